/*-------------------------------------------------------------------------
 *
 * worker_role.c
 *	  Who the background worker runs its jobs as, and the settings it pins
 *	  at connect.
 *
 * By default the worker connects as the bootstrap superuser, as in 0.2.
 * With d365sync.worker_role set it connects as that role instead
 * (BackgroundWorkerInitializeConnection with the role's name), so that its
 * jobs run with an operator's rights and nothing they reach runs as a
 * superuser.  The role must exist, be allowed to log in, not be a
 * superuser, and hold the operator set of d365_grant(); otherwise the
 * worker runs nothing, says why in the server log (once per problem) and
 * in d365_status() ("worker last error"), and looks again every few
 * seconds and at every configuration reload.
 *
 * Whatever it runs as, the worker pins at connect every setting its
 * statements depend on (d365_worker_pin_settings): ALTER DATABASE ... SET
 * and ALTER ROLE ... SET, which the database's owner or the role's owner
 * may run, must not make its transactions read-only, change its role,
 * choose which functions its SQL calls, or time its statements out.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "spi_util.h"
#include "worker.h"

/* d365sync.worker_role: empty for the bootstrap superuser */
char	   *d365_worker_role = NULL;

/* the prefix of the worker's last error when it is about its role */
#define ROLE_ERROR_PREFIX "worker role: "

/*
 * d365_worker_role_init
 *		Define d365sync.worker_role (from d365_worker_init, while the
 *		preload is processed).
 */
void
d365_worker_role_init(void)
{
	DefineCustomStringVariable("d365sync.worker_role",
							   "Role the d365sync background worker runs its jobs as (empty: the bootstrap superuser).",
							   "A role that can log in, is not a superuser and holds d365_grant()'s operator set.",
							   &d365_worker_role, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
}

/* the role to connect as, or NULL for the bootstrap superuser */
const char *
d365_worker_role_name(void)
{
	return (d365_worker_role != NULL && d365_worker_role[0] != '\0') ? d365_worker_role : NULL;
}

/*
 * d365_worker_role_problem
 *		What keeps the worker from connecting as d365sync.worker_role, from
 *		the shared catalog (callable connected to no database, inside a
 *		transaction): the role is missing, cannot log in, or is a
 *		superuser.  NULL when nothing does (or no role is set).
 */
char *
d365_worker_role_problem(void)
{
	const char *name = d365_worker_role_name();
	HeapTuple	tup;
	Form_pg_authid form;
	char	   *problem = NULL;

	if (name == NULL)
		return NULL;
	tup = SearchSysCache1(AUTHNAME, PointerGetDatum(name));
	if (!HeapTupleIsValid(tup))
		return psprintf("role \"%s\" named by d365sync.worker_role does not exist", name);
	form = (Form_pg_authid) GETSTRUCT(tup);
	if (form->rolsuper)
		problem = psprintf("role \"%s\" named by d365sync.worker_role is a superuser; the worker runs its jobs as a role without superuser rights", name);
	else if (!form->rolcanlogin)
		problem = psprintf("role \"%s\" named by d365sync.worker_role cannot log in (ALTER ROLE %s LOGIN)",
						   name, quote_identifier(name));
	ReleaseSysCache(tup);
	return problem;
}

/*
 * d365_worker_operator_problem
 *		Connected to the database as the worker role, with d365sync
 *		installed: whether the role holds what the jobs need of the operator
 *		set (USAGE on schema d365, EXECUTE on the job functions, UPDATE on
 *		d365.job_lock).  NULL when it does or no role is set.  Needs an open
 *		transaction and SPI connection.
 */
char *
d365_worker_operator_problem(void)
{
	const char *name = d365_worker_role_name();
	bool		isnull;
	Datum		ok;
	int			rc;

	if (name == NULL)
		return NULL;
	rc = SPI_execute("SELECT pg_catalog.has_schema_privilege(n.oid, 'USAGE')"
					 " AND pg_catalog.has_table_privilege(c.oid, 'UPDATE')"
					 " AND (SELECT pg_catalog.bool_and(pg_catalog.has_function_privilege(p.oid, 'EXECUTE'))"
					 "        FROM pg_catalog.pg_proc p"
					 "       WHERE p.pronamespace OPERATOR(pg_catalog.=) n.oid"
					 "         AND p.proname OPERATOR(pg_catalog.=) ANY ('{d365_sync_contacts,d365_sync_activities,d365_pull_changes}'::pg_catalog.name[]))"
					 "  FROM pg_catalog.pg_namespace n"
					 "  JOIN pg_catalog.pg_class c ON c.relnamespace OPERATOR(pg_catalog.=) n.oid"
					 "   AND c.relname OPERATOR(pg_catalog.=) 'job_lock'"
					 " WHERE n.nspname OPERATOR(pg_catalog.=) 'd365'", true, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not check the worker role's rights: %s", SPI_result_code_string(rc));
	if (SPI_processed == 0)
		return psprintf("d365sync here has no d365.job_lock: update it (ALTER EXTENSION d365sync UPDATE) to run the worker as role \"%s\"", name);
	ok = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull || !DatumGetBool(ok))
		return psprintf("role \"%s\" named by d365sync.worker_role does not hold the operator set (SELECT d365.d365_grant('%s', 'operator');)",
						name, name);
	return NULL;
}

/*
 * d365_worker_settings_query
 *		The worker's read of d365.settings: realtime and pull_interval only
 *		(never the row, whose secret a worker role may not read), each as
 *		"off" where a database still on an older version of the extension
 *		lacks the column.  Needs an open SPI connection.
 */
const char *
d365_worker_settings_query(void)
{
	bool		isnull;
	int64		cols;

	cols = d365_sql_int64("SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute a"
						  " WHERE a.attrelid OPERATOR(pg_catalog.=) 'd365.settings'::pg_catalog.regclass"
						  "   AND a.attname OPERATOR(pg_catalog.=) ANY ('{realtime,pull_interval}'::pg_catalog.name[])"
						  "   AND NOT a.attisdropped", 0, NULL, NULL, &isnull);
	if (cols == 2)
		return "SELECT coalesce(s.realtime, false),"
			" coalesce((pg_catalog.date_part('epoch', s.pull_interval) * 1000)::bigint, 0)"
			" FROM d365.settings s";
	return "SELECT false, 0::bigint";
}

/*
 * d365_worker_note_role_problem
 *		Show a role problem (NULL: none) as the worker's last error, and log
 *		it once when it starts or changes; clear the error once it is gone.
 *		*logged keeps the problem last logged (TopMemoryContext).
 */
void
d365_worker_note_role_problem(const char *problem, char **logged)
{
	SpinLockAcquire(&d365_shared->mutex);
	if (problem != NULL)
	{
		snprintf(d365_shared->last_error, sizeof(d365_shared->last_error), "%s%s",
				 ROLE_ERROR_PREFIX, problem);
		d365_shared->last_error_at = GetCurrentTimestamp();
	}
	else if (strncmp(d365_shared->last_error, ROLE_ERROR_PREFIX, strlen(ROLE_ERROR_PREFIX)) == 0)
	{
		d365_shared->last_error[0] = '\0';
		d365_shared->last_error_at = 0;
	}
	SpinLockRelease(&d365_shared->mutex);

	if (problem == NULL)
	{
		if (*logged != NULL)
		{
			ereport(LOG,
					(errmsg("d365sync worker runs its jobs as role \"%s\" again",
							d365_worker_role_name() ? d365_worker_role_name() : "(bootstrap superuser)")));
			pfree(*logged);
			*logged = NULL;
		}
		return;
	}
	if (*logged != NULL && strcmp(*logged, problem) == 0)
		return;
	ereport(LOG,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("d365sync worker runs no job: %s", problem),
			 errhint("Fix the role or d365sync.worker_role, then reload the configuration; the worker looks again every few seconds.")));
	if (*logged != NULL)
		pfree(*logged);
	*logged = MemoryContextStrdup(TopMemoryContext, problem);
}

