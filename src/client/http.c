/*-------------------------------------------------------------------------
 *
 * http.c
 *	  libcurl transport: every byte d365sync sends or receives passes here.
 *
 * Design notes
 *
 * - One curl multi handle per backend, made on first use and kept until the
 *	 backend exits.  Its connection cache keeps connections to Dynamics and
 *	 the token authority alive between calls and between statements, so a
 *	 run pays for TCP and TLS set-up once.
 *
 * - d365_http_execute() runs a list of requests with up to max_parallel of
 *	 them in flight.  A single request is the list of one.  Easy handles are
 *	 made per request (cheap; connections live in the multi's cache).
 *	 d365_http_start() and d365_http_wait() split it in two, so a caller can
 *	 do database work while the server answers; calls in flight at once
 *	 share the multi handle, and each transfer knows its call.
 *
 * - The wait loop is ours: curl_multi_poll() for at most 100 ms, then
 *	 CHECK_FOR_INTERRUPTS().  So statement_timeout and pg_cancel_backend()
 *	 end a transfer within about 100 ms with the standard SQLSTATE 57014,
 *	 and no PostgreSQL error is ever thrown from inside a libcurl callback.
 *	 The same loop, and every start of a call, looks for the postmaster: if
 *	 it died, the process exits (FATAL) before sending anything more, so a
 *	 backlog being sent never outlives the server by more than that
 *	 100 ms and never holds up its restart.
 *	 While it waits, and during a back-off (d365_http_sleep, on the latch),
 *	 the backend reports the wait event Extension, so pg_stat_activity
 *	 shows a run waiting on the network as waiting, not as busy.
 *	 Callbacks only copy bytes; they allocate with NO_OOM and report failure
 *	 by returning a short count, which makes libcurl stop the transfer.
 *
 * - A call may have a pacer (d365_http_start_paced): the caller's
 *	 throttling governor, asked before each of its requests starts and told
 *	 each outcome the moment it is in, so that a 429 holds back the rest of
 *	 the call at once rather than after the call.
 *
 * - Ownership: the easy handles and header lists of a call belong to a
 *	 memory context made for that call, through a reset callback.  When an
 *	 ERROR (a cancel, say) unwinds, the context goes and the callback detaches
 *	 the handles from the multi handle and frees them.  (The call's context
 *	 is a child of the caller's, so it goes before the response buffers
 *	 the transfers write into.)
 *
 * - Nothing is sent from a server in recovery (a hot standby): whatever a
 *	 sync sends must be recorded, and a standby cannot write.  Every call
 *	 refuses there (d365_http_require_primary), and so do the run and the
 *	 client before them, so the refusal comes before the first request.
 *
 * - Policy, enforced for every request: http and https only, no redirects,
 *	 TLS peer and host always verified (d365sync.ca_file adds a CA bundle),
 *	 plain http only to a loopback host, connect and total timeouts, and a
 *	 cap on the response size.
 *
 * - This file never logs or reports headers or bodies: the Authorization
 *	 header and token request bodies carry secrets.  Callers build error
 *	 messages from the method and URL path only.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "d365sync.h"
#include "http.h"

#include "access/xlog.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "portability/instr_time.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "utils/memutils.h"

#define D365_USER_AGENT "d365sync/0.2"
#define MAX_RESPONSE_HEADERS (256 * 1024)

/* A growable byte buffer that never throws (used from libcurl callbacks). */
typedef struct HttpBuffer
{
	MemoryContext cxt;
	char	   *data;
	size_t		len;
	size_t		cap;
	size_t		limit;
	bool		overflow;		/* limit reached */
	bool		oom;			/* allocation failed */
} HttpBuffer;

/* What one transfer needs while it runs. */
typedef struct HttpCall HttpCall;

