/*-------------------------------------------------------------------------
 *
 * runs.h
 *	  One sync run: its client and counts, the lock, the error capture, its
 *	  row in d365.sync_run and its SQL result row.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_RUNS_H
#define D365_RUNS_H

#include "fmgr.h"
#include "datatype/timestamp.h"

#include "odata.h"

/* Item counts of a run, as d365.sync_run stores them. */
typedef struct D365Counts
{
	int64		created;
	int64		updated;
	int64		unchanged;
	int64		failed;
	int64		unlinked;
} D365Counts;

/* A failed request, kept (outside the chunk's memory) for reporting. */
typedef struct D365Failure
{
	char	   *item_key;
	D365Op	   *op;
} D365Failure;

typedef struct D365Run
{
	const char *kind;			/* d365.sync_run.kind */
	TimestampTz started;
	D365Client *client;			/* opened on first use: no work, no token */
	D365Counts	counts;
	int64		items;			/* rows the work queries returned */
	int64		deferred;		/* items left pending, not failed: their
								 * request was throttled or got no answer */
	char	   *message;		/* why the run stopped early, or NULL */
	D365Failure *first_failure;
	MemoryContext cxt;			/* lives as long as the run */
	bool		no_record;		/* d365_run_execute: no d365.sync_run row */
	bool		skipped;		/* d365_run_execute: the job's lock was taken */
	bool		quiet;			/* d365_run_guarded: keep a failure in message
								 * only, no WARNING (the worker logs once) */

	/*
	 * d365_run_execute: run under the job's lock before the body, guarded
	 * on its own, so that what it did stays when the body fails (NULL:
	 * nothing)
	 */
	void		(*prepare) (struct D365Run *run, void *arg);
} D365Run;

typedef void (*D365RunBody) (D365Run *run, void *arg);

extern void d365_run_init(D365Run *run, const char *kind);
extern D365Client *d365_run_client(D365Run *run);
extern bool d365_run_execute(D365Run *run, const char *lock_name,
							 D365RunBody body, void *arg);
extern bool d365_run_guarded(D365Run *run, D365RunBody body, void *arg);
extern void d365_run_record(D365Run *run);
extern void d365_run_publish(D365Run *run);
extern void d365_run_add_counts(D365Run *run, int rc, const char *fn);
extern Datum d365_run_result(FunctionCallInfo fcinfo, D365Run *run);

#endif							/* D365_RUNS_H */
