/*-------------------------------------------------------------------------
 *
 * jobs.h
 *	  The three scheduled jobs as runs: what d365_sync_contacts(),
 *	  d365_sync_activities() and d365_pull_changes() run, and what the
 *	  background worker (src/worker.c) runs in its own transactions.
 *
 * Each takes a run from d365_run_init() (its kind is set here), runs the
 * engine's body under the job's lock through d365_run_execute(),
 * so a job never runs twice at once whoever starts it, and returns whether
 * the body completed.  Each needs a transaction and connects to SPI itself.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_JOBS_H
#define D365_JOBS_H

#include "runs.h"

/* in contacts_out.c */
extern bool d365_job_contacts(D365Run *run);

/* in activities.c */
extern bool d365_job_activities(D365Run *run);

/* in incoming.c */
extern bool d365_job_pull(D365Run *run);

#endif							/* D365_JOBS_H */
