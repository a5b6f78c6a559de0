/*-------------------------------------------------------------------------
 *
 * fdw_scan.c
 *	  The executor side of d365_fdw: a foreign scan reads the pages of one
 *	  OData GET and turns each JSON row into a tuple.
 *
 * Requests.  The scan opens the same client as every d365sync feature
 * (d365_client_open: the settings, the application users of
 * d365.app_users, the cached tokens), and follows @odata.nextLink through
 * odata_pages.c, which asks for pages of the server's page_size rows
 * (Prefer: odata.maxpagesize) and sends each through d365_client_execute():
 * retries, 429 back-off, the x-ms-dop-hint governor and token refresh are
 * the client's.  A failed page is an ERROR in postgres_fdw's form (remote
 * text, HTTP status and Dynamics error code, the request in the context).
 *
 * Memory.  A page's JSON lives in the page iterator's context, reset when
 * the page after it is taken, and a row's values in the executor's
 * per-tuple context.  While a page is read, the next one is already asked
 * for (d365_pages_prefetch), so that Dataverse prepares it meanwhile, and
 * every PUMP_ROWS rows what has arrived of it is read (d365_pages_pump):
 * the same pipeline as the pull and the initial load (odata_pages.c).  A
 * scan of any length runs in the memory of one parsed page (at most
 * page_size rows) and the raw bytes of the next.
 *
 * Interrupts.  Waits on the network are interruptible (http.c), and every
 * row checks for interrupts: a cancel stops a scan at once.
 *
 * Values.  A JSON string goes through the column type's input function (a
 * text column takes it as it is), a number is printed exactly (a double by
 * its shortest round-trip form) and read the same way, a boolean is a
 * boolean; an object or array is read from its JSON text (for json and
 * jsonb columns).  A value a column cannot take is an ERROR naming the
 * column and its Dataverse field.  U+0000 in a string, which PostgreSQL
 * text cannot hold, reads as U+FFFD (as in d365._get_all): one such
 * character must not fail a scan.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "catalog/pg_type.h"
#include "common/shortest_dec.h"
#include "executor/executor.h"
#include "commands/vacuum.h"
#include "miscadmin.h"
#include "nodes/nodeFuncs.h"
#include "utils/memutils.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/sampling.h"

#include "auth.h"
#include "fdw.h"

typedef struct D365FdwScan
{
	char	   *path;			/* the first page's path, percent-encoded */
	List	   *priv;			/* the plan's fdw_private */
	List	   *param_states;	/* ExprStates of the parameters, or NIL */
	List	   *param_info;		/* (field, op) of each parameter comparison */
	MemoryContext path_cxt;		/* where path lives (rebuilt on a new
								 * parameter value) */
	int			top;			/* at most this many rows; 0: all */
	int			ncols;			/* columns in each row */
	AttrNumber *attnums;		/* their attribute numbers */
	char	  **fields;			/* their Dataverse names */
	Oid		   *types;
	FmgrInfo   *inputs;
	Oid		   *ioparams;
	int32	   *typmods;

	D365Client *client;
	D365Pages  *pages;
	json_t	   *rows;			/* the current page's "value" array */
	size_t		next;			/* its next row */
	int64		returned;		/* rows returned since the scan (re)started */
	bool		done;			/* the last page has been read */
	bool		need_path;		/* build path before the next page */

	/* for error context */
	const char *relname;
	const char *field;
} D365FdwScan;

/* rows returned between two reads of the page arriving ahead */
#define PUMP_ROWS 256

static void setup_columns(D365FdwScan *st, TupleDesc desc, List *attrs, List *fields);

/* Error context: which column of which table was being read. */
static void
value_context(void *arg)
{
	D365FdwScan *st = arg;

	if (st->field != NULL)
		errcontext("Dataverse field %s of foreign table %s", st->field, st->relname);
}

