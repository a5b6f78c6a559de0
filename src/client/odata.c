/*-------------------------------------------------------------------------
 *
 * odata.c
 *	  The Dataverse Web API client: every feature sends through here.
 *
 * d365_client_execute() takes a list of operations and returns each one's
 * outcome; it never raises for an operation that failed (a 400 for one
 * contact must not stop the run), only for interrupts, for a token that
 * cannot be had, and for can't-happen conditions.  It owns the policy that
 * no other file repeats:
 *
 *	 - the OData headers of every request and the bearer token;
 *	 - 401: fetch a new token once per call and send the operations again;
 *	 - 429: count the response; the throttling governor holds the user
 *	   until Retry-After has passed and lowers its level; try again;
 *	 - 5xx and transport failures (timeouts, refused or dropped connections):
 *	   retry with bounded exponential back-off and jitter;
 *	 - anything else is final and is described in the operation: HTTP status,
 *	   Dynamics error code and message, or what was wrong with the response
 *	   (not JSON, malformed, too large);
 *	 - several operations travel in $batch requests (d365sync.batch_size
 *	   parts each, Prefer: odata.continue-on-error so each part has its own
 *	   outcome); a part's 429/5xx is retried like a request's;
 *	 - x-ms-dop-hint caps the requests in flight (with d365sync.max_parallel);
 *	   until the server has sent it, one request goes alone (a tenth of a
 *	   batch when batches are large) to learn it.  Within the cap, the
 *	   throttling governor (odata_governor.c) paces each application user
 *	   by Dataverse's execution-time budget: it says, before each request
 *	   starts, whether it may, and hears each outcome as it comes in;
 *	 - application users (lanes): the one in d365.settings and the enabled
 *	   ones of d365.app_users.  Each round spreads its exchanges over the
 *	   users in proportion to the requests each may have in flight; each
 *	   has its own token, its own bound and its own 429 state.  A user whose
 *	   token cannot be had is reported (WARNING) and skipped while others
 *	   are left; the run's message names it.
 *
 * Waits are interruptible (d365_http_sleep).  The number of attempts is
 * bounded by d365sync.max_retries and a single wait by
 * d365sync.retry_max_wait_ms; an operation that would need more stays failed
 * and its item stays pending for the next run.
 *
 * d365_op_report() turns a failed operation into an ereport in
 * postgres_fdw's manner: remote text through errmsg_internal, HTTP status
 * and Dynamics error code in errdetail, method and path in errcontext.
 * Neither headers nor bodies of requests are ever shown.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include <curl/curl.h>

#include "common/pg_prng.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"

#include "d365sync.h"
#include "odata.h"

/*
 * d365_client_init
 *		A client for this SQL call on the given settings, taking its bearer
 *		tokens from token (see D365TokenSource).  No request is made here.
 *		Callers open clients with d365_client_open() (auth.h).
 */
D365Client *
d365_client_init(D365Settings *settings, D365TokenSource token)
{
	D365Client *client = palloc0(sizeof(D365Client));

	client->settings = settings;
	client->token = token;
	client->cxt = CurrentMemoryContext;
	client->service_path = psprintf("/api/data/%s/", settings->api_version);
	client->service_root = psprintf("%s%s", settings->org_url, client->service_path);
	client->dop_limit = d365_max_parallel;
	client->lanes = palloc0(sizeof(D365Lane));
	d365_client_add_lane(client, settings->client_id, settings->client_secret);
	return client;
}

/*
 * d365_client_add_lane
 *		Send as one more application user (of d365.app_users) too.  The
 *		first lane is the settings' user, added by d365_client_init.
 */
void
d365_client_add_lane(D365Client *client, const char *client_id,
					 const char *client_secret)
{
	D365Lane   *lane;

	if (client->nlanes > 0)
		client->lanes = repalloc(client->lanes, sizeof(D365Lane) * (client->nlanes + 1));
	lane = &client->lanes[client->nlanes++];
	memset(lane, 0, sizeof(D365Lane));
	lane->client = client;
	lane->client_id = client_id ? MemoryContextStrdup(client->cxt, client_id) : NULL;
	lane->client_secret = client_secret ?
		MemoryContextStrdup(client->cxt, client_secret) : NULL;
	d365_governor_init(lane);
}

