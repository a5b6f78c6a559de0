/*-------------------------------------------------------------------------
 *
 * auth.c
 *	  OAuth 2.0 client-credentials tokens from Microsoft Entra ID (v2), and
 *	  the authenticated client every feature opens.
 *
 * POST {authority_url}/{tenant_id}/oauth2/v2.0/token with client_id,
 * client_secret, scope={org_url}/.default and grant_type=client_credentials.
 * The token is kept in backend memory (never in a table, GUC or message)
 * and reused until 5 minutes before it expires.  It is keyed by a SHA-256
 * digest of the authority, tenant, client id, secret and organization, so a
 * change to any of them in d365.settings is noticed on the next call and
 * the old token is dropped.
 *
 * The token request goes through d365_client_execute() like any other, so
 * it is retried on 5xx and transport failures by the same policy.  It is an
 * anonymous operation (op->anonymous): the client sends it without asking
 * its token source, which is d365_auth_token itself.  That rule, enforced
 * in odata.c (client_token), is all that keeps d365_auth_token from
 * calling itself; the dependency runs one way, auth.c -> odata.c, and
 * odata.c reaches this file only through the function pointer that
 * d365_client_open installs.  A refusal from Entra is an ERROR carrying the AADSTS code and description
 * (which never contains the secret) and a hint for the common codes.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "common/cryptohash.h"
#include "common/sha2.h"
#include "lib/stringinfo.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "auth.h"

/* Renew this long before the token expires. */
#define TOKEN_MARGIN_SECS 300

static char *cached_token = NULL;
static TimestampTz cached_renew_at = 0;
static uint8 cached_key[PG_SHA256_DIGEST_LENGTH];

/*
 * credentials_key
 *		SHA-256 over everything that determines which token is valid.
 */
static void
credentials_key(const D365Settings *s, uint8 *out)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
	const char *parts[5];
	int			i;

	parts[0] = s->authority_url;
	parts[1] = s->tenant_id;
	parts[2] = s->client_id;
	parts[3] = s->client_secret;
	parts[4] = s->org_url;

	if (ctx == NULL || pg_cryptohash_init(ctx) < 0)
		elog(ERROR, "could not initialise SHA-256");
	for (i = 0; i < 5; i++)
	{
		/* include the terminating NUL so that parts cannot run together */
		if (pg_cryptohash_update(ctx, (const uint8 *) parts[i], strlen(parts[i]) + 1) < 0)
			elog(ERROR, "could not compute SHA-256");
	}
	if (pg_cryptohash_final(ctx, out, PG_SHA256_DIGEST_LENGTH) < 0)
		elog(ERROR, "could not compute SHA-256");
	pg_cryptohash_free(ctx);
}

/*
 * d365_auth_forget
 *		Drop the cached token.
 */
void
d365_auth_forget(void)
{
	if (cached_token != NULL)
	{
		/* do not leave the token lying around in freed memory */
		explicit_bzero(cached_token, strlen(cached_token));
		pfree(cached_token);
	}
	cached_token = NULL;
	cached_renew_at = 0;
}

/*
 * aadsts_hint
 *		A hint for the Entra errors people meet when setting up.
 */
static const char *
aadsts_hint(const char *message)
{
	const char *p = message ? strstr(message, "AADSTS") : NULL;
	long		code = p ? atol(p + 6) : 0;

	switch (code)
	{
		case 7000215:
			return "Check client_secret in d365.settings: it must be the secret's value, not its ID.";
		case 7000222:
			return "The client secret has expired: create a new one for the app registration and store its value in d365.settings.client_secret.";
		case 700016:
			return "Check client_id and tenant_id in d365.settings: the application is not registered in that tenant.";
		case 90002:
			return "Check tenant_id in d365.settings: no such tenant exists.";
		case 500011:
			return "Check org_url in d365.settings: the tenant has no Dynamics 365 organization at that address.";
		case 1002012:
		case 70011:
			return "Check org_url in d365.settings: the token scope is {org_url}/.default.";
		default:
			return NULL;
	}
}

