/*-------------------------------------------------------------------------
 *
 * table_owner.h
 *	  Statements on an application table run as its owner, in a
 *	  security-restricted operation (src/privilege/table_owner.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_TABLE_OWNER_H
#define D365_TABLE_OWNER_H

#include "fmgr.h"

extern Datum d365_owner_statement(Oid relid, const char *op, const char *sql,
								  Datum columns, int nargs, Oid *types,
								  Datum *values, char *nulls, Oid restype,
								  bool *isnull);
extern bool d365_links_wait_set(bool wait);

#endif							/* D365_TABLE_OWNER_H */
