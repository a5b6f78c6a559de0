/*-------------------------------------------------------------------------
 *
 * job_role.c
 *	  The jobs run as d365sync's own role, d365sync_job, and remember who
 *	  called them.
 *
 * No role holds EXECUTE on d365's internal functions: the role that runs
 * a job holds EXECUTE on its entry point (d365_sync_contacts(),
 * d365_pull(), CALL d365_load(), ...), which PostgreSQL checks when it is
 * called.  The entry point then switches to the role d365sync_job -- NOLOGIN,
 * never a superuser, holding exactly what the jobs need in schema d365 --
 * for its work, the way a SECURITY DEFINER function switches to its owner
 * (SECURITY_LOCAL_USERID_CHANGE: no SET ROLE inside), and switches back when
 * it returns or raises.  A superuser's call runs d365's code as that role
 * too: nothing of d365sync runs as a superuser.
 *
 * Who called the job is kept (d365_job_caller(), d365._job_caller()): every
 * check that the job does for its caller only what the caller may do --
 * reading the application's table, writing its link or mapped columns,
 * inserting or deleting its rows -- checks the caller's rights, never the
 * job role's.  Code of the application's table owner keeps running as that
 * owner in a security-restricted operation (src/privilege/table_owner.c).
 *
 * The background worker connects as d365sync.worker_role (or the bootstrap
 * superuser) and runs each of its transactions as the job role, with the
 * connected role as the caller.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rls.h"

#include "job_role.h"

PG_FUNCTION_INFO_V1(d365_job_caller_sql);
PG_FUNCTION_INFO_V1(d365_caller_reads);
PG_FUNCTION_INFO_V1(d365_caller_rls);
PG_FUNCTION_INFO_V1(d365_update_contact);

/*
 * The role that called the job running now (InvalidOid: no job runs).  Set
 * by d365_as_job() for the length of the call, by d365_job_begin() in the
 * worker.
 */
static Oid	job_caller = InvalidOid;

/* the user and security context d365_as_job() switched from */
static Oid	outer_userid = InvalidOid;
static int	outer_sec = 0;

/*
 * d365_job_role
 *		The job role when this database's install has given it its rights
 *		(INSERT on d365.sync_run: not a right pg_read_all_data gives), else
 *		InvalidOid.  The role belongs to the
 *		cluster: another database's install may have made it while this
 *		one still runs the SQL objects of an earlier version (until ALTER
 *		EXTENSION d365sync UPDATE), whose jobs run as their caller.
 */
Oid
d365_job_role(void)
{
	Oid			role = get_role_oid(D365_JOB_ROLE, true);
	Oid			schema;
	Oid			runs;

	if (!OidIsValid(role))
		return InvalidOid;
	schema = get_namespace_oid("d365", true);
	runs = OidIsValid(schema) ? get_relname_relid("sync_run", schema) : InvalidOid;
	if (!OidIsValid(runs) || pg_class_aclcheck(runs, role, ACL_INSERT) != ACLCHECK_OK)
		return InvalidOid;
	return role;
}

/*
 * d365_as_job
 *		Call body(fcinfo) as the job role, with the caller kept for
 *		d365_job_caller().  A call made from d365's own code (already the
 *		job role, inside a job) keeps the job's caller.  Before the install
 *		has the job role (d365_job_role()) the body runs as the caller, as
 *		earlier versions did.
 */
Datum
d365_as_job(PGFunction body, FunctionCallInfo fcinfo)
{
	Oid			role = d365_job_role();
	Oid			save_userid;
	int			save_sec;
	Oid			save_caller = job_caller;
	Oid			save_outer = outer_userid;
	int			save_outer_sec = outer_sec;
	Datum		result = (Datum) 0;

	if (!OidIsValid(role))
		return body(fcinfo);
	GetUserIdAndSecContext(&save_userid, &save_sec);
	if (save_userid != role || !OidIsValid(job_caller))
		job_caller = save_userid;
	outer_userid = save_userid;
	outer_sec = save_sec;
	SetUserIdAndSecContext(role, save_sec | SECURITY_LOCAL_USERID_CHANGE);
	PG_TRY();
	{
		result = body(fcinfo);
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec);
		job_caller = save_caller;
		outer_userid = save_outer;
		outer_sec = save_outer_sec;
	}
	PG_END_TRY();
	return result;
}