/*
 * d365_client_open
 *		Load the settings (as the settings table's owner), check that a
 *		connection is configured, and prepare a client for this SQL call
 *		whose token source is d365_auth_token.  No request is made here.
 */
D365Client *
d365_client_open(void)
{
	D365Settings *settings = d365_settings_load();

	d365_settings_require_connection(settings);
	return d365_client_init(settings, d365_auth_token);
}

/*
 * d365_auth_token
 *		A valid access token for the client's organization: the cached one,
 *		or a new one when refresh is true, the cache is stale or the
 *		credentials changed.  The returned string is owned by this module
 *		(TopMemoryContext) and stays valid until the next refresh.
 */
const char *
d365_auth_token(D365Client *client, bool refresh)
{
	D365Settings *s = client->settings;
	uint8		key[PG_SHA256_DIGEST_LENGTH];
	StringInfoData form;
	D365Op	   *op;
	const char *token;
	json_t	   *expires;
	long		lifetime;
	const char *hint;
	char	   *escaped_secret;

	credentials_key(s, key);
	if (!refresh && cached_token != NULL &&
		memcmp(key, cached_key, sizeof(key)) == 0 &&
		GetCurrentTimestamp() < cached_renew_at)
		return cached_token;

	d365_auth_forget();

	escaped_secret = d365_uri_escape(s->client_secret);
	initStringInfo(&form);
	appendStringInfo(&form, "grant_type=client_credentials&client_id=%s&client_secret=%s&scope=%s",
					 d365_uri_escape(s->client_id),
					 escaped_secret,
					 d365_uri_escape(psprintf("%s/.default", s->org_url)));

	op = d365_op_make("POST",
					  psprintf("%s/%s/oauth2/v2.0/token", s->authority_url,
							   d365_uri_escape(s->tenant_id)),
					  NULL);
	op->body = form.data;
	/* anonymous: the client must not ask us for a token to send this */
	op->anonymous = true;
	op->content_type = "application/x-www-form-urlencoded";

	d365_client_execute(client, &op, 1);

	/* the form held the secret: wipe it now that it has been sent */
	explicit_bzero(form.data, form.len);
	explicit_bzero(escaped_secret, strlen(escaped_secret));

	if (!op->ok)
	{
		if (op->transport_failure || op->status == 0 || op->error_message == NULL ||
			op->json == NULL)
			d365_op_report(op, ERROR);
		hint = aadsts_hint(op->error_message);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("could not obtain an access token from Microsoft Entra ID"),
				 errdetail_internal("%s (HTTP status %d, error %s).", op->error_message,
									op->status, op->error_code ? op->error_code : "unknown"),
				 hint ? errhint("%s", hint) : 0,
				 errcontext("token request: POST %s/oauth2/v2.0/token", s->tenant_id)));
	}

	token = d365_json_str(op->json, "access_token");
	expires = op->json ? json_object_get(op->json, "expires_in") : NULL;
	if (json_is_integer(expires))
		lifetime = (long) json_integer_value(expires);
	else if (json_is_string(expires))	/* v1 endpoints send a string */
		lifetime = atol(json_string_value(expires));
	else
		lifetime = 0;
	if (token == NULL || token[0] == '\0' || lifetime <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("the token response has no access_token or expires_in"),
				 errcontext("token request: POST %s/oauth2/v2.0/token", s->tenant_id)));

	cached_token = MemoryContextStrdup(TopMemoryContext, token);
	memcpy(cached_key, key, sizeof(key));
	/* short-lived tokens: renew at half-life instead of a fixed margin */
	if (lifetime > 2 * TOKEN_MARGIN_SECS)
		lifetime -= TOKEN_MARGIN_SECS;
	else
		lifetime /= 2;
	cached_renew_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												  (int64) lifetime * 1000);
	return cached_token;
}