/*
 * check_column_type
 *		Refuse a column type whose input would run code that a role other
 *		than the reader controls: a domain (its CHECK constraints), and a
 *		composite, range or array type holding one.  Base types other than
 *		the built-in ones take a superuser to create, so their input
 *		functions are trusted as any installed code is.
 */
static void
check_column_type(Oid type, const char *column, const char *relname)
{
	char		typtype = get_typtype(type);
	Oid			elem = get_element_type(type);

	if (typtype == TYPTYPE_BASE && !OidIsValid(elem))
		return;
	if (typtype == TYPTYPE_BASE && get_typtype(elem) == TYPTYPE_BASE &&
		!OidIsValid(get_element_type(elem)))
		return;
	if (typtype == TYPTYPE_ENUM)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
			 errmsg("column \"%s\" of foreign table \"%s\" has type %s, which d365_fdw cannot read into",
					column, relname, format_type_be(type)),
			 errdetail("Reading into a domain, or a composite, range or array type of one, would run code of the type's owner as the reader."),
			 errhint("Declare the column with a base type (text, integer, uuid, ...) and cast in the query or in a view.")));
}

/*
 * build_path
 *		The first page's path (percent-encoded), with the current values of
 *		the parameters written into the $filter.
 */
static void
build_path(ForeignScanState *node, D365FdwScan *st)
{
	ExprContext *econtext = node->ss.ps.ps_ExprContext;
	const char *filter = strVal(list_nth(st->priv, D365_FDW_PRIV_FILTER));
	StringInfoData buf;
	MemoryContext old;
	const char *p;

	MemoryContextReset(st->path_cxt);
	old = MemoryContextSwitchTo(st->path_cxt);
	initStringInfo(&buf);
	for (p = filter; *p; p++)
	{
		int			n;
		ExprState  *es;
		List	   *info;
		Datum		v;
		bool		isnull;

		if (*p != D365_FDW_PARAM_MARK)
		{
			appendStringInfoChar(&buf, *p);
			continue;
		}
		n = atoi(p + 1);
		p = strchr(p + 1, D365_FDW_PARAM_MARK);
		es = list_nth(st->param_states, n);
		info = list_nth(st->param_info, n);
		MemoryContextSwitchTo(econtext->ecxt_per_tuple_memory);
		v = ExecEvalExpr(es, econtext, &isnull);
		MemoryContextSwitchTo(st->path_cxt);
		d365_fdw_param_text(&buf, strVal(linitial(info)), intVal(lsecond(info)),
							exprType((Node *) es->expr), v, isnull);
	}
	st->path = d365_fdw_request_text(strVal(list_nth(st->priv, D365_FDW_PRIV_SET)),
									 strVal(list_nth(st->priv, D365_FDW_PRIV_SELECT)),
									 buf.data,
									 strVal(list_nth(st->priv, D365_FDW_PRIV_ORDERBY)),
									 st->top, true);
	MemoryContextSwitchTo(old);
}

/*
 * d365_fdw_begin
 *		Prepare the scan from the plan's fdw_private; open the client and the
 *		page iterator (no request yet).  Nothing is opened for EXPLAIN.
 */
