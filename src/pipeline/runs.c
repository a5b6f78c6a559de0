/*-------------------------------------------------------------------------
 *
 * runs.c
 *	  The life of one sync run: its client, its counts, the lock that keeps
 *	  a job from running twice at once, the error capture, its row in
 *	  d365.sync_run and the result row of the SQL function that ran it.
 *
 * d365_run_execute() wraps an engine's body for the scheduled jobs: it
 * takes the job's row lock in d365.job_lock, to the end of the transaction
 * (a second run of the same job skips instead of duplicating work; no role
 * that may not run the jobs can hold it), runs the body in a subtransaction so
 * that a failure (no token, a dropped mapping) is recorded in d365.sync_run
 * and reported as a WARNING instead of being lost with the transaction, and
 * re-throws cancels and timeouts so they keep their SQLSTATE.  Remote
 * effects of a rolled-back run are harmless: creates are upserts on ids
 * chosen locally, and the items simply stay pending.
 *
 * What a run does in between is the engine's: usually one or more passes
 * of the chunk pipeline (pipeline.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "auth.h"
#include "d365sync.h"
#include "progress.h"
#include "runs.h"
#include "spi_util.h"

/*
 * d365_run_init
 *		Start a run of the given kind (d365.sync_run.kind).  ERROR on a hot
 *		standby, before anything is selected or sent: a run must record
 *		what it sent, and a standby cannot.
 */
void
d365_run_init(D365Run *run, const char *kind)
{
	d365_http_require_primary();
	memset(run, 0, sizeof(D365Run));
	run->kind = kind;
	run->started = GetCurrentTimestamp();
	run->cxt = CurrentMemoryContext;
}

/*
 * d365_run_client
 *		The run's OData client, opened on first use so that a run with
 *		nothing to send needs neither credentials nor a token.
 */
D365Client *
d365_run_client(D365Run *run)
{
	if (run->client == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(run->cxt);

		run->client = d365_client_open();
		MemoryContextSwitchTo(old);
	}
	return run->client;
}

/*
 * d365_run_record
 *		Insert the run into d365.sync_run.  Requires an SPI connection.
 */
