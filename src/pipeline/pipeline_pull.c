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
 * (src/client/odata_pages.c), hands each page to the record statement while the
 * page's memory is held, and stores the last page's delta link.  A delta
 * link Dynamics refuses (expired after 7 days, say: a 4xx other than the
 * ones about credentials or throttling) falls back to a new full read.
 * Memory stays flat: one page at a time.
 *
 * Fetching overlaps recording: as soon as a page is in, the next one is
 * asked for (d365_pages_prefetch), and what has arrived of it is read
 * between the statements that record the current page (d365_pages_pump),
 * so Dataverse prepares page N+1 while page N is applied.  Pages are still
 * recorded one after another, in order, and nothing of page N+1 is
 * recorded before page N's statements are done: a page that fails (after
 * its retries, in the client) fails the read where it stands, as before.
 *
 * An engine may have an initial load (engine->load, the table maps with
 * load = true): the first pull reads the whole table as its baseline, at
 * the server's maximum page size, recording each page with the load's
 * record statement and keeping the next link in d365.load_state, so that
 * a load stopped halfway goes on from there; a step may stop after a
 * number of pages for its caller to commit (CALL d365_load()).  The load
 * is a change-tracking read like any baseline: Dataverse tracks changes
 * from the start of that read (its records come in the order of their
 * versions, and the delta link of its last page brings what changed after
 * its first request), so the delta link of the last page becomes the
 * pull's and the pull applies what changed in Dynamics while the load
 * ran.  Its progress is measured against Dataverse's count of the table's
 * records (RetrieveTotalRecordCount, a snapshot: an estimate), asked for
 * once when the load starts; a count Dynamics does not give leaves the
 * total unknown.
 *
 * The contact pull (src/engines/incoming.c) and the table maps (src/engines/table_maps.c)
 * are engines on this reader.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"

#include "pipeline.h"
#include "progress.h"
#include "runs.h"
#include "spi_util.h"
#include "writers.h"

/*
 * Add one page's counts from the record statement to the run.  The rows go
 * as json, not jsonb: a string holding U+0000 fails its row alone there,
 * not the page.
 */
static void
record_page(D365Run *run, const D365PullEngine *engine, const char *record_sql,
			json_t *rows)
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
		rc = SPI_execute_with_args(record_sql, 2, types, args, nulls, false, 1);
	}
	PG_FINALLY();
	{
		d365_recorder_set(was);
	}
	PG_END_TRY();
	d365_run_add_counts(run, rc, record_sql);
}

/* The "value" array of a page read; ERROR when it failed or has none. */
static json_t *
page_rows(D365Pages *pages, D365Op *op)
{
	if (!op->ok)
		d365_op_report(op, ERROR);
	if (!json_is_object(op->json) || !json_is_array(json_object_get(op->json, "value")))
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("a page from Dynamics 365 has no \"value\" array"),
				 errcontext("Dynamics 365 request: GET %s", pages->path)));
	return json_object_get(op->json, "value");
}

/*
 * store_delta_link
 *		Keep the delta link Dynamics sent for the next pull, inside the flag
 *		of d365sync's own writes (src/capture/state_guard.c): no role running the
 *		jobs may choose what a pull reads.
 */
static void
store_delta_link(const D365PullEngine *engine, const char *delta, bool full)
{
	Oid			types[3] = {TEXTOID, TEXTOID, BOOLOID};
	bool		was = d365_recorder_set(true);

	PG_TRY();
	{
		d365_sql_text("INSERT INTO d365.pull_state AS p (entity, delta_link, baseline_at, last_pull_at)"
					  " VALUES ($1, $2, CASE WHEN $3 THEN now() END, now())"
					  " ON CONFLICT (entity) DO UPDATE SET delta_link = EXCLUDED.delta_link,"
					  " baseline_at = coalesce(EXCLUDED.baseline_at, p.baseline_at),"
					  " last_pull_at = EXCLUDED.last_pull_at RETURNING entity",
					  3, types,
					  (Datum[]) {CStringGetTextDatum(engine->state_key),
					  CStringGetTextDatum(delta), BoolGetDatum(full)});
	}
	PG_FINALLY();
	{
		d365_recorder_set(was);
	}
	PG_END_TRY();
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

/* The delta link of the last page of a read; ERROR when there is none. */
static const char *
last_delta_link(const D365PullEngine *engine, D365Pages *pages)
{
	const char *delta = pages->op ? d365_json_str(pages->op->json, "@odata.deltaLink") : NULL;

	if (delta == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("Dynamics 365 returned no delta link"),
				 errdetail("The last page of a change-tracking read carries @odata.deltaLink."),
				 errhint("%s", engine->no_delta_hint)));
	return delta;
}

/*
 * recorded_write
 *		One statement writing what Dynamics answered (a load's delta and
 *		next links), inside the flag of d365sync's own writes
 *		(src/capture/state_guard.c): no role running the jobs writes those links
 *		itself.  Returns the SPI result code.
 */