typedef struct HttpTransfer
{
	HttpCall   *call;
	D365HttpRequest *req;
	CURL	   *easy;
	struct curl_slist *headers;
	bool		attached;		/* added to the multi handle */
	HttpBuffer	body;
	HttpBuffer	head;
	instr_time	started;
	char		errbuf[CURL_ERROR_SIZE];
} HttpTransfer;

/* One call: requests started together and waited for together. */
struct HttpCall
{
	MemoryContext resp_cxt;		/* the caller's context: response buffers */
	MemoryContext cxt;			/* the call's own bookkeeping */
	HttpTransfer *transfers;
	int			n;
	int			next;			/* first transfer not started yet */
	int			running;
	int			done;
	int			max_parallel;
	D365HttpPacer pacer;		/* admit and done hooks, or none */
	long		held_ms;		/* the pacer held the next start this long */
	MemoryContextCallback cb;
};

static CURLM *multi_handle = NULL;

/*
 * d365_http_init
 *		libcurl's global initialisation; called once from _PG_init.
 */
void
d365_http_init(void)
{
	CURLcode	rc = curl_global_init(CURL_GLOBAL_ALL);

	if (rc != CURLE_OK)
		elog(ERROR, "curl_global_init failed: %s", curl_easy_strerror(rc));
}

/*
 * buffer_append
 *		Append without throwing; false when the limit or memory ran out.
 */
static bool
buffer_append(HttpBuffer *buf, const char *data, size_t len)
{
	if (buf->len + len > buf->limit)
	{
		buf->overflow = true;
		return false;
	}
	if (buf->len + len + 1 > buf->cap)
	{
		size_t		newcap = Max(buf->cap * 2, buf->len + len + 1);
		char	   *grown;

		newcap = Max(newcap, 1024);
		grown = MemoryContextAllocExtended(buf->cxt, newcap,
										   MCXT_ALLOC_NO_OOM | MCXT_ALLOC_HUGE);
		if (grown == NULL)
		{
			buf->oom = true;
			return false;
		}
		if (buf->data != NULL)
		{
			memcpy(grown, buf->data, buf->len);
			pfree(buf->data);
		}
		buf->data = grown;
		buf->cap = newcap;
	}
	memcpy(buf->data + buf->len, data, len);
	buf->len += len;
	buf->data[buf->len] = '\0';
	return true;
}

static size_t
write_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	HttpTransfer *t = (HttpTransfer *) userdata;
	size_t		len = size * nmemb;

	return buffer_append(&t->body, ptr, len) ? len : 0;
}

static size_t
write_header(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	HttpTransfer *t = (HttpTransfer *) userdata;
	size_t		len = size * nmemb;

	/* A new status line starts a new header block (after 100 Continue). */
	if (len >= 5 && strncmp(ptr, "HTTP/", 5) == 0)
		t->head.len = 0;
	return buffer_append(&t->head, ptr, len) ? len : 0;
}

/*
 * release_call
 *		Memory-context reset callback: detach and free every curl object of
 *		a call.  Runs on normal completion and when an ERROR unwinds.
 */
static void
release_call(void *arg)
{
	HttpCall   *call = (HttpCall *) arg;
	int			i;

	for (i = 0; i < call->n; i++)
	{
		HttpTransfer *t = &call->transfers[i];

		if (t->easy != NULL)
		{
			if (t->attached && multi_handle != NULL)
				curl_multi_remove_handle(multi_handle, t->easy);
			curl_easy_cleanup(t->easy);
			t->easy = NULL;
			t->attached = false;
		}
		if (t->headers != NULL)
		{
			curl_slist_free_all(t->headers);
			t->headers = NULL;
		}
	}
}

/*
 * host_is_loopback
 *		127.0.0.1, ::1 and localhost, the hosts plain http is allowed for.
 */
static bool
host_is_loopback(const char *host)
{
	return pg_strcasecmp(host, "localhost") == 0 ||
		strcmp(host, "127.0.0.1") == 0 ||
		strcmp(host, "[::1]") == 0 ||
		strcmp(host, "::1") == 0;
}

