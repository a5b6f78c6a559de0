/*-------------------------------------------------------------------------
 *
 * roles.c
 *	  What the sets of rights of d365_grant() need from C.
 *
 * The sets themselves are SQL (sql/install/08_roles.sql): plain GRANTs of
 * d365's objects, so that PostgreSQL's own privilege checks decide.  Here
 * is only what a set's holder could otherwise not do without a wider
 * right: d365_schedule() reads pg_cron's cron.host, which pg_cron keeps to
 * superusers and pg_read_all_settings.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/guc.h"

PG_FUNCTION_INFO_V1(d365_cron_host);

/*
 * d365._cron_host() -> text
 *		pg_cron's cron.host, or NULL when pg_cron is not loaded.  Read
 *		without the privileged-settings restriction: the host pg_cron
 *		connects to is no secret, and d365_schedule() must point the jobs
 *		at it whoever schedules them.
 */
Datum
d365_cron_host(PG_FUNCTION_ARGS)
{
	const char *host = GetConfigOption("cron.host", true, false);

	if (host == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(host));
}
