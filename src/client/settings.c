/*-------------------------------------------------------------------------
 *
 * settings.c
 *	  The settings row (d365.settings): reading it, checking that it can
 *	  reach Dynamics 365, and the URL rule its trigger applies.
 *
 * d365.settings holds the client secret, which roles using the extension
 * must not be able to read (the table's column privileges keep it from
 * them).  The C code still needs it to get a token, so the settings row is
 * read as the table's owner, exactly for the duration of one SELECT
 * (d365_as_table_owner).  Whoever may EXECUTE a d365sync function may use
 * the credentials but never see them.
 *
 * The check triggers of the tables holding a secret report a refused row
 * through d365._raise_quietly, without the error context: a refused row of
 * a COPY (a restore, a \copy) would otherwise be printed whole, secret and
 * all, in the CONTEXT line ("COPY app_users, line 1: ...").
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "http.h"
#include "settings.h"
#include "spi_util.h"

PG_FUNCTION_INFO_V1(d365_url_problem);
PG_FUNCTION_INFO_V1(d365_raise_quietly);

/* d365_as_table_owner body: the one SELECT of the settings row */
static void
select_settings(void *arg)
{
	int		   *rc = (int *) arg;

	*rc = SPI_execute("SELECT org_url, tenant_id, client_id::text AS client_id, client_secret,"
					  " authority_url, api_version, contact_sync_enabled, min_score,"
					  " activity_sync_enabled, default_owner, instance_id::text AS instance_id"
					  " FROM d365.settings", true, 2);
}

/* A column of the settings row by name; isnull set for SQL NULL. */
static Datum
column(HeapTuple tup, TupleDesc desc, const char *name, Oid type, bool *isnull)
{
	int			fno = SPI_fnumber(desc, name);

	if (fno <= 0)
		elog(ERROR, "d365.settings has no column \"%s\"", name);
	if (SPI_gettypeid(desc, fno) != type)
		elog(ERROR, "d365.settings.%s has an unexpected type", name);
	return SPI_getbinval(tup, desc, fno, isnull);
}

/* A text column as a C string (NULL for SQL NULL), in CurrentMemoryContext. */
static char *
text_column(HeapTuple tup, TupleDesc desc, const char *name)
{
	bool		isnull;
	Datum		d = column(tup, desc, name, TEXTOID, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* A boolean column; NULL reads as false. */
static bool
bool_column(HeapTuple tup, TupleDesc desc, const char *name)
{
	bool		isnull;
	Datum		d = column(tup, desc, name, BOOLOID, &isnull);

	return !isnull && DatumGetBool(d);
}

/*
 * d365_settings_load
 *		Read the settings row as the owner of d365.settings.  The result is
 *		allocated in the caller's memory context.  Raises when the row is
 *		missing (it never is, unless someone bypassed the trigger).
 *
 *		Runs inside the caller's transaction; connects to SPI itself, so it
 *		may be called with or without an open SPI connection.
 */
D365Settings *
d365_settings_load(void)
{
	MemoryContext callercxt = CurrentMemoryContext;
	MemoryContext spicxt;
	D365Settings *s;
	Oid			owner;
	HeapTuple	tup;
	TupleDesc	desc;
	int			rc = 0;
	bool		isnull;
	Datum		d;

	owner = d365_table_owner("settings");

	SPI_connect();
	d365_as_table_owner(owner, select_settings, &rc);

	if (rc != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(rc));
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("d365.settings must hold exactly one row"),
				 errhint("Recreate the extension, or restore the row from a backup.")));

	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;

	/* the values outlive the SPI connection: build them in the caller's context */
	spicxt = MemoryContextSwitchTo(callercxt);
	s = palloc0(sizeof(D365Settings));
	s->org_url = text_column(tup, desc, "org_url");
	s->tenant_id = text_column(tup, desc, "tenant_id");
	s->client_id = text_column(tup, desc, "client_id");
	s->client_secret = text_column(tup, desc, "client_secret");
	s->authority_url = text_column(tup, desc, "authority_url");
	s->api_version = text_column(tup, desc, "api_version");
	s->default_owner = text_column(tup, desc, "default_owner");
	s->instance_id = text_column(tup, desc, "instance_id");
	s->contact_sync_enabled = bool_column(tup, desc, "contact_sync_enabled");
	s->activity_sync_enabled = bool_column(tup, desc, "activity_sync_enabled");
	d = column(tup, desc, "min_score", INT4OID, &isnull);
	s->min_score = isnull ? 0 : DatumGetInt32(d);
	MemoryContextSwitchTo(spicxt);

	SPI_finish();
	return s;
}

