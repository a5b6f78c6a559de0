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
 *		one at a time by d365._pull_record(), so memory stays flat.  The
 *		reading is the pipeline's change-tracking reader (pipeline_pull.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"

#include "jobs.h"
#include "pipeline.h"
#include "runs.h"
#include "spi_util.h"
#include "job_role.h"

PG_FUNCTION_INFO_V1(d365_pull_changes);

/*
 * start_path
 *		The first request of a full read (d365._pull_start_path()); raises
 *		when there is nothing to read because no contact field is mapped.
 */
static char *
start_path(const D365PullEngine *engine)
{
	char	   *path = d365_sql_text("SELECT d365._pull_start_path()", 0, NULL, NULL);

	if (path == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no contact field is mapped for incoming changes"),
				 errhint("Attach the contact table with d365_attach_contacts() and map its fields in d365.field_map, with direction both or in.")));
	return path;
}

/* The contact pull: the pipeline's change-tracking reader on contacts. */
static void
pull_body(D365Run *run, void *arg)
{
	D365PullEngine engine = {0};
	bool		full;
	int			npages;

	/* arg: the call named the map "contact" (d365_job_pull_named) */
	if (arg == NULL && d365_contact_map_disabled(run))
		return;
	engine.state_key = "contact";
	engine.start_path = start_path;
	engine.record_sql = "SELECT updated, unchanged, failed, unlinked"
		" FROM d365._pull_record($1)";
	engine.no_delta_hint = "Enable change tracking for the contact table in Dynamics 365 (Power Apps: Tables, Contact, Properties, Track changes).";
	npages = d365_pipeline_pull(run, &engine, &full);
	if (full && run->message == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(run->cxt);

		run->message = psprintf("baseline: read all contacts in %d page(s)", npages);
		MemoryContextSwitchTo(old);
	}
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
 * d365_job_pull_named
 *		The same run for d365_pull('contact'): it runs a disabled map too.
 */
bool
d365_job_pull_named(D365Run *run)
{
	static bool named = true;

	run->kind = "pull";
	return d365_run_execute(run, "d365-pull-changes", pull_body, &named);
}

/*
 * d365_pull_changes() -> (updated, unchanged, failed, unlinked, requests)
 */
static Datum
d365_pull_changes_body(PG_FUNCTION_ARGS)
{
	D365Run		run;

	d365_run_init(&run, "pull");
	(void) d365_job_pull(&run);
	PG_RETURN_DATUM(d365_run_result(fcinfo, &run));
}

/* d365_pull_changes() runs as the job role (src/common/job_role.c) */
Datum
d365_pull_changes(PG_FUNCTION_ARGS)
{
	return d365_as_job(d365_pull_changes_body, fcinfo);
}
