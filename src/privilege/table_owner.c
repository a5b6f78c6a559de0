/*-------------------------------------------------------------------------
 *
 * table_owner.c
 *	  Writing (and converting values for) the application's contact table
 *	  as the table's owner, in a security-restricted operation.
 *
 * The contact table belongs to the application: its owner controls the
 * triggers, index expressions, defaults, domain checks, casts and row
 * security that run when the table is written.  d365sync writes it (the
 * link columns, incoming changes) from functions that a superuser, a
 * pg_cron job or the extension's owner may be running.  Were those writes
 * made with the caller's rights, the table's owner could plant code that
 * runs as a superuser.  So every write, and every conversion of an incoming
 * value into a column's type (domain checks are the owner's code too), is
 * made the way PostgreSQL makes REFRESH MATERIALIZED VIEW: as the table's
 * owner, with SECURITY_RESTRICTED_OPERATION (no SET ROLE, no temporary
 * objects that outlive it), under a new GUC nest level with a safe
 * search_path.  The owner has no rights on d365's tables, so the
 * statements take all their data as parameters.
 *
 * The statements come from d365._owner_sql(op, columns), never from the
 * caller, and the caller must hold the right the statement exercises: the
 * UPDATE right on each column it writes (SELECT on the table for the
 * incoming mapper, which reads the whole row).  Nobody does through these
 * functions what they could not do with their own rights; they only keep
 * the table owner's code from running with theirs.
 *
 * Reads of the contact table (the work query of a sync, the local values
 * an incoming change is compared with) run no user code at all: values are
 * converted by d365._json_expr with built-in functions only.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/proc.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/rls.h"
#include "utils/syscache.h"
#include "catalog/pg_proc.h"
#include "table_owner.h"

#include "writers.h"
#include "spi_util.h"
#include "job_role.h"

PG_FUNCTION_INFO_V1(d365_contact_set_links);
PG_FUNCTION_INFO_V1(d365_contact_unlink);
PG_FUNCTION_INFO_V1(d365_contact_convert);
PG_FUNCTION_INFO_V1(d365_contact_apply);
PG_FUNCTION_INFO_V1(d365_contact_convert_set);
PG_FUNCTION_INFO_V1(d365_contact_apply_set);
PG_FUNCTION_INFO_V1(d365_contact_map);
PG_FUNCTION_INFO_V1(d365_activity_mapper_call);

/* One statement to run as the owner of the contact table. */
typedef struct OwnerCall
{
	const char *op;				/* d365._owner_sql operation */
	Datum		columns;		/* name[] for convert/apply, else 0 */
	int			nargs;
	Oid		   *types;
	Datum	   *values;
	char	   *nulls;
	Oid			restype;		/* InvalidOid: no result */
	Datum		result;
	bool		result_null;
	char	   *sql;			/* the statement, from d365._owner_sql */
	int			rc;				/* its SPI result */
	bool		writes_links;	/* d365sync's own write of the link columns */
	bool		waits_briefly;	/* gives up on a row lock after a while */
} OwnerCall;

/*
 * How long an incoming change waits for a row another transaction holds
 * locked (when the session sets no lock_timeout of its own): the pull then
 * fails and starts again from the same changes next time, instead of
 * waiting as long as the other transaction lasts.
 */
#define OWNER_LOCK_TIMEOUT "10s"
#define OWNER_LOCK_TIMEOUT_TEXT "10 seconds"

/*
 * Set only by d365_sync_contact() around its one contact's pipeline: its
 * link write then waits for a row another transaction holds locked (up to
 * lock_timeout, OWNER_LOCK_TIMEOUT when the session sets none) instead of
 * skipping it, so that the caller gets the id or a clear error.  A
 * scheduled run skips such a row and links it on its next run.  Only C
 * code sets it; it changes how long a write waits, nothing it may do.
 */
static bool links_wait = false;

/*
 * d365_links_wait_set
 *		Mark the start (true) or end (false) of a one-contact sync; returns
 *		the earlier state, to be restored (also on error).
 */
bool
d365_links_wait_set(bool wait)
{
	bool		was = links_wait;

	links_wait = wait;
	return was;
}

/* A relation's name, schema-qualified and quoted. */
static char *
relation_name(Oid relid)
{
	return quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
									  get_rel_name(relid));
}

