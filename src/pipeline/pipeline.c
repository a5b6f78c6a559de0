/*-------------------------------------------------------------------------
 *
 * pipeline.c
 *	  select -> map -> send -> record: the loop every sync engine runs.
 *
 * An engine supplies two pieces of SQL:
 *
 *	 work query	  one row per item: (item_key text, requests text, context
 *				  text).  Mapping happens in the query: requests is a JSON
 *				  array of the requests the item needs, in order, each
 *				  {"method", "path", "body" (JSON text), "headers": [...],
 *				  "ok": [extra statuses that count as success]}; an empty
 *				  array means "nothing to send".  A request is sent only
 *				  when the one before it succeeded.  context is handed
 *				  back to the record function untouched.
 *
 *	 record function  fn(item_keys text[], contexts text[], statuses int[],
 *				  error_codes text[], error_messages text[]) -- the status
 *				  of each item's last request (NULL when it sent none) and
 *				  the failure, if one stopped it -- returning
 *				  (created, updated, unchanged, failed, unlinked) for the
 *				  chunk; it writes link columns, state, errors, back-off.
 *
 * d365_pipeline_process() streams the work query through a cursor in chunks
 * of d365sync.batch_size x d365sync.max_parallel rows (or, once the client
 * is open, x the requests all its application users may have in flight,
 * when that is more), sends each chunk's
 * requests through the OData client (batched, parallel, retried and
 * throttled there), then records the chunk with one call of the record
 * function.  Two chunks are on the way at once, so that database work and
 * the server's answers overlap:
 *
 *	   fetch+map chunk 1, start sending it
 *	   loop: fetch+map chunk k+1     while chunk k's requests are answered
 *			 finish chunk k (its later steps and retries)
 *			 start sending chunk k+1
 *			 record chunk k          while chunk k+1's requests are answered
 *
 * Look-up stage (optional, d365_pipeline_process_lookup): the work query
 * may have a fourth column, lookup text -- NULL, or what to look the item up
 * by in Dynamics before anything of it is sent (the contact engine: the
 * match values of an unlinked contact).  The items of a chunk that have one
 * are grouped, at most D365_LOOKUP_GROUP to a group; each group is one GET
 * whose path <lookup_fn>_path(lookups text[]) writes (a group whose path
 * would pass the Web API's URL length limit is split).  The GETs go through
 * the OData client like every other request.  Then one call of
 * <lookup_fn>_resolve(item_keys text[], lookups text[], contexts text[],
 * groups int[], answers text[]) -- answers the bodies of the groups' answers,
 * groups[i] the number (1-based) of the item's in answers -- returns
 * (item_key, requests, context) per item: new requests and context,
 * or NULL requests to keep the planned ones.  An item whose group's GET
 * failed fails with that request's error, as if its own request had.
 *
 * Memory is reset per chunk, so it does not grow with the number of items.
 * A run past its time budget (d365sync.max_run_time_ms) sends no further
 * chunk; the rest stays pending for the next run.  The run itself (client,
 * counts, lock, error capture, d365.sync_run) is runs.c's.
 *
 * The full contract between this loop and the SQL of each engine is
 * written out in docs/architecture.md.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "d365sync.h"
#include "pipeline.h"
#include "writers.h"
#include "progress.h"
#include "runs.h"
#include "spi_util.h"

static Datum
text_array(char **values, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * n);
	bool	   *nulls = palloc(sizeof(bool) * n);
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int			i;

	for (i = 0; i < n; i++)
	{
		nulls[i] = (values[i] == NULL);
		elems[i] = nulls[i] ? (Datum) 0 : CStringGetTextDatum(values[i]);
	}
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs,
											  TEXTOID, -1, false, TYPALIGN_INT));
}

static Datum
int_array(int *values, bool *isnull, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * n);
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int			i;

	for (i = 0; i < n; i++)
		elems[i] = Int32GetDatum(values[i]);
	return PointerGetDatum(construct_md_array(elems, isnull, 1, dims, lbs,
											  INT4OID, 4, true, TYPALIGN_INT));
}

/*
 * remember_failure
 *		Keep the run's first failed request, copied into the run's context.
 */
