/*-------------------------------------------------------------------------
 *
 * worker_jobs.h
 *	  The jobs the background worker runs (src/worker/worker_jobs.c): the contact,
 *	  activity and pull jobs, and one sync and one pull job per table map.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_WORKER_JOBS_H
#define D365_WORKER_JOBS_H

#include "nodes/pg_list.h"

#include "runs.h"
#include "worker_shmem.h"

/* Outcome of one job run by the worker. */
typedef enum JobOutcome
{
	JOB_IDLE,					/* completed, nothing to do */
	JOB_WORKED,					/* completed with items: look again */
	JOB_SKIPPED,				/* another run of the job held its lock */
	JOB_FAILED					/* failed; message says why */
} JobOutcome;

/* A job and its state, kept across passes (TopMemoryContext). */
typedef struct WorkerJob
{
	char	   *name;			/* d365.sync_run.kind: contacts, map:<name>, ... */
	bool		(*fn) (D365Run *run, const char *arg);
	char	   *arg;			/* the map of a map job, else NULL */
	D365WorkerPhase phase;
	bool		incoming;		/* runs on pull_interval (else while realtime) */
	bool		is_map;
	bool		listed;			/* in the last list of maps (refresh) */
	bool		noted;			/* a map sync: changes noted since its last run */
	bool		again;			/* its last run worked or skipped: run it next */
	TimestampTz next_at;		/* a pull: next one due; a map sync: next poll */
	TimestampTz retry_at;		/* no run before (back-off) */
	int			backoff_ms;		/* 0 while healthy */
	TimestampTz failing_since;
	char	   *logged_error;	/* the failure last logged */
} WorkerJob;

/* The maps of one pass, as d365._map_jobs() lists them. */
typedef struct WorkerMaps
{
	bool		known;			/* the list was read (else: keep the last one) */
	List	   *out;			/* char *: maps to send, in dependency order */
	List	   *noted;			/* char *: those among them with changes noted */
	List	   *in;				/* char *: maps to pull, in dependency order */
} WorkerMaps;

extern List *d365_worker_jobs(void);
extern void d365_worker_read_maps(WorkerMaps *maps);
extern void d365_worker_refresh_jobs(WorkerMaps *maps);

#endif							/* D365_WORKER_JOBS_H */