/*
 * check_row_security
 *		The statements run as the owner, whom the table's row security does
 *		not bind (unless forced): a caller it binds would reach rows it may
 *		not see or change, so such a caller is refused.
 */
static void
check_row_security(Oid relid, Oid caller)
{
	if (check_enable_rls(relid, caller, true) == RLS_ENABLED)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("row-level security of %s applies to role \"%s\"",
						relation_name(relid), GetUserNameFromId(caller, false)),
				 errdetail("d365sync writes the contact table as its owner, for roles that may write every row."),
				 errhint("Run the sync as the table's owner, or as a role with BYPASSRLS.")));
}

/*
 * check_caller_rights
 *		The caller must hold UPDATE on every column in columns (a name[]),
 *		or SELECT on the table when columns is NULL.
 */
static void
check_caller_rights(Oid relid, Datum columns, bool columns_null)
{
	Oid			caller = d365_job_caller();
	Datum	   *names;
	bool	   *nulls;
	int			n;
	int			i;

	if (columns_null)
	{
		if (pg_class_aclcheck(relid, caller, ACL_SELECT) != ACLCHECK_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied for table %s", relation_name(relid)),
					 errdetail("The incoming mapper reads the whole contact row.")));
		check_row_security(relid, caller);
		return;
	}
	if (pg_class_aclcheck(relid, caller, ACL_UPDATE) == ACLCHECK_OK)
	{
		check_row_security(relid, caller);
		return;
	}
	deconstruct_array(DatumGetArrayTypeP(columns), NAMEOID, NAMEDATALEN, false,
					  TYPALIGN_CHAR, &names, &nulls, &n);
	for (i = 0; i < n; i++)
	{
		const char *col = NameStr(*DatumGetName(names[i]));
		AttrNumber	attnum = get_attnum(relid, col);

		if (attnum == InvalidAttrNumber ||
			pg_attribute_aclcheck(relid, attnum, caller, ACL_UPDATE) != ACLCHECK_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied to update column \"%s\" of %s",
							col, relation_name(relid)),
					 errdetail("d365sync writes an application table only where the role that runs it may."),
					 errhint("GRANT UPDATE ON %s TO %s;", relation_name(relid),
							 quote_identifier(GetUserNameFromId(caller, false)))));
	}
	check_row_security(relid, caller);
}

/* as d365's owner: the key column of the attached table */
static void
read_key_column(void *arg)
{
	*(char **) arg = d365_sql_text("SELECT key_column::pg_catalog.text FROM d365.contact_source",
								   0, NULL, NULL);
}

/*
 * check_caller_reads
 *		An UPDATE ... WHERE needs SELECT on the columns its WHERE reads:
 *		the key (apply, links) and the link column (links, unlink).  The
 *		caller must hold that too, so that nobody updates rows through these
 *		functions that they could not find with their own rights.
 */
static void
check_caller_reads(Oid relid, const char *op)
{
	Oid			caller = d365_job_caller();
	char	   *key_column = NULL;
	const char *cols[2];
	int			n = 0;
	int			i;

	if (strcmp(op, "apply") == 0 || strcmp(op, "apply_set") == 0 || strcmp(op, "links") == 0)
	{
		d365_as_table_owner(d365_table_owner("contact_source"), read_key_column, &key_column);
		if (key_column != NULL)
			cols[n++] = key_column;
	}
	if (strcmp(op, "links") == 0 || strcmp(op, "unlink") == 0)
		cols[n++] = "dynamics365_related_id";
	if (n == 0 || pg_class_aclcheck(relid, caller, ACL_SELECT) == ACLCHECK_OK)
		return;
	for (i = 0; i < n; i++)
	{
		AttrNumber	attnum = get_attnum(relid, cols[i]);

		if (attnum == InvalidAttrNumber ||
			pg_attribute_aclcheck(relid, attnum, caller, ACL_SELECT) != ACLCHECK_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied to read column \"%s\" of %s",
							cols[i], relation_name(relid)),
					 errdetail("d365sync finds the rows it writes only where the role that runs it may."),
					 errhint("GRANT SELECT ON %s TO %s;", relation_name(relid),
							 quote_identifier(GetUserNameFromId(caller, false)))));
	}
}

/*
 * check_caller_may_delete
 *		The caller must hold DELETE on the table (and not be bound by its
 *		row security): d365sync deletes a row only where its caller could.
 */