static void
remember_failure(D365Run *run, const char *item_key, D365Op *op)
{
	MemoryContext old;
	D365Op	   *copy;

	if (run->first_failure != NULL)
		return;
	old = MemoryContextSwitchTo(run->cxt);
	copy = palloc0(sizeof(D365Op));
	copy->method = pstrdup(op->method);
	copy->path = op->http ? pstrdup(op->http->url) : pstrdup(op->path);
	copy->status = op->status;
	copy->transport_failure = op->transport_failure;
	copy->error_code = op->error_code ? pstrdup(op->error_code) : NULL;
	copy->error_message = op->error_message ? pstrdup(op->error_message) : NULL;
	run->first_failure = palloc0(sizeof(D365Failure));
	run->first_failure->item_key = pstrdup(item_key);
	run->first_failure->op = copy;
	MemoryContextSwitchTo(old);
}

/* One item of a chunk while its requests are sent. */
typedef struct PipelineItem
{
	char	   *key;
	char	   *context;
	char	   *lookup;			/* what to look up before sending, or NULL */
	json_t	   *requests;		/* JSON array of request objects */
	size_t		step;			/* next request to send */
	bool		failed;
	bool		deferred;		/* failed, but not by an answer about it:
								 * left pending, not recorded */
	bool		sent;			/* at least one request was sent */
	int			status;			/* of the last request sent */
	char	   *error_code;
	char	   *error_message;
} PipelineItem;

/*
 * op_from_request
 *		An operation from one element of an item's "requests" array:
 *		{"method", "path", "body" (JSON text or null), "headers": [...],
 *		 "ok": [statuses that count as success besides 2xx]}.
 */
static D365Op *
op_from_request(json_t *req, const char *key)
{
	const char *method = d365_json_str(req, "method");
	const char *path = d365_json_str(req, "path");
	json_t	   *headers = json_object_get(req, "headers");
	D365Op	   *op;
	size_t		i;
	json_t	   *h;

	if (method == NULL || path == NULL)
		elog(ERROR, "work query gave item %s a request without method or path", key);
	op = d365_op_make(method, path, d365_json_str(req, "body"));
	json_array_foreach(headers, i, h)
	{
		if (!json_is_string(h))
			continue;
		/* a line break would end the header and start one of its own */
		if (strpbrk(json_string_value(h), "\r\n") != NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("work query gave item %s a request header holding a line break", key)));
		op->headers = lappend(op->headers, pstrdup(json_string_value(h)));
	}
	return op;
}

static bool
status_accepted(json_t *req, int status)
{
	json_t	   *ok = json_object_get(req, "ok");
	size_t		i;
	json_t	   *v;

	json_array_foreach(ok, i, v)
	{
		if (json_is_integer(v) && json_integer_value(v) == status)
			return true;
	}
	return false;
}

/*
 * A chunk of items on its way through the pipeline: fetched and mapped,
 * then sent step by step (step k+1 of an item goes only after step k
 * succeeded: 2xx, or a status its "ok" list accepts), then recorded.
 */
typedef struct Chunk
{
	MemoryContext cxt;			/* everything of the chunk; reset after record */
	PipelineItem *items;
	int			n;
	/* the step in flight */
	D365Op	  **ops;
	int		   *owner;			/* ops[i] belongs to items[owner[i]] */
	int			nops;
	D365Sending *sending;
} Chunk;

/*
 * fetch_chunk
 *		The next rows of the work query, mapped into items (allocated in the
 *		chunk's context).  false when the query is exhausted.
 */
static bool
fetch_chunk(D365Run *run, Portal portal, int chunk_size, Chunk *c)
{
	MemoryContext old;
	SPITupleTable *work;
	int			i;

	SPI_cursor_fetch(portal, true, chunk_size);
	if (SPI_processed == 0)
	{
		SPI_freetuptable(SPI_tuptable);
		return false;
	}
	work = SPI_tuptable;
	c->n = (int) SPI_processed;
	run->items += c->n;

	old = MemoryContextSwitchTo(c->cxt);
	c->items = palloc0(sizeof(PipelineItem) * c->n);
	for (i = 0; i < c->n; i++)
	{
		HeapTuple	tup = work->vals[i];
		TupleDesc	desc = work->tupdesc;
		char	   *requests = SPI_getvalue(tup, desc, 2);
		PipelineItem *it = &c->items[i];

		it->key = SPI_getvalue(tup, desc, 1);
		it->context = SPI_getvalue(tup, desc, 3);
		it->lookup = desc->natts >= 4 ? SPI_getvalue(tup, desc, 4) : NULL;
		it->requests = d365_json_parse(requests ? requests : "[]",
									   requests ? strlen(requests) : 2,
									   "work query requests");
		if (!json_is_array(it->requests))
			elog(ERROR, "work query gave item %s requests that are not an array", it->key);
	}
	c->ops = palloc(sizeof(D365Op *) * c->n);
	c->owner = palloc(sizeof(int) * c->n);
	c->sending = NULL;
	MemoryContextSwitchTo(old);
	SPI_freetuptable(work);
	return true;
}