/*
 * d365_client_skipped
 *		"application user <id> skipped: <problem>" for each user whose token
 *		could not be had, joined by "; "; NULL when none was skipped.
 */
char *
d365_client_skipped(D365Client *client)
{
	StringInfoData buf;
	int			l;

	initStringInfo(&buf);
	for (l = 0; client != NULL && l < client->nlanes; l++)
		if (client->lanes[l].dead)
			appendStringInfo(&buf, "%sapplication user %s skipped: %s",
							 buf.len ? "; " : "", client->lanes[l].client_id,
							 client->lanes[l].problem ? client->lanes[l].problem : "no token");
	return buf.len ? buf.data : NULL;
}

/*
 * d365_client_slots
 *		How many requests the client may have in flight now, over all its
 *		application users that are not skipped.
 */
int
d365_client_slots(D365Client *client)
{
	int			n = 0;
	int			l;

	for (l = 0; l < client->nlanes; l++)
		n += client->lanes[l].dead ? 0 : client->dop_limit;
	return n;
}

static int
live_lanes(D365Client *client)
{
	int			n = 0;
	int			l;

	for (l = 0; l < client->nlanes; l++)
		n += client->lanes[l].dead ? 0 : 1;
	return n;
}

/*
 * client_token
 *		The bearer token of a lane, for operations that are not anonymous.
 *		Anonymous operations never get here: build_http gives them no
 *		Authorization header, batchable() keeps them out of $batch, and a 401
 *		on one does not refresh.  That rule is what lets the token source
 *		send its own (anonymous) request through this client without
 *		recursion.  While other users are left, a user whose token cannot be
 *		had is reported with a WARNING and skipped from then on (NULL); the
 *		last one left raises the error.
 */
static const char *
client_token(D365Client *client, D365Lane *lane, bool refresh)
{
	const char *token;

	if (client->token == NULL)
		elog(ERROR, "the Dynamics 365 client has no token source");
	token = client->token(client, lane, refresh, live_lanes(client) > 1);
	if (token == NULL)
	{
		/* the problem outlives this round's memory: the run reports it */
		lane->problem = MemoryContextStrdup(client->cxt,
											lane->problem ? lane->problem : "no token");
		lane->dead = true;
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("application user %s is skipped: no access token", lane->client_id),
				 errdetail_internal("%s", lane->problem ? lane->problem : "no token"),
				 errhint("Check its row in d365.app_users (or the settings' credentials); d365_whoami_all() checks every application user.")));
	}
	return token;
}

/*
 * d365_op_make
 *		A new operation.  path is relative to the service root, or absolute.
 *		body is JSON text or NULL.
 */
D365Op *
d365_op_make(const char *method, const char *path, const char *body)
{
	D365Op	   *op = palloc0(sizeof(D365Op));

	op->method = method;
	op->path = pstrdup(path);
	op->body = body ? pstrdup(body) : NULL;
	return op;
}

static bool
is_absolute(const char *path)
{
	return strncmp(path, "https://", 8) == 0 || strncmp(path, "http://", 7) == 0;
}

/*
 * d365_uri_escape
 *		Percent-encode everything but RFC 3986 unreserved characters.
 */
