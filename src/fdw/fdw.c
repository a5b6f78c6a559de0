/*-------------------------------------------------------------------------
 *
 * fdw.c
 *	  d365_fdw: Dataverse tables as read-only foreign tables.  The handler
 *	  and validator, the options, the planner callbacks with their costs,
 *	  EXPLAIN, ANALYZE and IMPORT FOREIGN SCHEMA.
 *
 * Where requests go.  A d365_fdw server has no address of its own: every
 * foreign table reads the organization configured in d365.settings, with
 * its application users, through the same OData client (odata.c), governor
 * and token cache (auth.c) as the sync.  The options that could send d365's
 * credentials elsewhere (org_url, authority_url, tenant_id, client_id,
 * client_secret, api_version) are refused on every object; an entity set
 * or field name is a plain identifier, so a request can only ever be a GET
 * of {org_url}/api/data/{version}/<entity set>?<query options>.
 *
 * Who may do what.  Creating a server needs USAGE on the wrapper (the
 * superuser's, given to d365sync admins), and only the server's owner may
 * change its options.  USAGE on a server lets a
 * role create foreign tables of any Dataverse table that d365's application
 * user can read; a scan checks that the foreign table's owner still holds
 * it, so revoking USAGE disables that role's tables.  Reading a foreign
 * table needs SELECT on it, as for any table.
 *
 * Planning.  Each condition of the query is written as OData by
 * fdw_deparse.c or stays local; a condition Dataverse answers only as a
 * superset (string comparisons, which are case-insensitive there) is both
 * sent and evaluated here.  $select names the columns used.  The ORDER BY
 * of a one-table query is sent when it means the same thing on both sides,
 * and a LIMIT becomes $top when nothing is left to evaluate locally (so the
 * first rows Dataverse returns are the first rows of the answer).  A
 * comparison with a parameter (a correlated subquery's outer value) is
 * sent with the value the scan starts with (ForeignScan.fdw_exprs).  Row
 * estimates come from the table's rows option, else ANALYZE (which reads
 * the table once and samples it, fdw_scan.c), else 1000.  Costs:
 * one request costs request_cost (default 100, a round trip's worth of
 * sequential page reads), each row received row_cost (default 0.05, JSON
 * decoding): a selective condition sent to Dataverse is always cheaper than
 * fetching rows to throw away, and a nested loop that would rescan the
 * remote side pays a full request per rescan, so the planner hashes or
 * materialises instead.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "access/reloptions.h"
#include "access/table.h"
#include "catalog/pg_class.h"
#include "catalog/pg_foreign_server.h"
#include "catalog/pg_foreign_table.h"
#include "catalog/pg_user_mapping.h"
#include "catalog/pg_foreign_data_wrapper.h"
#include "catalog/pg_attribute.h"
#include "catalog/pg_type.h"
#include "commands/defrem.h"
#include "executor/spi.h"
#include "foreign/fdwapi.h"
#include "foreign/foreign.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "optimizer/cost.h"
#include "optimizer/optimizer.h"
#include "optimizer/pathnode.h"
#include "optimizer/paths.h"
#include "optimizer/planmain.h"
#include "optimizer/restrictinfo.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "fdw.h"
#include "spi_util.h"

PG_FUNCTION_INFO_V1(d365_fdw_handler);
PG_FUNCTION_INFO_V1(d365_fdw_validator);

/* Defaults of the server options. */
#define DEFAULT_REQUEST_COST 100.0
#define DEFAULT_ROW_COST 0.05
#define DEFAULT_ROWS 1000.0

/* Options that would point d365's credentials somewhere: never accepted. */
static const char *const refused_options[] = {
	"org_url", "authority_url", "tenant_id", "client_id", "client_secret",
	"api_version", "url", "host", NULL
};

/*
 * identifier_ok
 *		An entity set, logical name or field: letters, digits and
 *		underscores, not starting with a digit (so a name can never add a
 *		path segment, a query option or a parameter to a request).
 */