/*
 * step_start
 *		Send the next request of every item that has one, without waiting.
 *		false when no item has a request left.
 */
static bool
step_start(D365Run *run, Chunk *c)
{
	MemoryContext old = MemoryContextSwitchTo(c->cxt);
	int			i;

	c->nops = 0;
	for (i = 0; i < c->n; i++)
	{
		PipelineItem *it = &c->items[i];

		if (it->failed || it->step >= json_array_size(it->requests))
			continue;
		c->ops[c->nops] = op_from_request(json_array_get(it->requests, it->step), it->key);
		c->owner[c->nops++] = i;
	}
	c->sending = c->nops > 0 ? d365_client_start(d365_run_client(run), c->ops, c->nops) : NULL;
	MemoryContextSwitchTo(old);
	return c->sending != NULL;
}

/*
 * about_item
 *		Whether a failed operation's outcome is an answer about its item
 *		(Dynamics judged this record: a 4xx, or a 500 of the item's own
 *		request or $batch part) rather than about the whole request: no
 *		usable answer (a transport failure), throttled (429), the service
 *		unavailable (502, 503, 504), the token refused (401 after a
 *		refresh), or a $batch that failed as a whole (the outcome the item
 *		got is the envelope's).  Only answers about an item fail it; the
 *		others say nothing about the record and leave it pending.
 */
static bool
about_item(const D365Op *op)
{
	const char *url = op->http ? op->http->url : NULL;
	size_t		len = url ? strlen(url) : 0;

	if (op->transport_failure || op->status == 0)
		return false;
	if (op->status == 429 || op->status == 401 ||
		op->status == 502 || op->status == 503 || op->status == 504)
		return false;
	if (len >= 6 && strcmp(url + len - 6, "$batch") == 0)
		return false;
	return true;
}

/*
 * fail_item
 *		Mark an item failed by a request that was made on its behalf.  When
 *		the outcome is not about the item (about_item), the item is only
 *		deferred: no further step is sent, it is not recorded (no failure,
 *		no back-off) and the next run sends it again.
 */
static void
fail_item(D365Run *run, PipelineItem *it, D365Op *op)
{
	it->sent = true;
	it->status = op->status;
	it->failed = true;
	if (!about_item(op))
	{
		it->deferred = true;
		run->deferred++;
	}
	it->error_code = op->error_code;
	it->error_message = op->transport_failure
		? psprintf("could not reach Dynamics 365: %s", op->error_message)
		: op->error_message;
	remember_failure(run, it->key, op);
}

/*
 * step_finish
 *		Wait for the step in flight and move each item on, or mark it failed.
 */
static void
step_finish(D365Run *run, Chunk *c)
{
	MemoryContext old = MemoryContextSwitchTo(c->cxt);
	int			i;

	d365_client_finish(c->sending);
	c->sending = NULL;
	for (i = 0; i < c->nops; i++)
	{
		D365Op	   *op = c->ops[i];
		PipelineItem *it = &c->items[c->owner[i]];
		json_t	   *req = json_array_get(it->requests, it->step);

		it->sent = true;
		it->status = op->status;
		if (op->ok || (!op->transport_failure && status_accepted(req, op->status)))
		{
			it->step++;
			continue;
		}
		fail_item(run, it, op);
	}
	MemoryContextSwitchTo(old);
}

/*
 * lookup_chunk
 *		The look-up stage of a chunk (see the top of this file): group the
 *		items that have a look-up, send one GET per group, and let the
 *		resolve function turn the answers into the items' requests.  Runs
 *		before the chunk's first step is sent; allocates in the chunk's
 *		context.
 */
