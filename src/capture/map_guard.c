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
 * contact table's check (src/engines/contact_source.c): d365_relation_problem.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/relation.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "map_guard.h"

PG_FUNCTION_INFO_V1(d365_map_table_problem);

/* A relation's or type's name as regclass / regtype print it. */
static char *
regclass_text(Oid relid)
{
	return DatumGetCString(DirectFunctionCall1(regclassout, ObjectIdGetDatum(relid)));
}

static char *
regtype_text(Oid typid)
{
	return DatumGetCString(DirectFunctionCall1(regtypeout, ObjectIdGetDatum(typid)));
}

/* what a relation of that kind is called in a message */
static const char *
relkind_name(char relkind)
{
	switch (relkind)
	{
		case RELKIND_VIEW:
			return "view";
		case RELKIND_MATVIEW:
			return "materialized view";
		case RELKIND_FOREIGN_TABLE:
			return "foreign table";
		case RELKIND_SEQUENCE:
			return "sequence";
		case RELKIND_INDEX:
		case RELKIND_PARTITIONED_INDEX:
			return "index";
		default:
			return "relation of another kind";
	}
}

/*
 * d365_column_problem
 *		What is wrong with column name of relid for the given role ("score",
 *		"link"), or NULL: it must exist (a user column) and have
 *		one of the ntypes types.  The messages are those the SQL checks of
 *		earlier versions gave.  Reads the catalog caches, which are current
 *		once the caller holds the table's lock.
 */
char *
d365_column_problem(Oid relid, const char *role, const char *name,
					const Oid *types, int ntypes)
{
	AttrNumber	attnum = get_attnum(relid, name);
	Oid			typid;
	int			i;

	if (attnum <= 0)
		return psprintf("%s column \"%s\" of %s was renamed or dropped",
						role, name, regclass_text(relid));
	typid = get_atttype(relid, attnum);
	for (i = 0; i < ntypes; i++)
		if (typid == types[i])
			return NULL;
	return psprintf("column \"%s\" of %s has type %s, which d365sync does not support",
					name, regclass_text(relid), regtype_text(typid));
}

/*
 * d365_relation_problem
 *		The part of an attachment's check that every table d365sync syncs
 *		shares (the contact table, src/engines/contact_source.c, and each table map).  Takes
 *		the relation's ACCESS SHARE lock (kept to the end of the transaction,
 *		so no ALTER TABLE, CREATE RULE or DROP can change it between this
 *		check and the statements that rely on it), then requires a plain or
 *		partitioned table without rewrite rules, whose link columns are the
 *		built-in uuid and timestamptz.  A view (CREATE RULE "_RETURN" turns
 *		an empty table into one), a foreign table, a rule or a link column of
 *		the owner's own type would run code of the owner's making with the
 *		rights of whoever reads or writes the table.  Sets *dropped (and
 *		returns NULL) when the relation is gone; otherwise returns what is
 *		wrong, or NULL.  Runs no user code.
 */
char *
d365_relation_problem(Oid relid, bool *dropped)
{
	static const Oid link_type[] = {UUIDOID};
	static const Oid stamp_type[] = {TIMESTAMPTZOID};
	Relation	rel;
	char		relkind;
	bool		has_rules;
	char	   *problem;

	*dropped = false;
	if (SearchSysCacheExists1(RELOID, ObjectIdGetDatum(relid)))
		LockRelationOid(relid, AccessShareLock);
	if (!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(relid)))
	{
		*dropped = true;
		return NULL;
	}
	relkind = get_rel_relkind(relid);
	if (relkind != RELKIND_RELATION && relkind != RELKIND_PARTITIONED_TABLE)
		return psprintf("%s is a %s, not a table",
						regclass_text(relid), relkind_name(relkind));
	/* pg_class.relhasrules may stay set after the last rule is dropped */
	rel = relation_open(relid, NoLock);
	has_rules = rel->rd_rules != NULL && rel->rd_rules->numLocks > 0;
	relation_close(rel, NoLock);
	if (has_rules)
		return psprintf("%s has rewrite rules (CREATE RULE), which d365sync does not run",
						regclass_text(relid));
	problem = d365_column_problem(relid, "link", "dynamics365_related_id", link_type, 1);
	if (problem == NULL)
		problem = d365_column_problem(relid, "link", "dynamics365_synchronized_on", stamp_type, 1);
	return problem;
}

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