/*
 * d365_http_url_problem
 *		Why url may not be used (palloc'd text), or NULL when it may: it must
 *		be an absolute http or https URL without user name or password, and
 *		http only to a loopback host.  Used for the settings (write time) and
 *		for every request (send time).
 */
char *
d365_http_url_problem(const char *url)
{
	CURLU	   *u = curl_url();
	char	   *scheme = NULL;
	char	   *host = NULL;
	char	   *user = NULL;
	char	   *problem = NULL;

	if (u == NULL)
		return pstrdup("out of memory");

	if (curl_url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME) != CURLUE_OK ||
		curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
		curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK)
		problem = pstrdup("it is not an absolute URL");
	else if (curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK)
		problem = pstrdup("it must not contain a user name or password");
	else if (pg_strcasecmp(scheme, "https") == 0)
		problem = NULL;
	else if (pg_strcasecmp(scheme, "http") == 0)
	{
		if (!host_is_loopback(host))
			problem = pstrdup("http:// is accepted only for a loopback host; use https://");
	}
	else
		problem = psprintf("the scheme \"%s\" is not supported; use https://", scheme);

	curl_free(scheme);
	curl_free(host);
	curl_free(user);
	curl_url_cleanup(u);
	return problem;
}

#define SETOPT(easy, opt, val) \
	do { \
		if (curl_easy_setopt((easy), (opt), (val)) != CURLE_OK) \
			elog(ERROR, "curl_easy_setopt(%s) failed", #opt); \
	} while (0)

/*
 * start_transfer
 *		Make the easy handle for one request and add it to the multi handle.
 *		May ERROR (bad URL, out of memory); the call's reset callback then
 *		frees what was made.
 */
static void
start_transfer(HttpCall *call, int i)
{
	HttpTransfer *t = &call->transfers[i];
	D365HttpRequest *req = t->req;
	char	   *problem;
	ListCell   *lc;
	CURLMcode	mrc;

	problem = d365_http_url_problem(req->url);
	if (problem != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("refusing to send a request to this URL: %s", problem),
				 errhint("Check org_url and authority_url in d365.settings.")));

	t->body.cxt = t->head.cxt = call->resp_cxt;
	t->body.limit = (size_t) d365_max_response_kb * 1024;
	t->head.limit = MAX_RESPONSE_HEADERS;

	t->easy = curl_easy_init();
	if (t->easy == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("curl_easy_init() failed.")));

	SETOPT(t->easy, CURLOPT_PRIVATE, (void *) t);
	SETOPT(t->easy, CURLOPT_URL, req->url);
	SETOPT(t->easy, CURLOPT_NOSIGNAL, 1L);
	SETOPT(t->easy, CURLOPT_PROTOCOLS_STR, "http,https");
	SETOPT(t->easy, CURLOPT_FOLLOWLOCATION, 0L);
	SETOPT(t->easy, CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_1_1);
	SETOPT(t->easy, CURLOPT_SSL_VERIFYPEER, 1L);
	SETOPT(t->easy, CURLOPT_SSL_VERIFYHOST, 2L);
	if (d365_ca_file != NULL && d365_ca_file[0] != '\0')
		SETOPT(t->easy, CURLOPT_CAINFO, d365_ca_file);
	SETOPT(t->easy, CURLOPT_CONNECTTIMEOUT_MS, (long) d365_connect_timeout_ms);
	SETOPT(t->easy, CURLOPT_TIMEOUT_MS, (long) d365_request_timeout_ms);
	SETOPT(t->easy, CURLOPT_TCP_KEEPALIVE, 1L);
	SETOPT(t->easy, CURLOPT_ACCEPT_ENCODING, "");
	SETOPT(t->easy, CURLOPT_USERAGENT, D365_USER_AGENT);
	SETOPT(t->easy, CURLOPT_ERRORBUFFER, t->errbuf);
	SETOPT(t->easy, CURLOPT_WRITEFUNCTION, write_body);
	SETOPT(t->easy, CURLOPT_WRITEDATA, (void *) t);
	SETOPT(t->easy, CURLOPT_HEADERFUNCTION, write_header);
	SETOPT(t->easy, CURLOPT_HEADERDATA, (void *) t);

	/* "Expect:" stops libcurl waiting for 100 Continue on large bodies. */
	t->headers = curl_slist_append(NULL, "Expect:");
	foreach(lc, req->headers)
	{
		struct curl_slist *more = curl_slist_append(t->headers, (char *) lfirst(lc));

		if (more == NULL)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		t->headers = more;
	}
	if (t->headers == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	SETOPT(t->easy, CURLOPT_HTTPHEADER, t->headers);

	if (strcmp(req->method, "GET") == 0)
		SETOPT(t->easy, CURLOPT_HTTPGET, 1L);
	else
	{
		SETOPT(t->easy, CURLOPT_POSTFIELDSIZE_LARGE,
			   (curl_off_t) (req->body ? req->body_len : 0));
		SETOPT(t->easy, CURLOPT_POSTFIELDS, req->body ? req->body : "");
		if (strcmp(req->method, "POST") != 0)
			SETOPT(t->easy, CURLOPT_CUSTOMREQUEST, req->method);
	}

	t->call = call;
	INSTR_TIME_SET_CURRENT(t->started);
	mrc = curl_multi_add_handle(multi_handle, t->easy);
	if (mrc != CURLM_OK)
		elog(ERROR, "curl_multi_add_handle failed: %s", curl_multi_strerror(mrc));
	t->attached = true;
}

