/*-------------------------------------------------------------------------
 *
 * metadata.c
 *	  Reading lists from Dynamics 365 for the metadata and owner functions.
 *
 * d365._get_all(path) is the C part of the metadata room: the functions
 * that list entities, attributes, option sets and owners are written in
 * SQL over it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "d365_json.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/jsonb.h"

#include "auth.h"
#include "spi_util.h"
#include "writers.h"
#include "job_role.h"

PG_FUNCTION_INFO_V1(d365_get_all);
PG_FUNCTION_INFO_V1(d365_metadata_store);

/* Pages past this many are an error: a runaway list, not a real one. */
#define GET_ALL_MAX_PAGES 10000

/*
 * Append one JSON value to the result as a jsonb row (U+0000, which jsonb
 * cannot hold, as U+FFFD: one such name must not fail the whole list).
 */
static void
put_row(ReturnSetInfo *rsinfo, json_t *value)
{
	Datum		d;
	bool		isnull = false;

	d365_json_scrub_nul(value);
	d = DirectFunctionCall1(jsonb_in, CStringGetDatum(d365_json_dump(value)));

	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, &d, &isnull);
}

/*
 * What a role other than a superuser may read through d365._get_all(): the
 * metadata (EntityDefinitions) and the list of users that activities name
 * their owners from (d365._user_id), as the documented metadata functions
 * show them.  Only the admin set (and d365sync's own code) holds EXECUTE on
 * it; without this an admin could read any Dynamics record with the
 * application's credentials.  d365's own code -- the jobs and the SECURITY
 * DEFINER functions (d365_owners()), which run as the job role -- reads
 * the paths it builds.
 */
static void
check_path_for_role(const char *path)
{
	static const char *const users =
		"systemusers?$select=systemuserid,internalemailaddress,fullname,accessmode,isdisabled";

	/* d365sync's own code (the jobs, the SECURITY DEFINER functions) */
	if (superuser() || (OidIsValid(d365_job_role()) && GetUserId() == d365_job_role()))
		return;
	if (strncmp(path, "EntityDefinitions(", 18) == 0 || strncmp(path, "EntityDefinitions?", 18) == 0 ||
		strcmp(path, users) == 0)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied to read \"%s\" through d365._get_all()", path),
			 errdetail("For a role that is not a superuser it reads Dynamics 365's metadata (EntityDefinitions) and its users only."),
			 errhint("Read Dynamics 365 tables through a foreign table (docs/foreign-tables.md).")));
}

/*
 * d365._get_all(path text) -> SETOF jsonb
 *		GET a Web API path and every page after it (@odata.nextLink), one row
 *		per element of "value"; a body without "value" is one row.  Raises
 *		on any failure.
 */
Datum
d365_get_all(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *path = text_to_cstring(PG_GETARG_TEXT_PP(0));
	D365Client *client;
	D365Pages  *pages;
	D365Op	   *op;

	check_path_for_role(path);
	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	client = d365_client_open();
	pages = d365_pages_open(client, path, NULL, GET_ALL_MAX_PAGES);

	while ((op = d365_pages_next(pages)) != NULL)
	{
		MemoryContext old;
		json_t	   *value;

		if (!op->ok)
			d365_op_report(op, ERROR);
		if (!json_is_object(op->json))
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("Dynamics 365 returned no JSON object"),
					 errcontext("Dynamics 365 request: GET %s%s", client->service_path,
								pages->path)));

		old = MemoryContextSwitchTo(pages->cxt);
		value = json_object_get(op->json, "value");
		if (json_is_array(value))
		{
			size_t		i;
			json_t	   *item;

			json_array_foreach(value, i, item)
				put_row(rsinfo, item);
		}
		else
			put_row(rsinfo, op->json);
		MemoryContextSwitchTo(old);
	}
	d365_pages_close(pages);
	return (Datum) 0;
}

/*
 * d365._metadata_store(path text) -> jsonb
 *		Every element of a GET of path (d365._get_all(), with its limits for
 *		a role that is not a superuser) as one jsonb array, kept in
 *		d365.metadata_cache for d365._get_cached().  The row is written
 *		inside the flag of d365sync's own writes (src/capture/state_guard.c): what
 *		the cache holds for a path is what Dynamics answered to it, never
 *		a body a role wrote there.
 */
Datum
d365_metadata_store(PG_FUNCTION_ARGS)
{
	text	   *path = PG_GETARG_TEXT_PP(0);
	MemoryContext fcxt = CurrentMemoryContext;
	Datum		body;
	bool		was;

	SPI_connect();
	MemoryContextSwitchTo(fcxt);
	body = d365_sql_datum("SELECT coalesce(pg_catalog.jsonb_agg(r), '[]'::jsonb)"
						  " FROM d365._get_all($1) r",
						  1, (Oid[]) {TEXTOID}, (Datum[]) {PointerGetDatum(path)},
						  JSONBOID, NULL);
	was = d365_recorder_set(true);
	PG_TRY();
	{
		(void) d365_sql_text("INSERT INTO d365.metadata_cache AS c (path, fetched_at, body)"
							 " VALUES ($1, pg_catalog.now(), $2)"
							 " ON CONFLICT ON CONSTRAINT metadata_cache_pkey"
							 " DO UPDATE SET fetched_at = EXCLUDED.fetched_at, body = EXCLUDED.body"
							 " RETURNING c.path",
							 2, (Oid[]) {TEXTOID, JSONBOID},
							 (Datum[]) {PointerGetDatum(path), body});
	}
	PG_FINALLY();
	{
		d365_recorder_set(was);
	}
	PG_END_TRY();
	SPI_finish();
	PG_RETURN_DATUM(body);
}