static bool
identifier_ok(const char *s)
{
	const char *p;

	if (s == NULL || s[0] == '\0' || (s[0] >= '0' && s[0] <= '9') || strlen(s) > 128)
		return false;
	for (p = s; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
			  (*p >= '0' && *p <= '9') || *p == '_'))
			return false;
	return true;
}

/* A non-negative number option; ERROR otherwise. */
static double
number_option(DefElem *def, double max)
{
	char	   *s = defGetString(def);
	char	   *end;
	double		v;

	errno = 0;
	v = strtod(s, &end);
	if (errno != 0 || end == s || *end != '\0' || isnan(v) || v < 0 || v > max)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
				 errmsg("invalid value for option \"%s\": \"%s\"", def->defname, s),
				 errhint("Use a number from 0 to %g.", max)));
	return v;
}

/* ERROR for an option that is not valid on this kind of object. */
static void
invalid_option(DefElem *def, const char *valid)
{
	int			i;

	for (i = 0; refused_options[i] != NULL; i++)
		if (strcmp(def->defname, refused_options[i]) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
					 errmsg("d365_fdw does not accept option \"%s\"", def->defname),
					 errdetail("A d365_fdw server always reads the organization configured in d365.settings, with its credentials."),
					 errhint("Change the connection in d365.settings (as a d365sync admin).")));
	ereport(ERROR,
			(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
			 errmsg("invalid option \"%s\"", def->defname),
			 valid[0] ? errhint("Valid options in this context are: %s.", valid)
			 : errhint("There are no valid options in this context.")));
}

/*
 * d365_fdw_validator(options text[], catalog oid)
 *		Check the options of the wrapper, a server, a user mapping, a
 *		foreign table or one of its columns.
 */
Datum
d365_fdw_validator(PG_FUNCTION_ARGS)
{
	List	   *options = untransformRelOptions(PG_GETARG_DATUM(0));
	Oid			catalog = PG_GETARG_OID(1);
	ListCell   *lc;
	bool		has_set = false;

	foreach(lc, options)
	{
		DefElem    *def = lfirst(lc);
		const char *name = def->defname;

		if (catalog == ForeignServerRelationId)
		{
			if (strcmp(name, "page_size") == 0)
			{
				double		v = number_option(def, D365_FDW_MAX_PAGE);

				if (v < 1 || v != floor(v))
					ereport(ERROR,
							(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
							 errmsg("invalid value for option \"page_size\": \"%s\"",
									defGetString(def)),
							 errhint("Use a whole number of rows from 1 to %d.",
									 D365_FDW_MAX_PAGE)));
			}
			else if (strcmp(name, "request_cost") == 0 || strcmp(name, "row_cost") == 0)
				(void) number_option(def, 1e9);
			else
				invalid_option(def, "page_size, request_cost, row_cost");
		}
		else if (catalog == ForeignTableRelationId)
		{
			if (strcmp(name, "entity_set") == 0 || strcmp(name, "entity") == 0)
			{
				if (!identifier_ok(defGetString(def)))
					ereport(ERROR,
							(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
							 errmsg("invalid value for option \"%s\": \"%s\"", name,
									defGetString(def)),
							 errhint("Dataverse names are letters, digits and underscores, e.g. accounts or new_projects.")));
				has_set |= (strcmp(name, "entity_set") == 0);
			}
			else if (strcmp(name, "rows") == 0)
				(void) number_option(def, 1e12);
			else
				invalid_option(def, "entity_set, entity, rows");
		}
		else if (catalog == AttributeRelationId)
		{
			if (strcmp(name, "field") != 0)
				invalid_option(def, "field");
			if (!identifier_ok(defGetString(def)))
				ereport(ERROR,
						(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
						 errmsg("invalid value for option \"field\": \"%s\"", defGetString(def)),
						 errhint("A field is an attribute's logical name, or _<lookup>_value for a lookup.")));
		}
		else
			invalid_option(def, "");
	}
	if (catalog == ForeignTableRelationId && !has_set && options != NIL)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_OPTION_NAME_NOT_FOUND),
				 errmsg("a d365_fdw foreign table needs the option entity_set"),
				 errhint("Name the Dataverse table's entity set, e.g. OPTIONS (entity_set 'accounts').")));
	PG_RETURN_VOID();
}

