/*-------------------------------------------------------------------------
 *
 * map_owner.c
 *	  Writes to a mapped table as its owner, in a security-restricted
 *	  operation: the table maps' side of src/privilege/table_owner.c.
 *
 * The statements come from d365._map_owner_sql(map, op, columns)
 * (sql/install/11_table_maps.sql), never from the caller; they run through
 * d365_owner_statement(), which checks that the caller holds the UPDATE
 * right on the columns written and is not bound by the table's row
 * security, then runs them as the table's owner under search_path =
 * pg_catalog, pg_temp.  So the triggers, defaults, domains and index
 * expressions of a mapped table run with its owner's rights, never with
 * those of whoever runs the sync.
 *
 *	 d365._map_set_links(map, keys, ids, expect)  link columns
 *	 d365._map_apply(map, vals, key)			   incoming values
 *	 d365._map_remove(map, key)				   a row deleted in Dynamics
 *	 d365._map_insert(map, rows)				   rows loaded from Dynamics
 *		(the statement from d365._map_insert_sql, sql/install/14_map_load.sql;
 *		the caller needs INSERT on the table)
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/partition.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "capture.h"
#include "writers.h"
#include "table_owner.h"

PG_FUNCTION_INFO_V1(d365_map_set_links);
PG_FUNCTION_INFO_V1(d365_map_apply);
PG_FUNCTION_INFO_V1(d365_map_remove);
PG_FUNCTION_INFO_V1(d365_map_insert);

/* d365_owner_statement, marked as d365sync's own write of relid. */
static Datum
own_write(Oid relid, const char *op, const char *sql, Datum columns,
		  int nargs, Oid *types, Datum *values, char *nulls,
		  Oid restype, bool *isnull)
{
	Oid			was = d365_map_own_write_set(relid);
	volatile Datum result = (Datum) 0;

	PG_TRY();
	{
		result = d365_owner_statement(relid, op, sql, columns, nargs, types, values,
									  nulls, restype, isnull);
	}
	PG_FINALLY();
	{
		(void) d365_map_own_write_set(was);
	}
	PG_END_TRY();
	return result;
}

/*
 * The statement of op for map, its table and the columns it writes, from
 * query (which takes map, op, columns and returns sql, tbl, columns).
 */
