/*-------------------------------------------------------------------------
 *
 * table_maps.c
 *	  Table maps: any local table <-> any Dataverse table, as one more
 *	  engine on the pipeline.
 *
 * A map's outgoing sync is the pipeline (src/pipeline/pipeline.c) with the work
 * query d365._map_work_sql(map) and the record function d365._map_record
 * (sql/install/12_map_sync.sql), and, for unlinked rows with match
 * columns, the look-up stage d365._map_lookup_path/_resolve (one hit is
 * linked instead of created): rows unlinked or changed since their last
 * sync become upserts (a create, on the row's own id) or updates (If-Match:
 * *, only what differs), lookups bound to the parent row's record
 * (<navigation property>@odata.bind), choices sent as their values.  A
 * map's pull is the pipeline's change-tracking reader (src/pipeline/pipeline_pull.c)
 * with the record statement d365._map_pull_record.  Nothing here knows a
 * table, a column or a Dataverse field: that is all in the SQL.
 *
 *	 d365_sync(map)  one run per map (of one, or every enabled map in
 *		dependency order: parents before children), each under the lock of
 *		its row in d365.table_map (a sync and a pull of one map never run
 *		at once) and recorded in d365.sync_run as kind "map:<name>"; the
 *		attached contact table is the map "contact" (a row of d365.table_map
 *		made by its attachment), in its place in that order, synced by the
 *		contact engine (src/engines/contacts_out.c)
 *	 d365_pull(map)  the same for incoming changes; the contact table's
 *		pull is src/engines/incoming.c's.  A map with load = true is loaded by its
 *		first pull (src/pipeline/pipeline_pull.c, sql/install/14_map_load.sql)
 *	 d365_load(map)  a procedure: the same pulls of the maps, committing
 *		after each page of a load
 *
 * Each returns one row per map: map, created, updated, unchanged, failed,
 * deleted (unlinked because the record was deleted), requests.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "d365_json.h"
#include "nodes/parsenodes.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/tuplestore.h"

#include "jobs.h"
#include "pipeline.h"
#include "progress.h"
#include "runs.h"
#include "spi_util.h"
#include "job_role.h"

PG_FUNCTION_INFO_V1(d365_sync);
PG_FUNCTION_INFO_V1(d365_pull);

/* The maps a call covers, in dependency order, and whether the contact
 * table (map "contact") is among them. */
