/*-------------------------------------------------------------------------
 *
 * fdw_deparse.c
 *	  The conditions and orderings of a query on a d365_fdw foreign table
 *	  that Dataverse can evaluate with PostgreSQL's meaning, written as
 *	  OData ($filter, $orderby), and the request text they make.
 *
 * The rule is postgres_fdw's: send only what means the same thing on both
 * sides.  A condition sent to Dataverse is one of two kinds:
 *
 *	 - exact: Dataverse returns precisely the rows for which PostgreSQL's
 *	   condition is true.  Such a condition is not evaluated again here.
 *	 - a superset: Dataverse returns every row PostgreSQL's condition
 *	   accepts, and perhaps more; the condition is also evaluated locally
 *	   (the planner keeps it among the scan's local conditions).
 *
 * Everything else stays local.  What decides the kind:
 *
 *	 - Three-valued logic.  OData's comparisons with null are false (ne:
 *	   true), PostgreSQL's are null.  Conditions are written in negation
 *	   normal form: NOT is pushed down to the comparisons (De Morgan holds
 *	   in three-valued logic, and NOT (a = 1) is a <> 1), and x <> c becomes
 *	   (x ne c and x ne null), so that every comparison is false where
 *	   PostgreSQL's is null.  AND and OR of exact parts are then exact.
 *	 - Collation.  Dataverse compares strings case- and accent-insensitively
 *	   (SQL Server's usual collation), so a string equality, IN or prefix
 *	   (LIKE 'abc%' as startswith) sent there finds a superset of the rows
 *	   a deterministic PostgreSQL collation finds: those are sent, only in
 *	   positive positions, and checked again here.  String ordering (<, >,
 *	   ORDER BY) differs and is never sent, nor is anything under a
 *	   non-deterministic collation.
 *	 - Types.  Comparisons are sent for integers, numeric, booleans, dates,
 *	   timestamps with time zone (written in UTC) and, for equality only,
 *	   uuids (SQL Server orders uniqueidentifiers differently).  Only
 *	   built-in operators, between a column and a constant of the same kind.
 *	 - Parameters.  A comparison with a value known only when the scan
 *	   starts is sent with that value (see deparse_param) and also checked
 *	   locally.
 *	 - Ordering.  Dataverse sorts nulls first ascending and last descending;
 *	   an ORDER BY is sent only when PostgreSQL asks for the same (or the
 *	   column is NOT NULL).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "access/stratnum.h"
#include "catalog/pg_type.h"
#include "datatype/timestamp.h"
#include "miscadmin.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/optimizer.h"
#include "utils/array.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

#include "fdw.h"
#include "odata.h"

/* What a column's type is, as far as pushing down goes. */
typedef enum TypeKind
{
	TK_NONE,					/* never pushed */
	TK_STRING,
	TK_INT,
	TK_NUMERIC,
	TK_BOOL,
	TK_UUID,
	TK_TIMESTAMPTZ,
	TK_DATE
} TypeKind;

/* The OData comparisons, and what NOT makes of them. */
typedef enum CmpOp
{
	OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE, OP_LIKE, OP_NONE
} CmpOp;

static const char *const op_odata[] = {"eq", "ne", "lt", "le", "gt", "ge"};

typedef struct Deparse
{
	RelOptInfo *rel;
	D365FdwRel *frel;
	StringInfo	buf;
	bool		exact;			/* false once a superset part was written */
	List	   *params;			/* comparisons with a parameter written so
								 * far (see D365FdwParam) */
	int			first_param;	/* the number of the first of them */
	bool		outer_vars;		/* a column of another table counts as a
								 * parameter (a parameterized scan's join
								 * clause) */
} Deparse;

static bool deparse_expr(Deparse *d, Expr *expr, bool negated);

static TypeKind
type_kind(Oid type)
{
	switch (getBaseType(type))
	{
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
			return TK_STRING;
		case INT2OID:
		case INT4OID:
		case INT8OID:
			return TK_INT;
		case NUMERICOID:
			return TK_NUMERIC;
		case BOOLOID:
			return TK_BOOL;
		case UUIDOID:
			return TK_UUID;
		case TIMESTAMPTZOID:
			return TK_TIMESTAMPTZ;
		case DATEOID:
			return TK_DATE;
		default:
			return TK_NONE;
	}
}

