/*-------------------------------------------------------------------------
 *
 * jobs.h
 *	  The scheduled jobs as runs: what d365_sync_contacts(),
 *	  d365_sync_activities(), d365_pull_changes() and, for each map,
 *	  d365_sync() and d365_pull() run, and what the background worker
 *	  (src/worker/worker.c) runs in its own transactions.
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

/* in table_maps.c: one map's sync or pull (the map's row lock, not a job's) */
extern bool d365_job_map_sync(D365Run *run, const char *map);
extern bool d365_job_map_pull(D365Run *run, const char *map);
extern bool d365_map_second_pass(const char *map, bool completed,
								 const bool *linked, int place, int nmaps);

/*
 * The contact table's runs when a call names the map "contact"
 * (d365_sync('contact'), d365_pull('contact')): they run it even while
 * the map is disabled (contacts_out.c, incoming.c); the others pass a
 * disabled map by (contact_policies.c).
 */
extern bool d365_job_contacts_named(D365Run *run);
extern bool d365_job_pull_named(D365Run *run);
extern bool d365_contact_map_disabled(D365Run *run);

#endif							/* D365_JOBS_H */