/*
 * finish_transfer
 *		Copy a finished transfer's outcome into its request, then free its
 *		curl objects (its buffers stay: they are the response).
 */
static void
finish_transfer(HttpTransfer *t, CURLcode result)
{
	D365HttpRequest *req = t->req;
	long		status = 0;
	instr_time	now;
	MemoryContext old;

	curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
	INSTR_TIME_SET_CURRENT(now);
	INSTR_TIME_SUBTRACT(now, t->started);
	req->elapsed_ms = INSTR_TIME_GET_MILLISEC(now);

	/*
	 * Everything written into the request goes to its call's response
	 * context: pump() may finish this transfer while another call is being
	 * waited for, in whatever context that caller has current.
	 */
	old = MemoryContextSwitchTo(t->call->resp_cxt);
	req->status = status;
	req->transport_error = (int) result;
	req->too_large = t->body.overflow;
	if (result != CURLE_OK)
	{
		if (t->body.overflow)
			req->transport_message = psprintf("The response is larger than d365sync.max_response_size (%d kB).",
											  d365_max_response_kb);
		else if (t->body.oom || t->head.oom)
			req->transport_message = pstrdup("Out of memory while receiving the response.");
		else if (t->head.overflow)
			req->transport_message = pstrdup("The response headers are too large.");
		else
			req->transport_message = pstrdup(t->errbuf[0] ? t->errbuf : curl_easy_strerror(result));
	}
	req->response = t->body.data ? t->body.data : pstrdup("");
	req->response_len = t->body.len;
	req->response_headers = t->head.data ? t->head.data : pstrdup("");
	req->response_headers_len = t->head.len;
	MemoryContextSwitchTo(old);

	curl_multi_remove_handle(multi_handle, t->easy);
	t->attached = false;
	curl_easy_cleanup(t->easy);
	t->easy = NULL;
	curl_slist_free_all(t->headers);
	t->headers = NULL;
}

/*
 * d365_http_require_primary
 *		ERROR on a server in recovery (a hot standby): nothing is sent to
 *		Dynamics from there.  Cheap; called before every call, and by the
 *		run and the client before their first request.
 */