static char *
owner_sql_from(const char *query, Datum map, const char *op, Datum columns,
			   Oid *relid, Datum *cols)
{
	MemoryContext caller = CurrentMemoryContext;
	Datum		args[3] = {map, CStringGetTextDatum(op), columns};
	char		nulls[3] = {' ', ' ', columns ? ' ' : 'n'};
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	char	   *sql;
	Datum		c;
	MemoryContext old;

	SPI_connect();
	if (SPI_execute_with_args(query, 3, (Oid[]) {TEXTOID, TEXTOID, NAMEARRAYOID}, args, nulls,
							  true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "no table-owner statement for operation \"%s\"", op);
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	old = MemoryContextSwitchTo(caller);
	sql = TextDatumGetCString(SPI_getbinval(tup, desc, 1, &isnull));
	*relid = DatumGetObjectId(SPI_getbinval(tup, desc, 2, &isnull));
	c = SPI_getbinval(tup, desc, 3, &isnull);
	*cols = isnull ? (Datum) 0 : PointerGetDatum(DatumGetArrayTypePCopy(c));
	MemoryContextSwitchTo(old);
	SPI_finish();
	return sql;
}

/* The statement of op for map (d365._map_owner_sql). */
static char *
owner_sql(Datum map, const char *op, Datum columns, Oid *relid, Datum *cols)
{
	return owner_sql_from("SELECT sql, tbl::pg_catalog.oid, columns FROM d365._map_owner_sql($1, $2, $3)",
						  map, op, columns, relid, cols);
}

/*
 * d365._map_set_links(map text, keys text[], ids uuid[], expect uuid[]) -> text[]
 *		Sets the link columns of the rows with these keys (an id NULL
 *		unlinks), only where the row is still linked to expect (NULL: only
 *		where it is still unlinked).  Returns the keys changed.
 */
Datum
d365_map_set_links(PG_FUNCTION_ARGS)
{
	Oid			relid;
	Datum		cols;
	char	   *sql;
	char		nulls[3];
	Datum		values[3];
	bool		isnull;
	Datum		result;
	int			i;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	for (i = 0; i < 3; i++)
	{
		nulls[i] = PG_ARGISNULL(i + 1) ? 'n' : ' ';
		values[i] = PG_ARGISNULL(i + 1) ? (Datum) 0 : PG_GETARG_DATUM(i + 1);
	}
	sql = owner_sql(PG_GETARG_DATUM(0), "links", (Datum) 0, &relid, &cols);
	result = own_write(relid, "links", sql, cols, 3,
								  (Oid[]) {TEXTARRAYOID, UUIDARRAYOID, UUIDARRAYOID},
								  values, nulls, TEXTARRAYOID, &isnull);
	if (isnull)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(result);
}

/*
 * d365._map_apply(map text, vals jsonb, row_key text) -> void
 *		Updates the columns named in vals ({column: JSON value}) of the row
 *		with that key.
 */
Datum
d365_map_apply(PG_FUNCTION_ARGS)
{
	Oid			relid;
	Datum		cols;
	Datum		names;
	char	   *sql;
	bool		isnull;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_VOID();

	/* the columns named in vals */
	SPI_connect();
	if (SPI_execute_with_args("SELECT pg_catalog.array_agg(k::pg_catalog.name ORDER BY k)"
							  " FROM pg_catalog.jsonb_object_keys($1) k",
							  1, (Oid[]) {JSONBOID}, (Datum[]) {PG_GETARG_DATUM(1)},
							  NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not list the columns of an incoming change");
	names = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	names = isnull ? (Datum) 0 : SPI_datumTransfer(names, false, -1);
	SPI_finish();
	if (names == (Datum) 0)
		PG_RETURN_VOID();

	sql = owner_sql(PG_GETARG_DATUM(0), "apply", names, &relid, &cols);
	(void) own_write(relid, "apply", sql, cols, 2,
								(Oid[]) {JSONBOID, TEXTOID},
								(Datum[]) {PG_GETARG_DATUM(1), PG_GETARG_DATUM(2)},
								NULL, InvalidOid, NULL);
	PG_RETURN_VOID();
}

/*
 * d365._map_remove(map text, row_key text) -> boolean
 *		Deletes the row with that key, only while it is unlinked (its
 *		record was deleted in Dynamics and on_remote_delete is 'delete').
 *		The caller must hold DELETE on the table.  Returns whether a row
 *		was deleted.
 */
Datum
d365_map_remove(PG_FUNCTION_ARGS)
{
	Oid			relid;
	Datum		cols;
	char	   *sql;
	bool		isnull = true;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_BOOL(false);
	sql = owner_sql(PG_GETARG_DATUM(0), "remove", (Datum) 0, &relid, &cols);
	(void) d365_owner_statement(relid, "remove", sql, (Datum) 0, 1,
								(Oid[]) {TEXTOID}, (Datum[]) {PG_GETARG_DATUM(1)},
								NULL, TEXTOID, &isnull);
	PG_RETURN_BOOL(!isnull);
}

/*
 * d365._map_insert(map text, rows jsonb) -> jsonb
 *		Inserts the rows loaded from Dynamics ([{column: value,
 *		"@dynamics_id": id}, ...]) into the map's table, linked; the caller
 *		must hold INSERT on the table.  Returns [[key, id], ...] of the rows
 *		inserted.
 */
Datum
d365_map_insert(PG_FUNCTION_ARGS)
{
	Oid			relid;
	Datum		cols;
	char	   *sql;
	bool		isnull = true;
	Datum		result;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	sql = owner_sql_from("SELECT sql, tbl::pg_catalog.oid, columns FROM d365._map_insert_sql($1)",
						 PG_GETARG_DATUM(0), "insert", (Datum) 0, &relid, &cols);
	result = own_write(relid, "insert", sql, cols, 1,
					   (Oid[]) {JSONBOID}, (Datum[]) {PG_GETARG_DATUM(1)},
					   NULL, JSONBOID, &isnull);
	if (isnull)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(result);
}
