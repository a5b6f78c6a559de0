/*-------------------------------------------------------------------------
 *
 * spi_util.c
 *	  Typed single-value queries over SPI, and running code as the owner of
 *	  d365sync's tables.
 *
 * A caller asks for the type it wants (bool, oid, int4, int8, text, or any
 * type as a Datum) and gets that value, never its text form to parse back.
 * The column's type is checked against the one asked for, so a query and
 * its caller cannot drift apart silently.
 *
 * d365_as_table_owner() is the one place where d365sync switches to the
 * owner of its own tables: for reading the client secret, and for the
 * sync state that callers with their own rights may read or settle only
 * through a privilege gate.  The switch is the one PostgreSQL makes for
 * SECURITY DEFINER functions, as a restricted operation, scoped to the
 * callback and undone on error.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"

#include "spi_util.h"
#include "writers.h"
#include "job_role.h"

/*
 * d365_sql_datum
 *		Run query (read-write, with its arguments) and return the first
 *		column of its first row, which must be of the given type, copied
 *		into the caller's memory context.
 */
Datum
d365_sql_datum(const char *query, int nargs, Oid *argtypes, Datum *args,
			   Oid type, bool *isnull)
{
	MemoryContext caller = CurrentMemoryContext;
	TupleDesc	desc;
	Oid			got;
	Datum		value;
	bool		null;
	int16		typlen;
	bool		typbyval;
	int			rc;

	rc = SPI_execute_with_args(query, nargs, argtypes, args, NULL, false, 1);
	if (rc < 0)
		elog(ERROR, "query failed: %s", query);
	if (SPI_tuptable == NULL)
		elog(ERROR, "query returned no result: %s", query);
	desc = SPI_tuptable->tupdesc;
	got = SPI_gettypeid(desc, 1);
	if (got != type)
		elog(ERROR, "query returned type %s instead of %s: %s",
			 format_type_be(got), format_type_be(type), query);

	null = true;
	value = (Datum) 0;
	if (SPI_processed > 0)
		value = SPI_getbinval(SPI_tuptable->vals[0], desc, 1, &null);
	if (null)
	{
		if (isnull == NULL)
			elog(ERROR, "query returned no value: %s", query);
		*isnull = true;
		return (Datum) 0;
	}
	if (isnull != NULL)
		*isnull = false;

	get_typlenbyval(type, &typlen, &typbyval);
	if (!typbyval)
	{
		MemoryContext old = MemoryContextSwitchTo(caller);

		value = datumCopy(value, typbyval, typlen);
		MemoryContextSwitchTo(old);
	}
	return value;
}

/*
 * d365_sql_text
 *		A text result as a C string in the caller's context; NULL for no row
 *		or a NULL value.
 */
char *
d365_sql_text(const char *query, int nargs, Oid *argtypes, Datum *args)
{
	bool		isnull;
	Datum		v = d365_sql_datum(query, nargs, argtypes, args, TEXTOID, &isnull);

	return isnull ? NULL : TextDatumGetCString(v);
}

/*
 * d365_sql_bool, d365_sql_oid, d365_sql_int32, d365_sql_int64
 *		A result of that SQL type (boolean, oid, integer, bigint) as its C
 *		type.  Cast regclass and the other reg* types to oid in the query.
 */
#define D365_TYPED_QUERY(name, ctype, typoid, from_datum) \
ctype \
name(const char *query, int nargs, Oid *argtypes, Datum *args, bool *isnull) \
{ \
	return from_datum(d365_sql_datum(query, nargs, argtypes, args, typoid, isnull)); \
}

D365_TYPED_QUERY(d365_sql_bool, bool, BOOLOID, DatumGetBool)
D365_TYPED_QUERY(d365_sql_oid, Oid, OIDOID, DatumGetObjectId)
D365_TYPED_QUERY(d365_sql_int32, int32, INT4OID, DatumGetInt32)
D365_TYPED_QUERY(d365_sql_int64, int64, INT8OID, DatumGetInt64)

/*
 * d365_table_owner
 *		The role that reads and writes d365's relation d365.relname for
 *		callers that may not: the job role (src/common/job_role.c), which holds
 *		what d365sync's own statements need and is no superuser; before
 *		this database's install gave it its rights, the relation's owner.
 *		ERROR when the relation is missing.
 */
Oid
d365_table_owner(const char *relname)
{
	Oid			relid;
	HeapTuple	tup;
	Oid			owner;

	relid = get_relname_relid(relname, get_namespace_oid("d365", false));
	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"d365.%s\" does not exist", relname)));
	owner = d365_job_role();
	if (OidIsValid(owner))
		return owner;
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

/*
 * d365_as_table_owner
 *		Run body(arg) as the role owner (the owner of d365's tables, from
 *		d365_table_owner), in a security-restricted operation: the body must
 *		run only d365's own statements, which reach no code the application
 *		controls.  The caller's user and security context come back when the
 *		body returns or raises.
 */
void
d365_as_table_owner(Oid owner, D365OwnerBody body, void *arg)
{
	Oid			save_userid;
	int			save_sec;

	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	PG_TRY();
	{
		body(arg);
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec);
	}
	PG_END_TRY();
}

/*
 * d365_as_owner_restricted
 *		Run body(arg) as role owner in a security-restricted operation under
 *		a new GUC nest level with search_path = pg_catalog, pg_temp: the way
 *		REFRESH MATERIALIZED VIEW runs code of a view's owner.  Any ERROR
 *		comes back with the caller's user and security context restored; the
 *		GUC nest level is then popped by the (sub)transaction abort.
 */
void
d365_as_owner_restricted(Oid owner, D365OwnerBody body, void *arg)
{
	Oid			save_userid;
	int			save_sec;
	int			save_nestlevel;
	bool		recording;

	/* the owner's code is not d365sync recording what Dynamics answered */
	recording = d365_recorder_set(false);
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	save_nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);
	PG_TRY();
	{
		body(arg);
	}
	PG_CATCH();
	{
		SetUserIdAndSecContext(save_userid, save_sec);
		d365_recorder_set(recording);
		PG_RE_THROW();
	}
	PG_END_TRY();
	AtEOXact_GUC(false, save_nestlevel);
	SetUserIdAndSecContext(save_userid, save_sec);
	d365_recorder_set(recording);
}