/* The value of option name in options, or NULL. */
static char *
option_value(List *options, const char *name)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *def = lfirst(lc);

		if (strcmp(def->defname, name) == 0)
			return defGetString(def);
	}
	return NULL;
}

/*
 * table_info
 *		The options of a foreign table and its server, and its columns'
 *		remote names, into a new D365FdwRel.
 */
static D365FdwRel *
table_info(Oid relid, double *rows)
{
	D365FdwRel *frel = palloc0(sizeof(D365FdwRel));
	ForeignTable *ft = GetForeignTable(relid);
	ForeignServer *server = GetForeignServer(ft->serverid);
	Relation	rel;
	TupleDesc	desc;
	char	   *v;
	int			i;

	frel->entity_set = option_value(ft->options, "entity_set");
	if (frel->entity_set == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_OPTION_NAME_NOT_FOUND),
				 errmsg("foreign table \"%s\" has no entity_set option", get_rel_name(relid)),
				 errhint("ALTER FOREIGN TABLE ... OPTIONS (ADD entity_set 'accounts').")));
	v = option_value(server->options, "page_size");
	frel->page_size = v ? atoi(v) : D365_FDW_MAX_PAGE;
	v = option_value(server->options, "request_cost");
	frel->request_cost = v ? strtod(v, NULL) : DEFAULT_REQUEST_COST;
	v = option_value(server->options, "row_cost");
	frel->row_cost = v ? strtod(v, NULL) : DEFAULT_ROW_COST;
	v = option_value(ft->options, "rows");
	*rows = v ? strtod(v, NULL) : -1;

	rel = table_open(relid, NoLock);
	desc = RelationGetDescr(rel);
	frel->natts = desc->natts;
	frel->fields = palloc0(sizeof(char *) * (desc->natts + 1));
	frel->notnull = palloc0(sizeof(bool) * (desc->natts + 1));
	for (i = 1; i <= desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i - 1);

		if (att->attisdropped)
			continue;
		v = option_value(GetForeignColumnOptions(relid, i), "field");
		frel->fields[i] = pstrdup(v ? v : NameStr(att->attname));

		/*
		 * A column without the option field reads the field of its name, and
		 * that name is written into $select and $filter: it must be a plain
		 * identifier as the option is (a name holding the parameter marker
		 * or OData syntax would rewrite the request).
		 */
		if (!identifier_ok(frel->fields[i]))
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_COLUMN_NAME),
					 errmsg("column \"%s\" of foreign table \"%s\" is not a Dataverse field name",
							NameStr(att->attname), get_rel_name(relid)),
					 errdetail("A column without the option field reads the field of its own name; a field is letters, digits and underscores, not starting with a digit."),
					 errhint("Name the field: ALTER FOREIGN TABLE ... ALTER COLUMN ... OPTIONS (ADD field 'logical_name').")));
		frel->notnull[i] = att->attnotnull;
	}
	table_close(rel, NoLock);
	return frel;
}

/*
 * get_rel_size
 *		Sort the conditions into sent and local, note the columns used, and
 *		estimate the rows.
 */
