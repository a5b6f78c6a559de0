/*
 * map_guard.h
 *	  The check of a synced table that the contact table and every table map
 *	  share (src/engines/contact_source.c, src/capture/map_guard.c).
 */
#ifndef D365_MAP_GUARD_H
#define D365_MAP_GUARD_H

extern char *d365_relation_problem(Oid relid, bool *dropped);

#endif
