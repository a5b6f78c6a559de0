/*
 * map_guard.h
 *	  The check of a synced table that the contact table and every table map
 *	  share (src/capture/map_guard.c), used by src/engines/contact_source.c.
 */
#ifndef D365_MAP_GUARD_H
#define D365_MAP_GUARD_H

extern char *d365_relation_problem(Oid relid, bool *dropped);
extern char *d365_column_problem(Oid relid, const char *role, const char *name,
								 const Oid *types, int ntypes);

#endif
