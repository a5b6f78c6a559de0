/*-------------------------------------------------------------------------
 *
 * pipeline_pull.c
 *	  The incoming half of the pipeline: read a Dataverse table's changes
 *	  with change tracking, record them page by page with SQL.
 *
 * An incoming engine supplies:
 *
 *	 state key	  its row in d365.pull_state (entity), which keeps the
 *				  @odata.deltaLink the next read continues from
 *	 start path	  the first request of a full read (the baseline), e.g.
 *				  accounts?$select=name,revenue,accountid
 *	 record SQL	  a statement taking $1 json (a page's "value" array) and
 *				  $2 text (the engine's argument, may be NULL) and
 *				  returning one row of counts (updated, unchanged, failed,
 *				  unlinked: any of d365.sync_run's count columns)
 *
 * d365_pipeline_pull() GETs the stored delta link (or the start path, with
 * Prefer: odata.track-changes), follows @odata.nextLink through the pages
 * (src/odata_pages.c), hands each page to the record statement while the
 * page's memory is held, and stores the last page's delta link.  A delta
 * link Dynamics refuses (expired after 7 days, say: a 4xx other than the
 * ones about credentials or throttling) falls back to a new full read.
 * Memory stays flat: one page at a time.
 *
 * The contact pull (src/incoming.c) and the table maps (src/table_maps.c)
 * are engines on this reader.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"

#include "pipeline.h"
#include "runs.h"
#include "spi_util.h"
#include "state_guard.h"

/*
 * Add one page's counts from the record statement to the run.  The rows go
 * as json, not jsonb: a string holding U+0000 fails its row alone there,
 * not the page.
 */
static void
record_page(D365Run *run, const D365PullEngine *engine, json_t *rows)
{
	Oid			types[2] = {JSONOID, TEXTOID};
	Datum		args[2];
	char		nulls[2] = {' ', engine->arg ? ' ' : 'n'};

	volatile int rc = 0;
	bool		was;

	args[0] = CStringGetTextDatum(d365_json_dump(rows));
	args[1] = engine->arg ? CStringGetTextDatum(engine->arg) : (Datum) 0;
	/* the Dynamics ids the record statement writes are what Dynamics sent */
	was = d365_recorder_set(true);
	PG_TRY();
	{
		rc = SPI_execute_with_args(engine->record_sql, 2, types, args, nulls, false, 1);
	}
	PG_FINALLY();
	{
		d365_recorder_set(was);
	}
	PG_END_TRY();
	d365_run_add_counts(run, rc, engine->record_sql);
}

/*
 * delta_link_refused
 *		Whether a failed read of a stored delta link means Dynamics will not
 *		take that link any more (a 4xx other than the ones about the
 *		credentials or throttling), so that a new full read is the remedy.
 */
static bool
delta_link_refused(const D365Op *op)
{
	return !op->ok && !op->transport_failure &&
		op->status >= 400 && op->status < 500 &&
		op->status != 401 && op->status != 403 && op->status != 429;
}

/*
 * d365_pipeline_pull
 *		One change-tracking read of engine's table (see the file's header).
 *		Returns the number of pages read; *baseline says whether it was a
 *		full read.  Requires an SPI connection.
 */
int
d365_pipeline_pull(D365Run *run, const D365PullEngine *engine, bool *baseline)
{
	D365Pages  *pages;
	D365Op	   *op;
	char	   *path;
	bool		full;
	int			npages = 0;
	const char *delta;
	Oid			types[3] = {TEXTOID, TEXTOID, BOOLOID};
	MemoryContext old;

	path = d365_sql_text("SELECT delta_link FROM d365.pull_state WHERE entity = $1",
						 1, types, (Datum[]) {CStringGetTextDatum(engine->state_key)});
	full = (path == NULL);
	if (full)
		path = engine->start_path(engine);

	pages = d365_pages_open(d365_run_client(run), path, "odata.track-changes", 0);
	while ((op = d365_pages_next(pages)) != NULL)
	{
		if (!full && delta_link_refused(op))
		{
			/* the delta link was refused: start over with a full read */
			old = MemoryContextSwitchTo(run->cxt);
			run->message = psprintf("the delta link was refused (%s); took a new baseline",
									d365_op_summary(op));
			path = engine->start_path(engine);
			full = true;
			MemoryContextSwitchTo(old);
			d365_pages_restart(pages, path);
			continue;
		}
		if (!op->ok)
			d365_op_report(op, ERROR);
		if (!json_is_object(op->json) || !json_is_array(json_object_get(op->json, "value")))
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("a change-tracking page from Dynamics 365 has no \"value\" array"),
					 errcontext("Dynamics 365 request: GET %s", pages->path)));

		old = MemoryContextSwitchTo(pages->cxt);
		record_page(run, engine, json_object_get(op->json, "value"));
		MemoryContextSwitchTo(old);
		npages++;
	}

	/* the last page carries the link the next pull continues from */
	delta = d365_json_str(pages->op->json, "@odata.deltaLink");
	if (delta == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("Dynamics 365 returned no delta link"),
				 errdetail("The last page of a change-tracking read carries @odata.deltaLink."),
				 errhint("%s", engine->no_delta_hint)));

	old = MemoryContextSwitchTo(pages->cxt);
	d365_sql_text("INSERT INTO d365.pull_state AS p (entity, delta_link, baseline_at, last_pull_at)"
				  " VALUES ($1, $2, CASE WHEN $3 THEN now() END, now())"
				  " ON CONFLICT (entity) DO UPDATE SET delta_link = EXCLUDED.delta_link,"
				  " baseline_at = coalesce(EXCLUDED.baseline_at, p.baseline_at),"
				  " last_pull_at = EXCLUDED.last_pull_at RETURNING entity",
				  3, types,
				  (Datum[]) {CStringGetTextDatum(engine->state_key),
				  CStringGetTextDatum(delta), BoolGetDatum(full)});
	MemoryContextSwitchTo(old);
	d365_pages_close(pages);
	if (baseline)
		*baseline = full;
	return npages;
}
