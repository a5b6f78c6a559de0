/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The near-real-time background worker: sends what commits, pulls on an
 *	  interval.
 *
 * Registered from _PG_init when d365sync is in shared_preload_libraries;
 * one worker per cluster, connected to the database d365sync.database_name
 * names.  It is a thin driver over the engines: every pass runs the jobs of
 * worker_jobs.c -- the entry points of d365_sync_contacts(),
 * d365_sync_activities(), d365_pull_changes() and, for each table map, of
 * d365_sync(map) and d365_pull(map) (src/engines/jobs.h) -- each in a transaction
 * of its own, under the same lock as a scheduled run (d365.job_lock, a
 * map's row of d365.table_map), each with its own back-off.  The engines'
 * ids make a crash anywhere harmless: they are derived from committed
 * state or chosen before sending, and creates are upserts.
 *
 * Woken at commit.  A backend whose transaction changed a contact or a
 * mapped row or logged an activity arms a wake (d365_worker_wake_at_commit()
 * from the contact capture, d365._worker_wake() from the map capture,
 * d365_log_activity and the settings trigger); that only sets a flag, and a
 * transaction callback sets the worker's latch at COMMIT.  A rolled-back
 * transaction wakes nobody.  (A background worker has no client connection
 * to receive NOTIFY on, hence the latch.)  Whatever committed while a pass
 * ran is picked up by the next pass, in batches.  A slow poll
 * (REALTIME_POLL_MS) catches what no wake announces: COMMIT PREPARED,
 * back-offs that expired.
 *
 * Life cycle (see docs/worker.md):
 *	  - database missing: the worker connects to no database and polls
 *		pg_database each second; once it exists it exits with code 1 and the
 *		postmaster starts it again, connected (a process cannot change its
 *		database).  DROP DATABASE ... WITH (FORCE) terminates it the same way.
 *	  - extension missing: it polls pg_extension; CREATE EXTENSION wakes it.
 *	  - SIGTERM: exits at once (the run in progress rolls back; its items
 *		stay pending) with code 1, so the postmaster restarts it after
 *		D365_WORKER_RESTART_S seconds unless the server is shutting down.
 *	  - SIGHUP: configuration reloaded before the next pass; d365.settings
 *		is read again at every pass.
 *	  - a failing job: its error is logged once when the failure starts
 *		(and when it changes), once when it ends; meanwhile the job is
 *		retried with a back-off of 1 s doubling up to 60 s.
 *	  - no transaction is open while it waits, and a pass holds its locks
 *		for at most WORKER_PASS_MS (the run's time budget) plus the requests
 *		in flight, so the application's DDL never waits long behind it.
 *
 * Shared memory (D365Shared, worker_shmem.c) holds the worker's state for
 * d365_status(), the run-progress slots any backend may use and the latch
 * a commit sets.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/pmsignal.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "auth.h"
#include "d365sync.h"
#include "worker.h"
#include "worker_jobs.h"
#include "job_role.h"

/* seconds before the postmaster starts the worker again after it exited */
#define D365_WORKER_RESTART_S	3
/* time budget of one run of a pass: bounds how long its locks are held */
#define WORKER_PASS_MS			10000
/* poll while realtime is on, for what no commit announces */
#define REALTIME_POLL_MS		30000
/* wait with nothing to do (settings changes wake the worker anyway) */
#define IDLE_POLL_MS			60000
/* poll for the database, and for the extension */
#define DATABASE_POLL_MS		1000
#define EXTENSION_POLL_MS		5000
/* back-off of a failing job */
#define BACKOFF_MIN_MS			1000
#define BACKOFF_MAX_MS			60000
/* retry after a job was skipped because a scheduled run held its lock */
#define SKIPPED_RETRY_MS		2000
/* while Dynamics is down: one cheap request this often instead of a run */
#define PROBE_MS				1000
/* the longest pull_interval honoured (a year); longer ones pull yearly */
#define PULL_MS_MAX				INT64CONST(31536000000)

PGDLLEXPORT void d365_worker_main(Datum main_arg);

PG_FUNCTION_INFO_V1(d365_worker_state);

char	   *d365_worker_database = NULL;

/* ------------------------------------------------------------------------
 * Registration
 * ------------------------------------------------------------------------
 */

/*
 * d365_worker_init
 *		Called by _PG_init.  Only while shared_preload_libraries is being
 *		processed: define d365sync.database_name, ask for shared memory and
 *		register the worker.  Otherwise nothing (no worker, no shared
 *		memory: the scheduled jobs are the only way).
 */
void
d365_worker_init(void)
{
	BackgroundWorker bgw;

	if (!process_shared_preload_libraries_in_progress)
		return;

	DefineCustomStringVariable("d365sync.database_name",
							   "Database the d365sync background worker connects to.",
							   "The worker runs only when d365sync is in shared_preload_libraries.",
							   &d365_worker_database, "postgres",
							   PGC_POSTMASTER, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	d365_worker_role_init();

	d365_shmem_init();

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = D365_WORKER_RESTART_S;
	strlcpy(bgw.bgw_library_name, "d365sync", BGW_MAXLEN);
	strlcpy(bgw.bgw_function_name, "d365_worker_main", BGW_MAXLEN);
	strlcpy(bgw.bgw_name, "d365sync worker", BGW_MAXLEN);
	strlcpy(bgw.bgw_type, "d365sync worker", BGW_MAXLEN);
	RegisterBackgroundWorker(&bgw);
}

static const char *
phase_name(D365WorkerPhase phase)
{
	switch (phase)
	{
		case D365W_STOPPED:
			return "stopped";
		case D365W_NO_DATABASE:
			return "waiting for the database";
		case D365W_NO_EXTENSION:
			return "waiting for CREATE EXTENSION";
		case D365W_IDLE:
			return "idle";
		case D365W_SENDING:
			return "sending";
		case D365W_PULLING:
			return "pulling";
		case D365W_BACKING_OFF:
			return "backing off";
	}
	return "unknown";
}

static Datum
timestamp_or_null(TimestampTz t, bool *isnull)
{
	*isnull = (t == 0);
	return TimestampTzGetDatum(t);
}

/*
 * d365._worker_state() -> (preloaded, running, pid, database, state,
 *		realtime, started_at, last_wake, last_pass, last_pull, last_error,
 *		last_error_at)
 *		A snapshot of the worker's shared state.  Without the preload:
 *		preloaded false and everything else NULL.
 */
Datum
d365_worker_state(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[12];
	bool		nulls[12];
	D365Shared	s;
	int			i;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	for (i = 0; i < 12; i++)
		nulls[i] = true;
	values[0] = BoolGetDatum(d365_shared != NULL);
	nulls[0] = false;
	if (d365_shared != NULL)
	{
		SpinLockAcquire(&d365_shared->mutex);
		memcpy(&s, d365_shared, offsetof(D365Shared, progress));
		SpinLockRelease(&d365_shared->mutex);

		values[1] = BoolGetDatum(s.pid != 0);
		nulls[1] = false;
		values[2] = Int32GetDatum(s.pid);
		nulls[2] = (s.pid == 0);
		if (OidIsValid(s.dboid))
		{
			char	   *name = get_database_name(s.dboid);

			if (name != NULL)
			{
				values[3] = CStringGetTextDatum(name);
				nulls[3] = false;
			}
		}
		else if (s.pid != 0)
		{
			values[3] = CStringGetTextDatum(d365_worker_database);
			nulls[3] = false;
		}
		values[4] = CStringGetTextDatum(phase_name(s.pid != 0 ? s.phase : D365W_STOPPED));
		nulls[4] = false;
		values[5] = BoolGetDatum(s.realtime);
		nulls[5] = (s.pid == 0);
		values[6] = timestamp_or_null(s.started_at, &nulls[6]);
		values[7] = timestamp_or_null(s.last_wake, &nulls[7]);
		values[8] = timestamp_or_null(s.last_pass, &nulls[8]);
		values[9] = timestamp_or_null(s.last_pull, &nulls[9]);
		if (s.last_error[0] != '\0')
		{
			values[10] = CStringGetTextDatum(s.last_error);
			nulls[10] = false;
		}
		values[11] = timestamp_or_null(s.last_error_at, &nulls[11]);
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

/* ------------------------------------------------------------------------
 * The worker process
 * ------------------------------------------------------------------------
 */

static void
set_phase(D365WorkerPhase phase)
{
	SpinLockAcquire(&d365_shared->mutex);
	d365_shared->phase = phase;
	SpinLockRelease(&d365_shared->mutex);
}

/* on_shmem_exit: the worker is gone */
static void
worker_detach(int code, Datum arg)
{
	SpinLockAcquire(&d365_shared->mutex);
	d365_shared->pid = 0;
	d365_shared->latch = NULL;
	d365_shared->dboid = InvalidOid;
	d365_shared->phase = D365W_STOPPED;
	d365_shared->realtime = false;
	SpinLockRelease(&d365_shared->mutex);
}

static void
worker_attach(void)
{
	SpinLockAcquire(&d365_shared->mutex);
	d365_shared->pid = MyProcPid;
	d365_shared->latch = MyLatch;
	d365_shared->dboid = MyDatabaseId;
	d365_shared->started_at = GetCurrentTimestamp();
	d365_shared->phase = OidIsValid(MyDatabaseId) ? D365W_IDLE : D365W_NO_DATABASE;
	SpinLockRelease(&d365_shared->mutex);
	on_shmem_exit(worker_detach, (Datum) 0);
}

/*
 * wait_latch
 *		Sleep until the latch is set or timeout_ms passed (no transaction
 *		open); returns whether a commit (or anyone) woke us.  Reloads the
 *		configuration on SIGHUP; SIGTERM ends the process here (die), and
 *		so does the postmaster's death, even when there is no time to sleep
 *		(the HTTP layer also looks for it while requests are in flight).
 */
static bool
wait_latch(long timeout_ms)
{
	int			rc = 0;

	if (timeout_ms > 0)
	{
		pgstat_report_activity(STATE_IDLE, NULL);
		rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					   timeout_ms, PG_WAIT_EXTENSION);
	}
	else if (!PostmasterIsAlive())
		proc_exit(1);			/* a backlog: no sleep between passes */
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
	}
	return (rc & WL_LATCH_SET) != 0;
}

/*
 * probe_database
 *		Connected to no database, wait until d365sync.database_name exists
 *		and the role of d365sync.worker_role (if set) can connect, then exit
 *		so that the postmaster starts us again, connected to it as that
 *		role.  Logs once that it waits.  Does not return.
 */
static void
probe_database(void)
{
	bool		logged = false;
	char	   *role_logged = NULL;

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	worker_attach();
	for (;;)
	{
		Oid			dboid;
		char	   *role_problem;

		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		dboid = get_database_oid(d365_worker_database, true);
		role_problem = d365_worker_role_problem();
		if (role_problem != NULL)
			role_problem = MemoryContextStrdup(TopMemoryContext, role_problem);
		CommitTransactionCommand();
		/* the role it is to connect as must be fit to connect first */
		d365_worker_note_role_problem(role_problem, &role_logged);
		if (role_problem != NULL)
		{
			pfree(role_problem);
			(void) wait_latch(DATABASE_POLL_MS);
			continue;
		}
		if (OidIsValid(dboid))
		{
			SpinLockAcquire(&d365_shared->mutex);
			d365_shared->connect_next = true;
			SpinLockRelease(&d365_shared->mutex);
			ereport(LOG,
					(errmsg("d365sync worker found database \"%s\" and restarts to connect to it",
							d365_worker_database)));
			proc_exit(1);
		}
		if (!logged)
			ereport(LOG,
					(errmsg("d365sync worker is waiting for database \"%s\" to exist",
							d365_worker_database),
					 errhint("Create the database, or set d365sync.database_name and restart the server.")));
		logged = true;
		(void) wait_latch(DATABASE_POLL_MS);
	}
}

/*
 * Outage detection.  After a job failed, a probe (probe_dynamics) looks
 * whether Dynamics 365 answers at all.  While it does not, failing jobs are
 * not run (a run would select its work, fail and roll back); the probe is
 * repeated every PROBE_MS and the contact and map queues are folded at
 * every pass, so that they hold the rows changed rather than every
 * statement of the outage.  The first probe that gets an answer ends the
 * outage: the failing jobs run at once, whatever their back-off.
 */
static TimestampTz probe_at = 0;	/* next probe; 0: none (no job failed
									 * since the last answer) */
static bool dynamics_down = false;	/* the last probe found no answer */

/*
 * run_failure
 *		Why a completed run should count as failed for the worker's back-off:
 *		every request it sent failed to reach Dynamics or was throttled (the
 *		items stay pending without back-off of their own, see pipeline.c).
 *		NULL when it did not.
 */
static char *
run_failure(D365Run *run)
{
	D365Op	   *op;

	if (run->first_failure == NULL ||
		run->counts.created + run->counts.updated + run->counts.unchanged > 0)
		return NULL;
	op = run->first_failure->op;
	if (!op->transport_failure && op->status < 500 && op->status != 429)
		return NULL;
	return psprintf("%s: %s", d365_op_summary(op),
					op->error_message ? op->error_message : "no answer");
}

/* whether a completed run handled anything (items, or pulled changes) */
static bool
worked(D365Run *run)
{
	D365Counts *c = &run->counts;

	return run->items > 0 ||
		c->created + c->updated + c->unchanged + c->failed + c->unlinked > 0;
}

/*
 * note_outcome
 *		Keep the job's back-off and the shared last error up to date, and
 *		log a failure once when it starts or changes, and its end once.
 */
static void
note_outcome(WorkerJob *job, JobOutcome outcome, const char *error)
{
	TimestampTz now = GetCurrentTimestamp();

	if (outcome != JOB_FAILED)
	{
		if (job->logged_error != NULL)
		{
			ereport(LOG,
					(errmsg("d365sync worker: %s job works again after %ld s of failures",
							job->name,
							(long) ((now - job->failing_since) / USECS_PER_SEC))));
			d365_worker_clear_error(job->name);
			pfree(job->logged_error);
		}
		job->logged_error = NULL;
		job->backoff_ms = 0;
		job->retry_at = 0;
		return;
	}

	job->backoff_ms = job->backoff_ms == 0 ? BACKOFF_MIN_MS
		: Min(job->backoff_ms * 2, BACKOFF_MAX_MS);
	job->retry_at = TimestampTzPlusMilliseconds(now, job->backoff_ms);
	/* is Dynamics down? a probe at the next pass tells */
	if (probe_at == 0)
		probe_at = now;
	SpinLockAcquire(&d365_shared->mutex);
	snprintf(d365_shared->last_error, sizeof(d365_shared->last_error), "%s: %s",
			 job->name, error);
	d365_shared->last_error_at = now;
	SpinLockRelease(&d365_shared->mutex);

	if (job->logged_error != NULL && strcmp(job->logged_error, error) == 0)
		return;
	if (job->logged_error == NULL)
		job->failing_since = now;
	else
		pfree(job->logged_error);
	job->logged_error = MemoryContextStrdup(TopMemoryContext, error);
	ereport(LOG,
			(errcode(ERRCODE_CONNECTION_FAILURE),
			 errmsg("d365sync worker: %s job failed; retrying with back-off up to %d s",
					job->name, BACKOFF_MAX_MS / 1000),
			 errdetail_internal("%s", error),
			 errhint("This is logged once; the worker logs again when the job works or fails differently.")));
}

/*
 * run_job
 *		One run of a job in a transaction of its own, under the job's lock,
 *		with the worker's time budget.  Recorded in d365.sync_run only when
 *		it handled items or failed.  Any error (the extension dropped under
 *		us, a cancel) is caught here: the transaction rolls back and the job
 *		counts as failed.
 */
static JobOutcome
run_job(WorkerJob *job)
{
	MemoryContext worker_cxt = CurrentMemoryContext;
	int			budget = d365_max_run_time_ms;
	volatile JobOutcome outcome = JOB_IDLE;
	char	   *volatile error = NULL;

	set_phase(job->phase);
	pgstat_report_activity(STATE_RUNNING, job->name);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		D365Run		run;
		bool		completed;

		D365JobSave as_job;

		PushActiveSnapshot(GetTransactionSnapshot());
		/* the job runs as the job role, for the worker's role */
		d365_job_begin(&as_job);
		d365_run_init(&run, job->name);
		run.no_record = true;
		run.quiet = true;
		d365_max_run_time_ms = budget > 0 ? Min(budget, WORKER_PASS_MS) : WORKER_PASS_MS;
		completed = job->fn(&run, job->arg);
		d365_max_run_time_ms = budget;

		if (run.skipped)
			outcome = JOB_SKIPPED;
		else if (!completed)
		{
			outcome = JOB_FAILED;
			error = MemoryContextStrdup(worker_cxt, run.message ? run.message : "failed");
		}
		else if ((error = run_failure(&run)) != NULL)
		{
			outcome = JOB_FAILED;
			error = MemoryContextStrdup(worker_cxt, error);
		}
		else
			outcome = worked(&run) ? JOB_WORKED : JOB_IDLE;

		if (outcome == JOB_WORKED || outcome == JOB_FAILED)
		{
			SPI_connect();
			d365_run_record(&run);
			SPI_finish();
		}
		d365_job_end(&as_job);
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		d365_max_run_time_ms = budget;
		MemoryContextSwitchTo(worker_cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		outcome = JOB_FAILED;
		error = pstrdup(edata->message);
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(worker_cxt);

	note_outcome(job, outcome, error);
	return outcome;
}

static long
ms_until(TimestampTz t)
{
	TimestampTz now = GetCurrentTimestamp();

	return t <= now ? 0 : (long) ((t - now) / 1000) + 1;
}

/*
 * probe_dynamics
 *		One cheap request, GET WhoAmI as the settings' application user,
 *		without retries, in a short transaction.  false when Dynamics 365
 *		or its token authority gave no usable answer: unreachable, throttled
 *		(429; *retry_after_ms is then its Retry-After, else 0) or a server
 *		error (5xx); true when it answered anything else (a job that still
 *		fails then reports its own error).
 */
static bool
probe_dynamics(long *retry_after_ms)
{
	MemoryContext caller = CurrentMemoryContext;
	int			retries = d365_max_retries;
	volatile bool up = true;
	volatile long wait = 0;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		D365Client *client;
		D365Op	   *op;

		PushActiveSnapshot(GetTransactionSnapshot());
		d365_max_retries = 0;
		client = d365_client_open();
		client->nlanes = 1;
		op = d365_op_make("GET", "WhoAmI", NULL);
		d365_client_execute(client, &op, 1);
		d365_max_retries = retries;
		up = !(op->transport_failure || op->status == 429 || op->status >= 500);
		if (op->status == 429 && op->http != NULL)
		{
			char	   *ra = d365_http_header(op->http, "Retry-After");

			/* throttled: the next probe not before the server asks */
			if (ra != NULL && ra[0] != '\0' && strspn(ra, "0123456789") == strlen(ra))
				wait = Min(atol(ra), 3600L) * 1000L;
		}
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		d365_max_retries = retries;
		MemoryContextSwitchTo(caller);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		/* the token request's failures, as d365_op_report classes them */
		up = !(edata->sqlerrcode == ERRCODE_CONNECTION_FAILURE ||
			   edata->sqlerrcode == ERRCODE_CONFIGURATION_LIMIT_EXCEEDED ||
			   edata->sqlerrcode == ERRCODE_EXTERNAL_ROUTINE_EXCEPTION);
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
	*retry_after_ms = wait;
	return up;
}

/*
 * fold_queue
 *		While Dynamics is down: fold the contact and map changes queued
 *		since the last pass into d365.contact_state and d365.map_row
 *		(d365._contact_fold_changes, d365._map_fold_changes), in a short
 *		transaction, sending nothing.  An error (the extension being
 *		dropped, say) is ignored: the next pass tries again.
 */
static void
fold_queue(void)
{
	MemoryContext caller = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		D365JobSave as_job;

		PushActiveSnapshot(GetTransactionSnapshot());
		d365_job_begin(&as_job);
		SPI_connect();
		if (SPI_execute("SELECT d365._contact_fold_changes()"
						" WHERE to_regprocedure('d365._contact_fold_changes()') IS NOT NULL",
						false, 0) < 0)
			elog(ERROR, "could not fold the contact queue");
		if (SPI_execute("SELECT d365._map_fold_changes(t.name) FROM d365.table_map t"
						" WHERE to_regprocedure('d365._map_fold_changes(text)') IS NOT NULL",
						false, 0) < 0)
			elog(ERROR, "could not fold the map queue");
		SPI_finish();
		d365_job_end(&as_job);
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(caller);
		FlushErrorState();
		AbortCurrentTransaction();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
}

/*
 * outage_pass
 *		The outage part of a pass (see probe_at): probe when due, fold the
 *		queue while down, and when the probe gets an answer after an outage
 *		let the failing jobs run at once.
 */
static void
outage_pass(bool realtime)
{
	bool		failing = false;
	ListCell   *lc;

	foreach(lc, d365_worker_jobs())
		failing |= ((WorkerJob *) lfirst(lc))->backoff_ms > 0;
	if (!failing)
	{
		probe_at = 0;
		dynamics_down = false;
		return;
	}
	if (probe_at > 0 && ms_until(probe_at) == 0)
	{
		long		retry_after = 0;
		bool		up = probe_dynamics(&retry_after);

		if (up && dynamics_down)
		{
			/* and the maps whose changes were folded meanwhile */
			foreach(lc, d365_worker_jobs())
				((WorkerJob *) lfirst(lc))->retry_at = ((WorkerJob *) lfirst(lc))->next_at = 0;
			ereport(LOG,
					(errmsg("d365sync worker: Dynamics 365 answers again; the failing jobs run now")));
		}
		dynamics_down = !up;
		/* after an answer, probe again only once a job has failed again */
		probe_at = up ? 0 : TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														 Max(PROBE_MS, retry_after));
	}
	if (dynamics_down && realtime)
		fold_queue();
}

/*
 * read_settings
 *		In a short transaction: whether the extension exists in this
 *		database and, if so, realtime and pull_interval (ms, 0 = none), and
 *		in *role_problem what keeps the worker role from running the jobs
 *		(NULL: nothing).
 *		Read through to_jsonb so that a database still on an older
 *		version of the extension (no such columns) reads as "off".  An
 *		error (the extension dropped while we look) reads as "not there":
 *		the next pass looks again.
 */
static bool
read_settings(bool *realtime, int64 *pull_ms, char **role_problem)
{
	MemoryContext caller = CurrentMemoryContext;
	char	   *volatile problem = NULL;
	volatile bool present = false;
	volatile bool on = false;
	volatile int64 ms = 0;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		PushActiveSnapshot(GetTransactionSnapshot());
		present = OidIsValid(get_extension_oid("d365sync", true));
		if (present)
		{
			SPI_connect();
			problem = d365_worker_operator_problem();
			if (problem != NULL)
				problem = MemoryContextStrdup(caller, problem);
			if (problem == NULL &&
				SPI_execute(d365_worker_settings_query(), true, 1) == SPI_OK_SELECT &&
				SPI_processed == 1)
			{
				bool		isnull;
				Datum		d;

				d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
				on = !isnull && DatumGetBool(d);
				d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
				ms = isnull ? 0 : Max(DatumGetInt64(d), 0);
			}
			SPI_finish();
		}
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(caller);
		FlushErrorState();
		AbortCurrentTransaction();
		present = false;
		on = false;
		ms = 0;
		problem = NULL;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
	*role_problem = problem;
	*realtime = on;
	/* an interval of centuries would overflow the time of the next pull */
	*pull_ms = Min(ms, PULL_MS_MAX);
	return present;
}

/*
 * pass_job
 *		Run one job of a pass when it is due; fold what came of it into the
 *		pass's timeout.  A pull is due on its interval; the contact and
 *		activity jobs at every pass; a map's sync when its changes were
 *		noted, its last run worked, a map before it in this pass worked
 *		(*map_worked: its children may wait for it), and at least every
 *		REALTIME_POLL_MS -- a commit to one table does not run every map.
 */
static void
pass_job(WorkerJob *job, int64 pull_ms, bool realtime, bool *map_worked, long *timeout)
{
	JobOutcome	o;
	TimestampTz now;

	/* a failing job waits for the probe while Dynamics is down */
	if (dynamics_down && job->backoff_ms > 0)
		return;
	if (ms_until(job->retry_at) > 0)
	{
		*timeout = Min(*timeout, ms_until(job->retry_at));
		return;
	}
	if ((job->incoming || job->is_map) && ms_until(job->next_at) > 0 &&
		(job->incoming || !(job->noted || job->again || job->backoff_ms > 0 || *map_worked)))
	{
		*timeout = Min(*timeout, ms_until(job->next_at));
		return;
	}

	o = run_job(job);
	now = GetCurrentTimestamp();
	job->again = (o == JOB_WORKED || o == JOB_SKIPPED);
	if (o == JOB_IDLE || o == JOB_WORKED)
		job->next_at = TimestampTzPlusMilliseconds(now, job->incoming ? pull_ms : REALTIME_POLL_MS);
	if (job->incoming)
	{
		if (o == JOB_IDLE || o == JOB_WORKED)
		{
			SpinLockAcquire(&d365_shared->mutex);
			d365_shared->last_pull = now;
			SpinLockRelease(&d365_shared->mutex);
		}
		else if (o == JOB_SKIPPED)
			job->next_at = TimestampTzPlusMilliseconds(now, SKIPPED_RETRY_MS);

		/*
		 * Applied changes leave their rows pending (the capture trigger
		 * fired); the sync settles them as unchanged at once instead of at
		 * the next poll.
		 */
		if (o == JOB_WORKED && realtime)
			*timeout = 0;
		*timeout = Min(*timeout, Max(ms_until(job->next_at), ms_until(job->retry_at)));
		return;
	}
	if (o == JOB_WORKED)
	{
		*timeout = 0;
		*map_worked |= job->is_map;
	}
	else if (o == JOB_SKIPPED)
		*timeout = Min(*timeout, SKIPPED_RETRY_MS);
	else if (o == JOB_FAILED)
		*timeout = Min(*timeout, ms_until(job->retry_at));
}

/*
 * worker_pass
 *		One pass: read the settings and the maps, send (realtime), pull
 *		(when due), each job of d365_worker_jobs() in its order.  Returns
 *		how long to sleep before the next pass, in ms (0: at once).
 */
static long
worker_pass(bool *extension_logged)
{
	bool		realtime;
	int64		pull_ms;
	long		timeout;
	bool		map_worked = false;
	ListCell   *lc;
	char	   *role_problem = NULL;
	static char *role_logged = NULL;

	if (!read_settings(&realtime, &pull_ms, &role_problem))
	{
		SpinLockAcquire(&d365_shared->mutex);
		d365_shared->realtime = false;
		d365_shared->phase = D365W_NO_EXTENSION;
		SpinLockRelease(&d365_shared->mutex);
		if (!*extension_logged)
			ereport(LOG,
					(errmsg("d365sync worker is waiting for CREATE EXTENSION d365sync in database \"%s\"",
							d365_worker_database)));
		*extension_logged = true;
		foreach(lc, d365_worker_jobs())
			((WorkerJob *) lfirst(lc))->next_at = 0;
		return EXTENSION_POLL_MS;
	}
	*extension_logged = false;
	d365_worker_note_role_problem(role_problem, &role_logged);
	if (role_problem != NULL)
		return EXTENSION_POLL_MS;
	SpinLockAcquire(&d365_shared->mutex);
	d365_shared->realtime = realtime;
	SpinLockRelease(&d365_shared->mutex);

	if (realtime || pull_ms > 0)
	{
		WorkerMaps	maps;

		d365_worker_read_maps(&maps);
		d365_worker_refresh_jobs(&maps);
	}

	/* a job switched off is no longer failing, and runs first when on */
	foreach(lc, d365_worker_jobs())
	{
		WorkerJob  *job = (WorkerJob *) lfirst(lc);

		if (job->incoming ? pull_ms == 0 : !realtime)
		{
			job->backoff_ms = 0;
			job->retry_at = 0;
			job->next_at = 0;
		}
	}

	outage_pass(realtime);

	timeout = realtime ? REALTIME_POLL_MS : IDLE_POLL_MS;
	foreach(lc, d365_worker_jobs())
	{
		WorkerJob  *job = (WorkerJob *) lfirst(lc);

		if (job->incoming ? pull_ms > 0 : realtime)
			pass_job(job, pull_ms, realtime, &map_worked, &timeout);
	}
	if (probe_at > 0)
		timeout = Min(timeout, ms_until(probe_at));

	SpinLockAcquire(&d365_shared->mutex);
	d365_shared->passes++;
	d365_shared->last_pass = GetCurrentTimestamp();
	d365_shared->phase = D365W_IDLE;
	foreach(lc, d365_worker_jobs())
	{
		if (((WorkerJob *) lfirst(lc))->backoff_ms > 0)
			d365_shared->phase = D365W_BACKING_OFF;
	}
	SpinLockRelease(&d365_shared->mutex);
	return timeout;
}

/*
 * d365_worker_main
 *		Entry point of the background worker.
 */
void
d365_worker_main(Datum main_arg)
{
	bool		connect;
	char	   *connected_role;
	bool		extension_logged = false;
	MemoryContext pass_cxt;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	SpinLockAcquire(&d365_shared->mutex);
	connect = d365_shared->connect_next;
	d365_shared->connect_next = false;
	SpinLockRelease(&d365_shared->mutex);
	if (!connect)
		probe_database();

	/*
	 * FATAL (and a restart into probe_database) if the database is gone.
	 * As d365sync.worker_role when set (probe_database checked it can
	 * connect), else as the bootstrap superuser.
	 */
	connected_role = d365_worker_role_name() ? pstrdup(d365_worker_role_name()) : NULL;
	BackgroundWorkerInitializeConnection(d365_worker_database, connected_role, 0);

	/*
	 * The worker parses and runs SQL of its own (the settings read, the
	 * work queries): ALTER DATABASE / ALTER ROLE ... SET, which the
	 * database's or the role's owner may run, must not decide which
	 * functions and operators those statements call, make its transactions
	 * read-only, change its role or time it out.
	 */
	d365_worker_pin_settings();
	worker_attach();
	ereport(LOG,
			(errmsg("d365sync worker started in database \"%s\" as %s", d365_worker_database,
					connected_role ? quote_identifier(connected_role) : "the bootstrap superuser")));

	pass_cxt = AllocSetContextCreate(TopMemoryContext, "d365sync worker pass",
									 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		MemoryContext old = MemoryContextSwitchTo(pass_cxt);
		long		timeout;

		timeout = worker_pass(&extension_logged);
		MemoryContextSwitchTo(old);
		MemoryContextReset(pass_cxt);

		if (wait_latch(timeout))
		{
			SpinLockAcquire(&d365_shared->mutex);
			d365_shared->wakes++;
			d365_shared->last_wake = GetCurrentTimestamp();
			SpinLockRelease(&d365_shared->mutex);
		}
		/* d365sync.worker_role changed: connect again (through the probe) */
		if ((d365_worker_role_name() == NULL) != (connected_role == NULL) ||
			(connected_role != NULL && strcmp(connected_role, d365_worker_role_name()) != 0))
		{
			ereport(LOG,
					(errmsg("d365sync worker restarts: d365sync.worker_role changed")));
			proc_exit(1);
		}
	}
}
