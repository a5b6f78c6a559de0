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
 *	 - x-ms-dop-hint bounds the requests in flight (with d365sync.max_parallel).
 *
 * Waits are interruptible (d365_http_sleep).  The number of attempts is
 * bounded by d365sync.max_retries and a single wait by
 * d365sync.retry_max_wait; an operation that would need more stays failed
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
 * d365_client_open
 *		Load the settings (as the settings table's owner), check that a
 *		connection is configured, and prepare a client for this SQL call.
 *		No request is made here.
 */
D365Client *
d365_client_open(void)
{
	D365Client *client = palloc0(sizeof(D365Client));

	client->settings = d365_settings_load();
	d365_settings_require_connection(client->settings);
	client->service_path = psprintf("/api/data/%s/", client->settings->api_version);
	client->service_root = psprintf("%s%s", client->settings->org_url,
									client->service_path);
	client->max_parallel = d365_max_parallel;
	return client;
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

		if (v > 0)
		{
			client->dop_hint = v;
			client->max_parallel = Max(1, Min(v, d365_max_parallel));
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

	if (!op->anonymous)
	{
		headers = lappend(headers, psprintf("Authorization: Bearer %s",
											d365_auth_token(client, false)));
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
 * d365_client_execute
 *		Send n operations (in parallel, up to the client's bound) and judge
 *		each outcome, retrying what the policy above says to retry.  Every
 *		operation ends with ok set, or with status/error_* describing the
 *		failure.  Raises only for interrupts, token failures and internal
 *		errors.
 */
void
d365_client_execute(D365Client *client, D365Op **ops, int n)
{
	int		   *attempts = palloc0(sizeof(int) * n);
	int		   *pending = palloc(sizeof(int) * n);
	int			npending = n;
	bool		refreshed = false;
	int			i;

	for (i = 0; i < n; i++)
		pending[i] = i;

	while (npending > 0)
	{
		D365HttpRequest **reqs = palloc(sizeof(D365HttpRequest *) * npending);
		int			nretry = 0;
		long		wait = 0;
		bool		unauthorized = false;

		for (i = 0; i < npending; i++)
		{
			D365Op	   *op = ops[pending[i]];

			op->http = reqs[i] = build_http(client, op);
			attempts[pending[i]]++;
		}
		d365_http_execute(reqs, npending, client->max_parallel);
		client->requests += npending;

		for (i = 0; i < npending; i++)
		{
			int			k = pending[i];
			D365Op	   *op = ops[k];
			D365HttpRequest *h = op->http;
			bool		retry = false;
			bool		can_retry = attempts[k] <= d365_max_retries;

			note_dop_hint(client, h);

			if (h->transport_error != 0 || h->status == 0)
			{
				if (can_retry && !h->too_large &&
					transport_error_is_transient(h->transport_error))
				{
					retry = true;
					wait = Max(wait, backoff_ms(attempts[k]));
				}
			}
			else if (h->status == 401 && !op->anonymous && !refreshed)
			{
				retry = true;
				unauthorized = true;
				attempts[k]--;	/* a token refresh is not a failed attempt */
			}
			else if (h->status == 429)
			{
				char	   *ra = d365_http_header(h, "Retry-After");
				long		ms = ra ? atol(ra) * 1000L : backoff_ms(attempts[k]);

				client->throttled++;
				client->max_parallel = Max(1, client->max_parallel / 2);
				if (can_retry && ms <= d365_retry_max_wait_ms)
				{
					retry = true;
					wait = Max(wait, ms);
				}
			}
			else if (h->status == 500 || h->status == 502 ||
					 h->status == 503 || h->status == 504)
			{
				if (can_retry)
				{
					retry = true;
					wait = Max(wait, backoff_ms(attempts[k]));
				}
			}

			if (retry)
				pending[nretry++] = k;
			else
				judge_final(op);
		}

		if (unauthorized)
		{
			(void) d365_auth_token(client, true);
			refreshed = true;
		}
		if (nretry > 0)
		{
			client->retries += nretry;
			if (wait > 0)
				d365_http_sleep(wait);
		}
		npending = nretry;
	}
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