static void
get_rel_size(PlannerInfo *root, RelOptInfo *baserel, Oid relid)
{
	D365FdwRel *frel;
	StringInfoData filter;
	ListCell   *lc;
	double		tuples;
	double		rows_option;

	frel = table_info(relid, &rows_option);
	baserel->fdw_private = frel;
	initStringInfo(&filter);

	foreach(lc, baserel->baserestrictinfo)
	{
		RestrictInfo *ri = lfirst(lc);
		StringInfoData one;
		bool		exact;

		initStringInfo(&one);
		if (d365_fdw_deparse_qual(baserel, frel, ri->clause, &one, &exact, &frel->params,
								  false))
		{
			appendStringInfo(&filter, "%s%s", filter.len ? " and " : "", one.data);
			frel->remote_conds = lappend(frel->remote_conds, ri);
			if (!exact)
				frel->local_conds = lappend(frel->local_conds, ri);
		}
		else
			frel->local_conds = lappend(frel->local_conds, ri);
	}
	frel->filter = filter.len ? filter.data : NULL;

	pull_varattnos((Node *) baserel->reltarget->exprs, baserel->relid, &frel->attrs_used);
	foreach(lc, frel->local_conds)
		pull_varattnos((Node *) ((RestrictInfo *) lfirst(lc))->clause, baserel->relid,
					   &frel->attrs_used);

	/* rows: the table's rows option if set, else ANALYZE's count, else 1000 */
	tuples = rows_option >= 0 ? rows_option :
		baserel->tuples >= 0 && baserel->pages > 0 ? baserel->tuples : DEFAULT_ROWS;
	baserel->tuples = tuples;
	frel->remote_rows = clamp_row_est(tuples *
									  clauselist_selectivity(root, frel->remote_conds,
															 baserel->relid, JOIN_INNER, NULL));
	baserel->rows = clamp_row_est(tuples *
								  clauselist_selectivity(root, baserel->baserestrictinfo,
														 baserel->relid, JOIN_INNER, NULL));
}

/*
 * pushed_limit
 *		The $top for this scan, or 0: only when the query is this one table,
 *		ungrouped, with a constant LIMIT (and OFFSET) and no condition left
 *		to evaluate locally, so the first rows Dataverse returns are the
 *		first rows of the answer.  Dataverse pages at most 5,000 rows.
 */
static int
pushed_limit(PlannerInfo *root, RelOptInfo *baserel, D365FdwRel *frel)
{
	Query	   *parse = root->parse;
	Const	   *count = (Const *) parse->limitCount;
	Const	   *offset = (Const *) parse->limitOffset;
	int64		n;

	if (frel->local_conds != NIL || baserel->reloptkind != RELOPT_BASEREL ||
		bms_membership(root->all_baserels) != BMS_SINGLETON ||
		parse->commandType != CMD_SELECT || root->limit_tuples < 0 ||
		parse->groupClause || parse->groupingSets || parse->distinctClause ||
		parse->hasAggs || parse->hasWindowFuncs || parse->hasTargetSRFs ||
		parse->havingQual || parse->rowMarks || parse->setOperations ||
		parse->limitOption != LIMIT_OPTION_COUNT ||
		count == NULL || !IsA(count, Const) || count->constisnull ||
		count->consttype != INT8OID)
		return 0;
	n = DatumGetInt64(count->constvalue);
	if (offset != NULL)
	{
		if (!IsA(offset, Const) || offset->constisnull || offset->consttype != INT8OID)
			return 0;
		n += Max(DatumGetInt64(offset->constvalue), 0);
	}
	return (n >= 1 && n <= D365_FDW_MAX_PAGE) ? (int) n : 0;
}

/* the path's costs: a request per page, a cost per row, local conditions */
static void
path_costs(PlannerInfo *root, D365FdwRel *frel, double rows, Cost *startup, Cost *total)
{
	QualCost	qcost;
	double		pages = Max(ceil(rows / frel->page_size), 1);

	cost_qual_eval(&qcost, extract_actual_clauses(frel->local_conds, false), root);
	*startup = frel->request_cost + qcost.startup;
	*total = *startup + (pages - 1) * frel->request_cost +
		rows * (frel->row_cost + cpu_tuple_cost + qcost.per_tuple);
}

/* generate_implied_equalities_for_column's callback: the column at hand */
typedef struct EcColumn
{
	Expr	   *current;		/* the member matched this round */
	List	   *already_used;	/* members matched in earlier rounds */
} EcColumn;

