/*-------------------------------------------------------------------------
 *
 * progress.c
 *	  Progress of the sync run in progress, for other sessions to see.
 *
 * A run reports what it has done so far -- items done and failed, items
 * remaining when known, HTTP requests, throttled responses, its start --
 * in two places, read together by d365.d365_run_progress():
 *
 *	 - its backend's activity text, which pg_stat_activity shows to every
 *	   session allowed to see it: the query's text behind a comment that
 *	   reads "d365sync: contacts run since 2026-01-02 03:04:05 UTC: 120
 *	   done, 0 failed, 2880 remaining, 3 requests, 0 throttled".
 *	   Works on every installation (it needs track_activities, on by
 *	   default); the comment goes when the run ends.
 *
 *	 - a slot in d365sync's shared memory, which exists only when d365sync
 *	   is in shared_preload_libraries (PostgreSQL 15 gives a library loaded
 *	   later no shared memory): exact, and independent of track_activities
 *	   and of the reader's privileges.
 *
 * Only the outermost run of a backend reports (a contact run that sends the
 * activities of new contacts is one run).  Whatever ends the run -- its
 * end, an error, a cancel -- the slot is released and the query's text
 * restored: the state is dropped by a reset callback of the memory of the
 * (sub)transaction the run started in.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "pgtime.h"
#include "storage/procarray.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "progress.h"
#include "worker_shmem.h"

/* the run this backend reports on; active = false when none */
typedef struct ProgressState
{
	bool		active;
	char		kind[80];		/* "map-pull:<map name>" fits */
	TimestampTz started;
	int64		total;			/* -1 while unknown */
	D365ProgressCounts counts;	/* the sum over the runs below */
	struct
	{
		const void *run;
		D365ProgressCounts last;
	}			runs[4];		/* the run and the runs it started */
	int			nruns;
	uint64		generation;		/* which report a reset callback belongs to */
} ProgressState;

static ProgressState state;
static uint64 last_generation = 0;

/*
 * report_activity
 *		Put the run's progress into this backend's activity text.
 */
static void
report_activity(void)
{
	char		since[32];
	char		remaining[24];
	pg_time_t	t = timestamptz_to_time_t(state.started);
	char	   *text;

	pg_strftime(since, sizeof(since), "%Y-%m-%d %H:%M:%S UTC", pg_gmtime(&t));
	if (state.total >= 0)
		snprintf(remaining, sizeof(remaining), INT64_FORMAT,
				 Max(state.total - state.counts.done - state.counts.failed, 0));
	else
		strlcpy(remaining, "?", sizeof(remaining));
	text = psprintf("/* d365sync: %s run since %s: " INT64_FORMAT " done, " INT64_FORMAT
					" failed, %s remaining, " INT64_FORMAT " requests, " INT64_FORMAT
					" throttled */ %s",
					state.kind, since, state.counts.done, state.counts.failed, remaining,
					state.counts.requests, state.counts.throttled,
					debug_query_string ? debug_query_string : "");
	pgstat_report_activity(STATE_RUNNING, text);
	pfree(text);
}

/*
 * progress_drop
 *		End the report: release the shared slot and give the backend its
 *		query's text back.  Runs at the end of a run, or as the reset
 *		callback of the transaction's memory when an error ended it.
 */
static void
progress_drop(void *arg)
{
	if (!state.active ||
		(arg != NULL && *(uint64 *) arg != state.generation))
		return;
	state.active = false;
	d365_progress_shared_release();
	pgstat_report_activity(STATE_RUNNING,
						   debug_query_string ? debug_query_string : "");
}

/*
 * d365_progress_start
 *		Start reporting a run of the given kind, unless this backend already
 *		reports one (an outer run); returns whether this call started the
 *		report, and then d365_progress_end() must follow on the normal exit
 *		path (an error drops the report by itself).  Needs a transaction.
 */
bool
d365_progress_start(const char *kind)
{
	return d365_progress_start_at(kind, GetCurrentTimestamp());
}

/*
 * d365_progress_start_at
 *		d365_progress_start() for a run that started at started: a run that
 *		commits as it goes (CALL d365_load()) reports again after each
 *		commit, which drops the report.
 */
bool
d365_progress_start_at(const char *kind, TimestampTz started)
{
	MemoryContextCallback *cb;
	uint64	   *generation;

	if (state.active)
		return false;
	memset(&state, 0, sizeof(state));
	strlcpy(state.kind, kind, sizeof(state.kind));
	state.started = started;
	state.total = -1;
	state.generation = ++last_generation;

	/*
	 * An error ends the (sub)transaction the run started in and, with its
	 * memory, the report: a run in a PL/pgSQL block with an EXCEPTION clause
	 * is cleaned up when that block's subtransaction aborts.
	 */
	cb = MemoryContextAlloc(CurTransactionContext, sizeof(MemoryContextCallback));
	generation = MemoryContextAlloc(CurTransactionContext, sizeof(uint64));
	*generation = state.generation;
	cb->func = progress_drop;
	cb->arg = generation;
	MemoryContextRegisterResetCallback(CurTransactionContext, cb);
	state.active = true;
	d365_progress_shared_claim(state.kind, state.started);
	report_activity();
	return true;
}