/*
 * d365_job_commit
 *		SPI_commit() in a procedure running as the job role: the commit and
 *		the start of the next transaction happen as the procedure's caller,
 *		so that a later error -- whose abort returns to the user the
 *		transaction started as -- never leaves the session as the job role.
 *		The job role is taken up again in the new transaction.
 */
void
d365_job_commit(void)
{
	Oid			userid;
	int			sec;

	GetUserIdAndSecContext(&userid, &sec);
	if (!OidIsValid(outer_userid) || userid == outer_userid)
	{
		SPI_commit();
		return;
	}
	SetUserIdAndSecContext(outer_userid, outer_sec);
	SPI_commit();
	SetUserIdAndSecContext(userid, sec);
}

/*
 * d365_job_caller
 *		The role whose rights d365's checks check: the job's caller while
 *		d365's code runs as the job role, else the current user (outside a
 *		job; or code of a table's owner, running as that owner).
 */
Oid
d365_job_caller(void)
{
	Oid			current = GetUserId();

	if (OidIsValid(job_caller) && current == get_role_oid(D365_JOB_ROLE, true))
		return job_caller;
	return current;
}

/*
 * d365_job_begin, d365_job_end
 *		For the background worker, inside one of its transactions: run as
 *		the job role from d365_job_begin() to d365_job_end(), with the
 *		connected role as the caller.  An error in between needs no
 *		d365_job_end(): the transaction's abort returns to the role it
 *		started as, and the caller is no longer used.  Nothing changes
 *		before the install has the job role.
 */
void
d365_job_begin(D365JobSave *save)
{
	Oid			role = d365_job_role();

	GetUserIdAndSecContext(&save->userid, &save->sec);
	save->caller = job_caller;
	save->switched = OidIsValid(role) && save->userid != role;
	if (!save->switched)
		return;
	job_caller = save->userid;
	SetUserIdAndSecContext(role, save->sec | SECURITY_LOCAL_USERID_CHANGE);
}

void
d365_job_end(D365JobSave *save)
{
	if (!save->switched)
		return;
	SetUserIdAndSecContext(save->userid, save->sec);
	job_caller = save->caller;
	save->switched = false;
}

/*
 * d365._job_caller() -> oid
 *		d365_job_caller() for d365's SQL: the role its rights checks check.
 */
Datum
d365_job_caller_sql(PG_FUNCTION_ARGS)
{
	PG_RETURN_OID(d365_job_caller());
}

/* ERROR when the row-level security of relid applies to the caller */
static void
check_caller_rls(Oid relid, Oid caller, const char *relname)
{
	if (check_enable_rls(relid, caller, true) == RLS_ENABLED)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("row-level security of %s applies to role \"%s\"",
						relname, GetUserNameFromId(caller, false)),
				 errdetail("Its policies are code of the table's owner: d365sync does not read the table for a role they bind."),
				 errhint("Run the job as the table's owner, or as a role with BYPASSRLS.")));
}

/*
 * d365._caller_rls(tbl regclass) -> boolean
 *		Whether the row-level security of tbl applies to the job's caller:
 *		a job reads every row of the tables it reads (as the job role,
 *		which no policy binds), so it refuses such a caller.
 */
Datum
d365_caller_rls(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);

	if (get_rel_name(relid) == NULL)
		PG_RETURN_BOOL(false);
	PG_RETURN_BOOL(check_enable_rls(relid, d365_job_caller(), true) == RLS_ENABLED);
}

/*
 * d365._caller_reads(tbl regclass) -> void
 *		Before a job reads an application table (as the job role): the
 *		caller must be able to read what the job reads -- SELECT on the
 *		table, or on each column d365sync's configuration names of it (its
 *		key, its link column, its score column, its mapped columns) -- and
 *		its row-level security must not apply to the caller (the job reads
 *		every row).  42501 otherwise.
 */
