/*-------------------------------------------------------------------------
 *
 * writers.h
 *	  d365sync's own writers, as this backend knows them (writers.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_WRITERS_H
#define D365_WRITERS_H

extern bool d365_recorder_set(bool active);
extern bool d365_recorder_active(void);
extern bool d365_link_writer_set(bool active);
extern bool d365_link_writer_active(void);
extern Oid	d365_map_own_write_set(Oid relid);
extern bool d365_map_own_write_active(Oid relid);

#endif							/* D365_WRITERS_H */