static void
check_caller_may_delete(Oid relid)
{
	Oid			caller = d365_job_caller();

	if (pg_class_aclcheck(relid, caller, ACL_DELETE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to delete from table %s", relation_name(relid)),
				 errdetail("d365sync deletes rows of a mapped table only where the role that runs it may."),
				 errhint("GRANT DELETE ON %s TO %s;", relation_name(relid),
						 quote_identifier(GetUserNameFromId(caller, false)))));
	check_row_security(relid, caller);
}

/*
 * check_caller_may_insert
 *		The caller must hold INSERT on the table, or on each column in
 *		columns (a name[]), and not be bound by its row security: d365sync
 *		inserts rows into a mapped table only where its caller could.
 */
static void
check_caller_may_insert(Oid relid, Datum columns)
{
	Oid			caller = d365_job_caller();
	Datum	   *names;
	bool	   *nulls;
	int			n;
	int			i;

	if (pg_class_aclcheck(relid, caller, ACL_INSERT) != ACLCHECK_OK)
	{
		if (columns == (Datum) 0)
			n = 0;
		else
			deconstruct_array(DatumGetArrayTypeP(columns), NAMEOID, NAMEDATALEN, false,
							  TYPALIGN_CHAR, &names, &nulls, &n);
		for (i = 0; i <= n; i++)
		{
			const char *col = i < n ? NameStr(*DatumGetName(names[i])) : NULL;
			AttrNumber	attnum = col ? get_attnum(relid, col) : InvalidAttrNumber;

			if (i == n ? n == 0 :
				(attnum == InvalidAttrNumber ||
				 pg_attribute_aclcheck(relid, attnum, caller, ACL_INSERT) != ACLCHECK_OK))
				ereport(ERROR,
						(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						 errmsg("permission denied to insert into table %s", relation_name(relid)),
						 errdetail("d365sync inserts rows into a mapped table only where the role that runs it may."),
						 errhint("GRANT INSERT ON %s TO %s;", relation_name(relid),
								 quote_identifier(GetUserNameFromId(caller, false)))));
		}
	}
	check_row_security(relid, caller);
}

/* Owner of a relation; ERROR when it is gone. */
static Oid
relation_owner(Oid relid)
{
	HeapTuple	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	Oid			owner;

	if (!HeapTupleIsValid(tup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("the attached contact table no longer exists"),
				 errhint("Call d365_detach_contacts(), then attach the table again.")));
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

/* as_owner_restricted body: the statement of an OwnerCall */
static void
run_statement(void *arg)
{
	OwnerCall  *call = (OwnerCall *) arg;

	/* set under the nest level as_owner_restricted opened */
	if (call->waits_briefly && LockTimeout == 0)
		(void) set_config_option("lock_timeout", OWNER_LOCK_TIMEOUT,
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
								 true, 0, false);
	call->rc = SPI_execute_with_args(call->sql, call->nargs, call->types,
									 call->values, call->nulls, false, 0);
	if (call->rc < 0)
		elog(ERROR, "table-owner statement \"%s\" failed: %s",
			 call->op, SPI_result_code_string(call->rc));
}

/*
 * as_link_writer
 *		run_statement as the owner, with the flag that lets d365sync's own
 *		write of the link columns through their guard (src/capture/link_guard.c)
 *		set for that statement only; cleared again on any error.
 */
static void
as_link_writer(Oid owner, OwnerCall *call)
{
	bool		was = d365_link_writer_set(true);

	PG_TRY();
	{
		d365_as_owner_restricted(owner, run_statement, call);
	}
	PG_CATCH();
	{
		d365_link_writer_set(was);
		PG_RE_THROW();
	}
	PG_END_TRY();
	d365_link_writer_set(was);
}

/*
 * run_as_owner
 *		Get the statement of call->op from d365._owner_sql (as the caller:
 *		that function is SECURITY DEFINER and runs no user code), check the
 *		caller's rights, then run the statement as the table's owner in a
 *		security-restricted operation with search_path = pg_catalog, pg_temp.
 *		The first column of the first row, if call->restype is set, is
 *		copied into the caller's memory context.  Any ERROR comes back with
 *		the caller's user and security context restored; the GUC nest level
 *		is popped by the (sub)transaction abort, as for REFRESH MATERIALIZED
 *		VIEW.
 */
static void
run_as_owner(OwnerCall *call)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	Datum		bargs[2];
	char		bnulls[2] = {' ', call->columns ? ' ' : 'n'};
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	Oid			relid;
	Datum		columns;
	bool		columns_null;
	Oid			owner;

	bargs[0] = CStringGetTextDatum(call->op);
	bargs[1] = call->columns;

	SPI_connect();
	if (SPI_execute_with_args("SELECT sql, tbl::pg_catalog.oid, columns FROM d365._owner_sql($1, $2)",
							  2, (Oid[]) {TEXTOID, NAMEARRAYOID}, bargs, bnulls,
							  true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "d365._owner_sql returned no statement");
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	call->sql = TextDatumGetCString(SPI_getbinval(tup, desc, 1, &isnull));
	relid = DatumGetObjectId(SPI_getbinval(tup, desc, 2, &isnull));
	columns = SPI_getbinval(tup, desc, 3, &columns_null);

	check_caller_rights(relid, columns, columns_null);
	check_caller_reads(relid, call->op);
	owner = relation_owner(relid);

	if (call->writes_links)
		as_link_writer(owner, call);
	else
		d365_as_owner_restricted(owner, run_statement, call);

	call->result_null = true;
	if (OidIsValid(call->restype) && SPI_tuptable != NULL && SPI_processed > 0)
	{
		if (SPI_gettypeid(SPI_tuptable->tupdesc, 1) != call->restype)
			elog(ERROR, "table-owner statement \"%s\" returned the wrong type", call->op);
		call->result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
									 &call->result_null);
		if (!call->result_null)
		{
			MemoryContext old = MemoryContextSwitchTo(caller_cxt);

			call->result = datumCopy(call->result, false, -1);
			MemoryContextSwitchTo(old);
		}
	}
	SPI_finish();
}

