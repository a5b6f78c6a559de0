/*-------------------------------------------------------------------------
 *
 * contact_source.c
 *	  The attached contact table, as far as C is concerned: the privilege
 *	  gate to a contact's synced snapshot.
 *
 * The contact source (d365.contact_source: which table, which key column,
 * how the score is read), its capture triggers and the field map are SQL
 * (sql/install/03_contact_source.sql).  What needs C is the gate through
 * which functions running with their caller's rights (d365_update_contact)
 * reach d365.contact_state, which only the owner of d365's tables may
 * touch: the caller's right is checked on the contact table itself, then
 * the state is read or written as the owner.
 *
 * It also checks the attached table's columns under the table's lock
 * (d365._contact_table_problem): the work query, d365_status() and the
 * incoming applies compare the score and link columns with built-in types,
 * and a column of the owner's own type would bring the owner's implicit
 * casts into those comparisons, run with the caller's rights.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/relation.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "map_guard.h"
#include "spi_util.h"
#include "job_role.h"

PG_FUNCTION_INFO_V1(d365_contact_snapshot);
PG_FUNCTION_INFO_V1(d365_contact_table_problem);

/* One call of the gate, handed to the owner-run steps. */
typedef struct SnapshotCall
{
	Datum		contact_key;
	Datum		settle;			/* jsonb, or NULL to read */
	bool		settle_null;
	MemoryContext result_cxt;	/* where the result is copied */
	Oid			contact_table;
	bool		no_table;
	char	   *key_column;
	char	   *columns;		/* the columns involved, comma-separated */
	bool		unknown_field;	/* settle names a field that is not mapped */
	Datum		result;
	bool		result_null;
} SnapshotCall;

/* as the owner: the attached contact table */
static void
read_contact_table(void *arg)
{
	SnapshotCall *c = (SnapshotCall *) arg;

	c->contact_table = d365_sql_oid("SELECT contact_table::oid FROM d365.contact_source",
									0, NULL, NULL, &c->no_table);
	if (c->no_table)
		return;
	c->key_column = d365_sql_text("SELECT key_column::text FROM d365.contact_source", 0, NULL, NULL);
	/*
	 * The columns whose values the snapshot holds: to read it, every mapped
	 * column; to settle, the columns of the fields settled.
	 */
	if (c->settle_null)
		c->columns = d365_sql_text("SELECT pg_catalog.string_agg(f.column_name::text, ',')"
								   " FROM d365.field_map f", 0, NULL, NULL);
	else
	{
		c->columns = d365_sql_text("SELECT pg_catalog.string_agg(f.column_name::text, ',')"
								   " FROM d365.field_map f"
								   " WHERE f.dynamics_field IN (SELECT pg_catalog.jsonb_object_keys($1))",
								   1, (Oid[]) {JSONBOID}, (Datum[]) {c->settle});
		c->unknown_field = d365_sql_bool("SELECT EXISTS (SELECT FROM pg_catalog.jsonb_object_keys($1) k"
										 " WHERE k NOT IN (SELECT f.dynamics_field FROM d365.field_map f))",
										 1, (Oid[]) {JSONBOID}, (Datum[]) {c->settle}, NULL);
	}
}

/*
 * check_column_right
 *		ERROR unless the caller holds mode (ACL_SELECT, ACL_UPDATE) on the
 *		column of the contact table.
 */
static void
check_column_right(Oid relid, const char *column, AclMode mode, Oid caller)
{
	AttrNumber	attnum = get_attnum(relid, column);

	if (attnum != InvalidAttrNumber &&
		(pg_class_aclcheck(relid, caller, mode) == ACLCHECK_OK ||
		 pg_attribute_aclcheck(relid, attnum, caller, mode) == ACLCHECK_OK))
		return;
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied for the sync state of contacts"),
			 errdetail("The sync state holds the values of the mapped columns: reading it takes SELECT on each of them and on the key, settling a field takes SELECT and UPDATE on its column; column \"%s\" is missing the %s right.",
					   column, mode == ACL_SELECT ? "SELECT" : "UPDATE")));
}