void
d365_http_require_primary(void)
{
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("d365sync sends nothing to Dynamics 365 from a server in recovery"),
				 errdetail("This server is a hot standby or is still recovering: what a sync sends must be recorded here, and nothing can be written."),
				 errhint("Run the sync on the primary server; d365_status() on this one shows the settings and the queue.")));
}

/*
 * exit_if_orphaned
 *		The postmaster is gone (killed, crashed): exit now, sending nothing
 *		more, so that the server can be started again at once.  FATAL, not
 *		ERROR: no caller may catch it and go on sending.
 */
static void
exit_if_orphaned(void)
{
	if (!PostmasterIsAlive())
		ereport(FATAL,
				(errcode(ERRCODE_ADMIN_SHUTDOWN),
				 errmsg("terminating connection due to unexpected postmaster exit"),
				 errdetail("d365sync stopped sending to Dynamics 365; what was not recorded stays pending.")));
}

/*
 * Start transfers of a call up to its bound on requests in flight, as far
 * as its pacer admits them.
 */
static void
fill(HttpCall *call)
{
	call->held_ms = 0;
	if (call->next < call->n)
		exit_if_orphaned();
	while (call->running < call->max_parallel && call->next < call->n)
	{
		if (call->pacer.admit != NULL)
		{
			long		hold = call->pacer.admit(call->pacer.arg);

			if (hold > 0)
			{
				call->held_ms = hold;
				break;
			}
		}
		start_transfer(call, call->next++);
		call->running++;
	}
}

/*
 * pump
 *		Let libcurl move every transfer of every call along, without
 *		waiting, and finish those that are done (whichever call they
 *		belong to).
 */
static void
pump(void)
{
	int			still_running;
	CURLMsg    *msg;
	int			queued;
	CURLMcode	mrc;

	mrc = curl_multi_perform(multi_handle, &still_running);
	if (mrc != CURLM_OK)
		elog(ERROR, "curl_multi_perform failed: %s", curl_multi_strerror(mrc));

	while ((msg = curl_multi_info_read(multi_handle, &queued)) != NULL)
	{
		HttpTransfer *t = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &t);
		if (t == NULL || t->easy != msg->easy_handle)
			continue;			/* cannot happen */
		finish_transfer(t, msg->data.result);
		t->call->running--;
		t->call->done++;
		if (t->call->pacer.done != NULL)
			t->call->pacer.done(t->req, t->call->pacer.arg);
	}
}

/* Whether a started transfer has handed its whole request to the kernel. */
static bool
transfer_sent(HttpTransfer *t)
{
	curl_off_t	uploaded = 0;
	long		header_bytes = 0;

	if (t->easy == NULL)
		return true;			/* finished already */
	curl_easy_getinfo(t->easy, CURLINFO_REQUEST_SIZE, &header_bytes);
	curl_easy_getinfo(t->easy, CURLINFO_SIZE_UPLOAD_T, &uploaded);
	return header_bytes > 0 &&
		(t->req->body == NULL || (size_t) uploaded >= t->req->body_len);
}

/*
 * d365_http_start
 *		Start n requests, at most max_parallel at a time, and return at once
 *		(after pushing the requests out, for up to 50 ms), so the caller can
 *		do other work while the server answers.  d365_http_wait() completes
 *		the call.  Several calls may be in flight; they share the backend's
 *		connections.  The call belongs to CurrentMemoryContext: if that goes
 *		(an ERROR), its transfers are cancelled and freed.  Response buffers
 *		are allocated in that context too.
 */
D365HttpCall *
d365_http_start(D365HttpRequest **reqs, int n, int max_parallel)
{
	return d365_http_start_paced(reqs, n, max_parallel, NULL, true);
}

/*
 * d365_http_start_paced
 *		d365_http_start, each request started only when pacer admits it
 *		(see D365HttpPacer; NULL: no pacer).  Without push it returns as
 *		soon as the requests are started: the caller pushes several calls
 *		out together with d365_http_push().
 */