/* run_as_owner, its result as the result of the SQL function fcinfo. */
static Datum
owner_result(FunctionCallInfo fcinfo, OwnerCall *call)
{
	run_as_owner(call);
	if (call->result_null)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(call->result);
}

/* The column names of a jsonb object, as name[]; ERROR when not an object. */
static Datum
object_columns(Datum vals)
{
	Datum		d;
	int			rc;
	bool		isnull;

	SPI_connect();
	rc = SPI_execute_with_args("SELECT pg_catalog.array_agg(k::pg_catalog.name ORDER BY k)"
							   " FROM pg_catalog.jsonb_object_keys($1) k",
							   1, (Oid[]) {JSONBOID}, &vals, NULL, true, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not list the columns of an incoming change");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	d = isnull ? (Datum) 0 : SPI_datumTransfer(d, false, -1);
	SPI_finish();
	return d;
}

/* The keys of a text[], comma-separated, for a message. */
static char *
key_list(ArrayType *keys)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	int			i;
	StringInfoData buf;

	deconstruct_array(keys, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	initStringInfo(&buf);
	for (i = 0; i < n; i++)
	{
		if (nulls[i])
			continue;
		if (buf.len > 0)
			appendStringInfoString(&buf, ", ");
		appendStringInfoString(&buf, TextDatumGetCString(elems[i]));
	}
	return buf.data;
}

/*
 * d365._contact_set_links(keys text[], ids uuid[], expect uuid[]) -> text[]
 *		Sets the link columns of the contacts with these keys (an id NULL
 *		unlinks, stamp and all), only where the row is still linked to
 *		expect (expect NULL: only where the row is still unlinked), so a
 *		row that changed hands meanwhile is never linked to another
 *		person's record.  Returns the keys changed.  Within
 *		d365_sync_contact() (links_wait) a locked row is waited for, and a
 *		lock timeout raises an error that names the contact.
 */
Datum
d365_contact_set_links(PG_FUNCTION_ARGS)
{
	MemoryContext fncxt = CurrentMemoryContext;
	OwnerCall	call = {0};
	ErrorData  *edata;
	char		nulls[3];
	int			i;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	for (i = 0; i < 3; i++)
		nulls[i] = PG_ARGISNULL(i) ? 'n' : ' ';
	call.op = links_wait ? "links_wait" : "links";
	call.writes_links = true;
	call.waits_briefly = links_wait;
	call.nargs = 3;
	call.types = (Oid[]) {TEXTARRAYOID, UUIDARRAYOID, UUIDARRAYOID};
	call.values = (Datum[]) {PG_GETARG_DATUM(0),
		PG_ARGISNULL(1) ? (Datum) 0 : PG_GETARG_DATUM(1),
	PG_ARGISNULL(2) ? (Datum) 0 : PG_GETARG_DATUM(2)};
	call.nulls = nulls;
	call.restype = TEXTARRAYOID;
	if (!links_wait)
		return owner_result(fcinfo, &call);
	PG_TRY();
	{
		run_as_owner(&call);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(fncxt);
		edata = CopyErrorData();
		if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
			PG_RE_THROW();
		FlushErrorState();
		ereport(ERROR,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("contact %s is locked by another transaction: its link was not written",
						key_list(PG_GETARG_ARRAYTYPE_P(0))),
				 errdetail("The contact was sent to Dynamics 365; d365_sync_contact() waits at most %s (or the session's lock_timeout) for its row to link it.",
						   OWNER_LOCK_TIMEOUT_TEXT),
				 errhint("The contact stays pending: once that transaction ends, the scheduled sync or another d365_sync_contact() call links it to the same Dynamics 365 record.")));
	}
	PG_END_TRY();
	if (call.result_null)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(call.result);
}

