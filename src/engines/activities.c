/*-------------------------------------------------------------------------
 *
 * activities.c
 *	  Activities: a thin engine on the pipeline.
 *
 * The select and map stages are d365._activity_work_sql() (pending
 * activities of linked contacts; type -> entity from d365.activity_type_map
 * and Dynamics metadata, entity set names from metadata; the built-in body
 * of d365._activity_body() with the custom mapper merged over it), the
 * record stage is d365._activity_record(); both live in
 * sql/install/06_activities.sql.
 * Every activity is created with a create-only upsert on the id chosen when
 * it was logged, so no retry creates it twice; phone calls and emails are
 * then completed with a second request.  This file wires them up:
 *
 *	 d365_sync_activities()		the scheduled job
 *	 d365._send_activity(id, strict)	one activity now (d365_log_activity,
 *								d365_create_task, d365_create_appointment)
 *	 d365_activities_after_contacts()	pending activities of the contacts a
 *								contact run just created or updated
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"

#include "activities.h"
#include "jobs.h"
#include "pipeline.h"
#include "settings.h"
#include "spi_util.h"
#include "job_role.h"

PG_FUNCTION_INFO_V1(d365_sync_activities);
PG_FUNCTION_INFO_V1(d365_send_activity);

static void
run_activities(D365Run *run, const char *mode, int64 one_id)
{
	Oid			types[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(one_id)};
	char	   *work_sql;

	work_sql = d365_sql_text("SELECT d365._activity_work_sql($1::text, $2)", 2,
							 (Oid[]) {TEXTOID, INT8OID},
							 (Datum[]) {CStringGetTextDatum(mode), Int64GetDatum(one_id)});
	d365_pipeline_process(run, work_sql, strcmp(mode, "one") == 0 ? 1 : 0,
						  types, args, "d365._activity_record");
}

static void
activities_body(D365Run *run, void *arg)
{
	D365Settings *settings = d365_settings_load();

	if (!settings->activity_sync_enabled)
	{
		run->message = pstrdup("activity sync is disabled (activity_sync_enabled = false)");
		return;
	}
	run_activities(run, "scheduled", 0);
}

/*
 * d365_job_activities
 *		The scheduled activities run under the job's lock (see jobs.h).
 */
bool
d365_job_activities(D365Run *run)
{
	run->kind = "activities";
	return d365_run_execute(run, "d365-activity-sync", activities_body, NULL);
}

/*
 * d365_sync_activities() -> (created, failed, requests)
 */
static Datum
d365_sync_activities_body(PG_FUNCTION_ARGS)
{
	D365Run		run;

	d365_run_init(&run, "activities");
	(void) d365_job_activities(&run);
	PG_RETURN_DATUM(d365_run_result(fcinfo, &run));
}

/* d365_sync_activities() runs as the job role (src/common/job_role.c) */
Datum
d365_sync_activities(PG_FUNCTION_ARGS)
{
	return d365_as_job(d365_sync_activities_body, fcinfo);
}

/*
 * d365_activities_after_contacts
 *		Send the pending activities of the contacts the current transaction
 *		synced, as a run of its own (recorded as kind "activities").
 *		Requires an SPI connection; called by the contact engine.
 */
static void
recent_body(D365Run *run, void *arg)
{
	run_activities(run, "recent", 0);
}

void
d365_activities_after_contacts(void)
{
	D365Run		run;

	/*
	 * Guarded: a failure here must not undo the contacts just recorded.
	 * The activities stay pending for their own job.
	 */
	d365_run_init(&run, "activities");
	(void) d365_run_guarded(&run, recent_body, NULL);
	if (run.items > 0 || run.message != NULL)
		d365_run_record(&run);
}

static void
one_body(D365Run *run, void *arg)
{
	run_activities(run, "one", *(int64 *) arg);
}

/*
 * d365._send_activity(activity_id bigint, strict boolean) -> uuid
 *		Send one logged activity now.  strict: a failure is an ERROR (the
 *		caller's insert rolls back with it).  Not strict: a failure, even of
 *		the connection or the token, becomes a WARNING and the activity stays
 *		pending for the scheduled sync.  Returns the Dynamics id once the
 *		activity exists there, else NULL.
 */
Datum
d365_send_activity(PG_FUNCTION_ARGS)
{
	MemoryContext fncxt = CurrentMemoryContext;
	MemoryContext spicxt;
	int64		id = PG_GETARG_INT64(0);
	bool		strict = PG_GETARG_BOOL(1);
	D365Run		run;
	Datum		synced;
	bool		pending;
	char	   *error;
	Oid			types[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(id)};

	d365_run_init(&run, "activity");
	if (strict)
	{
		SPI_connect();
		run_activities(&run, "one", id);
		if ((run.counts.failed > 0 || run.deferred > 0) && run.first_failure != NULL)
			d365_op_report(run.first_failure->op, ERROR);
	}
	else
	{
		run.no_record = true;
		/* a failure was reported as a WARNING by d365_run_execute */
		if (!d365_run_execute(&run, NULL, one_body, &id))
			ereport(WARNING,
					(errcode(ERRCODE_WARNING),
					 errmsg("activity %lld was not sent to Dynamics 365 and stays pending",
							(long long) id),
					 errhint("d365_sync_activities() will send it.")));
		SPI_connect();
	}

	/* the id outlives the SPI connection */
	spicxt = MemoryContextSwitchTo(fncxt);
	synced = d365_sql_datum("SELECT dynamics_activity_id FROM d365.activity"
							" WHERE id = $1 AND synced_at IS NOT NULL", 1, types, args,
							UUIDOID, &pending);
	MemoryContextSwitchTo(spicxt);
	if (pending)
	{
		if (run.deferred > 0 && run.first_failure != NULL)
			error = d365_op_summary(run.first_failure->op);	/* not recorded */
		else
			error = d365_sql_text("SELECT coalesce(last_error, 'the contact is not linked or activity sync is off')"
								  " FROM d365.activity WHERE id = $1", 1, types, args);
		if (strict)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("activity %lld was not created in Dynamics 365", (long long) id),
					 errdetail_internal("%s", error)));
		else if (run.counts.failed > 0 || run.deferred > 0)
			ereport(WARNING,
					(errcode(ERRCODE_WARNING),
					 errmsg("activity %lld was not created in Dynamics 365 and stays pending",
							(long long) id),
					 errdetail_internal("%s", error),
					 errhint("d365_sync_activities() will retry it.")));
		SPI_finish();
		PG_RETURN_NULL();
	}
	SPI_finish();
	PG_RETURN_DATUM(synced);
}
