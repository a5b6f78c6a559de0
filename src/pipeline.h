/*-------------------------------------------------------------------------
 *
 * pipeline.h
 *	  The sync pipeline every engine runs on: select pending items with SQL,
 *	  send their requests through the OData client, record each outcome
 *	  with SQL; and the run wrapper that locks, survives errors and writes
 *	  d365.sync_run.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_PIPELINE_H
#define D365_PIPELINE_H

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
	char	   *message;		/* why the run stopped early, or NULL */
	D365Failure *first_failure;
	MemoryContext cxt;			/* lives as long as the run */
	bool		no_record;		/* d365_run_execute: no d365.sync_run row */
} D365Run;

typedef void (*D365RunBody) (D365Run *run, void *arg);

extern void d365_run_init(D365Run *run, const char *kind);
extern D365Client *d365_run_client(D365Run *run);
extern bool d365_run_execute(D365Run *run, const char *lock_name,
							 D365RunBody body, void *arg);
extern bool d365_run_guarded(D365Run *run, D365RunBody body, void *arg);
extern void d365_run_record(D365Run *run);
extern char *d365_sql_text(const char *query, int nargs, Oid *argtypes,
						   Datum *args);
extern void d365_pipeline_process(D365Run *run, const char *work_sql,
								  int nargs, Oid *argtypes, Datum *args,
								  const char *record_fn);

#endif							/* D365_PIPELINE_H */