/*
 * d365_worker_pin_settings
 *		Right after connecting: the settings the worker's statements depend
 *		on, whatever ALTER DATABASE / ALTER ROLE ... SET chose, at the
 *		highest priority so that no later SET changes them.
 */
void
d365_worker_pin_settings(void)
{
	static const char *const pinned[][2] = {
		/* which functions and operators its SQL names */
		{"search_path", "pg_catalog, pg_temp"},
		/* its transactions write */
		{"default_transaction_read_only", "off"},
		{"default_transaction_isolation", "read committed"},
		{"default_transaction_deferrable", "off"},
		/* who it is: the role it connected as */
		{"role", "none"},
		/* its own time budgets bound its statements */
		{"statement_timeout", "0"},
		{"lock_timeout", "0"},
		{"idle_in_transaction_session_timeout", "0"},
		/* triggers and row security as everyone else sees them */
		{"session_replication_role", "origin"},
		{"row_security", "on"},
		/* how values are written and read back */
		{"DateStyle", "ISO, MDY"},
		{"IntervalStyle", "postgres"},
		{"TimeZone", "UTC"},
		{"extra_float_digits", "1"},
		{"bytea_output", "hex"},
		{"standard_conforming_strings", "on"},
		{"check_function_bodies", "on"},
	};
	int			i;

	for (i = 0; i < lengthof(pinned); i++)
		SetConfigOption(pinned[i][0], pinned[i][1], PGC_SUSET, PGC_S_OVERRIDE);
}