void
d365_run_record(D365Run *run)
{
	Oid			types[10] = {TEXTOID, TIMESTAMPTZOID, INT4OID, INT4OID, INT4OID,
	INT4OID, INT4OID, INT4OID, INT4OID, TEXTOID};
	Datum		values[10];
	char		nulls[11] = "          ";
	D365Client *c = run->client;
	char	   *skipped;

	values[0] = CStringGetTextDatum(run->kind);
	values[1] = TimestampTzGetDatum(run->started);
	values[2] = Int32GetDatum((int32) run->counts.created);
	values[3] = Int32GetDatum((int32) run->counts.updated);
	values[4] = Int32GetDatum((int32) run->counts.unchanged);
	values[5] = Int32GetDatum((int32) run->counts.failed);
	values[6] = Int32GetDatum((int32) run->counts.unlinked);
	values[7] = Int32GetDatum(c ? (int32) c->requests : 0);
	values[8] = Int32GetDatum(c ? (int32) c->throttled : 0);
	skipped = d365_client_skipped(c);
	if (run->message && skipped)
		values[9] = CStringGetTextDatum(psprintf("%s; %s", run->message, skipped));
	else if (run->message || skipped)
		values[9] = CStringGetTextDatum(run->message ? run->message : skipped);
	else
		nulls[9] = 'n';

	if (SPI_execute_with_args("INSERT INTO d365.sync_run (kind, started_at, created, updated,"
							  " unchanged, failed, unlinked, requests, throttled, message)"
							  " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
							  10, types, values, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not record the run in d365.sync_run");
}

static bool
is_interrupt(int sqlerrcode)
{
	return sqlerrcode == ERRCODE_QUERY_CANCELED ||
		sqlerrcode == ERRCODE_ADMIN_SHUTDOWN ||
		sqlerrcode == ERRCODE_CRASH_SHUTDOWN ||
		sqlerrcode == ERRCODE_IDLE_IN_TRANSACTION_SESSION_TIMEOUT;
}

/*
 * d365_run_guarded
 *		Run body(run, arg) in a subtransaction.  An error rolls back what the
 *		body did (its remote effects are idempotent, its items stay
 *		pending), is reported as a WARNING as it was (not when run->quiet),
 *		and is kept in run->message; cancels and shutdowns are re-thrown with their
 *		SQLSTATE.  Returns whether the body completed.  Requires an SPI
 *		connection.
 */
bool
d365_run_guarded(D365Run *run, D365RunBody body, void *arg)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool completed = true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		body(run, arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;

		if (is_interrupt(edata->sqlerrcode))
			ReThrowError(edata);

		/* the body's recorded outcomes were rolled back with it */
		memset(&run->counts, 0, sizeof(run->counts));
		run->message = psprintf("failed: %s", edata->message);
		completed = false;

		/* report the error as it was, at WARNING (unless run->quiet) */
		if (!run->quiet)
		{
			edata->elevel = WARNING;
			ThrowErrorData(edata);
		}
	}
	PG_END_TRY();
	return completed;
}

/*
 * prune_runs
 *		Delete the run history past d365.settings.run_history_retention.
 *		The library may be newer than the extension's SQL objects (between
 *		installing a release and ALTER EXTENSION UPDATE): without
 *		d365._prune_runs() nothing is pruned.  Requires an SPI connection.
 */
static void
prune_runs(void)
{
	bool		isnull;

	if (d365_sql_bool("SELECT to_regprocedure('d365._prune_runs()') IS NOT NULL",
					  0, NULL, NULL, NULL))
		(void) d365_sql_int32("SELECT d365._prune_runs()", 0, NULL, NULL, &isnull);
}

/*
 * d365_run_publish
 *		Show the run's counts so far to other sessions (progress.c); does
 *		nothing unless this backend reports a run.
 */
void
d365_run_publish(D365Run *run)
{
	D365ProgressCounts p;

	p.done = run->counts.created + run->counts.updated + run->counts.unchanged +
		run->counts.unlinked;
	p.failed = run->counts.failed;
	p.requests = run->client ? run->client->requests : 0;
	p.throttled = run->client ? run->client->throttled : 0;
	d365_progress_update(run, &p);
}

/*
 * take_job_lock
 *		Lock the job's row of d365.job_lock (FOR NO KEY UPDATE, to the end
 *		of the transaction) unless another transaction holds it: false then.
 *		Only a role that may run the jobs (UPDATE on d365.job_lock) can hold
 *		such a lock.  An ERROR when the row is missing.
 */
static bool
take_job_lock(const char *lock_name)
{
	const char *job = strcmp(lock_name, "d365-contact-sync") == 0 ? "contacts"
		: strcmp(lock_name, "d365-activity-sync") == 0 ? "activities"
		: strcmp(lock_name, "d365-pull-changes") == 0 ? "pull" : lock_name;
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(job)};

	/*
	 * An installation not yet updated to this version (ALTER EXTENSION
	 * d365sync UPDATE) has no d365.job_lock: the advisory lock of earlier
	 * versions, until it is updated.
	 */
	if (!OidIsValid(get_relname_relid("job_lock", get_namespace_oid("d365", false))))
		return d365_sql_bool("SELECT pg_catalog.pg_try_advisory_xact_lock(1144206901,"
							 " CASE $1 WHEN 'contacts' THEN 1 WHEN 'activities' THEN 2"
							 " WHEN 'pull' THEN 3 ELSE pg_catalog.hashtext($1) END)",
							 1, argtypes, args, NULL);
	if (d365_sql_int64("SELECT pg_catalog.count(*) FROM (SELECT FROM d365.job_lock l"
					   " WHERE l.job OPERATOR(pg_catalog.=) $1 FOR NO KEY UPDATE SKIP LOCKED) x",
					   1, argtypes, args, NULL) == 1)
		return true;
	if (!d365_sql_bool("SELECT EXISTS (SELECT FROM d365.job_lock l WHERE l.job OPERATOR(pg_catalog.=) $1)",
					   1, argtypes, args, NULL))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the lock row of job \"%s\" is missing from d365.job_lock", job),
				 errhint("INSERT INTO d365.job_lock (job) VALUES ('%s');", job)));
	return false;
}

