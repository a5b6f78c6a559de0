/*-------------------------------------------------------------------------
 *
 * catalog.c
 *	  Reading d365sync's own tables through SPI.
 *
 * d365.settings holds the client secret, which roles using the extension
 * must not be able to read (the table's column privileges keep it from
 * them).  The C code still needs it to get a token, so the settings row is
 * read with the privileges of the table's owner, exactly for the duration
 * of one SELECT: the same user switch PostgreSQL makes for SECURITY DEFINER
 * functions, scoped to this read.  Whoever may EXECUTE a d365sync function
 * may use the credentials but never see them.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "access/htup_details.h"
#include "catalog/pg_class.h"

#include "catalog.h"

static char *
spi_text(HeapTuple tup, TupleDesc desc, const char *col)
{
	int			fno = SPI_fnumber(desc, col);

	if (fno <= 0)
		elog(ERROR, "d365.settings has no column \"%s\"", col);
	return SPI_getvalue(tup, desc, fno);	/* NULL for SQL NULL */
}

static bool
spi_bool(HeapTuple tup, TupleDesc desc, const char *col)
{
	char	   *v = spi_text(tup, desc, col);

	return v != NULL && v[0] == 't';
}

/*
 * d365_table_owner
 *		Owner of the relation d365.relname; ERROR when it is missing.
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
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
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
	D365Settings *s;
	Oid			save_userid;
	int			save_sec;
	Oid			owner;
	HeapTuple	tup;
	TupleDesc	desc;
	int			rc;

	owner = d365_table_owner("settings");

	SPI_connect();
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	rc = SPI_execute("SELECT org_url, tenant_id, client_id::text AS client_id, client_secret,"
					 " authority_url, api_version, contact_sync_enabled, min_score,"
					 " activity_sync_enabled, default_owner, instance_id::text AS instance_id"
					 " FROM d365.settings", true, 2);
	SetUserIdAndSecContext(save_userid, save_sec);

	if (rc != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(rc));
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("d365.settings must hold exactly one row"),
				 errhint("Recreate the extension, or restore the row from a backup.")));

	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;

	/* SPI_getvalue results live in the SPI context: copy them out. */
	{
		MemoryContext spicxt = MemoryContextSwitchTo(callercxt);
		char	   *v;

		s = palloc0(sizeof(D365Settings));
#define COPY_TEXT(field) \
		do { \
			MemoryContextSwitchTo(spicxt); \
			v = spi_text(tup, desc, #field); \
			MemoryContextSwitchTo(callercxt); \
			s->field = v ? pstrdup(v) : NULL; \
		} while (0)
		COPY_TEXT(org_url);
		COPY_TEXT(tenant_id);
		COPY_TEXT(client_id);
		COPY_TEXT(client_secret);
		COPY_TEXT(authority_url);
		COPY_TEXT(api_version);
		COPY_TEXT(default_owner);
		COPY_TEXT(instance_id);
#undef COPY_TEXT
		MemoryContextSwitchTo(spicxt);
		s->contact_sync_enabled = spi_bool(tup, desc, "contact_sync_enabled");
		s->activity_sync_enabled = spi_bool(tup, desc, "activity_sync_enabled");
		v = spi_text(tup, desc, "min_score");
		s->min_score = v ? atoi(v) : 0;
		MemoryContextSwitchTo(callercxt);
	}

	SPI_finish();
	return s;
}

/*
 * d365_settings_require_connection
 *		Raise a clear error naming what is missing when the settings cannot
 *		reach Dynamics 365 yet.  Never shows the secret.
 */
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