char *
d365_uri_escape(const char *s)
{
	StringInfoData buf;
	const unsigned char *p;

	initStringInfo(&buf);
	for (p = (const unsigned char *) s; *p; p++)
	{
		if ((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
			(*p >= '0' && *p <= '9') || *p == '-' || *p == '.' ||
			*p == '_' || *p == '~')
			appendStringInfoChar(&buf, (char) *p);
		else
			appendStringInfo(&buf, "%%%02X", *p);
	}
	return buf.data;
}

static bool
content_type_is_json(const char *ct)
{
	return ct != NULL && strstr(ct, "json") != NULL;
}

/*
 * parse_error_body
 *		Fill error_code and error_message from a JSON error body, either the
 *		Web API's {"error":{"code","message"}} or Entra's {"error":"...",
 *		"error_description":"..."}.
 */
static void
parse_error_body(D365Op *op)
{
	json_t	   *err;

	if (op->json == NULL || !json_is_object(op->json))
		return;
	err = json_object_get(op->json, "error");
	if (json_is_object(err))
	{
		const char *code = d365_json_str(err, "code");
		const char *msg = d365_json_str(err, "message");

		if (code && code[0])
			op->error_code = pstrdup(code);
		if (msg)
			op->error_message = pstrdup(msg);
	}
	else if (json_is_string(err))
	{
		const char *desc = d365_json_str(op->json, "error_description");

		op->error_code = pstrdup(json_string_value(err));
		if (desc)
		{
			/* Entra appends trace and correlation ids after a line break. */
			size_t		len = strcspn(desc, "\r\n");
			const char *trace = strstr(desc, " Trace ID:");

			if (trace != NULL && (size_t) (trace - desc) < len)
				len = trace - desc;
			op->error_message = pnstrdup(desc, len);
		}
	}
}

/*
 * judge_final
 *		Fill in the outcome of an operation whose exchange is final.
 */
static void
judge_final(D365Op *op)
{
	D365HttpRequest *h = op->http;
	char	   *ct;

	op->status = (int) h->status;
	op->ok = false;
	op->json = NULL;
	op->error_code = NULL;
	op->error_message = NULL;
	op->transport_failure = false;

	if (h->transport_error != 0 || h->status == 0)
	{
		op->transport_failure = true;
		op->error_message = h->transport_message ? h->transport_message
			: pstrdup("no response");
		return;
	}

	ct = d365_http_header(h, "Content-Type");
	op->entity_id = d365_http_header(h, "OData-EntityId");

	if (h->response_len > 0 && content_type_is_json(ct))
	{
		json_error_t jerr;

		op->json = d365_json_loadb(h->response, h->response_len, &jerr);
		if (op->json == NULL)
		{
			op->error_message = psprintf("the response is not valid JSON (%s at line %d, column %d)",
										 jerr.text, jerr.line, jerr.column);
			return;
		}
	}

	if (h->status >= 200 && h->status < 300)
	{
		op->ok = true;
		return;
	}

	parse_error_body(op);
	if (op->error_message == NULL)
	{
		if (h->response_len > 0 && !content_type_is_json(ct))
			op->error_message = psprintf("unexpected %s response of %zu bytes",
										 ct ? ct : "untyped", h->response_len);
		else
			op->error_message = psprintf("HTTP status %d", op->status);
	}
}

static bool
transport_error_is_transient(int code)
{
	switch (code)
	{
		case CURLE_OPERATION_TIMEDOUT:
		case CURLE_COULDNT_CONNECT:
		case CURLE_SEND_ERROR:
		case CURLE_RECV_ERROR:
		case CURLE_GOT_NOTHING:
		case CURLE_PARTIAL_FILE:
			return true;
		default:
			return false;
	}
}

/* Back-off before attempt number "attempt" (1-based): 250 ms doubling, +-25%. */
static long
backoff_ms(int attempt)
{
	double		ms = 250.0 * (double) (1 << Min(attempt - 1, 16));

	ms *= 0.75 + 0.5 * pg_prng_double(&pg_global_prng_state);
	return (long) Min(ms, (double) d365_retry_max_wait_ms);
}

/*
 * note_dop_hint
 *		The server's x-ms-dop-hint bounds the requests in flight from now
 *		on (with d365sync.max_parallel).
 */
static void
note_dop_hint(D365Client *client, D365HttpRequest *h)
{
	char	   *hint = d365_http_header(h, "x-ms-dop-hint");

	if (hint != NULL)
	{
		int			v = atoi(hint);

		if (v > 0 && v != client->dop_hint)
		{
			client->dop_hint = v;
			client->dop_limit = Max(1, Min(v, d365_max_parallel));
			d365_governor_cap(client);
		}
	}
}

/*
 * build_http
 *		The HTTP request for an operation: URL, the OData headers, the token.
 */
static D365HttpRequest *
build_http(D365Client *client, D365Op *op, const char *token)
{
	D365HttpRequest *h = palloc0(sizeof(D365HttpRequest));
	List	   *headers = NIL;

	h->method = op->method;
	h->url = is_absolute(op->path) ? op->path
		: psprintf("%s%s", client->service_root, op->path);

	/*
	 * An absolute URL (a next or delta link the server gave) gets the token
	 * only when it points into the organization's Web API: the token must
	 * not go wherever a stored link says.
	 */
	if (!op->anonymous && is_absolute(op->path) &&
		pg_strncasecmp(op->path, client->service_root, strlen(client->service_root)) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("refusing to send the access token outside the organization's Web API"),
				 errdetail("A request URL does not start with %s.", client->service_root),
				 errhint("Check d365.pull_state.delta_link, or DELETE FROM d365.pull_state to take a new baseline.")));

	/* an anonymous operation (a token request) never asks for a token */
	if (!op->anonymous)
	{
		headers = lappend(headers, psprintf("Authorization: Bearer %s", token));
		headers = lappend(headers, "OData-MaxVersion: 4.0");
		headers = lappend(headers, "OData-Version: 4.0");
	}
	headers = lappend(headers, "Accept: application/json");
	if (op->body != NULL)
	{
		h->body = op->body;
		h->body_len = strlen(op->body);
		headers = lappend(headers,
						  psprintf("Content-Type: %s",
								   op->content_type ? op->content_type
								   : "application/json; charset=utf-8"));
	}
	h->headers = list_concat(headers, op->headers);
	return h;
}