static void
lookup_chunk(D365Run *run, Chunk *c, const char *lookup_fn)
{
	MemoryContext old = MemoryContextSwitchTo(c->cxt);
	int		   *idx = palloc(sizeof(int) * c->n);	/* items with a look-up */
	int		   *group_of = palloc(sizeof(int) * c->n);
	D365Op	  **ops = palloc(sizeof(D365Op *) * c->n);
	char	   *path_sql;
	char	   *resolve_sql;
	char	  **keys;
	char	  **lookups;
	char	  **contexts;
	char	  **answers;
	int		   *answer_of;		/* ops[i]'s answer number, 0 when it failed */
	int		   *groups;
	int			nanswers = 0;
	int			nl = 0;
	int			nops = 0;
	int			nres = 0;
	int			start;
	int			i;

	for (i = 0; i < c->n; i++)
		if (c->items[i].lookup != NULL)
			idx[nl++] = i;
	if (nl == 0)
	{
		MemoryContextSwitchTo(old);
		return;
	}
	path_sql = psprintf("SELECT %s_path($1)", lookup_fn);
	resolve_sql = psprintf("SELECT item_key, requests, context FROM %s_resolve($1, $2, $3, $4, $5)",
						   lookup_fn);
	lookups = palloc(sizeof(char *) * nl);
	for (i = 0; i < nl; i++)
		lookups[i] = c->items[idx[i]].lookup;

	/* groups of at most D365_LOOKUP_GROUP, fewer when the URL gets too long */
	for (start = 0; start < nl;)
	{
		int			size = Min(D365_LOOKUP_GROUP, nl - start);
		char	   *path;

		for (;;)
		{
			Oid			types[1] = {TEXTARRAYOID};
			Datum		args[1] = {text_array(lookups + start, size)};

			path = d365_sql_text(path_sql, 1, types, args);
			if (path == NULL || strlen(path) <= D365_LOOKUP_PATH_MAX || size == 1)
				break;
			size = (size + 1) / 2;
		}
		for (i = start; i < start + size; i++)
			group_of[i] = path ? nops : -1;
		if (path != NULL)
			ops[nops++] = d365_op_make("GET", path, NULL);
		start += size;
	}
	if (nops > 0)
		d365_client_execute(d365_run_client(run), ops, nops);

	/* the answers, handed to the resolve function */
	/* each answer once; items name theirs by number (1-based) */
	answers = palloc(sizeof(char *) * Max(nops, 1));
	answer_of = palloc0(sizeof(int) * Max(nops, 1));
	for (i = 0; i < nops; i++)
	{
		if (ops[i]->ok && ops[i]->json != NULL)
		{
			answers[nanswers] = d365_json_dump(ops[i]->json);
			answer_of[i] = ++nanswers;
		}
	}
	keys = palloc(sizeof(char *) * nl);
	contexts = palloc(sizeof(char *) * nl);
	groups = palloc(sizeof(int) * nl);
	for (i = 0; i < nl; i++)
	{
		PipelineItem *it = &c->items[idx[i]];

		if (group_of[i] < 0)
			continue;			/* nothing to look up: as planned */
		if (answer_of[group_of[i]] == 0)
		{
			fail_item(run, it, ops[group_of[i]]);
			continue;
		}
		keys[nres] = it->key;
		lookups[nres] = it->lookup;
		contexts[nres] = it->context;
		groups[nres] = answer_of[group_of[i]];
		idx[nres++] = idx[i];
	}
	if (nres > 0)
	{
		Oid			types[5] = {TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT4ARRAYOID,
		TEXTARRAYOID};
		Datum		args[5];
		SPITupleTable *tab;

		args[0] = text_array(keys, nres);
		args[1] = text_array(lookups, nres);
		args[2] = text_array(contexts, nres);
		args[3] = int_array(groups, NULL, nres);
		args[4] = text_array(answers, nanswers);
		if (SPI_execute_with_args(resolve_sql, 5, types, args, NULL, false, 0) != SPI_OK_SELECT ||
			SPI_processed != (uint64) nres)
			elog(ERROR, "%s_resolve did not return one row per item", lookup_fn);
		tab = SPI_tuptable;
		for (i = 0; i < nres; i++)
		{
			PipelineItem *it = &c->items[idx[i]];
			char	   *requests = SPI_getvalue(tab->vals[i], tab->tupdesc, 2);

			if (requests == NULL)
				continue;		/* as planned */
			it->requests = d365_json_parse(requests, strlen(requests), "look-up requests");
			if (!json_is_array(it->requests))
				elog(ERROR, "%s_resolve gave item %s requests that are not an array",
					 lookup_fn, it->key);
			it->context = SPI_getvalue(tab->vals[i], tab->tupdesc, 3);
		}
		SPI_freetuptable(tab);
	}
	MemoryContextSwitchTo(old);
	d365_run_publish(run);
}