static int
recorded_write(const char *sql, int nargs, Oid *types, Datum *args, const char *nulls)
{
	volatile int rc = 0;
	bool		was = d365_recorder_set(true);

	PG_TRY();
	{
		rc = SPI_execute_with_args(sql, nargs, types, args, nulls, false, 0);
	}
	PG_FINALLY();
	{
		d365_recorder_set(was);
	}
	PG_END_TRY();
	return rc;
}

/*
 * load_count
 *		Dataverse's count of the records of the engine's table, or -1 when
 *		it gives none: an estimate for the load's progress, never a reason
 *		to fail the load.
 */
static int64
load_count(D365Run *run, const D365PullEngine *engine)
{
	char	   *path = engine->load->count_path ? engine->load->count_path(engine) : NULL;
	D365Op	   *op;
	json_t	   *coll;
	json_t	   *values;

	if (path == NULL)
		return -1;
	op = d365_op_make("GET", path, NULL);
	d365_client_execute(d365_run_client(run), &op, 1);
	if (!op->ok || !json_is_object(op->json))
		return -1;
	coll = json_object_get(op->json, "EntityRecordCountCollection");
	values = coll ? json_object_get(coll, "Values") : NULL;
	/* (a count no table reaches is taken for none: it only sizes progress) */
	if (!json_is_array(values) || json_array_size(values) != 1 ||
		!json_is_integer(json_array_get(values, 0)) ||
		json_integer_value(json_array_get(values, 0)) < 0 ||
		json_integer_value(json_array_get(values, 0)) > INT64CONST(1000000000000))
		return -1;
	return (int64) json_integer_value(json_array_get(values, 0));
}

/*
 * load_start
 *		Start a load: its position is the engine's first request (every
 *		record, with change tracking), its total Dataverse's count.
 */
static void
load_start(D365Run *run, const D365PullEngine *engine)
{
	D365PullLoad *load = engine->load;
	int64		total = load_count(run, engine);

	if (recorded_write("INSERT INTO d365.load_state AS l (entity, delta_link, next_link, total)"
					   " VALUES ($1, NULL, $2, $3)"
					   " ON CONFLICT (entity) DO UPDATE SET delta_link = NULL,"
					   " next_link = EXCLUDED.next_link, total = EXCLUDED.total, pages = 0, records = 0,"
					   " started_at = pg_catalog.now(), finished_at = NULL, last_error = NULL",
					   3, (Oid[]) {TEXTOID, TEXTOID, INT8OID},
					   (Datum[]) {CStringGetTextDatum(engine->state_key),
					   CStringGetTextDatum(load->path(engine)), Int64GetDatum(total)},
					   total < 0 ? "  n" : NULL) != SPI_OK_INSERT)
		elog(ERROR, "could not start the load");
	if (total >= 0)
		d365_progress_add_total(total);
}

/*
 * load_delta_link
 *		The delta link of the load's last page becomes the pull's, inside
 *		the flag of d365sync's own writes (src/capture/state_guard.c).
 */
static void
load_delta_link(Datum key)
{
	bool		was = d365_recorder_set(true);

	PG_TRY();
	{
		d365_sql_text("INSERT INTO d365.pull_state AS p (entity, delta_link, baseline_at, last_pull_at)"
					  " SELECT l.entity, l.delta_link, l.started_at, pg_catalog.now()"
					  "   FROM d365.load_state l WHERE l.entity OPERATOR(pg_catalog.=) $1"
					  " ON CONFLICT (entity) DO UPDATE SET delta_link = EXCLUDED.delta_link,"
					  " baseline_at = EXCLUDED.baseline_at, last_pull_at = EXCLUDED.last_pull_at"
					  " RETURNING p.entity", 1, (Oid[]) {TEXTOID}, &key);
	}
	PG_FINALLY();
	{
		d365_recorder_set(was);
	}
	PG_END_TRY();
}

/*
 * load_finish
 *		After the last page: the engine's done_sql, then the delta link of
 *		the last page becomes the pull's.
 */
static void
load_finish(D365Run *run, const D365PullEngine *engine)
{
	D365PullLoad *load = engine->load;
	Datum		key = CStringGetTextDatum(engine->state_key);

	if (load->pages != NULL)
	{
		d365_pages_close(load->pages);
		load->pages = NULL;
	}
	if (load->done_sql != NULL &&
		SPI_execute_with_args(load->done_sql, 1, (Oid[]) {TEXTOID},
							  (Datum[]) {CStringGetTextDatum(engine->arg)}, NULL, false, 0) < 0)
		elog(ERROR, "the end of the load failed");
	load_delta_link(key);
	d365_sql_text("UPDATE d365.load_state l SET finished_at = pg_catalog.now(), next_link = NULL"
				  " WHERE l.entity OPERATOR(pg_catalog.=) $1 RETURNING l.entity",
				  1, (Oid[]) {TEXTOID}, &key);
}

/*
 * pull_load
 *		The engine's load, from where d365.load_state says it stands.
 *		Returns true when it is done (now or before), false when this step
 *		stopped after load->step_pages pages (load->more is set): commit,
 *		and call again.  The reader is kept in load between steps; it is
 *		opened again at the stored next link when another run moved it.
 */
