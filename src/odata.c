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
 *	 - 429: honour Retry-After (exponential back-off without it), halve the
 *	   number of requests in flight, count the response, try again;
 *	 - 5xx and transport failures (timeouts, refused or dropped connections):
 *	   retry with bounded exponential back-off and jitter;
 *	 - anything else is final and is described in the operation: HTTP status,
 *	   Dynamics error code and message, or what was wrong with the response
 *	   (not JSON, malformed, too large);
 *	 - several operations travel in $batch requests (d365sync.batch_size
 *	   parts each, Prefer: odata.continue-on-error so each part has its own
 *	   outcome); a part's 429/5xx is retried like a request's;
 *	 - x-ms-dop-hint bounds the requests in flight (with d365sync.max_parallel);
 *	   a 429 halves them, each round without one adds one back.
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
	client->service_path = psprintf("/api/data/%s/", settings->api_version);
	client->service_root = psprintf("%s%s", settings->org_url, client->service_path);
	client->max_parallel = d365_max_parallel;
	client->dop_limit = d365_max_parallel;
	return client;
}

/*
 * client_token
 *		The bearer token for an operation that is not anonymous.  Anonymous
 *		operations never get here: build_http gives them no Authorization
 *		header, batchable() keeps them out of $batch, and a 401 on one does
 *		not refresh.  That rule is what lets the token source send its own
 *		(anonymous) request through this client without recursion.
 */
static const char *
client_token(D365Client *client, bool refresh)
{
	if (client->token == NULL)
		elog(ERROR, "the Dynamics 365 client has no token source");
	return client->token(client, refresh);
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

		op->json = json_loadb(h->response, h->response_len,
							  JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
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
			client->max_parallel = Min(client->max_parallel, client->dop_limit);
		}
	}
}

/*
 * build_http
 *		The HTTP request for an operation: URL, the OData headers, the token.
 */
static D365HttpRequest *
build_http(D365Client *client, D365Op *op)
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
		headers = lappend(headers, psprintf("Authorization: Bearer %s",
											client_token(client, false)));
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
 * classify
 *		Decide what to do with one operation's exchange: true to send it
 *		again (raising *wait to the back-off it needs), false when the
 *		outcome is final.  Counts throttled responses and slows the client
 *		down on them.
 */