/*
 * d365._contact_unlink(dynamics_id uuid) -> text
 *		Unlinks the contact linked to a Dynamics id; its key, or NULL.
 */
Datum
d365_contact_unlink(PG_FUNCTION_ARGS)
{
	OwnerCall	call = {0};

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	call.op = "unlink";
	call.writes_links = true;
	call.waits_briefly = true;
	call.nargs = 1;
	call.types = (Oid[]) {UUIDOID};
	call.values = (Datum[]) {PG_GETARG_DATUM(0)};
	call.restype = TEXTOID;
	return owner_result(fcinfo, &call);
}

/*
 * d365._contact_convert(vals jsonb) -> jsonb
 *		{column: JSON value} converted into the columns' types (input
 *		functions with the columns' type modifiers, domain checks) and back
 *		as {dynamics_field: value}, the value as the column would hold it.
 *		Raises what the conversion raises.
 */
Datum
d365_contact_convert(PG_FUNCTION_ARGS)
{
	OwnerCall	call = {0};

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	call.columns = object_columns(PG_GETARG_DATUM(0));
	if (call.columns == (Datum) 0)
		PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
	call.op = "convert";
	call.nargs = 1;
	call.types = (Oid[]) {JSONBOID};
	call.values = (Datum[]) {PG_GETARG_DATUM(0)};
	call.restype = JSONBOID;
	return owner_result(fcinfo, &call);
}

/*
 * d365._contact_apply(vals jsonb, contact_key text) -> void
 *		Updates the columns named in vals of the contact with that key.
 */
Datum
d365_contact_apply(PG_FUNCTION_ARGS)
{
	OwnerCall	call = {0};

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_VOID();
	call.columns = object_columns(PG_GETARG_DATUM(0));
	if (call.columns == (Datum) 0)
		PG_RETURN_VOID();
	call.op = "apply";
	call.waits_briefly = true;
	call.nargs = 2;
	call.types = (Oid[]) {JSONBOID, TEXTOID};
	call.values = (Datum[]) {PG_GETARG_DATUM(0), PG_GETARG_DATUM(1)};
	run_as_owner(&call);
	PG_RETURN_VOID();
}

/*
 * d365._contact_convert_set(columns name[], vals jsonb) -> jsonb
 *		A page of incoming values at once: vals is an array of {column: JSON
 *		value} (columns lists every column any of them names), converted as
 *		d365._contact_convert converts one; returns the array of
 *		{dynamics_field: value} in the same order.  A column an element
 *		lacks is converted from NULL.  Raises what a conversion raises.
 */
Datum
d365_contact_convert_set(PG_FUNCTION_ARGS)
{
	OwnerCall	call = {0};

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	call.op = "convert_set";
	call.columns = PG_GETARG_DATUM(0);
	call.nargs = 1;
	call.types = (Oid[]) {JSONBOID};
	call.values = (Datum[]) {PG_GETARG_DATUM(1)};
	call.restype = JSONBOID;
	return owner_result(fcinfo, &call);
}

/*
 * d365._contact_apply_set(columns name[], changes jsonb) -> void
 *		One UPDATE for a page of incoming changes that write the same
 *		columns: changes is an array of {"k": contact key, "v": {column:
 *		JSON value}}, each key at most once.
 */