void
d365_fdw_begin(ForeignScanState *node, int eflags)
{
	ForeignScan *plan = (ForeignScan *) node->ss.ps.plan;
	List	   *priv = plan->fdw_private;
	TupleDesc	desc = RelationGetDescr(node->ss.ss_currentRelation);
	D365FdwScan *st;
	List	   *attrs;
	List	   *fields;
	int			page_size;

	if (eflags & EXEC_FLAG_EXPLAIN_ONLY)
		return;

	st = palloc0(sizeof(D365FdwScan));
	st->relname = RelationGetRelationName(node->ss.ss_currentRelation);
	st->top = intVal(list_nth(priv, D365_FDW_PRIV_TOP));
	st->priv = priv;
	st->param_info = list_nth(priv, D365_FDW_PRIV_PARAMS);
	if (plan->fdw_exprs != NIL)
		st->param_states = ExecInitExprList(plan->fdw_exprs, (PlanState *) node);
	st->path_cxt = AllocSetContextCreate(CurrentMemoryContext, "d365_fdw request",
										 ALLOCSET_SMALL_SIZES);
	/* parameters have their values only once the scan runs */
	st->path = "";
	st->need_path = true;
	page_size = intVal(list_nth(priv, D365_FDW_PRIV_PAGE_SIZE));
	attrs = list_nth(priv, D365_FDW_PRIV_ATTRS);
	fields = list_nth(priv, D365_FDW_PRIV_FIELDS);
	setup_columns(st, desc, attrs, fields);

	st->client = d365_client_open();
	st->pages = d365_pages_open(st->client, st->path, NULL, 0);
	/* with $top, ask for no more rows than that in one page */
	st->pages->page_size = st->top > 0 ? Min(st->top, page_size) : page_size;
	node->fdw_state = st;
}

/*
 * setup_columns
 *		The columns a scan reads (attribute numbers and Dataverse names),
 *		their types checked and their input functions looked up.
 */
static void
setup_columns(D365FdwScan *st, TupleDesc desc, List *attrs, List *fields)
{
	int			i;

	st->ncols = list_length(attrs);
	st->attnums = palloc(sizeof(AttrNumber) * Max(st->ncols, 1));
	st->fields = palloc(sizeof(char *) * Max(st->ncols, 1));
	st->types = palloc(sizeof(Oid) * Max(st->ncols, 1));
	st->inputs = palloc(sizeof(FmgrInfo) * Max(st->ncols, 1));
	st->ioparams = palloc(sizeof(Oid) * Max(st->ncols, 1));
	st->typmods = palloc(sizeof(int32) * Max(st->ncols, 1));
	for (i = 0; i < st->ncols; i++)
	{
		Form_pg_attribute att;
		Oid			input;

		st->attnums[i] = list_nth_int(attrs, i);
		st->fields[i] = strVal(list_nth(fields, i));
		att = TupleDescAttr(desc, st->attnums[i] - 1);
		check_column_type(att->atttypid, NameStr(att->attname), st->relname);
		st->types[i] = att->atttypid;
		st->typmods[i] = att->atttypmod;
		getTypeInputInfo(att->atttypid, &input, &st->ioparams[i]);
		fmgr_info(input, &st->inputs[i]);
	}
}

/* A JSON value as the text a type's input function reads. */
static char *
value_text(D365FdwScan *st, json_t *v)
{
	char		buf[64];

	switch (json_typeof(v))
	{
		case JSON_STRING:
			/* U+0000, which text cannot hold, reads as U+FFFD */
			if (memchr(json_string_value(v), '\0', json_string_length(v)) != NULL)
				d365_json_scrub_nul(v);
			return (char *) json_string_value(v);
		case JSON_INTEGER:
			snprintf(buf, sizeof(buf), "%lld", (long long) json_integer_value(v));
			return pstrdup(buf);
		case JSON_REAL:
			double_to_shortest_decimal_buf(json_real_value(v), buf);
			return pstrdup(buf);
		case JSON_TRUE:
			return "true";
		case JSON_FALSE:
			return "false";
		default:
			return d365_json_dump(v);
	}
}

/* One column's value; *isnull for a JSON null or an absent field. */
static Datum
column_value(D365FdwScan *st, int i, json_t *row, bool *isnull)
{
	json_t	   *v = json_object_get(row, st->fields[i]);
	char	   *s;

	*isnull = (v == NULL || json_is_null(v));
	if (*isnull)
		return (Datum) 0;
	/* the common cases without a round trip through text */
	switch (st->types[i])
	{
		case BOOLOID:
			if (json_is_boolean(v))
				return BoolGetDatum(json_is_true(v));
			break;
		case INT8OID:
			if (json_is_integer(v))
				return Int64GetDatum(json_integer_value(v));
			break;
		case INT4OID:
			if (json_is_integer(v) && json_integer_value(v) >= PG_INT32_MIN &&
				json_integer_value(v) <= PG_INT32_MAX)
				return Int32GetDatum((int32) json_integer_value(v));
			break;
		case TEXTOID:
			if (json_is_string(v))
			{
				s = value_text(st, v);
				return PointerGetDatum(cstring_to_text_with_len(s, strlen(s)));
			}
			break;
	}
	s = value_text(st, v);
	return InputFunctionCall(&st->inputs[i], s, st->ioparams[i], st->typmods[i]);
}