static bool
classify(D365Client *client, D365Op *op, D365HttpRequest *h, int *attempts,
		 bool refreshed, long *wait, bool *unauthorized)
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
		char	   *ra = d365_http_header(h, "Retry-After");
		long		ms;

		/* delta-seconds; an HTTP-date or anything else means back off */
		if (ra != NULL && ra[0] != '\0' && strspn(ra, "0123456789") == strlen(ra))
			ms = Min(atol(ra), 86400L) * 1000L;
		else
			ms = backoff_ms(*attempts);

		if (can_retry && ms <= d365_retry_max_wait_ms)
		{
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
 * build_batch
 *		One $batch request carrying ops[idx[0..k-1]] as independent parts,
 *		with Prefer: odata.continue-on-error so that each part gets its own
 *		outcome.  The body is multipart/mixed with CRLF line ends; each part
 *		is an application/http request line (method, path under the service
 *		path), its headers, a blank line and its body.  The response holds
 *		one part per request, in the same order (parse_batch_response).
 */
static D365HttpRequest *
build_batch(D365Client *client, D365Op **ops, const int *idx, int k)
{
	D365HttpRequest *h = palloc0(sizeof(D365HttpRequest));
	StringInfoData body;
	char	   *boundary;
	int			i;

	boundary = psprintf("batch_%08x%08x",
						(unsigned) pg_prng_uint32(&pg_global_prng_state),
						(unsigned) pg_prng_uint32(&pg_global_prng_state));
	initStringInfo(&body);
	for (i = 0; i < k; i++)
	{
		D365Op	   *op = ops[idx[i]];
		ListCell   *lc;

		appendStringInfo(&body,
						 "--%s\r\nContent-Type: application/http\r\n"
						 "Content-Transfer-Encoding: binary\r\n\r\n"
						 "%s %s%s HTTP/1.1\r\n",
						 boundary, op->method, client->service_path, op->path);
		foreach(lc, op->headers)
			appendStringInfo(&body, "%s\r\n", (char *) lfirst(lc));
		if (op->body != NULL)
			appendStringInfo(&body, "Content-Type: application/json; charset=utf-8\r\n\r\n%s\r\n",
							 op->body);
		else
			appendStringInfoString(&body, "\r\n");
	}
	appendStringInfo(&body, "--%s--\r\n", boundary);

	h->method = "POST";
	h->url = psprintf("%s$batch", client->service_root);
	h->body = body.data;
	h->body_len = body.len;
	h->headers = list_make5(psprintf("Authorization: Bearer %s", client_token(client, false)),
							"OData-MaxVersion: 4.0",
							"OData-Version: 4.0",
							"Accept: application/json",
							psprintf("Content-Type: multipart/mixed; boundary=%s", boundary));
	h->headers = lappend(h->headers, "Prefer: odata.continue-on-error");
	return h;
}

/* The next line of buf at *pos (without its CR LF); NULL at the end. */
static char *
next_line(const char *buf, size_t len, size_t *pos)
{
	size_t		start = *pos;
	size_t		end;

	if (start >= len)
		return NULL;
	end = start;
	while (end < len && buf[end] != '\n')
		end++;
	*pos = end < len ? end + 1 : end;
	if (end > start && buf[end - 1] == '\r')
		end--;
	return pnstrdup(buf + start, end - start);
}

/*
 * parse_batch_response
 *		Split a $batch response into the exchanges of its parts, in order:
 *		each becomes a D365HttpRequest with the part's status, headers and
 *		body (method and URL copied from its operation, for error context).
 *		Returns how many parts were found; a malformed response yields 0.
 */
static int
parse_batch_response(D365Client *client, D365HttpRequest *outer, D365Op **ops,
					 const int *idx, int k, D365HttpRequest **parts)
{
	char	   *ct = d365_http_header(outer, "Content-Type");
	char	   *b;
	char	   *delim;
	size_t		dlen;
	const char *buf = outer->response;
	size_t		len = outer->response_len;
	size_t		pos = 0;
	int			found = 0;
	char	   *line;

	if (ct == NULL || (b = strstr(ct, "boundary=")) == NULL)
		return 0;
	b += 9;
	if (*b == '"')
		b++;
	b = pnstrdup(b, strcspn(b, "\";, "));
	delim = psprintf("--%s", b);
	dlen = strlen(delim);

	/* skip the preamble up to the first delimiter */
	while ((line = next_line(buf, len, &pos)) != NULL && strncmp(line, delim, dlen) != 0)
		;
	while (line != NULL && found < k)
	{
		D365HttpRequest *p;
		StringInfoData headers;
		size_t		body_start;
		size_t		body_end;
		size_t		scan;

		if (strcmp(line + dlen, "--") == 0)
			break;				/* the closing delimiter */

		/* MIME headers of the part, up to a blank line */
		while ((line = next_line(buf, len, &pos)) != NULL && line[0] != '\0')
			;
		/* the HTTP status line */
		line = next_line(buf, len, &pos);
		if (line == NULL || strncmp(line, "HTTP/", 5) != 0)
			return found;
		p = palloc0(sizeof(D365HttpRequest));
		p->method = ops[idx[found]]->method;
		p->url = psprintf("%s%s", client->service_root, ops[idx[found]]->path);
		p->status = strtol(strchr(line, ' ') ? strchr(line, ' ') + 1 : "0", NULL, 10);
		/* the part's HTTP headers */
		initStringInfo(&headers);
		while ((line = next_line(buf, len, &pos)) != NULL && line[0] != '\0')
			appendStringInfo(&headers, "%s\r\n", line);
		p->response_headers = headers.data;
		p->response_headers_len = headers.len;
		/* the body runs to the next delimiter */
		body_start = body_end = pos;
		scan = pos;
		line = NULL;
		while (scan < len)
		{
			line = next_line(buf, len, &scan);
			if (strncmp(line, delim, dlen) == 0)
				break;			/* line is the next delimiter */
			body_end = scan;
			line = NULL;
		}
		while (body_end > body_start &&
			   (buf[body_end - 1] == '\n' || buf[body_end - 1] == '\r'))
			body_end--;
		p->response = pnstrdup(buf + body_start, body_end - body_start);
		p->response_len = body_end - body_start;
		pos = scan;
		parts[found++] = p;
	}
	return found;
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
	D365HttpRequest **reqs;
	D365HttpCall *call;
};

/* Build and start one round: an exchange per group of pending operations. */
static void
round_start(D365Sending *st)
{
	D365Op	  **ops = st->ops;
	int			i;
	int			e;

	st->batching = d365_batch_size > 1 && st->npending > 1;
	for (i = 0; st->batching && i < st->npending; i++)
		st->batching = batchable(ops[st->pending[i]]);
	st->per = st->batching ? d365_batch_size : 1;
	st->nex = (st->npending + st->per - 1) / st->per;

	st->reqs = palloc(sizeof(D365HttpRequest *) * st->nex);
	for (e = 0; e < st->nex; e++)
	{
		int			first = e * st->per;
		int			k = Min(st->per, st->npending - first);

		for (i = first; i < first + k; i++)
			st->attempts[st->pending[i]]++;
		if (st->batching && k > 1)
			st->reqs[e] = build_batch(st->client, ops, st->pending + first, k);
		else
			st->reqs[e] = build_http(st->client, ops[st->pending[first]]);
	}
	st->call = d365_http_start(st->reqs, st->nex, st->client->max_parallel);
	st->client->requests += st->nex;
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
	bool		unauthorized = false;
	bool		throttled = false;
	int			e;
	int			i;

	d365_http_wait(st->call);
	st->call = NULL;

	for (e = 0; e < st->nex; e++)
	{
		int			first = e * st->per;
		int			k = Min(st->per, st->npending - first);
		D365HttpRequest *h = st->reqs[e];
		D365HttpRequest **parts = NULL;
		int			nparts = 0;

		note_dop_hint(client, h);
		if (h->status == 429)
		{
			client->throttled++;
			throttled = true;
		}
		if (st->batching && k > 1 && h->status == 200 && h->transport_error == 0)
		{
			parts = palloc0(sizeof(D365HttpRequest *) * k);
			nparts = parse_batch_response(client, h, ops, st->pending + first, k, parts);
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
				throttled = true;
			}
			if (classify(client, op, op->http, &st->attempts[o], st->refreshed,
						 &wait, &unauthorized))
				st->retry_list[nretry++] = o;
			else
				judge_final(op);
		}
	}

	/* the throttling governor: halve on 429, creep back up otherwise */
	if (throttled)
		client->max_parallel = Max(1, client->max_parallel / 2);
	else if (client->max_parallel < client->dop_limit)
		client->max_parallel++;

	if (unauthorized)
	{
		(void) client_token(client, true);
		st->refreshed = true;
	}
	if (nretry > 0)
	{
		client->retries += nretry;
		if (wait > 0)
			d365_http_sleep(wait);
	}
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
 * d365_client_execute
 *		Send n operations and judge each outcome (d365_client_start and
 *		d365_client_finish in one).  Operations travel in $batch requests of
 *		up to d365sync.batch_size parts when there are several of them, else
 *		one request each; up to client->max_parallel requests are in flight.
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
