/*-------------------------------------------------------------------------
 *
 * worker_jobs.c
 *	  The jobs of the background worker: the contact, activity and pull
 *	  jobs, and a sync job and a pull job for each table map it serves.
 *
 * The worker's loop (worker.c) runs every job of this list the same way:
 * a run in a transaction of its own, its own back-off after a failure, its
 * own line in the log.  A job is a function of the run and one argument,
 * the map for a map's job, so that one loop serves the fixed jobs and any
 * number of maps, and a map that fails (Dynamics answering 500 for its
 * table, a broken column) backs off alone: the other maps and the contact
 * and activity jobs go on.
 *
 * The maps are listed again at every pass (d365._map_jobs(), the same list
 * the scheduled map jobs run): the enabled maps other than "contact" (the
 * contact table, run by the contact jobs), with at least one column mapped
 * in the job's direction, parents before children.  A map's state (its
 * back-off, its last error) is kept by the job's name from one pass to the
 * next and forgotten when the map leaves the list.  The order of the list
 * is the order of a pass: contacts, activities, the maps' syncs (parents
 * first), the contact pull, the maps' pulls.  The contact and activity jobs
 * come first so that a failing map (its requests retried within its run)
 * never delays them, and a map whose lookups point to the contact table
 * finds its contacts linked.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "jobs.h"
#include "worker_jobs.h"
#include "job_role.h"

static bool
job_contacts(D365Run *run, const char *arg)
{
	return d365_job_contacts(run);
}

static bool
job_activities(D365Run *run, const char *arg)
{
	return d365_job_activities(run);
}

static bool
job_pull(D365Run *run, const char *arg)
{
	return d365_job_pull(run);
}

static List *jobs = NIL;
static WorkerJob *fixed[3];

static WorkerJob *
make_job(const char *name, bool (*fn) (D365Run *, const char *), const char *arg,
		 D365WorkerPhase phase, bool incoming)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
	WorkerJob  *job = palloc0(sizeof(WorkerJob));

	job->name = pstrdup(name);
	job->fn = fn;
	job->arg = arg ? pstrdup(arg) : NULL;
	job->phase = phase;
	job->incoming = incoming;
	job->is_map = arg != NULL;
	MemoryContextSwitchTo(old);
	return job;
}

/*
 * d365_worker_jobs
 *		The worker's jobs, in the order of a pass (see the header).  Before
 *		the first list of maps: the contact, activity and pull jobs.
 */
List *
d365_worker_jobs(void)
{
	if (jobs == NIL)
	{
		MemoryContext old;

		fixed[0] = make_job("contacts", job_contacts, NULL, D365W_SENDING, false);
		fixed[1] = make_job("activities", job_activities, NULL, D365W_SENDING, false);
		fixed[2] = make_job("pull", job_pull, NULL, D365W_PULLING, true);
		old = MemoryContextSwitchTo(TopMemoryContext);
		jobs = list_make3(fixed[0], fixed[1], fixed[2]);
		MemoryContextSwitchTo(old);
	}
	return jobs;
}

/* the strings of column 1 of the last SPI result, copied into cxt */
static List *
spi_names(MemoryContext cxt, List **noted)
{
	List	   *names = NIL;
	uint64		i;

	for (i = 0; i < SPI_processed; i++)
	{
		char	   *name = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		MemoryContext old = MemoryContextSwitchTo(cxt);

		names = lappend(names, pstrdup(name));
		if (noted != NULL &&
			strcmp(SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2), "t") == 0)
			*noted = lappend(*noted, pstrdup(name));
		MemoryContextSwitchTo(old);
	}
	return names;
}

/*
 * d365_worker_read_maps
 *		The maps to send and to pull, in a short transaction of their own:
 *		an error (a map's table dropped while we look, an installation not
 *		yet updated to a version with d365._map_jobs) leaves maps->known
 *		false, and the worker keeps the jobs it had -- a broken list of
 *		maps never stops the contact and activity jobs.
 */
void
d365_worker_read_maps(WorkerMaps *maps)
{
	MemoryContext caller = CurrentMemoryContext;

	memset(maps, 0, sizeof(WorkerMaps));
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		D365JobSave as_job;

		PushActiveSnapshot(GetTransactionSnapshot());
		d365_job_begin(&as_job);
		SPI_connect();
		if (SPI_execute("SELECT to_regprocedure('d365._map_jobs(boolean)') IS NOT NULL", true, 1) == SPI_OK_SELECT &&
			strcmp(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1), "t") == 0)
		{
			if (SPI_execute("SELECT j.name, j.noted FROM d365._map_jobs(true) j", true, 0) != SPI_OK_SELECT)
				elog(ERROR, "could not list the maps to send");
			maps->out = spi_names(caller, &maps->noted);
			if (SPI_execute("SELECT j.name FROM d365._map_jobs(false) j", true, 0) != SPI_OK_SELECT)
				elog(ERROR, "could not list the maps to pull");
			maps->in = spi_names(caller, NULL);
		}
		maps->known = true;
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
		maps->known = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
}

static bool
list_has(List *names, const char *name)
{
	ListCell   *lc;

	foreach(lc, names)
	{
		if (strcmp((char *) lfirst(lc), name) == 0)
			return true;
	}
	return false;
}

/* the job of map's sync (or pull) from the current list, or a new one */
static WorkerJob *
map_job(const char *map, bool incoming)
{
	char		name[NAMEDATALEN + 16];
	ListCell   *lc;

	snprintf(name, sizeof(name), incoming ? "map-pull:%s" : "map:%s", map);
	foreach(lc, jobs)
	{
		WorkerJob  *job = (WorkerJob *) lfirst(lc);

		if (strcmp(job->name, name) == 0)
			return job;
	}
	return make_job(name, incoming ? d365_job_map_pull : d365_job_map_sync, map,
					incoming ? D365W_PULLING : D365W_SENDING, incoming);
}

/*
 * d365_worker_refresh_jobs
 *		Make the job list that of maps (unless it could not be read): the
 *		maps' jobs in their order around the fixed ones, each map's state
 *		kept, the jobs of maps no longer listed freed.
 */
void
d365_worker_refresh_jobs(WorkerMaps *maps)
{
	List	   *old_jobs = d365_worker_jobs();
	List	   *next = NIL;
	ListCell   *lc;
	MemoryContext old;

	if (!maps->known)
	{
		foreach(lc, old_jobs)
			((WorkerJob *) lfirst(lc))->noted = false;
		return;
	}
	old = MemoryContextSwitchTo(TopMemoryContext);
	next = lappend(next, fixed[0]);
	next = lappend(next, fixed[1]);
	foreach(lc, maps->out)
	{
		WorkerJob  *job = map_job((char *) lfirst(lc), false);

		job->noted = list_has(maps->noted, (char *) lfirst(lc));
		next = lappend(next, job);
	}
	next = lappend(next, fixed[2]);
	foreach(lc, maps->in)
		next = lappend(next, map_job((char *) lfirst(lc), true));
	MemoryContextSwitchTo(old);

	foreach(lc, old_jobs)
	{
		WorkerJob  *job = (WorkerJob *) lfirst(lc);

		if (list_member_ptr(next, job))
			continue;
		/* a map unmapped or disabled: its failure is no longer shown */
		d365_worker_clear_error(job->name);
		pfree(job->name);
		if (job->arg)
			pfree(job->arg);
		if (job->logged_error)
			pfree(job->logged_error);
		pfree(job);
	}
	list_free(old_jobs);
	jobs = next;
}
