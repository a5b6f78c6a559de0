/*-------------------------------------------------------------------------
 *
 * fdw.h
 *	  d365_fdw, the foreign data wrapper that reads Dataverse tables live.
 *
 * Three files, as postgres_fdw splits its own:
 *
 *	  src/fdw/fdw.c			handler and validator, options, planner callbacks,
 *						costs, EXPLAIN, ANALYZE, IMPORT FOREIGN SCHEMA
 *	  src/fdw/fdw_deparse.c	which conditions and orderings mean the same thing in
 *						Dataverse as in PostgreSQL, written as OData
 *						($select, $filter, $orderby)
 *	  src/fdw/fdw_scan.c		the executor: pages of rows through the OData client
 *						(odata_pages.c, the next page asked for ahead), JSON
 *						values into column values; ANALYZE's sample
 *
 * The planner hands the executor a list (ForeignScan.fdw_private) whose
 * members are indexed by D365FdwPrivateIndex.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_FDW_H
#define D365_FDW_H

#include "lib/stringinfo.h"
#include "nodes/execnodes.h"
#include "commands/explain.h"
#include "nodes/pathnodes.h"
#include "utils/relcache.h"

/* Rows per request when the server sets no page_size (Dataverse's maximum). */
#define D365_FDW_MAX_PAGE 5000

/* A condition whose OData text is longer than this stays local. */
#define D365_FDW_MAX_QUAL_LEN 4000

/*
 * What the planner knows of one foreign table (RelOptInfo.fdw_private).
 */
typedef struct D365FdwRel
{
	char	   *entity_set;		/* table option entity_set */
	char	  **fields;			/* remote name by attnum (1-based); NULL for
								 * dropped columns */
	bool	   *notnull;		/* NOT NULL by attnum */
	int			natts;
	int			page_size;		/* rows per request (server option) */
	double		request_cost;	/* cost of one request (server option) */
	double		row_cost;		/* cost of one row received (server option) */

	List	   *remote_conds;	/* RestrictInfos sent in $filter */
	List	   *local_conds;	/* RestrictInfos evaluated here (including
								 * those sent but only as a superset) */
	char	   *filter;			/* the $filter text, or NULL */
	List	   *params;			/* D365FdwParam of the parameter markers in
								 * filter, by number */
	Bitmapset  *attrs_used;		/* columns the query reads
								 * (FirstLowInvalidHeapAttributeNumber
								 * offset) */
	double		remote_rows;	/* rows the request is expected to return */
} D365FdwRel;

/*
 * A comparison of a column with a parameter (fdw_deparse.c): written into
 * the $filter as D365_FDW_PARAM_MARK, its number, D365_FDW_PARAM_MARK, and
 * by the scan with the parameter's value.  A string literal holding the
 * mark is never sent.
 */
#define D365_FDW_PARAM_MARK '\x1F'

typedef struct D365FdwParam
{
	char	   *field;
	int			op;				/* fdw_deparse.c's CmpOp */
	Expr	   *expr;			/* the Param (or, in a join clause, the other
								 * table's column, which becomes one) */
} D365FdwParam;

/* ForeignScan.fdw_private */
typedef enum D365FdwPrivateIndex
{
	D365_FDW_PRIV_SET,			/* String: entity set */
	D365_FDW_PRIV_SELECT,		/* String: $select, or "" */
	D365_FDW_PRIV_FILTER,		/* String: $filter, or "" */
	D365_FDW_PRIV_ORDERBY,		/* String: $orderby, or "" */
	D365_FDW_PRIV_TOP,			/* Integer: $top, or 0 */
	D365_FDW_PRIV_PAGE_SIZE,	/* Integer: odata.maxpagesize */
	D365_FDW_PRIV_ATTRS,		/* IntList: the attnums $select returns */
	D365_FDW_PRIV_FIELDS,		/* List of String: their remote names */
	D365_FDW_PRIV_PARAMS		/* List of (String field, Integer op): the
								 * parameter comparisons, whose values are
								 * ForeignScan.fdw_exprs in the same order */
} D365FdwPrivateIndex;

/* fdw_deparse.c */
extern bool d365_fdw_deparse_qual(RelOptInfo *rel, D365FdwRel *frel, Expr *clause,
								  StringInfo out, bool *exact, List **params,
								  bool outer_vars);
extern char *d365_fdw_deparse_orderby(PlannerInfo *root, RelOptInfo *rel,
									  D365FdwRel *frel, List *pathkeys);
extern const char *d365_fdw_op_name(int op);
extern void d365_fdw_param_text(StringInfo buf, const char *field, int op, Oid type,
								Datum v, bool isnull);
extern char *d365_fdw_request_text(const char *entity_set, const char *select,
								   const char *filter, const char *orderby,
								   int top, bool encode);

/* fdw_scan.c */
extern void d365_fdw_begin(ForeignScanState *node, int eflags);
extern TupleTableSlot *d365_fdw_iterate(ForeignScanState *node);
extern void d365_fdw_rescan(ForeignScanState *node);
extern void d365_fdw_end(ForeignScanState *node);
extern int	d365_fdw_sample(Relation rel, const char *entity_set, const char *select,
							List *attrs, List *fields, int page_size, int elevel,
							HeapTuple *rows, int targrows, double *totalrows);

#endif							/* D365_FDW_H */