static bool
ec_member_is_column(PlannerInfo *root, RelOptInfo *rel, EquivalenceClass *ec,
					EquivalenceMember *em, void *arg)
{
	EcColumn   *state = arg;
	Expr	   *expr = em->em_expr;

	if (state->current != NULL)
		return equal(expr, state->current);
	if (list_member(state->already_used, expr))
		return false;
	state->current = expr;
	return true;
}

/*
 * param_path_infos
 *		The parameterizations worth a path: one per set of outer tables that
 *		a join clause the wrapper can send needs (x = outer.y, from the
 *		query's equivalence classes or its other join clauses).
 */
static List *
param_path_infos(PlannerInfo *root, RelOptInfo *baserel, D365FdwRel *frel)
{
	List	   *ppis = NIL;
	List	   *clauses = NIL;
	ListCell   *lc;
	EcColumn	state;

	foreach(lc, baserel->joininfo)
		clauses = lappend(clauses, lfirst(lc));
	if (baserel->has_eclass_joins)
	{
		state.already_used = NIL;
		for (;;)
		{
			List	   *found;

			state.current = NULL;
			found = generate_implied_equalities_for_column(root, baserel, ec_member_is_column,
														   &state, baserel->lateral_referencers);
			if (state.current == NULL)
				break;
			clauses = list_concat(clauses, found);
			state.already_used = lappend(state.already_used, state.current);
		}
	}
	foreach(lc, clauses)
	{
		RestrictInfo *ri = lfirst(lc);
		Relids		outer;
		StringInfoData one;
		List	   *params = NIL;
		bool		exact;

		if (!join_clause_is_movable_to(ri, baserel))
			continue;
		initStringInfo(&one);
		if (!d365_fdw_deparse_qual(baserel, frel, ri->clause, &one, &exact, &params, true))
			continue;
		outer = bms_del_members(bms_union(ri->clause_relids, baserel->lateral_relids),
								baserel->relids);
		if (bms_is_empty(outer))
			continue;
		ppis = list_append_unique_ptr(ppis, get_baserel_parampathinfo(root, baserel, outer));
	}
	return ppis;
}

/*
 * get_paths
 *		The plain scan; when the query's ORDER BY can be sent, a sorted one;
 *		with a LIMIT that can be sent, the scan that carries it; and
 *		parameterized scans that send a join clause with the outer row's
 *		value (x eq <value>): for a few outer rows, a few small requests
 *		cost less than reading the whole table, and the costs say so.
 */
static void
get_paths(PlannerInfo *root, RelOptInfo *baserel, Oid relid)
{
	D365FdwRel *frel = baserel->fdw_private;
	int			top = pushed_limit(root, baserel, frel);
	char	   *orderby = NULL;
	Cost		startup,
				total;
	double		rows;

	if (root->query_pathkeys != NIL && bms_membership(root->all_baserels) == BMS_SINGLETON)
		orderby = d365_fdw_deparse_orderby(root, baserel, frel, root->query_pathkeys);

	/* the plain scan: limited only when no order is asked for */
	rows = (top > 0 && root->query_pathkeys == NIL) ? Min(frel->remote_rows, top) : frel->remote_rows;
	path_costs(root, frel, rows, &startup, &total);
	add_path(baserel, (Path *)
			 create_foreignscan_path(root, baserel, NULL,
									 (top > 0 && root->query_pathkeys == NIL) ?
									 Min(baserel->rows, top) : baserel->rows,
									 startup, total, NIL, baserel->lateral_relids, NULL,
									 list_make2(makeString(""),
												makeInteger(root->query_pathkeys == NIL ? top : 0))));

	if (baserel->reloptkind == RELOPT_BASEREL)
	{
		ListCell   *lc;

		foreach(lc, param_path_infos(root, baserel, frel))
		{
			ParamPathInfo *ppi = lfirst(lc);
			double		prows = get_parameterized_baserel_size(root, baserel, ppi->ppi_clauses);

			path_costs(root, frel, prows, &startup, &total);
			add_path(baserel, (Path *)
					 create_foreignscan_path(root, baserel, NULL, prows, startup, total, NIL,
											 ppi->ppi_req_outer, NULL,
											 list_make2(makeString(""), makeInteger(0))));
		}
	}

	if (orderby != NULL)
	{
		rows = top > 0 ? Min(frel->remote_rows, top) : frel->remote_rows;
		path_costs(root, frel, rows, &startup, &total);
		/* sorting costs Dataverse something too: a little more than unsorted */
		total += rows * cpu_operator_cost;
		add_path(baserel, (Path *)
				 create_foreignscan_path(root, baserel, NULL,
										 top > 0 ? Min(baserel->rows, top) : baserel->rows,
										 startup, total, root->query_pathkeys,
										 baserel->lateral_relids, NULL,
										 list_make2(makeString(orderby), makeInteger(top))));
	}
}