/* Read the next page into st->rows; false when there is none. */
static bool
next_page(D365FdwScan *st)
{
	D365Op	   *op = d365_pages_next(st->pages);
	json_t	   *value;

	if (op == NULL)
		return false;
	if (!op->ok)
		d365_op_report(op, ERROR);
	value = json_is_object(op->json) ? json_object_get(op->json, "value") : NULL;
	if (!json_is_array(value))
		ereport(ERROR,
				(errcode(ERRCODE_FDW_REPLY_HANDLE),
				 errmsg("Dynamics 365 returned no list of rows"),
				 errdetail("The response has no \"value\" array."),
				 errcontext("Dynamics 365 request: GET %s%s", st->client->service_path,
							st->pages->path)));
	st->rows = value;
	st->next = 0;
	/* let Dataverse prepare the next page while this one is read */
	if (st->top == 0)
		d365_pages_prefetch(st->pages);
	return true;
}

/*
 * d365_fdw_iterate
 *		The next row, fetching the next page when this one is used up; an
 *		empty slot at the end (or once $top rows were returned).
 */
TupleTableSlot *
d365_fdw_iterate(ForeignScanState *node)
{
	D365FdwScan *st = node->fdw_state;
	TupleTableSlot *slot = node->ss.ss_ScanTupleSlot;
	MemoryContext old;
	ErrorContextCallback errcb;
	json_t	   *row;
	int			i;

	ExecClearTuple(slot);
	CHECK_FOR_INTERRUPTS();
	if (st->need_path)
	{
		build_path(node, st);
		d365_pages_restart(st->pages, st->path);
		st->need_path = false;
	}
	for (;;)
	{
		if (st->top > 0 && st->returned >= st->top)
			return slot;
		if (st->rows != NULL && st->next < json_array_size(st->rows))
			break;
		if (st->done || !next_page(st))
		{
			st->done = true;
			st->rows = NULL;
			return slot;
		}
	}
	if (st->next % PUMP_ROWS == PUMP_ROWS - 1)
		d365_pages_pump(st->pages);
	row = json_array_get(st->rows, st->next++);
	if (!json_is_object(row))
		ereport(ERROR,
				(errcode(ERRCODE_FDW_REPLY_HANDLE),
				 errmsg("Dynamics 365 returned a row that is not a JSON object")));

	memset(slot->tts_isnull, true, sizeof(bool) * slot->tts_tupleDescriptor->natts);
	old = MemoryContextSwitchTo(node->ss.ps.ps_ExprContext->ecxt_per_tuple_memory);
	errcb.callback = value_context;
	errcb.arg = st;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;
	for (i = 0; i < st->ncols; i++)
	{
		AttrNumber	a = st->attnums[i] - 1;

		st->field = st->fields[i];
		slot->tts_values[a] = column_value(st, i, row, &slot->tts_isnull[a]);
	}
	st->field = NULL;
	error_context_stack = errcb.previous;
	MemoryContextSwitchTo(old);
	ExecStoreVirtualTuple(slot);
	st->returned++;
	return slot;
}

/*
 * d365_fdw_rescan
 *		Start again from the first page (a new request: Dataverse has no
 *		snapshot to return to).
 */
