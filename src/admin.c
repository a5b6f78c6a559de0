/*-------------------------------------------------------------------------
 *
 * admin.c
 *	  Diagnostic SQL functions: thin wrappers over the OData client.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/jsonb.h"
#include "utils/uuid.h"

#include "d365sync.h"
#include "odata.h"

PG_FUNCTION_INFO_V1(d365_whoami);
PG_FUNCTION_INFO_V1(d365_url_problem);

/*
 * uuid_datum
 *		A uuid Datum from the string member "key" of obj; NULL when absent.
 */
static Datum
uuid_datum(json_t *obj, const char *key, bool *isnull)
{
	const char *v = d365_json_str(obj, key);

	*isnull = (v == NULL);
	if (v == NULL)
		return (Datum) 0;
	return DirectFunctionCall1(uuid_in, CStringGetDatum(v));
}

/*
 * d365_whoami() -> (user_id, business_unit_id, organization_id, dop_hint)
 *		GET WhoAmI: proves that settings, credentials, TLS and the
 *		application user are all in order.
 */
Datum
d365_whoami(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	D365Client *client;
	json_t	   *who;
	Datum		values[4];
	bool		nulls[4];

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	client = d365_client_open();
	who = d365_client_call(client, "GET", "WhoAmI", NULL);
	if (!json_is_object(who) || d365_json_str(who, "UserId") == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("the WhoAmI response has no UserId"),
				 errcontext("Dynamics 365 request: GET %sWhoAmI", client->service_path)));

	values[0] = uuid_datum(who, "UserId", &nulls[0]);
	values[1] = uuid_datum(who, "BusinessUnitId", &nulls[1]);
	values[2] = uuid_datum(who, "OrganizationId", &nulls[2]);
	values[3] = Int32GetDatum(client->dop_hint);
	nulls[3] = (client->dop_hint == 0);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
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
 * d365._get_all(path text) -> SETOF jsonb
 *		GET a Web API path and every page after it (@odata.nextLink), one row
 *		per element of "value"; a body without "value" is one row.  Raises
 *		on any failure.  Internal: the metadata and owner functions are
 *		written in SQL over it.
 */
PG_FUNCTION_INFO_V1(d365_get_all);

Datum
d365_get_all(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *path = text_to_cstring(PG_GETARG_TEXT_PP(0));
	D365Client *client;
	MemoryContext page_cxt;
	int			pages = 0;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	client = d365_client_open();
	page_cxt = AllocSetContextCreate(CurrentMemoryContext, "d365sync page",
									 ALLOCSET_DEFAULT_SIZES);

	while (path != NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(page_cxt);
		D365Op	   *op = d365_op_make("GET", path, NULL);
		json_t	   *value;
		const char *next;

		op->headers = list_make1(psprintf("Prefer: odata.maxpagesize=%d", d365_page_size));
		d365_client_execute(client, &op, 1);
		if (!op->ok)
			d365_op_report(op, ERROR);
		if (!json_is_object(op->json))
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("Dynamics 365 returned no JSON object"),
					 errcontext("Dynamics 365 request: GET %s%s", client->service_path, path)));

		value = json_object_get(op->json, "value");
		if (json_is_array(value))
		{
			size_t		i;
			json_t	   *item;

			json_array_foreach(value, i, item)
			{
				Datum		d = DirectFunctionCall1(jsonb_in,
													CStringGetDatum(d365_json_dump(item)));
				bool		isnull = false;

				tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, &d, &isnull);
			}
		}
		else
		{
			Datum		d = DirectFunctionCall1(jsonb_in,
												CStringGetDatum(d365_json_dump(op->json)));
			bool		isnull = false;

			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, &d, &isnull);
		}

		next = d365_json_str(op->json, "@odata.nextLink");
		MemoryContextSwitchTo(old);
		path = next ? pstrdup(next) : NULL;
		MemoryContextReset(page_cxt);
		if (++pages > 10000)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("more than 10000 pages of results")));
	}
	return (Datum) 0;
}
