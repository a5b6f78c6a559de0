/*-------------------------------------------------------------------------
 *
 * worker_shmem.c
 *	  The shared memory of d365sync: the background worker's state, the
 *	  run-progress slots and the wake at commit.
 *
 * One D365Shared struct, created when the postmaster starts (or re-creates
 * shared memory after a crash) and only when d365sync is preloaded.  The
 * worker (worker.c) writes its own state there; any backend claims a
 * progress slot for its run (progress.c) and sets the worker's latch when
 * a transaction that changed a contact commits.  All fields are protected
 * by one spinlock, held only to copy a few words.
 *
 * Waking at commit: a backend whose transaction changed a contact or
 * logged an activity arms a wake (d365_worker_wake_at_commit() from the
 * capture trigger, d365._worker_wake() from SQL); that only sets a flag,
 * and a transaction callback sets the worker's latch at COMMIT, after the
 * commit is visible.  A rolled-back transaction wakes nobody.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "worker_shmem.h"

PG_FUNCTION_INFO_V1(d365_worker_wake);

D365Shared *d365_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* backends: wake the worker when the current transaction commits */
static bool wake_at_commit = false;
static bool xact_callback_registered = false;

static void
shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(D365Shared)));
}

/*
 * shmem_startup
 *		Create (postmaster start, crash re-initialisation) or attach the
 *		shared state.  After a fresh start the worker connects at once.
 */
static void
shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	d365_shared = ShmemInitStruct("d365sync", sizeof(D365Shared), &found);
	if (!found)
	{
		memset(d365_shared, 0, sizeof(D365Shared));
		SpinLockInit(&d365_shared->mutex);
		d365_shared->connect_next = true;
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * d365_shmem_init
 *		Called from d365_worker_init() while shared_preload_libraries is
 *		processed: ask for the shared memory and create it at start-up.
 */
void
d365_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shmem_startup;
}

/*
 * d365_progress_claim
 *		A free run-progress slot for a run of the given kind in this
 *		backend, or NULL (no shared memory, or every slot taken: progress is
 *		then simply not shown).  The owner updates its counters under
 *		d365_shared->mutex and must release the slot on every exit path
 *		(a memory-context reset callback of the run's context will do).
 */
D365Progress *
d365_progress_claim(const char *kind)
{
	D365Progress *slot = NULL;
	int			i;

	if (d365_shared == NULL)
		return NULL;
	SpinLockAcquire(&d365_shared->mutex);
	for (i = 0; i < D365_PROGRESS_SLOTS; i++)
	{
		if (d365_shared->progress[i].pid == 0)
		{
			slot = &d365_shared->progress[i];
			memset(slot, 0, sizeof(D365Progress));
			slot->pid = MyProcPid;
			slot->dboid = MyDatabaseId;
			strlcpy(slot->kind, kind, sizeof(slot->kind));
			slot->started_at = GetCurrentTimestamp();
			slot->remaining = -1;
			break;
		}
	}
	SpinLockRelease(&d365_shared->mutex);
	return slot;
}

/*
 * d365_progress_release
 *		Give a slot from d365_progress_claim() back (NULL is fine).
 */
void
d365_progress_release(D365Progress *slot)
{
	if (slot == NULL || d365_shared == NULL)
		return;
	SpinLockAcquire(&d365_shared->mutex);
	if (slot->pid == MyProcPid)
		slot->pid = 0;
	SpinLockRelease(&d365_shared->mutex);
}

static void
wake_xact_callback(XactEvent event, void *arg)
{
	Latch	   *latch = NULL;

	if (event == XACT_EVENT_COMMIT && wake_at_commit && d365_shared != NULL)
	{
		SpinLockAcquire(&d365_shared->mutex);
		if (d365_shared->dboid == MyDatabaseId)
			latch = d365_shared->latch;
		SpinLockRelease(&d365_shared->mutex);
		/* a latch of a process that just exited: a harmless spurious wake */
		if (latch != NULL)
			SetLatch(latch);
	}
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PREPARE)
		wake_at_commit = false;
}

/*
 * d365._worker_wake(always boolean) -> void
 *		Wake the worker when the current transaction commits: always (a
 *		settings change), or only while realtime is on (a captured change,
 *		a logged activity).  Nothing happens on rollback, in the worker
 *		itself, in another database, or without the preload.  Cheap: the
 *		capture trigger calls it for every row.
 */
Datum
d365_worker_wake(PG_FUNCTION_ARGS)
{
	d365_worker_wake_at_commit(PG_ARGISNULL(0) ? true : PG_GETARG_BOOL(0));
	PG_RETURN_VOID();
}

/*
 * d365_worker_wake_at_commit
 *		The C side of d365._worker_wake(), for the capture trigger.
 */
void
d365_worker_wake_at_commit(bool always)
{
	/* unlocked reads of single fields: a stale value costs one wake at most */
	if (d365_shared == NULL || d365_shared->pid == MyProcPid ||
		(!always && !d365_shared->realtime))
		return;
	if (!xact_callback_registered)
	{
		RegisterXactCallback(wake_xact_callback, NULL);
		xact_callback_registered = true;
	}
	wake_at_commit = true;
}


/*
 * d365_worker_clear_error
 *		The worker's job "job" works again: its failure, if it is the one
 *		d365_status() shows as the worker's last error ("<job>: ..."), is
 *		no longer shown.
 */
void
d365_worker_clear_error(const char *job)
{
	size_t		len = strlen(job);

	SpinLockAcquire(&d365_shared->mutex);
	if (strncmp(d365_shared->last_error, job, len) == 0 &&
		strncmp(d365_shared->last_error + len, ": ", 2) == 0)
	{
		d365_shared->last_error[0] = '\0';
		d365_shared->last_error_at = 0;
	}
	SpinLockRelease(&d365_shared->mutex);
}