/*
 * get_plan
 *		The ForeignScan: local conditions as its quals, the request's parts
 *		in fdw_private (see D365FdwPrivateIndex).
 */
static ForeignScan *
get_plan(PlannerInfo *root, RelOptInfo *baserel, Oid relid, ForeignPath *best_path,
		 List *tlist, List *scan_clauses, Plan *outer_plan)
{
	D365FdwRel *frel = baserel->fdw_private;
	List	   *local = NIL;
	List	   *attrs = NIL;
	List	   *fields = NIL;
	StringInfoData select;
	List	   *priv;
	List	   *params = NIL;
	List	   *param_exprs = NIL;
	ListCell   *lc;
	bool		whole_row;
	int			i;

	List	   *all_params = list_copy(frel->params);
	StringInfoData filter;

	initStringInfo(&filter);
	if (frel->filter != NULL)
		appendStringInfoString(&filter, frel->filter);
	foreach(lc, scan_clauses)
	{
		RestrictInfo *ri = lfirst(lc);
		bool		exact;

		if (ri->pseudoconstant)
			continue;
		if (list_member_ptr(frel->local_conds, ri) || !list_member_ptr(frel->remote_conds, ri))
			local = lappend(local, ri->clause);
		/*
		 * A join clause of a parameterized scan: sent with the outer row's
		 * value (and checked locally too, as every parameter comparison).
		 */
		if (best_path->path.param_info != NULL &&
			!list_member_ptr(baserel->baserestrictinfo, ri))
		{
			StringInfoData one;

			initStringInfo(&one);
			if (d365_fdw_deparse_qual(baserel, frel, ri->clause, &one, &exact, &all_params, true))
				appendStringInfo(&filter, "%s%s", filter.len ? " and " : "", one.data);
		}
	}

	whole_row = bms_is_member(0 - FirstLowInvalidHeapAttributeNumber, frel->attrs_used);
	initStringInfo(&select);
	for (i = 1; i <= frel->natts; i++)
	{
		if (frel->fields[i] == NULL ||
			!(whole_row || bms_is_member(i - FirstLowInvalidHeapAttributeNumber, frel->attrs_used)))
			continue;
		attrs = lappend_int(attrs, i);
		fields = lappend(fields, makeString(frel->fields[i]));
		appendStringInfo(&select, "%s%s", select.len ? "," : "", frel->fields[i]);
	}
	/* no column used (count(*)): the first one, to keep rows small */
	for (i = 1; select.len == 0 && i <= frel->natts; i++)
		if (frel->fields[i] != NULL)
			appendStringInfoString(&select, frel->fields[i]);

	priv = list_make5(makeString(frel->entity_set), makeString(select.data),
					  makeString(filter.data),
					  linitial(best_path->fdw_private), lsecond(best_path->fdw_private));
	priv = lappend(priv, makeInteger(frel->page_size));
	priv = lappend(priv, attrs);
	priv = lappend(priv, fields);
	foreach(lc, all_params)
	{
		D365FdwParam *p = lfirst(lc);

		params = lappend(params, list_make2(makeString(p->field), makeInteger(p->op)));
		param_exprs = lappend(param_exprs, p->expr);
	}
	priv = lappend(priv, params);
	return make_foreignscan(tlist, local, baserel->relid, param_exprs, priv, NIL, NIL,
							outer_plan);
}