D365HttpCall *
d365_http_start_paced(D365HttpRequest **reqs, int n, int max_parallel,
					  const D365HttpPacer *pacer, bool push)
{
	HttpCall   *call;
	MemoryContext cxt;
	int			i;

	d365_http_require_primary();
	exit_if_orphaned();
	if (multi_handle == NULL)
	{
		multi_handle = curl_multi_init();
		if (multi_handle == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory"),
					 errdetail("curl_multi_init() failed.")));
	}

	/*
	 * Response buffers live in the caller's context; the call's bookkeeping
	 * lives in a child context whose reset callback frees the curl objects.
	 */
	cxt = AllocSetContextCreate(CurrentMemoryContext, "d365sync http call",
								ALLOCSET_SMALL_SIZES);
	call = MemoryContextAllocZero(cxt, sizeof(HttpCall));
	call->resp_cxt = CurrentMemoryContext;
	call->cxt = cxt;
	call->n = n;
	call->max_parallel = Max(max_parallel, 1);
	if (pacer != NULL)
		call->pacer = *pacer;
	call->transfers = MemoryContextAllocZero(cxt, sizeof(HttpTransfer) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		call->transfers[i].req = reqs[i];
		reqs[i]->status = 0;
		reqs[i]->transport_error = 0;
		reqs[i]->transport_message = NULL;
		reqs[i]->too_large = false;
	}
	call->cb.func = release_call;
	call->cb.arg = call;
	MemoryContextRegisterResetCallback(cxt, &call->cb);

	/* send what can be sent now: the server starts on it while we wait */
	fill(call);
	if (push)
		d365_http_push((D365HttpCall **) &call, 1);
	return (D365HttpCall *) call;
}

/*
 * d365_http_push
 *		Push the requests the calls have started out to the server, for up
 *		to 50 ms, and return (NULL entries are skipped).  Calls started
 *		together are pushed together, so none waits for another's.
 */
void
d365_http_push(D365HttpCall **handles, int ncalls)
{
	int			spins;

	for (spins = 0; spins < 50; spins++)
	{
		bool		all_sent = true;
		int			c;
		int			i;

		pump();
		for (c = 0; c < ncalls && all_sent; c++)
		{
			HttpCall   *call = (HttpCall *) handles[c];

			for (i = 0; call != NULL && i < call->next && all_sent; i++)
				all_sent = transfer_sent(&call->transfers[i]);
		}
		if (all_sent)
			break;
		if (curl_multi_poll(multi_handle, NULL, 0, 1, NULL) != CURLM_OK)
			break;
	}
}

/*
 * d365_http_progress
 *		Move the calls along without waiting (NULL entries are skipped):
 *		start what each may start now, let libcurl send and receive what
 *		the sockets hold, and finish the transfers that are done.  For a
 *		caller with database work between the start and the wait of a call
 *		(a page asked for ahead while the page before is recorded): what
 *		the server has answered meanwhile is read between statements, so
 *		the wait finds it mostly in memory.  Never waits, never throws from
 *		libcurl; may ERROR as d365_http_start does (a URL the policy
 *		refuses, out of memory).
 */
void
d365_http_progress(D365HttpCall **handles, int ncalls)
{
	int			c;

	if (multi_handle == NULL)
		return;
	exit_if_orphaned();
	for (c = 0; c < ncalls; c++)
	{
		HttpCall   *call = (HttpCall *) handles[c];

		if (call != NULL && call->done < call->n)
			fill(call);
	}
	pump();
}

/*
 * d365_http_wait
 *		Complete a call from d365_http_start: every request ends with its
 *		outcome filled in.  Transport failures (refused connection, TLS
 *		failure, timeout, oversized response) do not raise: they come back
 *		in the request (status 0 or transport_error set) for the caller to
 *		judge.  Raises on interrupts (query cancel, statement_timeout), on a
 *		URL the policy refuses, and on out-of-memory.
 */