Datum
d365_contact_apply_set(PG_FUNCTION_ARGS)
{
	OwnerCall	call = {0};

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_VOID();
	call.op = "apply_set";
	call.columns = PG_GETARG_DATUM(0);
	call.waits_briefly = true;
	call.nargs = 1;
	call.types = (Oid[]) {JSONBOID};
	call.values = (Datum[]) {PG_GETARG_DATUM(1)};
	run_as_owner(&call);
	PG_RETURN_VOID();
}

/* A call of an activity mapper and its result */
typedef struct MapperCall
{
	FunctionCallInfo fcinfo;
	Datum		result;
} MapperCall;

/* as_owner_restricted body: the mapper's call */
static void
invoke_mapper(void *arg)
{
	MapperCall *mc = (MapperCall *) arg;

	mc->result = FunctionCallInvoke(mc->fcinfo);
}

/*
 * call_mapper_as_owner
 *		Call the function fn with the nargs arguments in args/argnulls as
 *		the function's owner, in a security-restricted operation with
 *		search_path = pg_catalog, pg_temp (as_owner_restricted), so that
 *		the function's owner never has it run with the rights of whoever
 *		runs the sync, nor with those of the contact table's owner.  The
 *		caller must be allowed to EXECUTE it.  A strict function called with
 *		a NULL returns NULL uncalled.
 */
static Datum
call_mapper_as_owner(Oid fn, int nargs, Datum *args, bool *argnulls, bool *isnull)
{
	Oid			owner;
	HeapTuple	tup;
	FmgrInfo	flinfo;
	MapperCall	mc;
	int			i;
	LOCAL_FCINFO(call, FUNC_MAX_ARGS);

	if (pg_proc_aclcheck(fn, d365_job_caller(), ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for function %s", get_func_name(fn))));
	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for function %u", fn);
	owner = ((Form_pg_proc) GETSTRUCT(tup))->proowner;
	ReleaseSysCache(tup);

	fmgr_info(fn, &flinfo);
	if (flinfo.fn_nargs != nargs)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
				 errmsg("function %s takes %d arguments, not %d",
						format_procedure(fn), flinfo.fn_nargs, nargs)));
	InitFunctionCallInfoData(*call, &flinfo, nargs, InvalidOid, NULL, NULL);
	for (i = 0; i < nargs; i++)
	{
		call->args[i].value = argnulls[i] ? (Datum) 0 : args[i];
		call->args[i].isnull = argnulls[i];
		if (argnulls[i] && flinfo.fn_strict)
		{
			*isnull = true;
			return (Datum) 0;
		}
	}
	mc.fcinfo = call;
	d365_as_owner_restricted(owner, invoke_mapper, &mc);
	*isnull = call->isnull;
	return mc.result;
}

/*
 * d365._contact_map(payload jsonb, mapping jsonb, contact_key text) -> jsonb
 *		The incoming mapper of the settings, called with the Dynamics row,
 *		the contact's row and the field map.  The contact's row is read as
 *		the table's owner (op "row"), the mapper runs as its own function's
 *		owner: neither runs with the other's rights, nor with the caller's.
 */
Datum
d365_contact_map(PG_FUNCTION_ARGS)
{
	OwnerCall	call = {0};
	Oid			mapper;
	bool		isnull;
	Datum		args[3];
	bool		argnulls[3];
	Datum		result;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(2))
		PG_RETURN_NULL();

	SPI_connect();
	if (SPI_execute("SELECT d365._incoming_mapper()::pg_catalog.oid", true, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "d365._incoming_mapper did not answer");
	mapper = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no incoming mapper is set")));

	call.op = "row";
	call.nargs = 1;
	call.types = (Oid[]) {TEXTOID};
	call.values = (Datum[]) {PG_GETARG_DATUM(2)};
	call.restype = JSONBOID;
	run_as_owner(&call);
	if (call.result_null)
		PG_RETURN_NULL();		/* the contact is gone */

	args[0] = PG_GETARG_DATUM(0);
	argnulls[0] = false;
	args[1] = call.result;
	argnulls[1] = false;
	args[2] = PG_ARGISNULL(1) ? (Datum) 0 : PG_GETARG_DATUM(1);
	argnulls[2] = PG_ARGISNULL(1);
	result = call_mapper_as_owner(mapper, 3, args, argnulls, &isnull);
	if (isnull)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(result);
}

