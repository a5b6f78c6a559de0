/*-------------------------------------------------------------------------
 *
 * worker_shmem.h
 *	  The shared memory the background worker and the backends meet in
 *	  (src/common/worker_shmem.c): the worker's state, the run-progress slots and
 *	  the wake at commit.
 *
 * Shared memory exists only when d365sync is in shared_preload_libraries;
 * without the preload d365_shared is NULL and every function here is a
 * cheap no-op.  This file includes nothing of the engines: the worker
 * (worker.c) and the progress reporting (progress.c) both build on it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_WORKER_SHMEM_H
#define D365_WORKER_SHMEM_H

#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "storage/spin.h"

/*
 * Progress of one run in progress, in any backend or the worker.  Slots are
 * claimed with d365_progress_claim() and released at the end of the run;
 * other sessions read them.  The counters are written by their owner
 * only, under the slot's mutex.
 */
#define D365_PROGRESS_SLOTS 16

typedef struct D365Progress
{
	int			pid;			/* owner; 0 = free slot */
	Oid			dboid;
	char		kind[16];		/* d365.sync_run.kind */
	TimestampTz started_at;
	int64		done;
	int64		failed;
	int64		remaining;		/* -1 when unknown */
	int64		requests;
	int64		throttled;
} D365Progress;

/* What the worker is doing, as d365_status() shows it. */
typedef enum D365WorkerPhase
{
	D365W_STOPPED = 0,			/* no worker process (yet) */
	D365W_NO_DATABASE,			/* waiting for the database to exist */
	D365W_NO_EXTENSION,			/* connected, waiting for CREATE EXTENSION */
	D365W_IDLE,					/* waiting for a commit, a pull or a timer */
	D365W_SENDING,				/* a contact or activity run */
	D365W_PULLING,				/* a change-tracking pull */
	D365W_BACKING_OFF			/* the last run failed; waiting to retry */
} D365WorkerPhase;

typedef struct D365Shared
{
	slock_t		mutex;			/* protects everything below */
	int			pid;			/* worker process, 0 when none */
	Latch	   *latch;			/* its latch, NULL when none */
	Oid			dboid;			/* database it serves, InvalidOid if none */
	D365WorkerPhase phase;
	bool		realtime;		/* d365.settings.realtime, as last read */
	bool		connect_next;	/* next start connects (else probes first) */
	TimestampTz started_at;
	TimestampTz last_wake;		/* last wake by a commit */
	TimestampTz last_pass;		/* end of the last pass */
	TimestampTz last_pull;		/* end of the last pull */
	TimestampTz last_error_at;
	char		last_error[256];
	int64		wakes;
	int64		passes;
	D365Progress progress[D365_PROGRESS_SLOTS];
} D365Shared;

extern D365Shared *d365_shared;

extern void d365_shmem_init(void);
extern void d365_worker_wake_at_commit(bool always);
extern void d365_worker_clear_error(const char *job);
extern D365Progress *d365_progress_claim(const char *kind);
extern void d365_progress_release(D365Progress *slot);

#endif							/* D365_WORKER_SHMEM_H */
