/*-------------------------------------------------------------------------
 *
 * map_guard.c
 *	  The C part of the check every table map's run starts with.
 *
 * A map's run reads its table (and the tables its lookups point to) with
 * the rights of whoever runs it: the superuser, an admin, an operator, the
 * background worker, a pg_cron job.  The table's owner must not be able to
 * put code of its own there: d365._map_problem (sql/install/16_map_guard.sql)
 * checks the triggers, the key and the index; this file holds the part that
 * needs the table's lock and its relation cache entry, shared with the
 * contact table's check (d365_relation_problem, src/engines/contact_source.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"

#include "map_guard.h"

PG_FUNCTION_INFO_V1(d365_map_table_problem);

/*
 * d365._map_table_problem(tbl regclass) -> text
 *		Takes the table's ACCESS SHARE lock, to the end of the transaction,
 *		and says what is wrong with it as a mapped table (a view, a foreign
 *		table, rules, link columns of another type, dropped), or NULL.  Runs
 *		no user code.
 */
Datum
d365_map_table_problem(PG_FUNCTION_ARGS)
{
	Oid			relid;
	bool		dropped;
	char	   *problem;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	relid = PG_GETARG_OID(0);
	problem = d365_relation_problem(relid, &dropped);
	if (dropped)
		problem = psprintf("the table (OID %u) was dropped", relid);
	if (problem == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(problem));
}
