/*-------------------------------------------------------------------------
 *
 * whoami.c
 *	  d365_whoami(): the connection check a user runs after the settings;
 *	  d365_whoami_all(): the same for every configured application user.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"
#include "utils/uuid.h"

#include "auth.h"

PG_FUNCTION_INFO_V1(d365_whoami);
PG_FUNCTION_INFO_V1(d365_whoami_all);

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
	client->nlanes = 1;			/* the settings' application user */
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
 * whoami_one
 *		WhoAmI as one application user: its UserId (a uuid Datum, *isnull
 *		when none), or NULL problem text on success.  A token that cannot be
 *		had or a failed request is the user's problem, not an ERROR.
 */
static char *
whoami_one(D365Settings *settings, const char *client_id, const char *secret,
		   Datum *user_id, bool *isnull)
{
	D365Client *client = d365_client_init(settings, d365_auth_token);
	D365Op	   *op;

	*isnull = true;
	client->lanes[0].client_id = pstrdup(client_id);
	client->lanes[0].client_secret = secret ? pstrdup(secret) : NULL;
	if (d365_auth_token(client, &client->lanes[0], false, true) == NULL)
		return client->lanes[0].problem;
	op = d365_op_make("GET", "WhoAmI", NULL);
	d365_client_execute(client, &op, 1);
	if (!op->ok)
		return d365_op_summary(op);
	*user_id = uuid_datum(op->json, "UserId", isnull);
	return *isnull ? pstrdup("the WhoAmI response has no UserId") : NULL;
}

/*
 * d365_whoami_all() -> SETOF (client_id, source, enabled, user_id, problem)
 *		WhoAmI as each configured application user: the one in d365.settings
 *		(source 'settings') and every row of d365.app_users, enabled or not.
 *		A user that cannot sign in or call has its problem in the row.
 */
Datum
d365_whoami_all(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	D365Settings *settings;
	D365AppUser *users;
	int			n;
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	settings = d365_settings_load();
	d365_settings_require_connection(settings);
	users = d365_app_users_load(true, &n);

	for (i = -1; i < n; i++)
	{
		const char *id = i < 0 ? settings->client_id : users[i].client_id;
		const char *secret = i < 0 ? settings->client_secret : users[i].client_secret;
		Datum		values[5];
		bool		nulls[5] = {false, false, false, true, false};
		char	   *problem;

		values[0] = DirectFunctionCall1(uuid_in, CStringGetDatum(id));
		values[1] = CStringGetTextDatum(i < 0 ? "settings" : "app_users");
		values[2] = BoolGetDatum(i < 0 ? true : users[i].enabled);
		problem = whoami_one(settings, id, secret, &values[3], &nulls[3]);
		if (problem != NULL)
			values[4] = CStringGetTextDatum(problem);
		nulls[4] = (problem == NULL);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
