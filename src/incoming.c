/*-------------------------------------------------------------------------
 *
 * incoming.c
 *	  Incoming changes: Dynamics edits applied to the local contacts.
 *
 * Two ways in, one map stage.  Both end in d365._incoming_apply() (SQL):
 * it finds the contact linked to a Dynamics row, converts each mapped value
 * to its column's type, changes only what Dynamics changed since the last
 * sync, and records the values as synced so the next outgoing run does not
 * send them back (echo suppression).
 *
 *	 d365_update_contact(payload)  push: what a Power Automate flow posts.
 *		SQL over d365._incoming_apply(), with the caller's rights: the
 *		caller reads and updates the contact table itself (the Xperience
 *		endpoint's "user allowed to modify contacts"), so its triggers,
 *		row security and column privileges apply as usual.  d365's own
 *		tables are reached through owner-run helpers that run no user code;
 *		the snapshot gate here checks the caller may update contacts.
 *
 *	 d365_pull_changes()  pull, no inbound port: Dataverse change tracking.
 *		The first call reads every contact with Prefer: odata.track-changes
 *		(the baseline, compared and applied like any change) and keeps the
 *		@odata.deltaLink in d365.pull_state; later calls GET the delta link
 *		and get only what changed, deletions as $deletedEntity entries
 *		(unlinked and reported).  A delta link Dynamics refuses (expired
 *		after 7 days, say) falls back to a new full read.  Pages are applied
 *		one at a time by d365._pull_record(), so memory stays flat.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/jsonb.h"
#include "utils/acl.h"
#include "utils/memutils.h"

#include "d365sync.h"
#include "pipeline.h"

PG_FUNCTION_INFO_V1(d365_contact_snapshot);
PG_FUNCTION_INFO_V1(d365_pull_changes);

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
	Oid			save_userid;
	int			save_sec;
	char	   *relid_text;
	Oid			relid;
	char	   *result;
	MemoryContext callercxt = CurrentMemoryContext;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();

	SPI_connect();
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	relid_text = d365_sql_text("SELECT contact_table::oid::text FROM d365.contact_source",
							   0, NULL, NULL);
	SetUserIdAndSecContext(save_userid, save_sec);
	if (relid_text == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no contact table is attached")));
	relid = (Oid) strtoul(relid_text, NULL, 10);

	if (pg_class_aclcheck(relid, caller, ACL_UPDATE) != ACLCHECK_OK &&
		pg_attribute_aclcheck_all(relid, caller, ACL_UPDATE, ACLMASK_ANY) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for the sync state of contacts"),
				 errdetail("Only a role that may update the contact table may read or settle its sync state.")));

	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	if (PG_ARGISNULL(1))
		result = d365_sql_text("SELECT synced::text FROM d365.contact_state WHERE contact_key = $1",
							   1, (Oid[]) {TEXTOID}, (Datum[]) {PG_GETARG_DATUM(0)});
	else
		result = d365_sql_text("INSERT INTO d365.contact_state AS s (contact_key, synced, synced_seq)"
							   " VALUES ($1, $2, 0) ON CONFLICT (contact_key) DO UPDATE"
							   " SET synced = coalesce(s.synced, '{}') || EXCLUDED.synced"
							   " RETURNING synced::text",
							   2, (Oid[]) {TEXTOID, JSONBOID},
							   (Datum[]) {PG_GETARG_DATUM(0), PG_GETARG_DATUM(1)});
	SetUserIdAndSecContext(save_userid, save_sec);
	if (result != NULL)
		result = MemoryContextStrdup(callercxt, result);
	SPI_finish();

	if (result == NULL)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(result)));
}

/* Add one page's counts from d365._pull_record() to the run. */
static void
record_page(D365Run *run, const char *body)
{
	Oid			types[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(body)};
	HeapTuple	tup;
	TupleDesc	desc;
	int64	   *dest[4] = {&run->counts.updated, &run->counts.unchanged,
	&run->counts.failed, &run->counts.unlinked};
	int			c;

	if (SPI_execute_with_args("SELECT updated, unchanged, failed, unlinked"
							  " FROM d365._pull_record(($1::jsonb) -> 'value')",
							  1, types, args, NULL, false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "d365._pull_record did not return its counts");
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	for (c = 0; c < 4; c++)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(tup, desc, c + 1, &isnull);

		if (!isnull)
			*dest[c] += DatumGetInt32(d);
	}
	SPI_freetuptable(SPI_tuptable);
}