/*
 * d365_settings_require_connection
 *		Raise a clear error naming what is missing when the settings cannot
 *		reach Dynamics 365 yet.  Never shows the secret.
 */
static void
select_app_users(void *arg)
{
	int		   *rc = (int *) arg;

	*rc = SPI_execute("SELECT client_id::text AS client_id, client_secret, enabled"
					  " FROM d365.app_users ORDER BY client_id", true, 0);
}

/*
 * d365_app_users_load
 *		The application users of d365.app_users (the enabled ones, or all
 *		when all is true) in client id order, read as the table's owner: no
 *		one else may read the secrets.  *n is set to their number.
 */
D365AppUser *
d365_app_users_load(bool all, int *n)
{
	MemoryContext callercxt = CurrentMemoryContext;
	D365AppUser *users;
	int			rc = 0;
	uint64		i;

	*n = 0;
	/* the library of a later release may serve a 0.1 schema without it */
	if (!OidIsValid(get_relname_relid("app_users", get_namespace_oid("d365", false))))
		return palloc0(sizeof(D365AppUser));
	SPI_connect();
	d365_as_table_owner(d365_table_owner("app_users"), select_app_users, &rc);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(rc));
	users = MemoryContextAllocZero(callercxt, sizeof(D365AppUser) * (SPI_processed + 1));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		MemoryContext spicxt;
		bool		enabled = bool_column(tup, desc, "enabled");

		if (!enabled && !all)
			continue;
		spicxt = MemoryContextSwitchTo(callercxt);
		users[*n].client_id = text_column(tup, desc, "client_id");
		users[*n].client_secret = text_column(tup, desc, "client_secret");
		users[*n].enabled = enabled;
		MemoryContextSwitchTo(spicxt);
		(*n)++;
	}
	SPI_finish();
	return users;
}

void
d365_settings_require_connection(const D365Settings *s)
{
	StringInfoData missing;

	initStringInfo(&missing);
	if (s->org_url == NULL || s->org_url[0] == '\0')
		appendStringInfoString(&missing, "org_url");
	if (s->tenant_id == NULL || s->tenant_id[0] == '\0')
		appendStringInfo(&missing, "%stenant_id", missing.len ? ", " : "");
	if (s->client_id == NULL)
		appendStringInfo(&missing, "%sclient_id", missing.len ? ", " : "");
	if (s->client_secret == NULL || s->client_secret[0] == '\0')
		appendStringInfo(&missing, "%sclient_secret", missing.len ? ", " : "");

	if (missing.len > 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("d365sync is not configured"),
				 errdetail("These settings are not set: %s.", missing.data),
				 errhint("Set them with UPDATE d365.settings SET org_url = '...', tenant_id = '...', client_id = '...', client_secret = '...';")));
}

/*
 * d365._url_problem(url text) -> text
 *		Why the URL may not be used for Dynamics 365, or NULL.  Used by the
 *		settings trigger so that write-time and send-time rules are one.
 */
Datum
d365_url_problem(PG_FUNCTION_ARGS)
{
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *problem = d365_http_url_problem(url);

	if (problem == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(problem));
}

/*
 * d365._raise_quietly(level text, sqlstate text, message text, detail text,
 *					   hint text) -> void
 *		Raises an ERROR (or, level 'WARNING', a warning) with no error
 *		context at all: the callbacks of the statements around it (COPY's
 *		prints the whole input line) are left out.  For the check triggers
 *		of the tables that hold a secret; the message, detail and hint must
 *		not hold one.
 */
Datum
d365_raise_quietly(PG_FUNCTION_ARGS)
{
	ErrorContextCallback *save = error_context_stack;
	const char *code;
	int			elevel = ERROR;
	char	   *message;
	char	   *detail;
	char	   *hint;

	if (!PG_ARGISNULL(0) && strcmp(text_to_cstring(PG_GETARG_TEXT_PP(0)), "WARNING") == 0)
		elevel = WARNING;
	code = PG_ARGISNULL(1) ? "" : text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (strlen(code) != 5 || strspn(code, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") != 5)
		code = elevel == WARNING ? "01000" : "P0001";
	message = PG_ARGISNULL(2) ? "refused" : text_to_cstring(PG_GETARG_TEXT_PP(2));
	detail = PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3));
	hint = PG_ARGISNULL(4) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(4));

	error_context_stack = NULL;
	ereport(elevel,
			(errcode(MAKE_SQLSTATE(code[0], code[1], code[2], code[3], code[4])),
			 errmsg_internal("%s", message),
			 detail && detail[0] ? errdetail_internal("%s", detail) : 0,
			 hint && hint[0] ? errhint("%s", hint) : 0));
	error_context_stack = save;
	PG_RETURN_VOID();
}
