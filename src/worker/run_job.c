/*-------------------------------------------------------------------------
 *
 * run_job.c
 *	  CALL d365.d365_run_job(job): the command of the pg_cron jobs.
 *
 * Runs one scheduled job as its caller may (contacts, activities, pull,
 * maps, map-pull), as the job role (src/common/job_role.c), so that the caller
 * needs EXECUTE on this procedure only, none on d365's internal functions.
 * The map jobs run one map per transaction (each map's lock is held for
 * its own run only), every enabled map, parents first, then again each
 * map that owes lookups closing a cycle whose parents the job linked (the
 * second pass d365_sync() runs, sql/install/17_map_cycles.sql).  Each run is
 * committed before a failure is raised, so that pg_cron records the job
 * run as failed and the run's row in d365.sync_run stays.  Called inside a
 * transaction block its commit fails (invalid transaction termination), as
 * a COMMIT in a procedure's body does there.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "nodes/parsenodes.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "job_role.h"
#include "jobs.h"
#include "spi_util.h"

PG_FUNCTION_INFO_V1(d365_run_job);

/* search_path = pg_catalog, pg_temp to the end of the transaction */
static void
pin_search_path(void)
{
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
}

/*
 * run_one
 *		SELECT run_id, failure FROM <query>($1[, $2]): one run, as
 *		d365._run_job() or d365._run_map_job() records it.  The failure (or
 *		NULL) is copied into cxt; *run_id is set when the run has one.
 */
static char *
run_one(MemoryContext cxt, const char *query, int nargs, Datum *args,
		int64 *run_id, bool *has_id)
{
	Oid			types[2] = {TEXTOID, TEXTOID};
	bool		isnull;
	Datum		d;
	char	   *failure = NULL;

	if (SPI_execute_with_args(query, nargs, types, args, NULL, false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "could not run the job: %s", query);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	*has_id = !isnull;
	if (!isnull)
		*run_id = DatumGetInt64(d);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	if (!isnull)
		failure = MemoryContextStrdup(cxt, TextDatumGetCString(d));
	return failure;
}

/*
 * run_map
 *		One run of a map's job (d365._run_map_job()) in a transaction of its
 *		own, committed; a failure is added to *failure (the first failed
 *		run's id kept in *run_id).  Returns whether the run went through;
 *		*linked: whether it also linked, sent or settled rows (its created,
 *		updated or unchanged count), that is whether a lookup closing a
 *		cycle may now find its parent.
 */
static bool
run_map(MemoryContext cxt, const char *job, const char *map, StringInfo failure,
		int64 *run_id, bool *has_id, bool *linked)
{
	int64		one_id = 0;
	bool		one_has = false;
	char	   *one;

	*linked = false;

	pin_search_path();
	one = run_one(cxt, "SELECT r.run_id, r.failure FROM d365._run_map_job($1, $2) r", 2,
				  (Datum[]) {CStringGetTextDatum(job), CStringGetTextDatum(map)},
				  &one_id, &one_has);
	if (one == NULL && one_has)
		*linked = d365_sql_bool("SELECT s.created OPERATOR(pg_catalog.+) s.updated"
							   " OPERATOR(pg_catalog.+) s.unchanged OPERATOR(pg_catalog.>) 0"
							   " FROM d365.sync_run s WHERE s.id OPERATOR(pg_catalog.=) $1",
							   1, (Oid[]) {INT8OID}, (Datum[]) {Int64GetDatum(one_id)}, NULL);
	d365_job_commit();
	if (one != NULL)
	{
		if (!*has_id && one_has)
		{
			*run_id = one_id;
			*has_id = true;
		}
		appendStringInfo(failure, "%smap %s: %s", failure->len > 0 ? "; " : "", map, one);
	}
	return one == NULL;
}

static Datum
run_job_body(PG_FUNCTION_ARGS)
{
	MemoryContext cxt = CurrentMemoryContext;
	bool		nonatomic = fcinfo->context != NULL && IsA(fcinfo->context, CallContext) &&
		!castNode(CallContext, fcinfo->context)->atomic;
	char	   *job;
	StringInfoData failure;
	int64		run_id = 0;
	bool		has_id = false;

	pin_search_path();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown d365sync job \"%s\"", "(null)"),
				 errhint("The jobs are contacts, activities, pull, maps and map-pull.")));
	job = text_to_cstring(PG_GETARG_TEXT_PP(0));
	initStringInfo(&failure);

	SPI_connect_ext(nonatomic ? SPI_OPT_NONATOMIC : 0);
	if (strcmp(job, "maps") == 0 || strcmp(job, "map-pull") == 0)
	{
		List	   *maps = NIL;
		ListCell   *lc;
		uint64		i;
		bool	   *completed;
		bool	   *linked;
		bool		ignored;
		int			k;

		if (SPI_execute_with_args("SELECT j.name FROM d365._map_jobs($1) j", 1,
								  (Oid[]) {BOOLOID},
								  (Datum[]) {BoolGetDatum(strcmp(job, "maps") == 0)},
								  NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not list the maps");
		for (i = 0; i < SPI_processed; i++)
			maps = lappend(maps, MemoryContextStrdup(cxt, SPI_getvalue(SPI_tuptable->vals[i],
																		 SPI_tuptable->tupdesc, 1)));
		/* a transaction per map: each map's lock is held for its own run only */
		completed = palloc0(sizeof(bool) * (list_length(maps) + 1));
		linked = palloc0(sizeof(bool) * (list_length(maps) + 1));
		k = 0;
		foreach(lc, maps)
		{
			completed[k] = run_map(cxt, job, (char *) lfirst(lc), &failure, &run_id, &has_id,
								   &linked[k]);
			k++;
		}

		/*
		 * The maps' second pass, by the rule d365_sync() follows
		 * (d365_map_second_pass), so that the lookups to maps later in the
		 * order go in the same job run.
		 */
		k = 0;
		foreach(lc, maps)
		{
			char	   *map = (char *) lfirst(lc);

			k++;
			if (strcmp(job, "map-pull") == 0)
				continue;
			pin_search_path();
			if (d365_map_second_pass(map, completed[k - 1], linked, k - 1, list_length(maps)))
				(void) run_map(cxt, job, map, &failure, &run_id, &has_id, &ignored);
			else
				d365_job_commit();
		}
	}
	else
	{
		char	   *one = run_one(cxt, "SELECT r.run_id, r.failure FROM d365._run_job($1) r", 1,
								  (Datum[]) {CStringGetTextDatum(job)}, &run_id, &has_id);

		d365_job_commit();
		if (one != NULL)
			appendStringInfoString(&failure, one);
	}
	SPI_finish();
	if (failure.len > 0)
	{
		pin_search_path();
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("d365sync %s run failed: %s", job, failure.data),
				 has_id ? errdetail("The run is recorded in d365.sync_run with id " INT64_FORMAT ".", run_id)
				 : errdetail("The run is recorded in d365.sync_run."),
				 errhint("What the run did not finish stays pending for the next run.")));
	}
	PG_RETURN_VOID();
}

/* CALL d365.d365_run_job(job text), as the job role */
Datum
d365_run_job(PG_FUNCTION_ARGS)
{
	return d365_as_job(run_job_body, fcinfo);
}