/*
 * d365_retry_after_ms
 *		A 429's Retry-After in milliseconds: delta-seconds, at most a day
 *		(more digits than that cannot be read without overflow); -1 when
 *		there is none, or an HTTP-date or anything else (then back off).
 */
long
d365_retry_after_ms(D365HttpRequest *h)
{
	char	   *ra = d365_http_header(h, "Retry-After");

	if (ra != NULL && ra[0] != '\0' && strspn(ra, "0123456789") == strlen(ra))
	{
		const char *digits = ra + strspn(ra, "0");

		return (strlen(digits) > 5 ? 86400L : Min(atol(digits), 86400L)) * 1000L;
	}
	return -1;
}

/*
 * classify
 *		Decide what to do with one operation's exchange: true to send it
 *		again (raising *wait to the back-off it needs), false when the
 *		outcome is final.  A 429 of an application user (paced) needs no
 *		wait here: the governor holds the user until its Retry-After.
 */
static bool
classify(D365Client *client, D365Op *op, D365HttpRequest *h, int *attempts,
		 bool refreshed, bool paced, long *wait, bool *unauthorized)
{
	bool		can_retry = *attempts <= d365_max_retries;

	if (h->transport_error != 0 || h->status == 0)
	{
		if (can_retry && !h->too_large &&
			transport_error_is_transient(h->transport_error))
		{
			*wait = Max(*wait, backoff_ms(*attempts));
			return true;
		}
		return false;
	}
	if (h->status == 401 && !op->anonymous && !refreshed)
	{
		*unauthorized = true;
		(*attempts)--;			/* a token refresh is not a failed attempt */
		return true;
	}
	if (h->status == 429)
	{
		long		ms = d365_retry_after_ms(h);

		if (ms < 0)
			ms = backoff_ms(*attempts);

		if (can_retry && ms <= d365_retry_max_wait_ms)
		{
			if (!paced)
				*wait = Max(*wait, ms);
			return true;
		}
		return false;
	}
	if (h->status == 500 || h->status == 502 || h->status == 503 || h->status == 504)
	{
		if (can_retry)
		{
			*wait = Max(*wait, backoff_ms(*attempts));
			return true;
		}
	}
	return false;
}