/* as the owner: read the snapshot, or merge settle into it */
static void
read_or_settle(void *arg)
{
	SnapshotCall *c = (SnapshotCall *) arg;
	MemoryContext old = MemoryContextSwitchTo(c->result_cxt);

	if (c->settle_null)
		c->result = d365_sql_datum("SELECT synced FROM d365.contact_state WHERE contact_key = $1",
								   1, (Oid[]) {TEXTOID}, (Datum[]) {c->contact_key},
								   JSONBOID, &c->result_null);
	else
		c->result = d365_sql_datum("INSERT INTO d365.contact_state AS s (contact_key, synced, synced_seq)"
								   " VALUES ($1, $2, 0) ON CONFLICT (contact_key) DO UPDATE"
								   " SET synced = coalesce(s.synced, '{}') || EXCLUDED.synced"
								   " RETURNING synced",
								   2, (Oid[]) {TEXTOID, JSONBOID},
								   (Datum[]) {c->contact_key, c->settle},
								   JSONBOID, &c->result_null);
	MemoryContextSwitchTo(old);
}

/*
 * d365._contact_snapshot(contact_key text, settle jsonb) -> jsonb
 *		The gate through which d365_update_contact(), running with its
 *		caller's rights, reads and writes a contact's synced snapshot.  The
 *		caller must hold SELECT on the key and on every mapped column to
 *		read it, SELECT and UPDATE on the column of each field it settles
 *		(only mapped fields can be); then d365.contact_state is read (settle NULL: returns the
 *		snapshot) or settle's fields are recorded as synced, as the owner of
 *		d365's tables, in a restricted operation that runs no user code.
 */
Datum
d365_contact_snapshot(PG_FUNCTION_ARGS)
{
	Oid			caller = d365_job_caller();
	Oid			owner = d365_table_owner("settings");
	SnapshotCall c;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();

	memset(&c, 0, sizeof(c));
	c.contact_key = PG_GETARG_DATUM(0);
	c.settle_null = PG_ARGISNULL(1);
	c.settle = c.settle_null ? (Datum) 0 : PG_GETARG_DATUM(1);
	c.result_cxt = CurrentMemoryContext;

	SPI_connect();
	d365_as_table_owner(owner, read_contact_table, &c);
	if (c.no_table)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no contact table is attached")));

	if (c.unknown_field)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("only mapped Dynamics fields can be settled")));
	check_column_right(c.contact_table, c.key_column, ACL_SELECT, caller);
	if (c.columns != NULL)
	{
		char	   *col;
		char	   *save;

		for (col = strtok_r(c.columns, ",", &save); col != NULL; col = strtok_r(NULL, ",", &save))
		{
			check_column_right(c.contact_table, col, ACL_SELECT, caller);
			if (!c.settle_null)
				check_column_right(c.contact_table, col, ACL_UPDATE, caller);
		}
	}

	d365_as_table_owner(owner, read_or_settle, &c);
	SPI_finish();

	if (c.result_null)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(c.result);
}

/*
 * d365._contact_table_problem(tbl regclass, score_column name) -> text
 *		The shared table check (d365_relation_problem: the lock, a table
 *		without rules, the link columns) and the score column, which the
 *		work query compares with built-in operators (a built-in numeric
 *		type).  (The key's type cannot change while the capture trigger's
 *		WHEN clause names the column.)  Returns what is wrong, or NULL.
 *		Runs no user code.
 */
Datum
d365_contact_table_problem(PG_FUNCTION_ARGS)
{
	static const Oid score_types[] = {INT2OID, INT4OID, INT8OID, NUMERICOID, FLOAT4OID, FLOAT8OID};
	Oid			relid;
	bool		dropped;
	char	   *problem;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	relid = PG_GETARG_OID(0);
	problem = d365_relation_problem(relid, &dropped);
	if (dropped)
		PG_RETURN_TEXT_P(cstring_to_text(psprintf("the attached table (OID %u) was dropped", relid)));
	if (problem == NULL)
		problem = d365_column_problem(relid, "score", NameStr(*PG_GETARG_NAME(1)),
								 score_types, lengthof(score_types));
	if (problem == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(problem));
}
