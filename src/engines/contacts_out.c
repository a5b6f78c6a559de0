/*-------------------------------------------------------------------------
 *
 * contacts_out.c
 *	  Outgoing contacts: a thin engine on the pipeline.
 *
 * The select and map stages are d365._contact_work_sql() (the mapped
 * columns become the JSON body; a linked contact sends only what differs
 * from the synced snapshot), the record stage is d365._contact_record()
 * (link columns, state, back-off), both in sql/install/05_contacts_out.sql.  This file
 * wires them to the pipeline and exposes the SQL functions:
 *
 *	 d365_sync_contacts()		the scheduled job (skips when disabled or
 *								when another run holds the job's lock)
 *	 d365_sync_contact(key)		"Import to Dynamics 365": one contact, now,
 *								whatever its score; raises on failure
 *
 * When match fields are marked, an unlinked contact is first looked up in
 * Dynamics (the pipeline's look-up stage, d365._contact_lookup_path and
 * _resolve): one hit is linked and sent only what differs, several fail.
 *
 * Creation is an upsert (PATCH contacts(<id>) without If-Match) on an id
 * derived from the installation and the key, so no failure or retry can
 * make a second Dynamics contact; updates carry If-Match: * so they never
 * re-create a contact deleted in Dynamics (404: unlinked and reported).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/lsyscache.h"

#include "activities.h"
#include "jobs.h"
#include "pipeline.h"
#include "settings.h"
#include "spi_util.h"
#include "table_owner.h"
#include "job_role.h"

PG_FUNCTION_INFO_V1(d365_sync_contacts);
PG_FUNCTION_INFO_V1(d365_sync_contact);

/*
 * contacts_body
 *		The scheduled run: nothing when contact sync is disabled, else every
 *		qualifying or changed contact through the pipeline.
 */
static void
contacts_body(D365Run *run, void *arg)
{
	D365Settings *settings = d365_settings_load();
	char	   *work_sql;

	/* arg: the call named the map "contact" (d365_job_contacts_named) */
	if (arg == NULL && d365_contact_map_disabled(run))
		return;
	if (!settings->contact_sync_enabled || settings->min_score <= 0)
	{
		run->message = psprintf("contact sync is disabled (contact_sync_enabled = %s, min_score = %d)",
								settings->contact_sync_enabled ? "true" : "false",
								settings->min_score);
		return;
	}
	work_sql = d365_sql_text("SELECT d365._contact_work_sql(true)", 0, NULL, NULL);
	d365_pipeline_process_lookup(run, work_sql, 0, NULL, NULL, "d365._contact_record",
								 "d365._contact_lookup");

	/*
	 * The records of contacts deleted here, with on_local_delete
	 * deactivate or delete (sql/install/16_contact_policies.sql)
	 */
	if (d365_sql_bool("SELECT to_regprocedure('d365._contact_delete_work_sql()') IS NOT NULL",
					  0, NULL, NULL, NULL) &&
		(work_sql = d365_sql_text("SELECT d365._contact_delete_work_sql()", 0, NULL, NULL)) != NULL)
		d365_pipeline_process(run, work_sql, 0, NULL, NULL, "d365._map_record");

	/*
	 * A new contact's pending activities (logged while it was not linked)
	 * go right after it instead of waiting for the activity job.
	 */
	if (settings->activity_sync_enabled && run->counts.created > 0)
		d365_activities_after_contacts();
}

/*
 * fold_body
 *		A contact run's first step: fold the changes the capture trigger
 *		queued into d365.contact_state.  Run before the body and kept when
 *		the body fails (Dynamics unreachable, say), so that failed runs
 *		during an outage do not fold the whole queue and roll it back again
 *		each time, and the queue holds at most the statements since the
 *		last run, not since the outage began.  Nothing when the extension's
 *		SQL objects predate the queue.
 */
static void
fold_body(D365Run *run, void *arg)
{
	if (d365_sql_bool("SELECT to_regprocedure('d365._contact_fold_changes()') IS NOT NULL",
					  0, NULL, NULL, NULL))
		(void) d365_sql_text("SELECT d365._contact_fold_changes()::text", 0, NULL, NULL);
}

/*
 * d365_job_contacts
 *		The scheduled contacts run under the job's lock (see jobs.h).
 */
bool
d365_job_contacts(D365Run *run)
{
	run->kind = "contacts";
	run->prepare = fold_body;
	return d365_run_execute(run, "d365-contact-sync", contacts_body, NULL);
}

/*
 * d365_job_contacts_named
 *		The same run for d365_sync('contact'): it runs a disabled map too.
 */
bool
d365_job_contacts_named(D365Run *run)
{
	static bool named = true;

	run->kind = "contacts";
	run->prepare = fold_body;
	return d365_run_execute(run, "d365-contact-sync", contacts_body, &named);
}

/*
 * d365_sync_contacts() -> (created, updated, unchanged, failed, unlinked,
 *							requests)
 */