/*
 * batchable
 *		Whether an operation may travel inside a $batch: Web API requests
 *		addressed relative to the service root.  Never an anonymous one: a
 *		$batch carries the token.
 */
static bool
batchable(const D365Op *op)
{
	return !op->anonymous && !is_absolute(op->path);
}

/*
 * The state of one d365_client_execute, kept between its rounds: a round
 * sends every operation still pending (in $batches when there are several),
 * then judges what came back; retries go into the next round.
 */
struct D365Sending
{
	D365Client *client;
	D365Op	  **ops;
	int			n;
	int		   *attempts;
	int		   *pending;
	int		   *retry_list;
	int			npending;
	bool		refreshed;

	/* the round in flight */
	bool		batching;
	int			per;			/* operations per exchange */
	int			nex;			/* exchanges */
	int			unsent;			/* pending[unsent..] wait for the next round */
	D365HttpRequest **reqs;
	int		   *exlane;			/* lane of each exchange; -1: anonymous */
	D365HttpCall **calls;		/* one per lane, and one for anonymous */
	D365HttpPacer *pacers;		/* the lanes' governors */
};

/*
 * A round's exchanges go out in waves of the requests the users may have
 * in flight.  When the round is large (at least half of a wave of full
 * batches) and its last wave would be partly empty, its operations are
 * spread evenly over whole waves instead (smaller batches, the same server
 * time), so that the round does not end with a few requests alone while
 * the budget of the others goes unused.  No batch gets smaller than a
 * tenth of d365sync.batch_size.  Small rounds keep full batches: fewer
 * requests, and the time saved would be small.
 */
static void
spread_over_waves(D365Sending *st)
{
	D365Client *client = st->client;
	int			slots = 0;
	int			waves;
	int			per;
	int			l;

	for (l = 0; l < client->nlanes; l++)
		if (!client->lanes[l].dead)
			slots += client->lanes[l].max_parallel;
	if (slots <= 0 || st->nex % slots == 0 ||
		(int64) st->npending * 2 < (int64) slots * st->per)
		return;
	waves = (st->nex + slots - 1) / slots;
	per = (st->npending + waves * slots - 1) / (waves * slots);
	per = Max(per, (st->per + 9) / 10);
	if (per < st->per)
	{
		st->per = per;
		st->nex = (st->npending + per - 1) / per;
	}
}