static bool
pull_load(D365Run *run, const D365PullEngine *engine)
{
	D365PullLoad *load = engine->load;
	Datum		key = CStringGetTextDatum(engine->state_key);
	char	   *next;
	D365Op	   *op;
	int			steps = 0;
	MemoryContext old;

	load->more = false;
	if (d365_sql_bool("SELECT EXISTS (SELECT FROM d365.load_state l WHERE l.entity OPERATOR(pg_catalog.=) $1"
					  " AND l.finished_at IS NOT NULL)", 1, (Oid[]) {TEXTOID}, &key, NULL))
		return true;
	/* not started (or left without a position): from the first page */
	if (!d365_sql_bool("SELECT EXISTS (SELECT FROM d365.load_state l WHERE l.entity OPERATOR(pg_catalog.=) $1"
					   " AND (l.next_link IS NOT NULL OR l.delta_link IS NOT NULL))",
					   1, (Oid[]) {TEXTOID}, &key, NULL))
		load_start(run, engine);
	else if (d365_progress_total() < 0)
	{
		/* a report started again (after a commit, or another run's pages) */
		bool		isnull;
		int64		left = d365_sql_int64("SELECT CASE WHEN l.total > l.records THEN l.total - l.records ELSE 0 END"
										  " FROM d365.load_state l WHERE l.entity OPERATOR(pg_catalog.=) $1",
										  1, (Oid[]) {TEXTOID}, &key, &isnull);

		if (!isnull)
			d365_progress_add_total(left + run->counts.created + run->counts.updated +
									run->counts.unchanged + run->counts.unlinked +
									run->counts.failed);
	}
	next = d365_sql_text("SELECT l.next_link FROM d365.load_state l WHERE l.entity OPERATOR(pg_catalog.=) $1",
						 1, (Oid[]) {TEXTOID}, &key);
	if (next == NULL)
	{
		load_finish(run, engine);
		return true;
	}
	if (load->pages == NULL || load->expect == NULL || strcmp(load->expect, next) != 0)
	{
		if (load->pages != NULL)
			d365_pages_close(load->pages);
		old = MemoryContextSwitchTo(load->cxt);
		load->pages = d365_pages_open(d365_run_client(run), next, "odata.track-changes", 0);
		load->pages->page_size = load->page_size;
		MemoryContextSwitchTo(old);
	}

	while ((op = d365_pages_next(load->pages)) != NULL)
	{
		json_t	   *rows = page_rows(load->pages, op);
		const char *link = d365_json_str(op->json, "@odata.nextLink");
		const char *delta = link ? NULL : last_delta_link(engine, load->pages);

		/*
		 * The next page is fetched while this one is recorded; the position
		 * kept below is this page's next link all the same, so a page ahead
		 * that fails or never comes is read again by the next step.  The
		 * last page's delta link is kept with it, in the same write.
		 */
		d365_pages_prefetch(load->pages);
		old = MemoryContextSwitchTo(load->pages->cxt);
		record_page(run, engine, load->record_sql, rows);
		d365_pages_pump(load->pages);
		if (recorded_write("UPDATE d365.load_state l SET next_link = $2, pages = l.pages + 1,"
						   " records = l.records + $3, delta_link = coalesce($4, l.delta_link)"
						   " WHERE l.entity OPERATOR(pg_catalog.=) $1",
						   4, (Oid[]) {TEXTOID, TEXTOID, INT8OID, TEXTOID},
						   (Datum[]) {key, link ? CStringGetTextDatum(link) : (Datum) 0,
						   Int64GetDatum((int64) json_array_size(rows)),
						   delta ? CStringGetTextDatum(delta) : (Datum) 0},
						   link ? "   n" : " n  ") != SPI_OK_UPDATE)
			elog(ERROR, "could not keep the position of the load");
		MemoryContextSwitchTo(old);
		if (load->expect != NULL)
			pfree(load->expect);
		load->expect = link ? MemoryContextStrdup(load->cxt, link) : NULL;
		d365_run_publish(run);
		if (link == NULL)
			break;
		if (load->step_pages > 0 && ++steps >= load->step_pages)
		{
			load->more = true;
			return false;
		}
	}
	load_finish(run, engine);
	return true;
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
	json_t	   *rows;

	if (engine->load != NULL && !pull_load(run, engine))
	{
		/* a step of the load ended before its last page */
		if (baseline)
			*baseline = true;
		return 0;
	}

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
		rows = page_rows(pages, op);
		/* the next page is fetched while this one is recorded */
		d365_pages_prefetch(pages);
		old = MemoryContextSwitchTo(pages->cxt);
		record_page(run, engine, engine->record_sql, rows);
		d365_pages_pump(pages);
		MemoryContextSwitchTo(old);
		d365_run_publish(run);
		npages++;
	}

	/* the last page carries the link the next pull continues from */
	delta = last_delta_link(engine, pages);

	old = MemoryContextSwitchTo(pages->cxt);
	store_delta_link(engine, delta, full);
	MemoryContextSwitchTo(old);
	d365_pages_close(pages);
	if (baseline)
		*baseline = full;
	return npages;
}