Datum
d365_caller_reads(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);
	Oid			caller = d365_job_caller();
	char	   *relname;
	char	   *missing = NULL;
	Oid			argtypes[1] = {OIDOID};
	Datum		args[1];
	uint64		i;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("no table to check")));
	relname = get_rel_name(relid);
	if (relname == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u does not exist", relid)));
	relname = quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)), relname);

	check_caller_rls(relid, caller, relname);
	if (pg_class_aclcheck(relid, caller, ACL_SELECT) == ACLCHECK_OK)
		PG_RETURN_VOID();

	args[0] = ObjectIdGetDatum(relid);
	SPI_connect();
	if (SPI_execute_with_args("SELECT DISTINCT a.attnum, a.attname::text"
							  "  FROM pg_catalog.pg_attribute a"
							  " WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attnum > 0"
							  "   AND NOT a.attisdropped"
							  "   AND (a.attname OPERATOR(pg_catalog.=) 'dynamics365_related_id'"
							  "        OR a.attname IN (SELECT t.key_column FROM d365.table_map t"
							  "                          WHERE t.local_table OPERATOR(pg_catalog.=) $1::pg_catalog.regclass)"
							  "        OR a.attname IN (SELECT c.\"column\" FROM d365.column_map c"
							  "                           JOIN d365.table_map t ON t.name OPERATOR(pg_catalog.=) c.map"
							  "                          WHERE t.local_table OPERATOR(pg_catalog.=) $1::pg_catalog.regclass)"
							  "        OR a.attname IN (SELECT s.key_column FROM d365.contact_source s"
							  "                          WHERE s.contact_table OPERATOR(pg_catalog.=) $1::pg_catalog.regclass"
							  "                         UNION ALL"
							  "                         SELECT s.score_column FROM d365.contact_source s"
							  "                          WHERE s.contact_table OPERATOR(pg_catalog.=) $1::pg_catalog.regclass"
							  "                         UNION ALL"
							  "                         SELECT f.column_name FROM d365.field_map f, d365.contact_source s"
							  "                          WHERE s.contact_table OPERATOR(pg_catalog.=) $1::pg_catalog.regclass))"
							  " ORDER BY 1",
							  1, argtypes, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the columns of %s", relname);
	/* a table d365sync's configuration names no column of: all of it */
	if (SPI_processed == 0)
		missing = "*";
	for (i = 0; i < SPI_processed && missing == NULL; i++)
	{
		bool		isnull;
		AttrNumber	attnum = DatumGetInt16(SPI_getbinval(SPI_tuptable->vals[i],
														 SPI_tuptable->tupdesc, 1, &isnull));

		if (pg_attribute_aclcheck(relid, attnum, caller, ACL_SELECT) != ACLCHECK_OK)
			missing = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);
	}
	if (missing != NULL)
		missing = pstrdup(missing);
	SPI_finish();
	if (missing != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for table %s", relname),
				 errdetail("The job reads column \"%s\" for role \"%s\", which may not read it.",
						   missing, GetUserNameFromId(caller, false)),
				 errhint("GRANT SELECT ON %s TO %s;", relname,
						 quote_identifier(GetUserNameFromId(caller, false)))));
	PG_RETURN_VOID();
}

/*
 * d365_update_contact(payload jsonb) -> jsonb
 *		An application's push of a Dynamics contact row: d365._incoming_apply
 *		as the job role, with the application's rights checked (it reads
 *		and changes contacts only where its caller may).
 */
static Datum
update_contact_body(PG_FUNCTION_ARGS)
{
	MemoryContext cxt = CurrentMemoryContext;
	Datum		arg = PG_ARGISNULL(0) ? (Datum) 0 : PG_GETARG_DATUM(0);
	bool		isnull;
	Datum		result;

	SPI_connect();
	if (SPI_execute_with_args("SELECT d365._incoming_apply($1, true)", 1, (Oid[]) {JSONBOID},
							  &arg, PG_ARGISNULL(0) ? "n" : " ", false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "d365._incoming_apply did not answer");
	result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (!isnull)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		result = datumCopy(result, false, -1);
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
	if (isnull)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(result);
}

Datum
d365_update_contact(PG_FUNCTION_ARGS)
{
	return d365_as_job(update_contact_body, fcinfo);
}
