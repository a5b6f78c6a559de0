/*-------------------------------------------------------------------------
 *
 * auth.c
 *	  OAuth 2.0 client-credentials tokens from Microsoft Entra ID (v2), and
 *	  the authenticated client every feature opens.
 *
 * POST {authority_url}/{tenant_id}/oauth2/v2.0/token with client_id,
 * client_secret, scope={org_url}/.default and grant_type=client_credentials.
 * Each application user (the one in d365.settings and those in
 * d365.app_users) has its own token.  Tokens are kept in backend memory
 * (never in a table, GUC or message) and reused until 5 minutes before they
 * expire.  Each is keyed by a SHA-256 digest of the authority, tenant,
 * client id, secret and organization, so a change to any of them is noticed
 * on the next call and the old token is no longer used.
 *
 * The token request goes through d365_client_execute() like any other, so
 * it is retried on 5xx and transport failures by the same policy.  It is an
 * anonymous operation (op->anonymous): the client sends it without asking
 * its token source, which is d365_auth_token itself.  That rule, enforced
 * in odata.c (client_token), is all that keeps d365_auth_token from
 * calling itself; the dependency runs one way, auth.c -> odata.c, and
 * odata.c reaches this file only through the function pointer that
 * d365_client_open installs.  A refusal from Entra is an ERROR carrying the
 * AADSTS code and description (which never contains the secret) and a hint
 * for the common codes -- or, when the caller can do without that user
 * (missing_ok), the same text in lane->problem.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>
#include "d365_json.h"

#include "common/cryptohash.h"
#include "common/sha2.h"
#include "lib/stringinfo.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "auth.h"

/* Renew this long before the token expires. */
#define TOKEN_MARGIN_SECS 300

/* The tokens of this backend, one per set of credentials. */
#define TOKEN_SLOTS 16

typedef struct TokenSlot
{
	char	   *token;			/* in TopMemoryContext, or NULL */
	TimestampTz renew_at;
	uint8		key[PG_SHA256_DIGEST_LENGTH];
} TokenSlot;

static TokenSlot slots[TOKEN_SLOTS];

/* A token lifetime is taken between these bounds, in seconds. */
#define TOKEN_MIN_LIFETIME_SECS 60
#define TOKEN_MAX_LIFETIME_SECS 86400

/*
 * token_lifetime
 *		The lifetime an expires_in value (a number, or a string of digits
 *		as v1 endpoints send it) gives a token, clamped to a minute..a day:
 *		an absurd value must neither overflow the renewal time nor make
 *		every call fetch a token.  0 when there is no such value.
 */
static long
token_lifetime(json_t *expires)
{
	double		secs;

	if (json_is_integer(expires))
		secs = (double) json_integer_value(expires);
	else if (json_is_real(expires))
		secs = json_real_value(expires);
	else if (json_is_string(expires))
	{
		const char *s = json_string_value(expires);
		char	   *end;

		secs = strtod(s, &end);
		if (end == s || *end != '\0')
			return 0;
	}
	else
		return 0;
	if (isnan(secs))
		return 0;
	if (secs < TOKEN_MIN_LIFETIME_SECS)
		return TOKEN_MIN_LIFETIME_SECS;
	if (secs > TOKEN_MAX_LIFETIME_SECS)
		return TOKEN_MAX_LIFETIME_SECS;
	return (long) secs;
}

/*
 * credentials_key
 *		SHA-256 over everything that determines which token is valid.
 */
static void
credentials_key(const D365Settings *s, const D365Lane *lane, uint8 *out)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
	const char *parts[5];
	int			i;

	parts[0] = s->authority_url;
	parts[1] = s->tenant_id;
	parts[2] = lane->client_id ? lane->client_id : "";
	parts[3] = lane->client_secret ? lane->client_secret : "";
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

/* Empty a slot, wiping its token. */
static void
slot_clear(TokenSlot *slot)
{
	if (slot->token != NULL)
	{
		/* do not leave the token lying around in freed memory */
		explicit_bzero(slot->token, strlen(slot->token));
		pfree(slot->token);
	}
	memset(slot, 0, sizeof(TokenSlot));
}

/*
 * slot_for
 *		The slot holding the token for key, or else the one to put it in:
 *		an empty slot, or the one that expires first.
 */
static TokenSlot *
slot_for(const uint8 *key, bool *found)
{
	TokenSlot  *victim = &slots[0];
	int			i;

	for (i = 0; i < TOKEN_SLOTS; i++)
	{
		if (slots[i].token != NULL && memcmp(slots[i].key, key, PG_SHA256_DIGEST_LENGTH) == 0)
		{
			*found = true;
			return &slots[i];
		}
		if (slots[i].token == NULL)
			victim = victim->token == NULL ? victim : &slots[i];
		else if (victim->token != NULL && slots[i].renew_at < victim->renew_at)
			victim = &slots[i];
	}
	*found = false;
	return victim;
}