static List *
maps_to_run(FunctionCallInfo fcinfo, bool outgoing, bool *contact)
{
	char	   *only = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	bool		attached;
	List	   *names = NIL;
	uint64		i;
	MemoryContext caller = CurrentMemoryContext;

	SPI_connect();
	attached = d365_sql_bool("SELECT EXISTS (SELECT FROM d365.contact_source)", 0, NULL, NULL, NULL);

	if (only != NULL && strcmp(only, "contact") == 0)
	{
		*contact = attached;
		if (!attached)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("table map \"contact\" does not exist"),
					 errhint("The map \"contact\" is the contact table attached with d365_attach_contacts().")));
		SPI_finish();
		return NIL;
	}
	if (only != NULL)
	{
		*contact = false;
		/* an error when there is no such map */
		(void) d365_sql_text("SELECT (d365._table_map($1)).name", 1, (Oid[]) {TEXTOID},
							 (Datum[]) {CStringGetTextDatum(only)});
	}
	else
	{
		/*
		 * The contact table is the map "contact" of d365.table_map, listed
		 * in its place in the dependency order (after the other maps of its
		 * depth) and dispatched to the contact engine by run_maps.  An
		 * attachment without that row (never made so) runs last.
		 */
		*contact = attached
			&& !d365_sql_bool("SELECT EXISTS (SELECT FROM d365.table_map t"
							  " WHERE t.name OPERATOR(pg_catalog.=) 'contact')",
							  0, NULL, NULL, NULL);
	}
	if (SPI_execute_with_args(outgoing
							  ? "SELECT o.name FROM d365._map_order() o JOIN d365.table_map t USING (name)"
							  " WHERE ($1 IS NULL AND t.enabled OR t.name = $1) AND t.direction <> 'in'"
							  " ORDER BY o.depth, o.name = 'contact', o.name"
							  : "SELECT o.name FROM d365._map_order() o JOIN d365.table_map t USING (name)"
							  " WHERE ($1 IS NULL AND t.enabled OR t.name = $1) AND t.direction <> 'out'"
							  " ORDER BY o.depth, o.name = 'contact', o.name",
							  1, (Oid[]) {TEXTOID},
							  (Datum[]) {only ? CStringGetTextDatum(only) : (Datum) 0},
							  only ? " " : "n", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not list the table maps");
	for (i = 0; i < SPI_processed; i++)
	{
		char	   *name = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		MemoryContext old = MemoryContextSwitchTo(caller);

		names = lappend(names, pstrdup(name));
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
	return names;
}

/* One result row of d365_sync() or d365_pull(): a map's counts. */
typedef struct MapRow
{
	char	   *map;
	D365Counts	counts;
	int64		requests;
	bool		completed;		/* the map's run ended without an error */
} MapRow;

/* The counts of a finished run, added to its map's row. */
static void
add_run(MapRow *row, const char *map, D365Run *run)
{
	row->map = pstrdup(map);
	row->counts.created += run->counts.created;
	row->counts.updated += run->counts.updated;
	row->counts.unchanged += run->counts.unchanged;
	row->counts.failed += run->counts.failed;
	row->counts.unlinked += run->counts.unlinked;
	row->requests += run->client ? run->client->requests : 0;
}

static void
put_row(ReturnSetInfo *rsinfo, const MapRow *row)
{
	Datum		values[7];
	bool		nulls[7] = {false};

	values[0] = CStringGetTextDatum(row->map);
	values[1] = Int32GetDatum((int32) row->counts.created);
	values[2] = Int32GetDatum((int32) row->counts.updated);
	values[3] = Int32GetDatum((int32) row->counts.unchanged);
	values[4] = Int32GetDatum((int32) row->counts.failed);
	values[5] = Int32GetDatum((int32) row->counts.unlinked);
	values[6] = Int32GetDatum((int32) row->requests);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/*
 * The contact engine's run of the map "contact": one result row.  named:
 * the call named the map, which runs it even while it is disabled.
 */
static void
run_contact(MapRow *row, bool outgoing, bool named)
{
	D365Run		run;

	d365_run_init(&run, outgoing ? "contacts" : "pull");
	if (outgoing)
		(void) (named ? d365_job_contacts_named(&run) : d365_job_contacts(&run));
	else
		(void) (named ? d365_job_pull_named(&run) : d365_job_pull(&run));
	add_run(row, "contact", &run);
}

/*
 * map_lock
 *		The map's row of d365.table_map, locked FOR NO KEY UPDATE to the end
 *		of the transaction, unless another run holds it: false then (the run
 *		says it skipped).  A row lock, not an advisory lock: only a role that
 *		may update the maps can hold it, so no other role can keep a map
 *		from syncing.
 */
static bool
map_lock(D365Run *run, const char *map)
{
	if (d365_sql_int64("SELECT pg_catalog.count(*) FROM (SELECT FROM d365.table_map t"
					   " WHERE t.name OPERATOR(pg_catalog.=) $1 FOR NO KEY UPDATE SKIP LOCKED) x",
					   1, (Oid[]) {TEXTOID}, (Datum[]) {CStringGetTextDatum(map)}, NULL) == 1)
		return true;
	{
		MemoryContext old = MemoryContextSwitchTo(run->cxt);

		run->message = psprintf("skipped: another run of map %s is in progress", map);
		MemoryContextSwitchTo(old);
	}
	run->skipped = true;
	return false;
}

/*
 * map_guard
 *		The check every run of a map starts with, under its table's lock
 *		(d365._map_guard, sql/install/16_map_guard.sql): an error, which
 *		fails the run, when the table or a table its lookups read could run
 *		code of its owner's making, or lost d365sync's triggers.
 */
static void
map_guard(const char *map)
{
	if (SPI_execute_with_args("SELECT d365._map_guard($1)", 1, (Oid[]) {TEXTOID},
							  (Datum[]) {CStringGetTextDatum(map)}, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not check table map \"%s\"", map);
}

/*
 * The outgoing run of one map: its work query through the pipeline, with
 * the look-up stage (d365._map_lookup) finding the records of unlinked rows
 * by their match columns and reading the records to merge (linked rows of
 * a map with 'both' fields whose ETag is not known).  An update answered 412 (the record changed in
 * Dynamics since its ETag was read) forgets the ETag, so a second pass
 * reads and merges those rows at once; what still meets a 412 then waits
 * for the next run.
 */
static void
sync_body(D365Run *run, void *arg)
{
	const char *map = (const char *) arg;
	int			pass;

	if (!map_lock(run, map))
		return;
	map_guard(map);

	for (pass = 0; pass < 2; pass++)
	{
		char	   *work_sql;

		if (pass > 0 &&
			!d365_sql_bool("SELECT EXISTS (SELECT FROM d365.map_row r WHERE r.map = $1"
						   " AND r.last_status = 412 AND r.etag IS NULL"
						   " AND r.change_seq > r.synced_seq AND r.next_attempt_at IS NULL"
						   " AND r.last_attempt_at >= pg_catalog.now())",
						   1, (Oid[]) {TEXTOID}, (Datum[]) {CStringGetTextDatum(map)}, NULL))
			break;
		work_sql = d365_sql_text("SELECT d365._map_work_sql($1)", 1, (Oid[]) {TEXTOID},
								 (Datum[]) {CStringGetTextDatum(map)});
		d365_pipeline_process_lookup(run, work_sql, 0, NULL, NULL, "d365._map_record",
									 "d365._map_lookup");
	}
}

/* The first request of a full read of a map (nothing mapped: an error). */
static char *
pull_start_path(const D365PullEngine *engine)
{
	char	   *path = d365_sql_text("SELECT d365._map_pull_start_path($1)", 1,
									 (Oid[]) {TEXTOID},
									 (Datum[]) {CStringGetTextDatum(engine->arg)});

	if (path == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no column of map \"%s\" is mapped for incoming changes", engine->arg),
				 errhint("Map columns with d365_map_column(), direction both or in.")));
	return path;
}

/* Dataverse's count of the records of a map's table, for a load's progress. */
static char *
load_count_path(const D365PullEngine *engine)
{
	return d365_sql_text("SELECT d365._map_load_count_path($1)", 1, (Oid[]) {TEXTOID},
						 (Datum[]) {CStringGetTextDatum(engine->arg)});
}

/* A pull of one map: its load (when it has one) and its changes. */
typedef struct PullStep
{
	const char *map;
	D365PullLoad *load;			/* kept between the steps of a load */
	int			step_pages;		/* pages per step (0: to the end) */
	bool		done;			/* set when the pull has nothing more to do */
} PullStep;

/*
 * The incoming run of one map: the change-tracking reader on its table,
 * after its initial load when load = true (src/pipeline/pipeline_pull.c).  Lookups
 * still waiting for their parent are resolved at the end.
 */
static void
pull_body(D365Run *run, void *arg)
{
	PullStep   *step = (PullStep *) arg;
	const char *map = step->map;
	D365PullEngine engine = {0};
	bool		full;
	int			npages;
	bool		loading;
	char	   *loaded;
	MemoryContext old;

	step->done = true;
	if (!map_lock(run, map))
		return;
	map_guard(map);
	engine.state_key = psprintf("map:%s", map);
	engine.start_path = pull_start_path;
	engine.record_sql = "SELECT updated, unchanged, failed, unlinked"
		" FROM d365._map_pull_record($1, $2)";
	engine.arg = map;
	engine.no_delta_hint = "Enable change tracking for the table in Dynamics 365 (Power Apps: Tables, the table, Properties, Track changes).";
	loading = d365_sql_bool("SELECT t.load AND NOT EXISTS (SELECT FROM d365.load_state l"
							"  WHERE l.entity OPERATOR(pg_catalog.=) ('map:' OPERATOR(pg_catalog.||) t.name)"
							"    AND l.finished_at IS NOT NULL)"
							" FROM d365.table_map t WHERE t.name OPERATOR(pg_catalog.=) $1",
							1, (Oid[]) {TEXTOID}, (Datum[]) {CStringGetTextDatum(map)}, NULL);
	if (d365_sql_bool("SELECT t.load FROM d365.table_map t WHERE t.name OPERATOR(pg_catalog.=) $1",
					  1, (Oid[]) {TEXTOID}, (Datum[]) {CStringGetTextDatum(map)}, NULL))
	{
		/* records not linked yet are loaded, during the load and after */
		engine.record_sql = "SELECT created, updated, unchanged, failed, unlinked"
			" FROM d365._map_load_record($1, $2)";
		engine.load = step->load;
		engine.load->count_path = load_count_path;
		engine.load->path = pull_start_path;
		engine.load->record_sql = engine.record_sql;
		engine.load->done_sql = "SELECT d365._map_resolve_lookups()";
		engine.load->page_size = D365_LOAD_PAGE_SIZE;
		engine.load->step_pages = step->step_pages;
	}
	npages = d365_pipeline_pull(run, &engine, &full);
	if (engine.load != NULL && engine.load->more)
	{
		step->done = false;
		return;
	}
	(void) d365_sql_text("SELECT d365._map_resolve_lookups()::pg_catalog.text", 0, NULL, NULL);
	if (run->message != NULL)
		return;
	old = MemoryContextSwitchTo(run->cxt);
	if (loading &&
		(loaded = d365_sql_text("SELECT pg_catalog.format('loaded map %s: %s record(s) in %s page(s)', $1,"
								" l.records, l.pages) FROM d365.load_state l"
								" WHERE l.entity OPERATOR(pg_catalog.=) ('map:' OPERATOR(pg_catalog.||) $1)"
								"   AND l.finished_at IS NOT NULL",
								1, (Oid[]) {TEXTOID}, (Datum[]) {CStringGetTextDatum(map)})) != NULL)
		run->message = pstrdup(loaded);
	else if (full)
		run->message = psprintf("baseline: read map %s in %d page(s)", map, npages);
	MemoryContextSwitchTo(old);
}

/*
 * d365_job_map_sync, d365_job_map_pull
 *		One run of a map's sync or pull (see jobs.h): kind "map:<name>" or
 *		"map-pull:<name>", under the lock of the map's row.  What d365_sync()
 *		and d365_pull() run for each map, and the background worker for each
 *		map it serves.
 */
bool
d365_job_map_sync(D365Run *run, const char *map)
{
	MemoryContext old = MemoryContextSwitchTo(run->cxt);

	run->kind = psprintf("map:%s", map);
	MemoryContextSwitchTo(old);
	return d365_run_execute(run, NULL, sync_body, (void *) map);
}

bool
d365_job_map_pull(D365Run *run, const char *map)
{
	MemoryContext old = MemoryContextSwitchTo(run->cxt);
	D365PullLoad load = {0};
	PullStep	step = {map, &load, 0, false};

	run->kind = psprintf("map-pull:%s", map);
	MemoryContextSwitchTo(old);
	load.cxt = run->cxt;
	return d365_run_execute(run, NULL, pull_body, (void *) &step);
}

/*
 * d365_map_second_pass
 *		Whether a map runs again at the end of a call that ran maps in their
 *		order (d365_sync(), CALL d365_run_job('maps')): its rows went without
 *		a lookup closing a cycle of the order (sql/install/17_map_cycles.sql),
 *		and the parents of those lookups may have been linked since.  Only a
 *		map whose run went through (completed), only when it or a map after
 *		it in the call linked rows (linked[place .. nmaps - 1]: a parent of
 *		such a lookup is one of them), and only when it owes lookups.  The
 *		one rule both callers follow.  Requires an SPI connection.
 */
bool
d365_map_second_pass(const char *map, bool completed, const bool *linked,
					 int place, int nmaps)
{
	bool		later = false;
	int			j;

	for (j = place; j < nmaps; j++)
		later = later || linked[j];
	if (!completed || !later)
		return false;
	return d365_sql_bool("SELECT d365._map_owes_lookups($1)", 1, (Oid[]) {TEXTOID},
						 (Datum[]) {CStringGetTextDatum(map)}, NULL);
}

/* d365_sync() and d365_pull(): one run per map, one row per run. */
static Datum
run_maps(FunctionCallInfo fcinfo, bool outgoing)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bool		contact;
	List	   *maps;
	ListCell   *lc;
	MapRow	   *rows;
	bool	   *linked;
	int			nrows = 0;
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	maps = maps_to_run(fcinfo, outgoing, &contact);
	rows = palloc0(sizeof(MapRow) * (list_length(maps) + 1));
	foreach(lc, maps)
	{
		char	   *map = (char *) lfirst(lc);
		D365Run		run;

		if (strcmp(map, "contact") == 0)
		{
			run_contact(&rows[nrows++], outgoing, !PG_ARGISNULL(0));
			continue;
		}
		d365_run_init(&run, "map");
		if (outgoing)
			rows[nrows].completed = d365_job_map_sync(&run, map) && !run.skipped;
		else
			(void) d365_job_map_pull(&run, map);
		add_run(&rows[nrows++], map, &run);
	}
	if (contact)
		run_contact(&rows[nrows++], outgoing, !PG_ARGISNULL(0));

	/*
	 * The maps' second pass (d365_map_second_pass), counted in the map's
	 * row: the lookups owed whose parents this call linked go now.
	 */
	linked = palloc0(sizeof(bool) * (nrows + 1));
	for (i = 0; i < nrows; i++)
		linked[i] = rows[i].counts.created > 0 || rows[i].counts.updated > 0 ||
			rows[i].counts.unchanged > 0;
	for (i = 0; outgoing && i < nrows; i++)
	{
		D365Run		run;
		bool		again;

		if (strcmp(rows[i].map, "contact") == 0)
			continue;
		SPI_connect();
		again = d365_map_second_pass(rows[i].map, rows[i].completed, linked, i, nrows);
		SPI_finish();
		if (!again)
			continue;
		d365_run_init(&run, "map");
		(void) d365_job_map_sync(&run, rows[i].map);
		add_run(&rows[i], rows[i].map, &run);
	}
	for (i = 0; i < nrows; i++)
		put_row(rsinfo, &rows[i]);
	return (Datum) 0;
}

/*
 * d365_sync(map text DEFAULT NULL) -> SETOF (map, created, updated,
 *		unchanged, failed, deleted, requests)
 */
static Datum
d365_sync_body(PG_FUNCTION_ARGS)
{
	return run_maps(fcinfo, true);
}

/* d365_sync() runs as the job role (src/common/job_role.c) */
Datum
d365_sync(PG_FUNCTION_ARGS)
{
	return d365_as_job(d365_sync_body, fcinfo);
}

/*
 * d365_pull(map text DEFAULT NULL) -> SETOF (map, created, updated,
 *		unchanged, failed, deleted, requests)
 */
static Datum
d365_pull_body(PG_FUNCTION_ARGS)
{
	return run_maps(fcinfo, false);
}

/* d365_pull() runs as the job role (src/common/job_role.c) */
Datum
d365_pull(PG_FUNCTION_ARGS)
{
	return d365_as_job(d365_pull_body, fcinfo);
}

/* search_path = pg_catalog, pg_temp to the end of the transaction */
static void
pin_search_path(void)
{
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
}

/*
 * d365_load(map text DEFAULT NULL), a procedure
 *		The pull of one map or of every enabled map (parents first), as
 *		d365_pull() runs it, committing after each page of an initial load
 *		when called by CALL outside a transaction block, so that a load
 *		cancelled or cut off by a crash goes on from its last page.  Each
 *		map's pull is one run (one row in d365.sync_run, its progress in
 *		d365_run_progress() across the commits).  Inside a transaction
 *		block it commits nothing, as d365_pull().  A procedure that commits
 *		cannot carry a SET clause: search_path is pinned in each of its
 *		transactions.
 */
PG_FUNCTION_INFO_V1(d365_load);

static Datum
d365_load_body(PG_FUNCTION_ARGS)
{
	bool		nonatomic = fcinfo->context != NULL && IsA(fcinfo->context, CallContext) &&
		!castNode(CallContext, fcinfo->context)->atomic;
	bool		contact;
	List	   *maps;
	ListCell   *lc;

	pin_search_path();
	if (!PG_ARGISNULL(0) && strcmp(text_to_cstring(PG_GETARG_TEXT_PP(0)), "contact") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("d365_load() does not pull the contact table"),
				 errhint("Pull it with d365_pull('contact') or d365_pull_changes().")));
	maps = maps_to_run(fcinfo, false, &contact);
	SPI_connect_ext(nonatomic ? SPI_OPT_NONATOMIC : 0);
	foreach(lc, maps)
	{
		char	   *map = (char *) lfirst(lc);
		D365Run		run;
		D365PullLoad load = {0};
		PullStep	step = {map, &load, nonatomic ? 1 : 0, false};
		bool		reporting;

		/* the contact table is pulled by its own engine: d365_pull() */
		if (strcmp(map, "contact") == 0)
			continue;
		d365_run_init(&run, psprintf("map-pull:%s", map));
		load.cxt = run.cxt;
		reporting = d365_progress_start(run.kind);
		for (;;)
		{
			bool		completed = d365_run_guarded(&run, pull_body, &step);

			d365_run_publish(&run);
			if (!completed || step.done)
				break;
			/* a page of the load is read and recorded: keep it */
			d365_job_commit();
			pin_search_path();
			if (reporting)
				reporting = d365_progress_start_at(run.kind, run.started);
			d365_run_publish(&run);
		}
		d365_run_record(&run);
		if (reporting)
			d365_progress_end();
		if (nonatomic)
		{
			d365_job_commit();
			pin_search_path();
		}
	}
	SPI_finish();
	PG_RETURN_VOID();
}

/* d365_load() runs as the job role (src/common/job_role.c) */
Datum
d365_load(PG_FUNCTION_ARGS)
{
	return d365_as_job(d365_load_body, fcinfo);
}