/*
 * explain_filter
 *		The $filter with each parameter comparison written with $n (n from
 *		1) in place of the value the scan will send.
 */
static char *
explain_filter(const char *filter, List *params)
{
	StringInfoData buf;
	const char *p;

	initStringInfo(&buf);
	for (p = filter; *p; p++)
	{
		List	   *param;

		if (*p != D365_FDW_PARAM_MARK)
		{
			appendStringInfoChar(&buf, *p);
			continue;
		}
		param = list_nth(params, atoi(p + 1));
		appendStringInfo(&buf, "%s %s $%d", strVal(linitial(param)),
						 d365_fdw_op_name(intVal(lsecond(param))), atoi(p + 1) + 1);
		p = strchr(p + 1, D365_FDW_PARAM_MARK);
	}
	return buf.data;
}

/* EXPLAIN: the OData request (VERBOSE) */
static void
explain_scan(ForeignScanState *node, ExplainState *es)
{
	List	   *priv = ((ForeignScan *) node->ss.ps.plan)->fdw_private;

	if (!es->verbose)
		return;
	ExplainPropertyText("OData request",
						psprintf("GET %s",
								 d365_fdw_request_text(strVal(list_nth(priv, D365_FDW_PRIV_SET)),
													   strVal(list_nth(priv, D365_FDW_PRIV_SELECT)),
													   explain_filter(strVal(list_nth(priv, D365_FDW_PRIV_FILTER)),
																	  list_nth(priv, D365_FDW_PRIV_PARAMS)),
													   strVal(list_nth(priv, D365_FDW_PRIV_ORDERBY)),
													   intVal(list_nth(priv, D365_FDW_PRIV_TOP)),
													   false)),
						es);
}

/* import_body: the CREATE FOREIGN TABLE commands, as d365's tables' owner */
typedef struct ImportArgs
{
	ImportForeignSchemaStmt *stmt;
	List	   *commands;
	MemoryContext cxt;
} ImportArgs;

static void
import_body(void *arg)
{
	ImportArgs *a = arg;
	ImportForeignSchemaStmt *stmt = a->stmt;
	Datum	   *names;
	int			n = 0;
	ListCell   *lc;
	Oid			types[4] = {TEXTOID, TEXTOID, TEXTOID, TEXTARRAYOID};
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	int			rc;
	uint64		i;

	names = palloc(sizeof(Datum) * (list_length(stmt->table_list) + 1));
	foreach(lc, stmt->table_list)
		names[n++] = CStringGetTextDatum(((RangeVar *) lfirst(lc))->relname);
	values[0] = CStringGetTextDatum(stmt->server_name);
	values[1] = CStringGetTextDatum(stmt->list_type == FDW_IMPORT_SCHEMA_LIMIT_TO ? "limit to" :
									stmt->list_type == FDW_IMPORT_SCHEMA_EXCEPT ? "except" : "all");
	values[2] = CStringGetTextDatum(stmt->local_schema);
	values[3] = PointerGetDatum(construct_array(names, n, TEXTOID, -1, false, TYPALIGN_INT));

	rc = SPI_execute_with_args("SELECT d365._fdw_import(server => $1, mode => $2, local_schema => $3, entity_sets => $4)",
							   4, types, values, nulls, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(rc));
	for (i = 0; i < SPI_processed; i++)
	{
		char	   *cmd = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		MemoryContext old = MemoryContextSwitchTo(a->cxt);

		a->commands = lappend(a->commands, pstrdup(cmd));
		MemoryContextSwitchTo(old);
	}
}

/*
 * import_schema
 *		IMPORT FOREIGN SCHEMA dataverse: one CREATE FOREIGN TABLE per
 *		Dataverse table, from its metadata (d365._fdw_import, which shares
 *		d365_describe's cached metadata).  The caller already holds USAGE on
 *		the server and CREATE on the target schema; the metadata is read as
 *		the owner of d365's tables, as d365_describe does.
 */