/*
 * column_of
 *		The attribute number when expr is a plain column of the foreign
 *		table (under binary-compatible relabelling), else 0.
 */
static AttrNumber
column_of(Deparse *d, Expr *expr, Oid *type)
{
	Var		   *var;

	while (expr && IsA(expr, RelabelType))
		expr = ((RelabelType *) expr)->arg;
	if (expr == NULL || !IsA(expr, Var))
		return 0;
	var = (Var *) expr;
	if (var->varno != d->rel->relid || var->varlevelsup != 0 ||
		var->varattno <= 0 || var->varattno > d->frel->natts ||
		d->frel->fields[var->varattno] == NULL)
		return 0;
	*type = var->vartype;
	return var->varattno;
}

/* OData string literal: single quotes, a quote doubled. */
static void
append_string_literal(StringInfo buf, const char *s)
{
	appendStringInfoChar(buf, '\'');
	for (; *s; s++)
	{
		if (*s == '\'')
			appendStringInfoChar(buf, '\'');
		appendStringInfoChar(buf, *s);
	}
	appendStringInfoChar(buf, '\'');
}

/*
 * append_literal
 *		The OData literal of a non-null constant of kind k; false when it has
 *		none that means the same (NaN, infinities, years outside 1-9999).
 *		quoted: every value as a string literal (the value lists of
 *		Microsoft.Dynamics.CRM.In are strings).
 */