/*
 * d365_run_execute
 *		Run body(run, arg) as one scheduled-job run.  When lock_name is not
 *		NULL and another transaction holds that job's lock, the run is
 *		skipped (run->skipped is set, and it is recorded with a message
 *		unless run->no_record) and false is returned.  The body runs
 *		guarded (d365_run_guarded), after run->prepare if set (guarded on
 *		its own, so that a failing body does not undo it).  The run is recorded in
 *		d365.sync_run unless run->no_record.  Connects to SPI itself.
 */
bool
d365_run_execute(D365Run *run, const char *lock_name, D365RunBody body, void *arg)
{
	bool		completed;
	bool		reporting;

	SPI_connect();

	if (lock_name != NULL && !take_job_lock(lock_name))
	{
		run->message = psprintf("skipped: another %s run is in progress", run->kind);
		run->skipped = true;
		if (!run->no_record)
			d365_run_record(run);
		SPI_finish();
		return false;
	}

	reporting = d365_progress_start(run->kind);
	/* what prepare did stays even when the body fails and rolls back */
	completed = run->prepare == NULL || d365_run_guarded(run, run->prepare, arg);
	if (completed)
		completed = d365_run_guarded(run, body, arg);
	d365_run_publish(run);

	if (!run->no_record)
	{
		d365_run_record(run);
		prune_runs();
	}
	if (reporting)
		d365_progress_end();
	SPI_finish();
	return completed;
}

/*
 * count_field
 *		The run's count a column of a counts row stands for, by the column's
 *		name (created, updated, unchanged, failed, unlinked); NULL for any
 *		other name.
 */
static int64 *
count_field(D365Counts *counts, const char *name)
{
	if (strcmp(name, "created") == 0)
		return &counts->created;
	if (strcmp(name, "updated") == 0)
		return &counts->updated;
	if (strcmp(name, "unchanged") == 0)
		return &counts->unchanged;
	if (strcmp(name, "failed") == 0)
		return &counts->failed;
	if (strcmp(name, "unlinked") == 0)
		return &counts->unlinked;
	return NULL;
}

/*
 * d365_run_add_counts
 *		Add the counts row a record function returned to the run: rc and
 *		SPI_tuptable are the result of the SELECT that called it, which must
 *		be one row whose columns are named as the counts are.  fn names the
 *		function in the error.  Frees the tuple table.
 */
void
d365_run_add_counts(D365Run *run, int rc, const char *fn)
{
	TupleDesc	desc;
	int			i;

	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "%s did not return its counts", fn);
	desc = SPI_tuptable->tupdesc;
	for (i = 0; i < desc->natts; i++)
	{
		int64	   *dest = count_field(&run->counts,
									   NameStr(TupleDescAttr(desc, i)->attname));
		bool		isnull;
		Datum		d;

		if (dest == NULL || SPI_gettypeid(desc, i + 1) != INT4OID)
			elog(ERROR, "%s returned an unexpected column \"%s\"", fn,
				 NameStr(TupleDescAttr(desc, i)->attname));
		d = SPI_getbinval(SPI_tuptable->vals[0], desc, i + 1, &isnull);
		if (!isnull)
			*dest += DatumGetInt32(d);
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * d365_run_result
 *		The result row of a sync function from its finished run.  Each
 *		column of the function's row type is filled by its name: created,
 *		updated, unchanged, failed, unlinked (the run's counts) or requests
 *		(HTTP exchanges, token requests included; 0 when no client opened).
 */
Datum
d365_run_result(FunctionCallInfo fcinfo, D365Run *run)
{
	TupleDesc	desc;
	Datum	   *values;
	bool	   *nulls;
	int			i;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	desc = BlessTupleDesc(desc);
	values = palloc0(sizeof(Datum) * desc->natts);
	nulls = palloc0(sizeof(bool) * desc->natts);
	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute attr = TupleDescAttr(desc, i);
		const char *name = NameStr(attr->attname);
		int64	   *count = count_field(&run->counts, name);
		int64		v;

		if (attr->attisdropped)
		{
			nulls[i] = true;
			continue;
		}
		if (count != NULL)
			v = *count;
		else if (strcmp(name, "requests") == 0)
			v = run->client ? run->client->requests : 0;
		else
			elog(ERROR, "a sync function's result has an unknown column \"%s\"", name);
		values[i] = Int32GetDatum((int32) v);
	}
	return HeapTupleGetDatum(heap_form_tuple(desc, values, nulls));
}