static Datum
d365_sync_contacts_body(PG_FUNCTION_ARGS)
{
	D365Run		run;

	d365_run_init(&run, "contacts");
	(void) d365_job_contacts(&run);
	PG_RETURN_DATUM(d365_run_result(fcinfo, &run));
}

/* d365_sync_contacts() runs as the job role (src/common/job_role.c) */
Datum
d365_sync_contacts(PG_FUNCTION_ARGS)
{
	return d365_as_job(d365_sync_contacts_body, fcinfo);
}

/*
 * d365_sync_contact(contact_key anyelement) -> uuid
 *		Create or update one contact now.  The key may be of any type whose
 *		text form equals the key column's.  Raises the Dynamics error when
 *		the request fails (the contact stays pending for the scheduled job);
 *		when the contact turns out to be deleted in Dynamics it is unlinked,
 *		a WARNING says so and NULL is returned.
 */
static Datum
d365_sync_contact_body(PG_FUNCTION_ARGS)
{
	MemoryContext fncxt = CurrentMemoryContext;
	Oid			argtype = get_fn_expr_argtype(fcinfo->flinfo, 0);
	Oid			outfunc;
	bool		isvarlena;
	char	   *key;
	D365Run		run;
	char	   *work_sql;
	Oid			types[1] = {TEXTOID};
	Datum		args[1];
	MemoryContext spicxt;
	Datum		linked;
	bool		unlinked;
	bool		links_wait_was;

	if (!OidIsValid(argtype))
		elog(ERROR, "could not determine the type of the contact key");
	getTypeOutputInfo(argtype, &outfunc, &isvarlena);
	key = OidOutputFunctionCall(outfunc, PG_GETARG_DATUM(0));
	args[0] = CStringGetTextDatum(key);

	d365_run_init(&run, "contact");
	SPI_connect();
	work_sql = d365_sql_text("SELECT d365._contact_work_sql(false)", 0, NULL, NULL);

	/*
	 * The caller wants the id now: the link write waits for a row another
	 * transaction holds locked (up to lock_timeout) instead of leaving it
	 * for the next run, and says so when it gives up.
	 */
	links_wait_was = d365_links_wait_set(true);
	PG_TRY();
	{
		d365_pipeline_process_lookup(&run, work_sql, 1, types, args, "d365._contact_record",
									 "d365._contact_lookup");
	}
	PG_FINALLY();
	{
		d365_links_wait_set(links_wait_was);
	}
	PG_END_TRY();

	if (run.items == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("contact %s does not exist", key),
				 errhint("The key is looked up in the table registered by d365_attach_contacts().")));
	if (run.counts.unlinked > 0)
	{
		ereport(WARNING,
				(errcode(ERRCODE_WARNING),
				 errmsg("contact %s was deleted in Dynamics 365 and has been unlinked", key),
				 errhint("Call d365_sync_contact() again to create it anew.")));
		SPI_finish();
		PG_RETURN_NULL();
	}
	/* failed, or throttled / unreachable (then pending, without back-off) */
	if ((run.counts.failed > 0 || run.deferred > 0) && run.first_failure != NULL)
		d365_op_report(run.first_failure->op, ERROR);
	if (run.counts.failed > 0)
	{
		/*
		 * failed without a request: its match found no single Dynamics
		 * contact, or its link column holds an id d365sync did not write
		 */
		char	   *reason = d365_sql_text("SELECT last_error FROM d365.contact_state"
										   " WHERE contact_key = $1", 1, types, args);
		char	   *code = d365_sql_text("SELECT last_error_code FROM d365.contact_state"
										 " WHERE contact_key = $1", 1, types, args);

		if (code != NULL && strcmp(code, "d365sync.link") == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("contact %s %s", key, reason),
					 errhint("Set its dynamics365_related_id to NULL to have it created anew, or call d365_link_contact() to link it to the right Dynamics 365 contact.")));
		ereport(ERROR,
				(errcode(ERRCODE_CARDINALITY_VIOLATION),
				 errmsg("contact %s %s", key, reason ? reason : "could not be matched"),
				 errhint("Link it with d365_link_contact() to the right Dynamics 365 contact, or make its match fields unique in Dynamics 365.")));
	}

	/* like the scheduled run: a new contact's pending activities follow it */
	if (run.counts.created > 0 && d365_settings_load()->activity_sync_enabled)
		d365_activities_after_contacts();

	/* the id outlives the SPI connection */
	spicxt = MemoryContextSwitchTo(fncxt);
	linked = d365_sql_datum("SELECT d365._contact_link($1)", 1, types, args,
							UUIDOID, &unlinked);
	MemoryContextSwitchTo(spicxt);
	SPI_finish();
	if (unlinked)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(linked);
}

/* d365_sync_contact() runs as the job role (src/common/job_role.c) */
Datum
d365_sync_contact(PG_FUNCTION_ARGS)
{
	return d365_as_job(d365_sync_contact_body, fcinfo);
}