static bool
append_literal(StringInfo buf, TypeKind k, Oid type, Datum value, bool quoted)
{
	char	   *s;
	Oid			out;
	bool		varlena;

	switch (k)
	{
		case TK_TIMESTAMPTZ:
			{
				TimestampTz ts = DatumGetTimestampTz(value);
				struct pg_tm tm;
				fsec_t		fsec;

				if (TIMESTAMP_NOT_FINITE(ts) ||
					timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0 ||
					tm.tm_year < 1 || tm.tm_year > 9999)
					return false;
				s = psprintf("%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year, tm.tm_mon,
							 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
				if (fsec != 0)
					s = psprintf("%s.%06d", s, (int) fsec);
				s = psprintf("%sZ", s);
				break;
			}
		case TK_DATE:
			{
				DateADT		date = DatumGetDateADT(value);
				int			y,
							m,
							dd;

				if (DATE_NOT_FINITE(date))
					return false;
				j2date(date + POSTGRES_EPOCH_JDATE, &y, &m, &dd);
				if (y < 1 || y > 9999)
					return false;
				s = psprintf("%04d-%02d-%02d", y, m, dd);
				break;
			}
		case TK_BOOL:
			s = DatumGetBool(value) ? "true" : "false";
			break;
		default:
			getTypeOutputInfo(type, &out, &varlena);
			s = OidOutputFunctionCall(out, value);
			if (k == TK_NUMERIC && (strchr(s, 'N') || strchr(s, 'n')))
				return false;	/* NaN, Infinity */
			break;
	}
	if (strchr(s, D365_FDW_PARAM_MARK) != NULL)
		return false;			/* the character that marks parameters */
	if (k == TK_STRING || quoted)
		append_string_literal(buf, s);
	else
		appendStringInfoString(buf, s);
	return true;
}

/*
 * like_prefix
 *		The literal prefix of a LIKE pattern of the form 'prefix%' (backslash
 *		escapes), or NULL when the pattern is anything else.  *whole is set
 *		when the pattern has no wildcard at all.  A prefix holding %, _ or [
 *		is refused: SQL Server's LIKE behind startswith might read them as
 *		wildcards or character classes, which could match fewer rows.
 */
static char *
like_prefix(const char *pat, bool *whole)
{
	StringInfoData buf;
	const char *p;

	initStringInfo(&buf);
	*whole = true;
	for (p = pat; *p; p++)
	{
		char		c = *p;

		if (c == '\\')
		{
			if (p[1] == '\0')
				return NULL;
			c = *++p;
		}
		else if (c == '%' && p[1] == '\0')
		{
			*whole = false;
			break;
		}
		else if (c == '%' || c == '_')
			return NULL;
		if (c == '%' || c == '_' || c == '[')
			return NULL;
		appendStringInfoChar(&buf, c);
	}
	return buf.data;
}

/* cmp_of: the OData comparison of a built-in operator, or OP_NONE */
static CmpOp
cmp_of(Oid opno)
{
	char	   *name;

	if (opno >= FirstGenbkiObjectId)
		return OP_NONE;
	name = get_opname(opno);
	if (name == NULL)
		return OP_NONE;
	if (strcmp(name, "=") == 0)
		return OP_EQ;
	if (strcmp(name, "<>") == 0)
		return OP_NE;
	if (strcmp(name, "<") == 0)
		return OP_LT;
	if (strcmp(name, "<=") == 0)
		return OP_LE;
	if (strcmp(name, ">") == 0)
		return OP_GT;
	if (strcmp(name, ">=") == 0)
		return OP_GE;
	if (strcmp(name, "~~") == 0)
		return OP_LIKE;
	return OP_NONE;
}

static CmpOp
commute(CmpOp op)
{
	switch (op)
	{
		case OP_LT:
			return OP_GT;
		case OP_LE:
			return OP_GE;
		case OP_GT:
			return OP_LT;
		case OP_GE:
			return OP_LE;
		case OP_LIKE:
			return OP_NONE;
		default:
			return op;
	}
}

static CmpOp
negate(CmpOp op)
{
	switch (op)
	{
		case OP_EQ:
			return OP_NE;
		case OP_NE:
			return OP_EQ;
		case OP_LT:
			return OP_GE;
		case OP_LE:
			return OP_GT;
		case OP_GT:
			return OP_LE;
		case OP_GE:
			return OP_LT;
		default:
			return OP_NONE;
	}
}

/* strings: only deterministic collations mean what Dataverse's superset covers */
static bool
collation_ok(Oid collid)
{
	return !OidIsValid(collid) || get_collation_isdeterministic(collid);
}

/*
 * deparse_param
 *		column op parameter: a value known only when the scan starts (a
 *		correlated subquery's outer value, a prepared statement's
 *		parameter).  Written as a marker, D365_FDW_PARAM_MARK, the
 *		comparison's number and the marker again; the scan writes the
 *		comparison with the parameter's value (d365_fdw_param_text).  Such a
 *		condition is always also checked locally, so a value that has no
 *		OData literal can be sent as a condition that holds for every row.
 */
static bool
deparse_param(Deparse *d, OpExpr *e, AttrNumber att, Oid vtype, Expr *p, CmpOp op)
{
	TypeKind	k = type_kind(vtype);
	D365FdwParam *dp;

	if (op == OP_NONE || op == OP_LIKE || k == TK_NONE || type_kind(exprType((Node *) p)) != k)
		return false;
	if (k == TK_STRING && (op != OP_EQ || !collation_ok(e->inputcollid)))
		return false;
	if ((k == TK_UUID || k == TK_BOOL) && op != OP_EQ && op != OP_NE)
		return false;
	dp = palloc0(sizeof(D365FdwParam));
	dp->field = d->frel->fields[att];
	dp->op = op;
	dp->expr = (Expr *) p;
	d->params = lappend(d->params, dp);
	d->exact = false;
	appendStringInfo(d->buf, "%c%d%c", D365_FDW_PARAM_MARK,
					 d->first_param + list_length(d->params) - 1, D365_FDW_PARAM_MARK);
	return true;
}

/*
 * is_value_source
 *		Whether expr gives a comparison its value when the scan starts: a
 *		parameter (of a prepared statement, or set by an outer plan), or in
 *		a parameterized scan's join clause a column of another table of the
 *		same query level, which the planner turns into a parameter.
 */
static bool
is_value_source(Deparse *d, Expr *expr)
{
	while (expr && IsA(expr, RelabelType))
		expr = ((RelabelType *) expr)->arg;
	if (expr == NULL)
		return false;
	if (IsA(expr, Param))
		return ((Param *) expr)->paramkind == PARAM_EXTERN ||
			((Param *) expr)->paramkind == PARAM_EXEC;
	return d->outer_vars && IsA(expr, Var) && ((Var *) expr)->varlevelsup == 0 &&
		!bms_is_member(((Var *) expr)->varno, d->rel->relids);
}

/* the OData name of a comparison (for EXPLAIN) */
const char *
d365_fdw_op_name(int op)
{
	return (op >= OP_EQ && op <= OP_GE) ? op_odata[op] : "?";
}

/*
 * d365_fdw_param_text
 *		The OData text of parameter comparison number n with the value v
 *		(type type): "field op literal", with the null guard of ne; a NULL
 *		makes a comparison that holds for no row (PostgreSQL's comparison is
 *		NULL, and in negation normal form NULL and false select the same
 *		rows), a value without an OData literal one that holds for every row
 *		(the condition is checked locally anyway).
 */
void
d365_fdw_param_text(StringInfo buf, const char *field, int op, Oid type,
					Datum v, bool isnull)
{
	StringInfoData lit;

	initStringInfo(&lit);
	if (isnull)
		appendStringInfo(buf, "(%s eq null and %s ne null)", field, field);
	else if (!append_literal(&lit, type_kind(type), type, v, false))
		appendStringInfo(buf, "(%s eq null or %s ne null)", field, field);
	else if (op == OP_NE)
		appendStringInfo(buf, "(%s ne %s and %s ne null)", field, lit.data, field);
	else
		appendStringInfo(buf, "%s %s %s", field, op_odata[op], lit.data);
}

/*
 * deparse_comparison
 *		column op constant (either way round).
 */
static bool
deparse_comparison(Deparse *d, OpExpr *e, bool negated)
{
	Expr	   *l,
			   *r;
	Const	   *c;
	AttrNumber	att;
	Oid			vtype = InvalidOid;
	TypeKind	k;
	CmpOp		op = cmp_of(e->opno);
	const char *field;

	if (list_length(e->args) != 2 || op == OP_NONE)
		return false;
	l = linitial(e->args);
	r = lsecond(e->args);
	if ((att = column_of(d, l, &vtype)) != 0 && IsA(r, Const))
		c = (Const *) r;
	else if ((att = column_of(d, r, &vtype)) != 0 && IsA(l, Const))
	{
		c = (Const *) l;
		op = commute(op);
	}
	else if ((att = column_of(d, l, &vtype)) != 0 && is_value_source(d, r))
		return deparse_param(d, e, att, vtype, r, negated ? negate(op) : op);
	else if ((att = column_of(d, r, &vtype)) != 0 && is_value_source(d, l))
		return deparse_param(d, e, att, vtype, l,
							 negated ? negate(commute(op)) : commute(op));
	else
		return false;
	k = type_kind(vtype);
	if (c->constisnull || k == TK_NONE || type_kind(c->consttype) != k)
		return false;
	if (negated)
		op = negate(op);
	if (op == OP_NONE)
		return false;
	field = d->frel->fields[att];

	if (k == TK_STRING)
	{
		/* only = and LIKE 'prefix%', as a superset checked again here */
		if (!collation_ok(e->inputcollid))
			return false;
		d->exact = false;
		if (op == OP_LIKE)
		{
			bool		whole;
			char	   *prefix;

			if (c->consttype != TEXTOID)
				return false;
			prefix = like_prefix(TextDatumGetCString(c->constvalue), &whole);
			if (prefix == NULL || strchr(prefix, D365_FDW_PARAM_MARK) != NULL)
				return false;
			appendStringInfo(d->buf, whole ? "%s eq " : "startswith(%s,", field);
			append_string_literal(d->buf, prefix);
			if (!whole)
				appendStringInfoChar(d->buf, ')');
			return true;
		}
		if (op != OP_EQ)
			return false;
	}
	else if (k == TK_UUID || k == TK_BOOL)
	{
		if (op != OP_EQ && op != OP_NE)
			return false;
	}
	if (op == OP_LIKE)
		return false;

	if (op == OP_NE)
		appendStringInfo(d->buf, "(%s ne ", field);
	else
		appendStringInfo(d->buf, "%s %s ", field, op_odata[op]);
	if (!append_literal(d->buf, k, c->consttype, c->constvalue, false))
		return false;
	if (op == OP_NE)
		appendStringInfo(d->buf, " and %s ne null)", field);
	return true;
}

/*
 * deparse_in
 *		column = ANY (constant array) as Microsoft.Dynamics.CRM.In, and
 *		column <> ALL (...) as NotIn (with the null guard).  Arrays that are
 *		empty or hold a NULL stay local.
 */
static bool
deparse_in(Deparse *d, ScalarArrayOpExpr *e, bool negated)
{
	Const	   *c;
	AttrNumber	att;
	Oid			vtype = InvalidOid;
	Oid			elemtype;
	TypeKind	k;
	CmpOp		op = cmp_of(e->opno);
	ArrayType  *arr;
	Datum	   *values;
	bool	   *nulls;
	int			n;
	int16		typlen;
	bool		typbyval;
	char		typalign;
	bool		in;
	int			i;

	if (list_length(e->args) != 2 || !IsA(lsecond(e->args), Const))
		return false;
	att = column_of(d, linitial(e->args), &vtype);
	c = lsecond(e->args);
	if (att == 0 || c->constisnull)
		return false;
	if (op == OP_EQ && e->useOr)
		in = true;
	else if (op == OP_NE && !e->useOr)
		in = false;
	else
		return false;
	if (negated)
		in = !in;
	k = type_kind(vtype);
	elemtype = get_element_type(c->consttype);
	if (k == TK_NONE || k == TK_TIMESTAMPTZ || k == TK_DATE ||
		!OidIsValid(elemtype) || type_kind(elemtype) != k)
		return false;
	if (k == TK_STRING)
	{
		if (!in || !collation_ok(e->inputcollid))
			return false;
		d->exact = false;
	}

	arr = DatumGetArrayTypeP(c->constvalue);
	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	deconstruct_array(arr, elemtype, typlen, typbyval, typalign, &values, &nulls, &n);
	if (n == 0)
		return false;
	for (i = 0; i < n; i++)
		if (nulls[i])
			return false;

	if (!in)
		appendStringInfoChar(d->buf, '(');
	appendStringInfo(d->buf, "Microsoft.Dynamics.CRM.%s(PropertyName='%s',PropertyValues=[",
					 in ? "In" : "NotIn", d->frel->fields[att]);
	for (i = 0; i < n; i++)
	{
		if (i > 0)
			appendStringInfoChar(d->buf, ',');
		if (!append_literal(d->buf, k, elemtype, values[i], true))
			return false;
	}
	appendStringInfoString(d->buf, "])");
	if (!in)
		appendStringInfo(d->buf, " and %s ne null)", d->frel->fields[att]);
	return true;
}

/* IS [NOT] NULL of a column */
static bool
deparse_nulltest(Deparse *d, NullTest *e, bool negated)
{
	AttrNumber	att;
	Oid			vtype;
	bool		isnull = (e->nulltesttype == IS_NULL);

	if (e->argisrow || (att = column_of(d, e->arg, &vtype)) == 0)
		return false;
	if (negated)
		isnull = !isnull;
	appendStringInfo(d->buf, "%s %s null", d->frel->fields[att], isnull ? "eq" : "ne");
	return true;
}

/* AND / OR of parts (NOT already pushed into them: De Morgan) */
static bool
deparse_bool(Deparse *d, BoolExpr *e, bool negated)
{
	bool		is_and = (e->boolop == AND_EXPR);
	ListCell   *lc;
	bool		first = true;

	if (e->boolop == NOT_EXPR)
		return deparse_expr(d, linitial(e->args), !negated);
	if (negated)
		is_and = !is_and;
	appendStringInfoChar(d->buf, '(');
	foreach(lc, e->args)
	{
		if (!first)
			appendStringInfoString(d->buf, is_and ? " and " : " or ");
		first = false;
		if (!deparse_expr(d, lfirst(lc), negated))
			return false;
	}
	appendStringInfoChar(d->buf, ')');
	return true;
}

static bool
deparse_expr(Deparse *d, Expr *expr, bool negated)
{
	Oid			vtype;
	AttrNumber	att;

	check_stack_depth();
	if (expr == NULL)
		return false;
	switch (nodeTag(expr))
	{
		case T_BoolExpr:
			return deparse_bool(d, (BoolExpr *) expr, negated);
		case T_OpExpr:
			return deparse_comparison(d, (OpExpr *) expr, negated);
		case T_ScalarArrayOpExpr:
			return deparse_in(d, (ScalarArrayOpExpr *) expr, negated);
		case T_NullTest:
			return deparse_nulltest(d, (NullTest *) expr, negated);
		case T_Var:
		case T_RelabelType:
			/* a boolean column by itself */
			att = column_of(d, expr, &vtype);
			if (att == 0 || type_kind(vtype) != TK_BOOL)
				return false;
			appendStringInfo(d->buf, "%s eq %s", d->frel->fields[att],
							 negated ? "false" : "true");
			return true;
		default:
			return false;
	}
}

/*
 * d365_fdw_deparse_qual
 *		Append clause as an OData condition to out; false (out unchanged)
 *		when it cannot be sent.  *exact is set false when Dataverse's answer
 *		is only a superset, so the clause must also be evaluated locally.
 *		Comparisons with parameters are appended to *params (numbered on from
 *		its length); with outer_vars, a column of another table is such a
 *		parameter (a parameterized scan's join clause).
 */
bool
d365_fdw_deparse_qual(RelOptInfo *rel, D365FdwRel *frel, Expr *clause,
					  StringInfo out, bool *exact, List **params, bool outer_vars)
{
	StringInfoData buf;
	Deparse		d;

	initStringInfo(&buf);
	d.rel = rel;
	d.frel = frel;
	d.buf = &buf;
	d.exact = true;
	d.params = NIL;
	d.first_param = list_length(*params);
	d.outer_vars = outer_vars;
	if (contain_volatile_functions((Node *) clause) ||
		!deparse_expr(&d, clause, false) || buf.len > D365_FDW_MAX_QUAL_LEN)
		return false;
	appendBinaryStringInfo(out, buf.data, buf.len);
	*params = list_concat(*params, d.params);
	*exact = d.exact;
	return true;
}

/*
 * d365_fdw_deparse_orderby
 *		$orderby for pathkeys, or NULL when any of them cannot be sent: each
 *		must be a column of the table of a type whose order is the same on
 *		both sides, in its default order, with the nulls where Dataverse
 *		puts them (first ascending, last descending) unless the column is
 *		NOT NULL.
 */
char *
d365_fdw_deparse_orderby(PlannerInfo *root, RelOptInfo *rel, D365FdwRel *frel,
						 List *pathkeys)
{
	StringInfoData buf;
	Deparse		d;
	ListCell   *lc;

	initStringInfo(&buf);
	d.rel = rel;
	d.frel = frel;
	d.buf = &buf;
	d.params = NIL;
	d.first_param = 0;
	d.outer_vars = false;
	foreach(lc, pathkeys)
	{
		PathKey    *pk = lfirst(lc);
		EquivalenceClass *ec = pk->pk_eclass;
		AttrNumber	att = 0;
		Oid			vtype = InvalidOid;
		ListCell   *lm;
		TypeKind	k;
		bool		desc;
		TypeCacheEntry *tce;

		if (ec->ec_has_volatile)
			return NULL;
		foreach(lm, ec->ec_members)
		{
			EquivalenceMember *em = lfirst(lm);

			if (bms_equal(em->em_relids, rel->relids) &&
				(att = column_of(&d, em->em_expr, &vtype)) != 0)
				break;
		}
		if (att == 0)
			return NULL;
		k = type_kind(vtype);
		if (k != TK_INT && k != TK_NUMERIC && k != TK_DATE &&
			k != TK_TIMESTAMPTZ && k != TK_BOOL)
			return NULL;
		tce = lookup_type_cache(vtype, TYPECACHE_BTREE_OPFAMILY);
		if (tce->btree_opf != pk->pk_opfamily)
			return NULL;
		if (pk->pk_strategy == BTLessStrategyNumber)
			desc = false;
		else if (pk->pk_strategy == BTGreaterStrategyNumber)
			desc = true;
		else
			return NULL;
		if (pk->pk_nulls_first == desc && !frel->notnull[att])
			return NULL;
		appendStringInfo(&buf, "%s%s %s", buf.len ? "," : "", frel->fields[att],
						 desc ? "desc" : "asc");
	}
	return buf.len ? buf.data : NULL;
}

/*
 * d365_fdw_request_text
 *		The GET path (relative to the service root): readable for EXPLAIN,
 *		or with the query option values percent-encoded to be sent.
 */
char *
d365_fdw_request_text(const char *entity_set, const char *select,
					  const char *filter, const char *orderby, int top,
					  bool encode)
{
	StringInfoData buf;
	char		sep = '?';

	initStringInfo(&buf);
	appendStringInfoString(&buf, entity_set);
#define OPTION(name, value) \
	if ((value) != NULL && (value)[0] != '\0') \
	{ \
		appendStringInfo(&buf, "%c%s=%s", sep, name, \
						 encode ? d365_uri_escape(value) : (value)); \
		sep = '&'; \
	}
	OPTION("$select", select);
	OPTION("$filter", filter);
	OPTION("$orderby", orderby);
#undef OPTION
	if (top > 0)
		appendStringInfo(&buf, "%c$top=%d", sep, top);
	return buf.data;
}