/* Build and start one round: an exchange per group of pending operations. */
static void
round_start(D365Sending *st)
{
	D365Client *client = st->client;
	D365Op	  **ops = st->ops;
	bool		anonymous = false;
	const char **tokens;
	int		   *caps;
	int			total = 0;
	int			cum = 0;
	int			i;
	int			e;
	int			l;

	st->batching = d365_batch_size > 1 && st->npending > 1;
	for (i = 0; st->batching && i < st->npending; i++)
		st->batching = batchable(ops[st->pending[i]]);
	st->per = st->batching ? d365_batch_size : 1;
	st->nex = (st->npending + st->per - 1) / st->per;

	/*
	 * Before the server has said how many requests it wants in flight
	 * (x-ms-dop-hint), one exchange goes alone -- a tenth of a batch, when
	 * batches are large, so that the answer comes soon; it carries the
	 * hint, and the rest follow in the next round.
	 */
	if (st->client->dop_hint == 0 && st->nex > 1)
	{
		if (st->per >= 20)
			st->per = (st->per + 9) / 10;
		st->nex = 1;
	}
	else if (st->batching)
		spread_over_waves(st);
	st->unsent = Min(st->nex * st->per, st->npending);

	/*
	 * The users to send as, with their tokens.  Each live one gets a
	 * contiguous share of the exchanges in proportion to the requests it
	 * may have in flight, and its own HTTP call bounded by that number.
	 * An anonymous operation (a token request) is sent as nobody.
	 */
	for (i = 0; i < st->unsent && !anonymous; i++)
		anonymous = ops[st->pending[i]]->anonymous;
	tokens = palloc0(sizeof(char *) * client->nlanes);
	caps = palloc0(sizeof(int) * client->nlanes);
	for (l = 0; l < client->nlanes && !anonymous; l++)
	{
		if (!client->lanes[l].dead)
			tokens[l] = client_token(client, &client->lanes[l], false);
		caps[l] = tokens[l] ? client->lanes[l].max_parallel : 0;
		total += caps[l];
	}
	/* users waiting out a 429 get no share while others are free */
	if (total > 0)
	{
		int			free_total = 0;

		for (l = 0; l < client->nlanes && !anonymous; l++)
			if (caps[l] > 0 && !d365_governor_held(&client->lanes[l]))
				free_total += caps[l];
		if (free_total > 0)
		{
			for (l = 0; l < client->nlanes && !anonymous; l++)
				if (caps[l] > 0 && d365_governor_held(&client->lanes[l]))
					caps[l] = 0;
			total = free_total;
		}
	}
	st->pacers = palloc0(sizeof(D365HttpPacer) * client->nlanes);

	st->reqs = palloc(sizeof(D365HttpRequest *) * st->nex);
	st->exlane = palloc(sizeof(int) * st->nex);
	st->calls = palloc0(sizeof(D365HttpCall *) * (client->nlanes + 1));
	e = 0;
	for (l = anonymous ? -1 : 0; l < (anonymous ? 0 : client->nlanes); l++)
	{
		int			start = e;
		int			end;

		if (l < 0)
			end = st->nex;
		else
		{
			cum += caps[l];
			end = (int) (((int64) st->nex * cum + total - 1) / Max(total, 1));
		}
		for (; e < end; e++)
		{
			int			first = e * st->per;
			int			k = Min(st->per, st->unsent - first);

			for (i = first; i < first + k; i++)
				st->attempts[st->pending[i]]++;
			st->exlane[e] = l;
			if (st->batching && k > 1)
				st->reqs[e] = d365_batch_build(client, ops, st->pending + first, k, tokens[l]);
			else
				st->reqs[e] = build_http(client, ops[st->pending[first]],
										 l < 0 ? NULL : tokens[l]);
		}
		if (end > start && l < 0)
			st->calls[0] = d365_http_start(st->reqs + start, end - start,
										   client->dop_limit);
		else if (end > start)
		{
			/* the cap bounds the call; the governor paces it within */
			st->pacers[l].admit = d365_governor_admit;
			st->pacers[l].done = d365_governor_done;
			st->pacers[l].arg = &client->lanes[l];
			st->calls[l + 1] = d365_http_start_paced(st->reqs + start, end - start,
													 client->dop_limit, &st->pacers[l],
													 false);
			client->lanes[l].requests += end - start;
		}
	}
	/* every user's requests go out together */
	d365_http_push(st->calls + 1, client->nlanes);
	client->requests += st->nex;
}

/*
 * Wait for the round in flight and judge it: every operation either gets
 * its final outcome or goes into the next round.  Sleeps the back-off the
 * retries need.  Returns true when another round is needed.
 */