/*
 * d365_progress_active
 *		Whether this backend reports a run now.
 */
bool
d365_progress_active(void)
{
	return state.active;
}

/*
 * d365_progress_total
 *		The number of items of the reported run, -1 while unknown or when
 *		none is reported.
 */
int64
d365_progress_total(void)
{
	return state.active ? state.total : -1;
}

/*
 * d365_progress_add_total
 *		Add to the number of items the run has in all (each pass over a work
 *		query counts its items before it starts on them).
 */
void
d365_progress_add_total(int64 n)
{
	if (!state.active)
		return;
	state.total = Max(state.total, 0) + n;
	d365_progress_shared_update(&state.counts, state.total);
	report_activity();
}

/*
 * d365_progress_update
 *		Publish a run's counts so far.  run identifies it: the counts of a
 *		run started inside the reported one (the activities that follow new
 *		contacts) are added to the outer run's.
 */
void
d365_progress_update(const void *run, const D365ProgressCounts *counts)
{
	int			i;

	if (!state.active)
		return;
	for (i = 0; i < state.nruns && state.runs[i].run != run; i++)
		;
	if (i == state.nruns)
	{
		if (state.nruns == lengthof(state.runs))
			i = state.nruns - 1;	/* cannot happen: runs nest one deep */
		else
			state.nruns++;
		state.runs[i].run = run;
	}
	state.runs[i].last = *counts;
	memset(&state.counts, 0, sizeof(state.counts));
	for (i = 0; i < state.nruns; i++)
	{
		state.counts.done += state.runs[i].last.done;
		state.counts.failed += state.runs[i].last.failed;
		state.counts.requests += state.runs[i].last.requests;
		state.counts.throttled += state.runs[i].last.throttled;
	}
	d365_progress_shared_update(&state.counts, state.total);
	report_activity();
}

/*
 * d365_progress_end
 *		End a report started by d365_progress_start().
 */
void
d365_progress_end(void)
{
	progress_drop(NULL);
}

/* ------------------------------------------------------------------------
 * Shared memory: a slot per run in progress
 * ------------------------------------------------------------------------
 */

static D365Progress *slot = NULL;	/* this backend's, or NULL */

/*
 * d365_progress_shared_claim
 *		Take a slot for this backend's run.  No shared memory (no preload),
 *		or no free slot: nothing, the activity text still shows the run.
 */
void
d365_progress_shared_claim(const char *kind, TimestampTz started)
{
	slot = d365_progress_claim(kind);
	if (slot == NULL)
		return;
	SpinLockAcquire(&d365_shared->mutex);
	slot->started_at = started;
	SpinLockRelease(&d365_shared->mutex);
}

/*
 * d365_progress_shared_update
 *		Copy the counts into this backend's slot, if it has one.
 */
void
d365_progress_shared_update(const D365ProgressCounts *counts, int64 total)
{
	if (slot == NULL)
		return;
	SpinLockAcquire(&d365_shared->mutex);
	slot->done = counts->done;
	slot->failed = counts->failed;
	slot->remaining = total >= 0 ? Max(total - counts->done - counts->failed, 0) : -1;
	slot->requests = counts->requests;
	slot->throttled = counts->throttled;
	SpinLockRelease(&d365_shared->mutex);
}

/*
 * d365_progress_shared_release
 *		Give this backend's slot back, if it has one.
 */
void
d365_progress_shared_release(void)
{
	d365_progress_release(slot);
	slot = NULL;
}

PG_FUNCTION_INFO_V1(d365_run_progress_shared);

/*
 * d365_run_progress_shared() -> SETOF (pid, kind, started_at, done, failed,
 *									   remaining, requests, throttled)
 *		The runs in progress in this database that hold a shared slot; none
 *		without the preload.  A slot whose process is gone (it cannot
 *		happen short of a crash, which resets shared memory) is skipped.
 */
Datum
d365_run_progress_shared(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	D365Progress copy[D365_PROGRESS_SLOTS];
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	if (d365_shared == NULL)
		return (Datum) 0;
	SpinLockAcquire(&d365_shared->mutex);
	memcpy(copy, d365_shared->progress, sizeof(copy));
	SpinLockRelease(&d365_shared->mutex);

	for (i = 0; i < D365_PROGRESS_SLOTS; i++)
	{
		D365Progress *p = &copy[i];
		Datum		values[8];
		bool		nulls[8] = {false};

		if (p->pid == 0 || p->dboid != MyDatabaseId || BackendPidGetProc(p->pid) == NULL)
			continue;
		values[0] = Int32GetDatum(p->pid);
		values[1] = CStringGetTextDatum(p->kind);
		values[2] = TimestampTzGetDatum(p->started_at);
		values[3] = Int64GetDatum(p->done);
		values[4] = Int64GetDatum(p->failed);
		values[5] = Int64GetDatum(p->remaining);
		nulls[5] = (p->remaining < 0);
		values[6] = Int64GetDatum(p->requests);
		values[7] = Int64GetDatum(p->throttled);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