/*
 * record_chunk
 *		One call of the record function for the whole chunk; adds its
 *		counts to the run.
 */
static void
record_chunk(D365Run *run, Chunk *c, const char *record_sql, const char *record_fn)
{
	MemoryContext old = MemoryContextSwitchTo(c->cxt);
	char	  **keys = palloc(sizeof(char *) * c->n);
	char	  **contexts = palloc(sizeof(char *) * c->n);
	int		   *statuses = palloc0(sizeof(int) * c->n);
	bool	   *status_null = palloc(sizeof(bool) * c->n);
	char	  **codes = palloc(sizeof(char *) * c->n);
	char	  **messages = palloc(sizeof(char *) * c->n);
	Datum		rargs[5];
	Oid			rtypes[5] = {TEXTARRAYOID, TEXTARRAYOID, INT4ARRAYOID,
	TEXTARRAYOID, TEXTARRAYOID};
	int			i;
	int			n = 0;
	volatile int rc = 0;
	bool		was;

	/* deferred items are left as they are: pending, without back-off */
	for (i = 0; i < c->n; i++)
	{
		if (c->items[i].deferred)
			continue;
		keys[n] = c->items[i].key;
		contexts[n] = c->items[i].context;
		statuses[n] = c->items[i].status;
		status_null[n] = !c->items[i].sent;
		codes[n] = c->items[i].error_code;
		messages[n] = c->items[i].error_message;
		n++;
	}
	if (n == 0)
	{
		MemoryContextSwitchTo(old);
		d365_run_publish(run);
		return;
	}
	rargs[0] = text_array(keys, n);
	rargs[1] = text_array(contexts, n);
	rargs[2] = int_array(statuses, status_null, n);
	rargs[3] = text_array(codes, n);
	rargs[4] = text_array(messages, n);
	/* the Dynamics ids the record function writes are what Dynamics answered */
	was = d365_recorder_set(true);
	PG_TRY();
	{
		rc = SPI_execute_with_args(record_sql, 5, rtypes, rargs, NULL, false, 1);
	}
	PG_FINALLY();
	{
		d365_recorder_set(was);
	}
	PG_END_TRY();
	d365_run_add_counts(run, rc, record_fn);
	MemoryContextSwitchTo(old);
	d365_run_publish(run);
}

static bool
over_budget(D365Run *run, int not_sent)
{
	MemoryContext m;

	if (d365_max_run_time_ms <= 0 ||
		!TimestampDifferenceExceeds(run->started, GetCurrentTimestamp(),
									d365_max_run_time_ms))
		return false;
	m = MemoryContextSwitchTo(run->cxt);
	run->message = psprintf("stopped after %lld items at the time budget (d365sync.max_run_time_ms = %d ms); the rest stays pending",
							(long long) (run->items - not_sent), d365_max_run_time_ms);
	MemoryContextSwitchTo(m);
	return true;
}

/*
 * d365_pipeline_process
 *		d365_pipeline_process_lookup without a look-up stage.
 */
void
d365_pipeline_process(D365Run *run, const char *work_sql,
					  int nargs, Oid *argtypes, Datum *args,
					  const char *record_fn)
{
	d365_pipeline_process_lookup(run, work_sql, nargs, argtypes, args, record_fn, NULL);
}

/*
 * d365_pipeline_process_lookup
 *		Stream work_sql (with its arguments) in chunks; look up, send and
 *		record each chunk as described at the top of this file (lookup_fn
 *		NULL: no look-up stage).  While one chunk's first requests are in
 *		flight, the next chunk is fetched and mapped, and the chunk before
 *		is recorded, so database work and the server's answer overlap.
 *		Adds to run->counts.  Requires an SPI connection.  Raises only for
 *		interrupts and failures that are not an item's own (token, SQL
 *		errors).
 */