static bool
round_finish(D365Sending *st)
{
	D365Client *client = st->client;
	D365Op	  **ops = st->ops;
	int			nretry = 0;
	long		wait = 0;
	bool	   *unauthorized = palloc0(sizeof(bool) * client->nlanes);
	bool		dummy = false;
	int			e;
	int			i;
	int			l;

	d365_http_wait_many(st->calls, client->nlanes + 1);

	for (e = 0; e < st->nex; e++)
	{
		int			first = e * st->per;
		int			k = Min(st->per, st->unsent - first);
		D365HttpRequest *h = st->reqs[e];
		D365HttpRequest **parts = NULL;
		int			nparts = 0;
		D365Lane   *lane = st->exlane[e] < 0 ? NULL : &client->lanes[st->exlane[e]];
		bool	   *unauth = lane ? &unauthorized[st->exlane[e]] : &dummy;

		note_dop_hint(client, h);
		/* the governor heard of a 429 of the request itself when it came */
		if (h->status == 429)
		{
			client->throttled++;
			if (lane)
				lane->throttled++;
		}
		if (st->batching && k > 1 && h->status == 200 && h->transport_error == 0)
		{
			parts = palloc0(sizeof(D365HttpRequest *) * k);
			nparts = d365_batch_parse(client, h, ops, st->pending + first, k, parts);
		}

		for (i = first; i < first + k; i++)
		{
			int			o = st->pending[i];
			D365Op	   *op = ops[o];

			if (parts == NULL)
				op->http = h;	/* the request itself, or a batch that failed whole */
			else if (i - first < nparts)
				op->http = parts[i - first];
			else
			{
				/* the batch answered without this part: send it again */
				op->http = palloc0(sizeof(D365HttpRequest));
				op->http->method = op->method;
				op->http->url = h->url;
				op->http->transport_error = CURLE_GOT_NOTHING;
				op->http->transport_message = pstrdup("The $batch response has no part for this operation.");
			}
			if (parts != NULL && op->http->status == 429)
			{
				client->throttled++;
				lane->throttled++;
				/* sent when its $batch was */
				op->http->elapsed_ms = h->elapsed_ms;
				d365_governor_throttled(lane, op->http);
			}
			if (classify(client, op, op->http, &st->attempts[o], st->refreshed,
						 lane != NULL, &wait, unauth))
				st->retry_list[nretry++] = o;
			else
				judge_final(op);
		}
	}

	for (l = 0; l < client->nlanes; l++)
	{
		D365Lane   *lane = &client->lanes[l];

		if (unauthorized[l] && !lane->dead)
		{
			(void) client_token(client, lane, true);
			st->refreshed = true;
		}
	}
	if (nretry > 0)
	{
		client->retries += nretry;
		if (wait > 0)
			d365_http_sleep(wait);
	}
	/* what this round did not send goes with the next one */
	for (i = st->unsent; i < st->npending; i++)
		st->retry_list[nretry++] = st->pending[i];
	memcpy(st->pending, st->retry_list, sizeof(int) * nretry);
	st->npending = nretry;
	return nretry > 0;
}

/*
 * d365_client_start
 *		Send the first round of n operations and return without waiting for
 *		the answers, so the caller can do database work meanwhile; finish
 *		with d365_client_finish().  The operations and the returned state
 *		belong to CurrentMemoryContext.
 */
D365Sending *
d365_client_start(D365Client *client, D365Op **ops, int n)
{
	D365Sending *st = palloc0(sizeof(D365Sending));
	int			i;

	st->client = client;
	st->ops = ops;
	st->n = n;
	st->attempts = palloc0(sizeof(int) * Max(n, 1));
	st->pending = palloc(sizeof(int) * Max(n, 1));
	st->retry_list = palloc(sizeof(int) * Max(n, 1));
	/* nothing is sent when one path would leave the Web API */
	for (i = 0; i < n; i++)
		d365_check_op_path(client, ops[i]);
	for (i = 0; i < n; i++)
		st->pending[i] = i;
	st->npending = n;
	if (n > 0)
		round_start(st);
	return st;
}

/*
 * d365_client_finish
 *		Wait for the operations of d365_client_start and judge each outcome,
 *		retrying what the policy above says to retry.  Every operation ends
 *		with ok set, or with status/error_* describing the failure.  Raises
 *		only for interrupts, token failures and internal errors.
 */
void
d365_client_finish(D365Sending *st)
{
	if (st->n == 0)
		return;
	while (round_finish(st))
		round_start(st);
}

/*
 * d365_client_progress
 *		Move the round in flight of d365_client_start along without waiting
 *		(d365_http_progress); judging, retries and back-off stay with
 *		d365_client_finish().
 */
void
d365_client_progress(D365Sending *st)
{
	if (st != NULL && st->n > 0 && st->calls != NULL)
		d365_http_progress(st->calls, st->client->nlanes + 1);
}

