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
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"

#include "spi_util.h"

PG_FUNCTION_INFO_V1(d365_contact_snapshot);

/* One call of the gate, handed to the owner-run steps. */
typedef struct SnapshotCall
{
	Datum		contact_key;
	Datum		settle;			/* jsonb, or NULL to read */
	bool		settle_null;
	MemoryContext result_cxt;	/* where the result is copied */
	Oid			contact_table;
	bool		no_table;
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
 *		caller must be allowed to update the attached contact table (any
 *		column); then d365.contact_state is read (settle NULL: returns the
 *		snapshot) or settle's fields are recorded as synced, as the owner of
 *		d365's tables, in a restricted operation that runs no user code.
 */
Datum
d365_contact_snapshot(PG_FUNCTION_ARGS)
{
	Oid			caller = GetUserId();
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

	if (pg_class_aclcheck(c.contact_table, caller, ACL_UPDATE) != ACLCHECK_OK &&
		pg_attribute_aclcheck_all(c.contact_table, caller, ACL_UPDATE,
								  ACLMASK_ANY) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for the sync state of contacts"),
				 errdetail("Only a role that may update the contact table may read or settle its sync state.")));

	d365_as_table_owner(owner, read_or_settle, &c);
	SPI_finish();

	if (c.result_null)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(c.result);
}
