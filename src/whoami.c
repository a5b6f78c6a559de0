/*-------------------------------------------------------------------------
 *
 * whoami.c
 *	  d365_whoami(): the connection check a user runs after the settings.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/uuid.h"

#include "auth.h"

PG_FUNCTION_INFO_V1(d365_whoami);

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