/*
 * d365_client_execute
 *		Send n operations and judge each outcome (d365_client_start and
 *		d365_client_finish in one).  Operations travel in $batch requests of
 *		up to d365sync.batch_size parts when there are several of them, else
 *		one request each; each application user has at most its bound of
 *		requests in flight (see the top of this file).
 */
void
d365_client_execute(D365Client *client, D365Op **ops, int n)
{
	d365_client_finish(d365_client_start(client, ops, n));
}

/*
 * d365_client_call
 *		One operation that must succeed: returns its parsed JSON body (NULL
 *		when it had none) or raises the failure as an ERROR.
 */
json_t *
d365_client_call(D365Client *client, const char *method, const char *path,
				 const char *body)
{
	D365Op	   *op = d365_op_make(method, path, body);

	d365_client_execute(client, &op, 1);
	if (!op->ok)
		d365_op_report(op, ERROR);
	return op->json;
}

/*
 * d365_op_summary
 *		A one-line description of a failed operation, for tables that record
 *		failures: "HTTP 404 0x80040217: contact With Id = ... Does Not Exist".
 */
char *
d365_op_summary(const D365Op *op)
{
	if (op->transport_failure)
		return psprintf("transport: %s", op->error_message);
	if (op->error_code)
		return psprintf("HTTP %d %s: %s", op->status, op->error_code,
						op->error_message ? op->error_message : "");
	return psprintf("HTTP %d: %s", op->status,
					op->error_message ? op->error_message : "");
}

static bool
transport_is_tls(int code)
{
	return code == CURLE_PEER_FAILED_VERIFICATION ||
		code == CURLE_SSL_CONNECT_ERROR ||
		code == CURLE_SSL_CACERT_BADFILE ||
		code == CURLE_SSL_CERTPROBLEM;
}

/*
 * d365_op_report
 *		ereport a failed operation at elevel.  The request is named by method
 *		and path only.
 */
void
d365_op_report(D365Op *op, int elevel)
{
	D365HttpRequest *h = op->http;
	const char *url = h ? h->url : op->path;
	const char *path;
	const char *slash;
	int			sqlstate;

	/* method and path for errcontext, never the host's credentials or body */
	slash = strstr(url, "://");
	slash = slash ? strchr(slash + 3, '/') : NULL;
	path = slash ? slash : url;

	if (op->transport_failure)
	{
		int			code = h ? h->transport_error : 0;

		ereport(elevel,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not complete the request to Dynamics 365"),
				 errdetail_internal("%s", op->error_message),
				 transport_is_tls(code) ?
				 errhint("The server's TLS certificate could not be verified. If it is signed by a private CA, set d365sync.ca_file to that CA's bundle.") :
				 code == CURLE_OPERATION_TIMEDOUT ?
				 errhint("Raise d365sync.request_timeout_ms or d365sync.connect_timeout_ms if the server is slow.") : 0,
				 errcontext("Dynamics 365 request: %s %s", op->method, path)));
		return;
	}

	if (op->status == 401 || op->status == 403)
		sqlstate = ERRCODE_INSUFFICIENT_PRIVILEGE;
	else if (op->status == 429)
		sqlstate = ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;
	else if (op->status >= 200 && op->status < 300)
		sqlstate = ERRCODE_PROTOCOL_VIOLATION;	/* a 2xx we could not read */
	else
		sqlstate = ERRCODE_EXTERNAL_ROUTINE_EXCEPTION;

	ereport(elevel,
			(errcode(sqlstate),
			 errmsg_internal("Dynamics 365: %s", op->error_message),
			 op->error_code ?
			 errdetail("HTTP status %d, Dynamics error code %s.", op->status, op->error_code) :
			 errdetail("HTTP status %d.", op->status),
			 op->status == 401 ?
			 errhint("Make sure the application user exists in Dataverse and has a security role.") :
			 op->status == 403 ?
			 errhint("The application user lacks a privilege; check its security roles.") : 0,
			 errcontext("Dynamics 365 request: %s %s", op->method, path)));
}