void
d365_fdw_rescan(ForeignScanState *node)
{
	D365FdwScan *st = node->fdw_state;

	if (st == NULL)
		return;
	st->rows = NULL;
	st->done = false;
	st->returned = 0;
	/* a parameter changed (the next outer row of a correlated subquery) */
	if (st->param_states != NIL && node->ss.ps.chgParam != NULL)
		st->need_path = true;
	else
		d365_pages_restart(st->pages, st->path);
}

/* d365_fdw_end: free the last page. */
void
d365_fdw_end(ForeignScanState *node)
{
	D365FdwScan *st = node->fdw_state;

	if (st == NULL)
		return;
	d365_pages_close(st->pages);
	node->fdw_state = NULL;
}

/*
 * d365_fdw_sample
 *		ANALYZE's sample of a foreign table: every row of the entity set is
 *		read (columns attrs, Dataverse names fields, $select select), page by
 *		page, and up to targrows of them are kept by reservoir sampling, as
 *		postgres_fdw does for its remote tables.  *totalrows is the number
 *		of rows read.  Memory: one page, the sample, one row at a time.
 */
int
d365_fdw_sample(Relation rel, const char *entity_set, const char *select, List *attrs,
				List *fields, int page_size, int elevel, HeapTuple *rows, int targrows,
				double *totalrows)
{
	TupleDesc	desc = RelationGetDescr(rel);
	D365FdwScan st;
	ReservoirStateData rstate;
	ErrorContextCallback errcb;
	MemoryContext rowcxt;
	MemoryContext old;
	Datum	   *values = palloc0(sizeof(Datum) * desc->natts);
	bool	   *nulls = palloc(sizeof(bool) * desc->natts);
	double		seen = 0;
	double		skip = -1;
	int			kept = 0;

	memset(&st, 0, sizeof(st));
	st.relname = RelationGetRelationName(rel);
	setup_columns(&st, desc, attrs, fields);
	st.path = d365_fdw_request_text(entity_set, select, "", "", 0, true);
	st.client = d365_client_open();
	st.pages = d365_pages_open(st.client, st.path, NULL, 0);
	st.pages->page_size = page_size;
	rowcxt = AllocSetContextCreate(CurrentMemoryContext, "d365_fdw analyze row",
								   ALLOCSET_DEFAULT_SIZES);
	reservoir_init_selection_state(&rstate, targrows);
	errcb.callback = value_context;
	errcb.arg = &st;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;

	while ((st.rows != NULL && st.next < json_array_size(st.rows)) || next_page(&st))
	{
		json_t	   *row = json_array_get(st.rows, st.next++);
		bool		keep;
		int			slot = kept;
		int			i;

		vacuum_delay_point();
		if (kept < targrows)
			keep = true;
		else
		{
			if (skip < 0)
				skip = reservoir_get_next_S(&rstate, seen, targrows);
			keep = (skip <= 0);
			if (keep)
				slot = (int) (targrows * sampler_random_fract(&rstate.randstate));
			skip -= 1;
		}
		seen += 1;
		if (!keep || !json_is_object(row))
			continue;

		memset(nulls, true, sizeof(bool) * desc->natts);
		old = MemoryContextSwitchTo(rowcxt);
		for (i = 0; i < st.ncols; i++)
		{
			AttrNumber	a = st.attnums[i] - 1;

			st.field = st.fields[i];
			values[a] = column_value(&st, i, row, &nulls[a]);
		}
		st.field = NULL;
		MemoryContextSwitchTo(old);
		if (slot < kept)
			heap_freetuple(rows[slot]);
		rows[slot] = heap_form_tuple(desc, values, nulls);
		if (slot == kept)
			kept++;
		MemoryContextReset(rowcxt);
	}
	error_context_stack = errcb.previous;
	d365_pages_close(st.pages);
	MemoryContextDelete(rowcxt);
	*totalrows = seen;
	ereport(elevel,
			(errmsg("\"%s\": read %.0f rows from Dataverse, %d rows in sample",
					RelationGetRelationName(rel), seen, kept)));
	return kept;
}
