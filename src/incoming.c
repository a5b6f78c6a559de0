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
 *		the snapshot gate (d365._contact_snapshot, contact_source.c) checks
 *		that the caller may update contacts.
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

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"

#include "jobs.h"
#include "runs.h"
#include "spi_util.h"

PG_FUNCTION_INFO_V1(d365_pull_changes);

/*
 * Add one page's counts from d365._pull_record() to the run.  The rows go
 * as json text, not jsonb: a string holding U+0000 fails its row alone
 * there, not the page.
 */
static void
record_page(D365Run *run, json_t *rows)
{
	Oid			types[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(d365_json_dump(rows))};

	d365_run_add_counts(run,
						SPI_execute_with_args("SELECT updated, unchanged, failed, unlinked"
											  " FROM d365._pull_record($1::pg_catalog.json)",
											  1, types, args, NULL, false, 1),
						"d365._pull_record");
}

/*
 * delta_link_refused
 *		Whether a failed read of a stored delta link means Dynamics will not
 *		take that link any more (a 4xx other than the ones about the
 *		credentials or throttling), so that a new full read is the remedy.
 */
static bool
delta_link_refused(const D365Op *op)
{
	return !op->ok && !op->transport_failure &&
		op->status >= 400 && op->status < 500 &&
		op->status != 401 && op->status != 403 && op->status != 429;
}

/*
 * start_path
 *		The first request of a full read (d365._pull_start_path()); raises
 *		when there is nothing to read because no contact field is mapped.
 */
static char *
start_path(void)
{
	char	   *path = d365_sql_text("SELECT d365._pull_start_path()", 0, NULL, NULL);

	if (path == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no contact field is mapped for incoming changes"),
				 errhint("Attach the contact table with d365_attach_contacts() and map its fields in d365.field_map, with direction both or in.")));
	return path;
}

static void
pull_body(D365Run *run, void *arg)
{
	D365Pages  *pages;
	D365Op	   *op;
	char	   *path;
	bool		full;
	int			npages = 0;
	const char *delta;
	Oid			types[2] = {TEXTOID, BOOLOID};
	MemoryContext old;

	path = d365_sql_text("SELECT delta_link FROM d365.pull_state WHERE entity = 'contact'",
						 0, NULL, NULL);
	full = (path == NULL);
	if (full)
		path = start_path();

	pages = d365_pages_open(d365_run_client(run), path, "odata.track-changes", 0);
	while ((op = d365_pages_next(pages)) != NULL)
	{
		if (!full && delta_link_refused(op))
		{
			/* the delta link was refused: start over with a full read */
			old = MemoryContextSwitchTo(run->cxt);
			run->message = psprintf("the delta link was refused (%s); took a new baseline",
									d365_op_summary(op));
			path = start_path();
			full = true;
			MemoryContextSwitchTo(old);
			d365_pages_restart(pages, path);
			continue;
		}
		if (!op->ok)
			d365_op_report(op, ERROR);
		if (!json_is_object(op->json) || !json_is_array(json_object_get(op->json, "value")))
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("a change-tracking page from Dynamics 365 has no \"value\" array"),
					 errcontext("Dynamics 365 request: GET %s", pages->path)));

		old = MemoryContextSwitchTo(pages->cxt);
		record_page(run, json_object_get(op->json, "value"));
		MemoryContextSwitchTo(old);
		npages++;
	}

	/* the last page carries the link the next pull continues from */
	delta = d365_json_str(pages->op->json, "@odata.deltaLink");
	if (delta == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("Dynamics 365 returned no delta link"),
				 errdetail("The last page of a change-tracking read carries @odata.deltaLink."),
				 errhint("Enable change tracking for the contact table in Dynamics 365 (Power Apps: Tables, Contact, Properties, Track changes).")));

	old = MemoryContextSwitchTo(pages->cxt);
	d365_sql_text("INSERT INTO d365.pull_state AS p (entity, delta_link, baseline_at, last_pull_at)"
				  " VALUES ('contact', $1, CASE WHEN $2 THEN now() END, now())"
				  " ON CONFLICT (entity) DO UPDATE SET delta_link = EXCLUDED.delta_link,"
				  " baseline_at = coalesce(EXCLUDED.baseline_at, p.baseline_at),"
				  " last_pull_at = EXCLUDED.last_pull_at RETURNING entity",
				  2, types,
				  (Datum[]) {CStringGetTextDatum(delta), BoolGetDatum(full)});
	MemoryContextSwitchTo(run->cxt);
	if (full && run->message == NULL)
		run->message = psprintf("baseline: read all contacts in %d page(s)", npages);
	MemoryContextSwitchTo(old);
	d365_pages_close(pages);
}

/*
 * d365_job_pull
 *		The scheduled pull run under the job's lock (see jobs.h).
 */
bool
d365_job_pull(D365Run *run)
{
	run->kind = "pull";
	return d365_run_execute(run, "d365-pull-changes", pull_body, NULL);
}

/*
 * d365_pull_changes() -> (updated, unchanged, failed, unlinked, requests)
 */
Datum
d365_pull_changes(PG_FUNCTION_ARGS)
{
	D365Run		run;

	d365_run_init(&run, "pull");
	(void) d365_job_pull(&run);
	PG_RETURN_DATUM(d365_run_result(fcinfo, &run));
}