/*
 * d365._activity_mapper_call(mapper regprocedure, entity text,
 *							   dynamics_contact_id uuid, activity jsonb) -> jsonb
 *		Calls a registered activity mapper as the mapper function's owner,
 *		in a security-restricted operation with search_path = pg_catalog,
 *		pg_temp, so that the function's owner never has it run with the
 *		rights of whoever runs the activity sync.  The caller must be allowed
 *		to EXECUTE it.
 */
Datum
d365_activity_mapper_call(PG_FUNCTION_ARGS)
{
	Oid			fn;
	Oid			owner;
	HeapTuple	tup;
	bool		registered;
	bool		isnull;
	FmgrInfo	flinfo;
	MapperCall	mc;
	int			i;
	LOCAL_FCINFO(call, 3);

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	fn = PG_GETARG_OID(0);

	SPI_connect();
	if (SPI_execute_with_args("SELECT d365._is_activity_mapper($1)", 1,
							  (Oid[]) {REGPROCEDUREOID}, (Datum[]) {ObjectIdGetDatum(fn)},
							  NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "d365._is_activity_mapper did not answer");
	registered = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	if (isnull || !registered)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("function %s is not a registered activity mapper", format_procedure(fn))));
	if (pg_proc_aclcheck(fn, d365_job_caller(), ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for function %s", get_func_name(fn))));

	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for function %u", fn);
	owner = ((Form_pg_proc) GETSTRUCT(tup))->proowner;
	ReleaseSysCache(tup);

	fmgr_info(fn, &flinfo);
	InitFunctionCallInfoData(*call, &flinfo, 3, InvalidOid, NULL, NULL);
	for (i = 0; i < 3; i++)
	{
		call->args[i].value = PG_ARGISNULL(i + 1) ? (Datum) 0 : PG_GETARG_DATUM(i + 1);
		call->args[i].isnull = PG_ARGISNULL(i + 1);
		if (call->args[i].isnull && flinfo.fn_strict)
			PG_RETURN_NULL();
	}

	mc.fcinfo = call;
	d365_as_owner_restricted(owner, invoke_mapper, &mc);
	if (call->isnull)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(mc.result);
}

/*
 * d365_owner_statement
 *		The same gate for other application tables (the table maps,
 *		src/privilege/map_owner.c): check that the caller holds UPDATE on every column
 *		in columns (a name[]; NULL: SELECT on the table; op "remove": DELETE
 *		on the table; op "insert": INSERT on it or on those columns) and is not bound by
 *		the table's row security, then run sql with its nargs parameters as
 *		the owner of relid in a security-restricted operation with
 *		search_path = pg_catalog, pg_temp (ops "links" and "insert": as
 *		d365sync's own link writer, which the link columns' guard lets
 *		through).  The
 *		statement comes from d365sync's own SQL, never from the caller.  When restype is set, the
 *		first column of the first row is returned in the caller's memory
 *		context (*isnull when there is none).
 */
Datum
d365_owner_statement(Oid relid, const char *op, const char *sql, Datum columns,
					 int nargs, Oid *types, Datum *values, char *nulls,
					 Oid restype, bool *isnull)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	OwnerCall	call = {0};
	Oid			owner;

	call.op = op;
	call.sql = pstrdup(sql);
	call.nargs = nargs;
	call.types = types;
	call.values = values;
	call.nulls = nulls;
	call.restype = restype;

	if (strcmp(op, "remove") == 0)
		check_caller_may_delete(relid);
	else if (strcmp(op, "insert") == 0)
		check_caller_may_insert(relid, columns);
	else
		check_caller_rights(relid, columns, columns == (Datum) 0);
	owner = relation_owner(relid);

	SPI_connect();
	if (strcmp(op, "links") == 0 || strcmp(op, "insert") == 0)
		as_link_writer(owner, &call);
	else
		d365_as_owner_restricted(owner, run_statement, &call);
	call.result_null = true;
	if (OidIsValid(restype) && SPI_tuptable != NULL && SPI_processed > 0)
	{
		if (SPI_gettypeid(SPI_tuptable->tupdesc, 1) != restype)
			elog(ERROR, "table-owner statement \"%s\" returned the wrong type", op);
		call.result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
									&call.result_null);
		if (!call.result_null)
		{
			MemoryContext old = MemoryContextSwitchTo(caller_cxt);

			call.result = datumCopy(call.result, get_typbyval(restype), get_typlen(restype));
			MemoryContextSwitchTo(old);
		}
	}
	SPI_finish();
	if (isnull)
		*isnull = call.result_null;
	return call.result;
}