/*
 * forget_others
 *		Drop the tokens of credentials none of the client's users has any
 *		longer: a changed secret, organization or user leaves no token of
 *		the old one behind.
 */
static void
forget_others(D365Client *client)
{
	uint8	   *keys = palloc(PG_SHA256_DIGEST_LENGTH * Max(client->nlanes, 1));
	int			i;
	int			l;

	for (l = 0; l < client->nlanes; l++)
		credentials_key(client->settings, &client->lanes[l], keys + l * PG_SHA256_DIGEST_LENGTH);
	for (i = 0; i < TOKEN_SLOTS; i++)
	{
		bool		used = false;

		for (l = 0; l < client->nlanes && !used; l++)
			used = memcmp(slots[i].key, keys + l * PG_SHA256_DIGEST_LENGTH,
						  PG_SHA256_DIGEST_LENGTH) == 0;
		if (!used)
			slot_clear(&slots[i]);
	}
	pfree(keys);
}

/*
 * d365_auth_forget
 *		Drop every cached token.
 */
void
d365_auth_forget(void)
{
	int			i;

	for (i = 0; i < TOKEN_SLOTS; i++)
		slot_clear(&slots[i]);
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
 *		Load the settings and the enabled application users of
 *		d365.app_users (as the tables' owner), check that a connection is
 *		configured, and prepare a client for this SQL call whose token
 *		source is d365_auth_token.  No request is made here.  ERROR on a
 *		hot standby (nothing is sent from there).
 */
D365Client *
d365_client_open(void)
{
	D365Settings *settings = d365_settings_load();
	D365Client *client;
	D365AppUser *users;
	int			n;
	int			i;

	d365_http_require_primary();
	d365_settings_require_connection(settings);
	client = d365_client_init(settings, d365_auth_token);
	users = d365_app_users_load(false, &n);
	for (i = 0; i < n; i++)
		d365_client_add_lane(client, users[i].client_id, users[i].client_secret);
	forget_others(client);
	return client;
}

/*
 * d365_auth_token
 *		A valid access token of an application user (lane) for the client's
 *		organization: the cached one, or a new one when refresh is true, the
 *		cache is stale or the credentials changed.  The returned string is
 *		owned by this module (TopMemoryContext) and stays valid until that
 *		user's next refresh.  A token that cannot be had raises an ERROR, or
 *		when missing_ok sets lane->problem and returns NULL (see
 *		D365TokenSource).
 */
const char *
d365_auth_token(D365Client *client, D365Lane *lane, bool refresh, bool missing_ok)
{
	D365Settings *s = client->settings;
	uint8		key[PG_SHA256_DIGEST_LENGTH];
	TokenSlot  *slot;
	bool		found;
	StringInfoData form;
	D365Op	   *op;
	const char *token;
	json_t	   *expires;
	long		lifetime;
	const char *hint;
	char	   *escaped_secret;

	credentials_key(s, lane, key);
	slot = slot_for(key, &found);
	if (found && !refresh && GetCurrentTimestamp() < slot->renew_at)
		return slot->token;
	slot_clear(slot);

	escaped_secret = d365_uri_escape(lane->client_secret ? lane->client_secret : "");
	initStringInfo(&form);
	appendStringInfo(&form, "grant_type=client_credentials&client_id=%s&client_secret=%s&scope=%s",
					 d365_uri_escape(lane->client_id ? lane->client_id : ""),
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

	if (!op->ok && missing_ok)
	{
		lane->problem = op->transport_failure || op->json == NULL ||
			op->error_message == NULL ? d365_op_summary(op) :
			psprintf("could not obtain an access token from Microsoft Entra ID: %s (HTTP status %d, error %s)",
					 op->error_message, op->status,
					 op->error_code ? op->error_code : "unknown");
		return NULL;
	}
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
				 errcontext("token request: POST /%s/oauth2/v2.0/token", s->tenant_id)));
	}

	token = d365_json_str(op->json, "access_token");
	expires = op->json ? json_object_get(op->json, "expires_in") : NULL;
	lifetime = token_lifetime(expires);
	if ((token == NULL || token[0] == '\0' || lifetime <= 0) && missing_ok)
	{
		lane->problem = pstrdup("the token response has no access_token or expires_in");
		return NULL;
	}
	if (token == NULL || token[0] == '\0' || lifetime <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("the token response has no access_token or expires_in"),
				 errcontext("token request: POST /%s/oauth2/v2.0/token", s->tenant_id)));

	slot->token = MemoryContextStrdup(TopMemoryContext, token);
	memcpy(slot->key, key, sizeof(key));
	/* short-lived tokens: renew at half-life instead of a fixed margin */
	if (lifetime > 2 * TOKEN_MARGIN_SECS)
		lifetime -= TOKEN_MARGIN_SECS;
	else
		lifetime /= 2;
	slot->renew_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												 (int64) lifetime * 1000);
	return slot->token;
}