void
d365_http_wait(D365HttpCall *handle)
{
	d365_http_wait_many(&handle, 1);
}

/*
 * d365_http_wait_many
 *		d365_http_wait for several calls at once (NULL entries are skipped):
 *		each call keeps starting its requests while any of them is waited
 *		for, so one call's queue does not stand still while another's ends.
 */
void
d365_http_wait_many(D365HttpCall **handles, int ncalls)
{
	int			c;

	for (;;)
	{
		CURLMcode	mrc;
		int			timeout = 100;
		bool		busy = false;

		CHECK_FOR_INTERRUPTS();
		exit_if_orphaned();
		for (c = 0; c < ncalls; c++)
		{
			HttpCall   *call = (HttpCall *) handles[c];

			if (call != NULL && call->done < call->n)
				fill(call);
		}
		pump();
		for (c = 0; c < ncalls; c++)
		{
			HttpCall   *call = (HttpCall *) handles[c];

			if (call == NULL || call->done >= call->n)
				continue;
			busy = true;
			/* a held start is asked about again when its hold ends */
			if (call->held_ms > 0 && call->held_ms < timeout)
				timeout = (int) call->held_ms;
		}
		if (!busy)
			break;
		pgstat_report_wait_start(PG_WAIT_EXTENSION);
		mrc = curl_multi_poll(multi_handle, NULL, 0, timeout, NULL);
		pgstat_report_wait_end();
		if (mrc != CURLM_OK)
			elog(ERROR, "curl_multi_poll failed: %s", curl_multi_strerror(mrc));
	}
	for (c = 0; c < ncalls; c++)
		if (handles[c] != NULL)
		{
			MemoryContextDelete(((HttpCall *) handles[c])->cxt);
			handles[c] = NULL;
		}
}

/*
 * d365_http_execute
 *		Perform n requests, at most max_parallel at a time, and fill in each
 *		one's outcome (see d365_http_wait).
 */
void
d365_http_execute(D365HttpRequest **reqs, int n, int max_parallel)
{
	if (n > 0)
		d365_http_wait(d365_http_start(reqs, n, max_parallel));
}

/*
 * d365_http_header
 *		Value of response header "name" (case-insensitive; the last one wins),
 *		trimmed and palloc'd, or NULL.
 */
char *
d365_http_header(const D365HttpRequest *req, const char *name)
{
	const char *p = req->response_headers;
	size_t		namelen = strlen(name);
	char	   *found = NULL;

	if (p == NULL)
		return NULL;
	while (*p)
	{
		const char *eol = strchr(p, '\n');
		const char *end = eol ? eol : p + strlen(p);

		if ((size_t) (end - p) > namelen && p[namelen] == ':' &&
			pg_strncasecmp(p, name, namelen) == 0)
		{
			const char *v = p + namelen + 1;
			const char *ve = end;

			while (v < ve && (*v == ' ' || *v == '\t'))
				v++;
			while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
				ve--;
			if (found)
				pfree(found);
			found = pnstrdup(v, ve - v);
		}
		if (!eol)
			break;
		p = eol + 1;
	}
	return found;
}

/*
 * d365_http_sleep
 *		Wait ms milliseconds on the process latch, honouring interrupts
 *		(a cancel during a back-off ends it at once with SQLSTATE 57014).
 */
void
d365_http_sleep(long ms)
{
	instr_time	start;

	INSTR_TIME_SET_CURRENT(start);
	for (;;)
	{
		instr_time	now;
		long		left;

		CHECK_FOR_INTERRUPTS();
		INSTR_TIME_SET_CURRENT(now);
		INSTR_TIME_SUBTRACT(now, start);
		left = ms - (long) INSTR_TIME_GET_MILLISEC(now);
		if (left <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 left, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