static void
pull_body(D365Run *run, void *arg)
{
	MemoryContext page_cxt;
	char	   *path;
	bool		full;
	int			pages = 0;
	Oid			types[2] = {TEXTOID, BOOLOID};

	path = d365_sql_text("SELECT delta_link FROM d365.pull_state WHERE entity = 'contact'",
						 0, NULL, NULL);
	full = (path == NULL);
	if (full)
		path = d365_sql_text("SELECT d365._pull_start_path()", 0, NULL, NULL);

	page_cxt = AllocSetContextCreate(CurrentMemoryContext, "d365sync pull page",
									 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		MemoryContext old = MemoryContextSwitchTo(page_cxt);
		D365Op	   *op = d365_op_make("GET", path, NULL);
		const char *next;
		const char *delta;

		op->headers = list_make1(psprintf("Prefer: odata.track-changes, odata.maxpagesize=%d",
										  d365_page_size));
		d365_client_execute(d365_run_client(run), &op, 1);

		if (!op->ok && !full && !op->transport_failure &&
			op->status >= 400 && op->status < 500 &&
			op->status != 401 && op->status != 403 && op->status != 429)
		{
			/* the delta link was refused: start over with a full read */
			MemoryContextSwitchTo(run->cxt);
			run->message = psprintf("the delta link was refused (%s); took a new baseline",
									d365_op_summary(op));
			path = d365_sql_text("SELECT d365._pull_start_path()", 0, NULL, NULL);
			full = true;
			MemoryContextSwitchTo(old);
			MemoryContextReset(page_cxt);
			continue;
		}
		if (!op->ok)
			d365_op_report(op, ERROR);
		if (!json_is_object(op->json) || !json_is_array(json_object_get(op->json, "value")))
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("a change-tracking page from Dynamics 365 has no \"value\" array"),
					 errcontext("Dynamics 365 request: GET %s", path)));

		record_page(run, op->http->response);
		pages++;

		next = d365_json_str(op->json, "@odata.nextLink");
		delta = d365_json_str(op->json, "@odata.deltaLink");
		MemoryContextSwitchTo(run->cxt);
		if (next != NULL)
		{
			path = pstrdup(next);
			MemoryContextSwitchTo(old);
			MemoryContextReset(page_cxt);
			CHECK_FOR_INTERRUPTS();
			continue;
		}
		if (delta == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("Dynamics 365 returned no delta link"),
					 errdetail("The last page of a change-tracking read carries @odata.deltaLink."),
					 errhint("Enable change tracking for the contact table in Dynamics 365 (Power Apps: Tables, Contact, Properties, Track changes).")));

		d365_sql_text("INSERT INTO d365.pull_state AS p (entity, delta_link, baseline_at, last_pull_at)"
					  " VALUES ('contact', $1, CASE WHEN $2 THEN now() END, now())"
					  " ON CONFLICT (entity) DO UPDATE SET delta_link = EXCLUDED.delta_link,"
					  " baseline_at = coalesce(EXCLUDED.baseline_at, p.baseline_at),"
					  " last_pull_at = EXCLUDED.last_pull_at RETURNING entity",
					  2, types,
					  (Datum[]) {CStringGetTextDatum(delta), BoolGetDatum(full)});
		if (full && run->message == NULL)
			run->message = psprintf("baseline: read all contacts in %d page(s)", pages);
		MemoryContextSwitchTo(old);
		break;
	}
	MemoryContextDelete(page_cxt);
}

/*
 * d365_pull_changes() -> (updated, unchanged, failed, unlinked, requests)
 */
Datum
d365_pull_changes(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	D365Run		run;
	Datum		values[5];
	bool		nulls[5] = {false};

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	d365_run_init(&run, "pull");
	(void) d365_run_execute(&run, "d365-pull-changes", pull_body, NULL);

	values[0] = Int32GetDatum((int32) run.counts.updated);
	values[1] = Int32GetDatum((int32) run.counts.unchanged);
	values[2] = Int32GetDatum((int32) run.counts.failed);
	values[3] = Int32GetDatum((int32) run.counts.unlinked);
	values[4] = Int32GetDatum(run.client ? (int32) run.client->requests : 0);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}