void
d365_pipeline_process_lookup(D365Run *run, const char *work_sql,
							 int nargs, Oid *argtypes, Datum *args,
							 const char *record_fn, const char *lookup_fn)
{
	Portal		portal;
	char	   *record_sql;
	int			chunk_size;
	Chunk		chunks[2];
	Chunk	   *cur = &chunks[0];
	Chunk	   *next = &chunks[1];
	bool		have;
	int			save_nestlevel;

	if (work_sql == NULL)
		elog(ERROR, "%s: the engine gave no work query", record_fn);

	/* enough items to fill every request in flight with a full batch */
	chunk_size = Min(d365_batch_size * d365_max_parallel, 10000);
	record_sql = psprintf("SELECT created, updated, unchanged, failed, unlinked"
						  " FROM %s($1, $2, $3, $4, $5)", record_fn);
	/*
	 * The work query is planned without JIT compilation: its estimated cost
	 * grows with the table (it is one join over every contact), and the
	 * compilation of its many expressions took seconds -- most of a sync
	 * with little or nothing to send -- while it reads what an index finds.
	 */
	save_nestlevel = NewGUCNestLevel();
	(void) set_config_option("jit", "off", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);
	/* others see how many items remain: count them first (only the rows) */
	if (d365_progress_active())
		d365_progress_add_total(d365_sql_int64(psprintf("SELECT count(*) FROM (%s) d365_work",
														work_sql),
											   nargs, argtypes, args, NULL));
	portal = SPI_cursor_open_with_args(NULL, work_sql, nargs, argtypes, args,
									   NULL, false, CURSOR_OPT_NO_SCROLL);
	AtEOXact_GUC(true, save_nestlevel);
	memset(chunks, 0, sizeof(chunks));
	chunks[0].cxt = AllocSetContextCreate(CurrentMemoryContext, "d365sync pipeline chunk",
										  ALLOCSET_DEFAULT_SIZES);
	chunks[1].cxt = AllocSetContextCreate(CurrentMemoryContext, "d365sync pipeline chunk",
										  ALLOCSET_DEFAULT_SIZES);

	have = fetch_chunk(run, portal, chunk_size, cur);
	if (have && lookup_fn != NULL)
		lookup_chunk(run, cur, lookup_fn);
	if (have)
		(void) step_start(run, cur);
	while (have)
	{
		bool		more;
		Chunk	   *t;

		CHECK_FOR_INTERRUPTS();
		/* map the next chunk while this one's requests are answered */
		if (run->client != NULL)
			chunk_size = Min(d365_batch_size * Max(d365_max_parallel,
												   d365_client_slots(run->client)),
							 10000);
		more = fetch_chunk(run, portal, chunk_size, next);

		if (cur->sending != NULL)
			step_finish(run, cur);
		while (step_start(run, cur))
			step_finish(run, cur);

		/* past the time budget, the next chunk is not sent: it stays pending */
		if (more && over_budget(run, next->n))
		{
			run->items -= next->n;
			MemoryContextReset(next->cxt);
			more = false;
		}

		/*
		 * send the next chunk (its look-ups first, while nothing else is in
		 * flight), and record this one while it is answered
		 */
		if (more && lookup_fn != NULL)
			lookup_chunk(run, next, lookup_fn);
		if (more)
			(void) step_start(run, next);
		record_chunk(run, cur, record_sql, record_fn);

		MemoryContextReset(cur->cxt);
		t = cur;
		cur = next;
		next = t;
		have = more;
	}

	SPI_cursor_close(portal);
	MemoryContextDelete(chunks[0].cxt);
	MemoryContextDelete(chunks[1].cxt);

	if (run->deferred > 0 && run->message == NULL)
	{
		MemoryContext m = MemoryContextSwitchTo(run->cxt);

		run->message = psprintf("%lld items not sent: Dynamics 365 throttled the requests or could not be reached (%s); they stay pending, without back-off",
								(long long) run->deferred,
								run->first_failure ? d365_op_summary(run->first_failure->op) : "no answer");
		MemoryContextSwitchTo(m);
	}
}