static List *
import_schema(ImportForeignSchemaStmt *stmt, Oid serverOid)
{
	ImportArgs	a;
	ListCell   *lc;

	if (strcmp(stmt->remote_schema, "dataverse") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_SCHEMA_NOT_FOUND),
				 errmsg("d365_fdw has no remote schema \"%s\"", stmt->remote_schema),
				 errhint("Import from schema dataverse: IMPORT FOREIGN SCHEMA dataverse LIMIT TO (accounts) FROM SERVER ... INTO ...")));
	foreach(lc, stmt->options)
		invalid_option(lfirst(lc), "");

	a.stmt = stmt;
	a.commands = NIL;
	a.cxt = CurrentMemoryContext;
	SPI_connect();
	d365_as_table_owner(d365_table_owner("metadata_cache"), import_body, &a);
	SPI_finish();
	return a.commands;
}

/* A foreign table reads Dataverse only while its owner holds USAGE on its server. */
static void
check_owner_usage(Relation rel)
{
	ForeignTable *ft = GetForeignTable(RelationGetRelid(rel));

	if (pg_foreign_server_aclcheck(ft->serverid, rel->rd_rel->relowner, ACL_USAGE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("owner of foreign table \"%s\" has no USAGE on server \"%s\"",
						RelationGetRelationName(rel), GetForeignServer(ft->serverid)->servername),
				 errhint("A d365_fdw foreign table reads Dataverse only while its owner holds USAGE on its server.")));
}

/* The scan owner's right to the server, checked when a scan starts. */
static void
begin_scan(ForeignScanState *node, int eflags)
{
	if (!(eflags & EXEC_FLAG_EXPLAIN_ONLY))
		check_owner_usage(node->ss.ss_currentRelation);
	d365_fdw_begin(node, eflags);
}

/*
 * acquire_sample_rows
 *		ANALYZE: read every column of every row and keep a sample
 *		(d365_fdw_sample); the row count becomes the planner's estimate.
 */
static int
acquire_sample_rows(Relation rel, int elevel, HeapTuple *rows, int targrows,
					double *totalrows, double *totaldeadrows)
{
	double		rows_option;
	D365FdwRel *frel;
	List	   *attrs = NIL;
	List	   *fields = NIL;
	StringInfoData select;
	int			i;

	check_owner_usage(rel);
	frel = table_info(RelationGetRelid(rel), &rows_option);
	initStringInfo(&select);
	for (i = 1; i <= frel->natts; i++)
	{
		if (frel->fields[i] == NULL)
			continue;
		attrs = lappend_int(attrs, i);
		fields = lappend(fields, makeString(frel->fields[i]));
		appendStringInfo(&select, "%s%s", select.len ? "," : "", frel->fields[i]);
	}
	*totaldeadrows = 0;
	return d365_fdw_sample(rel, frel->entity_set, select.data, attrs, fields,
						   frel->page_size, elevel, rows, targrows, totalrows);
}

/* ANALYZE of a foreign table: supported, by reading it (acquire_sample_rows). */
static bool
analyze_table(Relation rel, AcquireSampleRowsFunc *func, BlockNumber *totalpages)
{
	*func = acquire_sample_rows;
	*totalpages = 1;
	return true;
}

/*
 * d365_fdw_handler()
 *		The wrapper's callbacks: reads only.
 */
Datum
d365_fdw_handler(PG_FUNCTION_ARGS)
{
	FdwRoutine *r = makeNode(FdwRoutine);

	r->GetForeignRelSize = get_rel_size;
	r->GetForeignPaths = get_paths;
	r->GetForeignPlan = get_plan;
	r->BeginForeignScan = begin_scan;
	r->IterateForeignScan = d365_fdw_iterate;
	r->ReScanForeignScan = d365_fdw_rescan;
	r->EndForeignScan = d365_fdw_end;
	r->ExplainForeignScan = explain_scan;
	r->AnalyzeForeignTable = analyze_table;
	r->ImportForeignSchema = import_schema;
	PG_RETURN_POINTER(r);
}
