/*-------------------------------------------------------------------------
 *
 * odata.h
 *	  The Dataverse Web API client: the single place where requests get
 *	  their headers and token, where responses are judged, and where retry,
 *	  token refresh and throttling are decided.  Every feature sends through
 *	  d365_client_execute().
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_ODATA_H
#define D365_ODATA_H

#include "d365_json.h"
#include "datatype/timestamp.h"
#include "http.h"
#include "settings.h"

typedef struct D365Client D365Client;

/*
 * The throttling governor's state of one application user
 * (odata_governor.c): what it has in flight, what the server said of its
 * budget, and the 429 it last met.
 */
/* the trailing window's accounting: slots per window, requests tracked */
#define D365_GOV_SLOTS 64
#define D365_GOV_WINDOW_SLOTS 60
#define D365_GOV_TRACK 64

typedef struct D365Governor
{
	int			inflight;		/* requests of this user in flight now */
	int			wall;			/* the level a 429 met (0: none remembered) */
	TimestampTz wall_at;
	TimestampTz hold_until;		/* nothing goes out before (Retry-After) */
	int			throttled_streak;	/* 429s without a success between */
	TimestampTz changed_at;		/* the level's last change */
	double		mean_ms;		/* moving average of response times */
	/* x-ms-ratelimit-time-remaining-xrm-requests: seconds of execution time */
	bool		has_time_left;	/* the last response said */
	double		time_left;		/* what it said */
	/* x-ms-ratelimit-burst-remaining-xrm-requests; -1 while not said */
	int64		requests_left;
	/*
	 * The trailing window of the execution-time budget (d365sync.budget_
	 * seconds per d365sync.budget_window_seconds), to spend what is unspent
	 * above the sustained level: the durations of this user's requests by
	 * the slot of the window they ended in, the start of each request in
	 * flight, and what the window held before the first answer.
	 */
	double		budget_s;
	double		window_s;
	TimestampTz started_at;		/* the first answer (0: none yet) */
	bool		prior_known;	/* the first answer said the time left */
	double		prior_s;		/* the window's spending it showed */
	int64		slot_id[D365_GOV_SLOTS];
	double		slot_s[D365_GOV_SLOTS];
	int			ntrack;
	TimestampTz track[D365_GOV_TRACK];	/* starts of the requests in flight */
	TimestampTz burst_at;		/* last start above the sustained level */
	double		max_ms;			/* the longest answer so far */
	int			answers;		/* answers so far (not 429s) */
} D365Governor;

/*
 * One application user the client sends as: the one in d365.settings
 * (lane 0) or one of d365.app_users.  Each has its own token and its own
 * throttle state; Dataverse's service-protection limits are per user.
 */
typedef struct D365Lane
{
	D365Client *client;			/* the client it belongs to */
	char	   *client_id;
	char	   *client_secret;
	int			max_parallel;	/* requests it may have in flight (the
								 * governor's level) */
	D365Governor gov;
	bool		dead;			/* no token could be had: skipped */
	char	   *problem;		/* why it is dead, or NULL */
	int64		requests;		/* exchanges sent as this user */
	int64		throttled;		/* 429 responses to this user */
} D365Lane;

/*
 * Where a lane's bearer token comes from: a valid token, a new one when
 * refresh is true.  When missing_ok, a token that cannot be had (Entra
 * refuses, the authority cannot be reached) sets lane->problem and returns
 * NULL; otherwise it is an ERROR.  The client calls it for every operation
 * that is not anonymous and never for an anonymous one, so a token source
 * may itself send anonymous operations through the client (auth.c does)
 * without recursion.
 */
typedef const char *(*D365TokenSource) (D365Client *client, D365Lane *lane,
										bool refresh, bool missing_ok);

/*
 * A connection to one organization for the length of one SQL call, opened
 * by d365_client_open() (auth.h), which sets the settings and the token
 * source.
 */
struct D365Client
{
	D365Settings *settings;
	D365TokenSource token;		/* see D365TokenSource */
	char	   *service_root;	/* {org_url}/api/data/{version}/ */
	char	   *service_path;	/* /api/data/{version}/ */
	MemoryContext cxt;			/* where the client and its lanes live */
	D365Lane   *lanes;			/* lane 0: the settings' application user */
	int			nlanes;
	int			dop_limit;		/* per lane: x-ms-dop-hint and the GUC */
	int			dop_hint;		/* last x-ms-dop-hint seen, 0 if none */

	/* counters for d365.sync_run */
	int64		requests;		/* HTTP exchanges, token requests included */
	int64		throttled;		/* 429 responses */
	int64		retries;		/* requests sent again */
};

/*
 * One Web API operation.  The caller sets method, path (relative to the
 * service root, e.g. "contacts(<id>)"; or an absolute URL), body and extra
 * headers; d365_client_execute sets the outcome.  ok means a 2xx response
 * whose body, if any, parsed.
 */
typedef struct D365Op
{
	const char *method;
	char	   *path;
	char	   *body;			/* JSON text, or NULL */
	List	   *headers;		/* extra "Name: value" lines */
	bool		anonymous;		/* no token asked, no Authorization header:
								 * token requests (see D365TokenSource) */
	const char *content_type;	/* default application/json */

	/* outcome */
	bool		ok;
	int			status;			/* HTTP status; 0 when none arrived */
	char	   *error_code;		/* Dynamics/Entra error code, or NULL */
	char	   *error_message;	/* why it failed, or NULL */
	bool		transport_failure;	/* no usable HTTP response */
	json_t	   *json;			/* parsed body of a JSON response */
	char	   *entity_id;		/* OData-EntityId header, or NULL */
	D365HttpRequest *http;		/* the last exchange */
} D365Op;

extern D365Client *d365_client_init(D365Settings *settings,
									D365TokenSource token);
extern void d365_client_add_lane(D365Client *client, const char *client_id,
								 const char *client_secret);
extern char *d365_client_skipped(D365Client *client);
extern int	d365_client_slots(D365Client *client);
extern D365Op *d365_op_make(const char *method, const char *path, const char *body);
/* in odata_path.c */
extern void d365_check_op_path(const D365Client *client, const D365Op *op);
/* the first round of d365_client_execute in flight (see d365_client_start) */
typedef struct D365Sending D365Sending;

extern void d365_client_execute(D365Client *client, D365Op **ops, int n);
extern D365Sending *d365_client_start(D365Client *client, D365Op **ops, int n);
extern void d365_client_finish(D365Sending *sending);
extern void d365_client_progress(D365Sending *sending);
extern json_t *d365_client_call(D365Client *client, const char *method,
								const char *path, const char *body);
extern void d365_op_report(D365Op *op, int elevel);
extern char *d365_op_summary(const D365Op *op);
extern char *d365_uri_escape(const char *s);
extern long d365_retry_after_ms(D365HttpRequest *h);

/* odata_governor.c: the throttling governor (see there) */
extern void d365_governor_init(D365Lane *lane);
extern void d365_governor_cap(D365Client *client);
extern bool d365_governor_held(D365Lane *lane);
extern long d365_governor_admit(void *lane);
extern void d365_governor_done(D365HttpRequest *req, void *lane);
extern void d365_governor_throttled(D365Lane *lane, D365HttpRequest *h);

/* odata_batch.c: a $batch of ops[idx[0..k-1]], and its response's parts */
extern D365HttpRequest *d365_batch_build(D365Client *client, D365Op **ops,
										 const int *idx, int k, const char *token);
extern int	d365_batch_parse(D365Client *client, D365HttpRequest *outer,
							 D365Op **ops, const int *idx, int k,
							 D365HttpRequest **parts);

/*
 * odata_pages.c: GET a path and every page after it (@odata.nextLink).
 * d365_pages_next() sends the next GET and returns its operation, judged
 * like any other (the caller reports a failure or restarts); NULL once a
 * page had no next link.  Each page lives in cxt, which is reset when the
 * next page is fetched: do per-page work in it, copy out what must stay.
 */
typedef struct D365Pages
{
	D365Client *client;
	const char *prefer;			/* Prefer: preferences before maxpagesize */
	int			max_pages;		/* ERROR past this many pages; 0: no limit */
	int			page_size;		/* odata.maxpagesize; 0: d365sync.page_size */
	int			pages;			/* pages fetched so far */
	char	   *path;			/* the current page's path (in cxt) */
	char	   *next;			/* the next page's path, or NULL */
	D365Op	   *op;				/* the current page (in cxt), or NULL */
	MemoryContext cxt;			/* the current page's memory */
	MemoryContext owner_cxt;	/* where next lives */
	/* the page asked for ahead (d365_pages_prefetch), or NULL */
	D365Sending *sending;
	D365Op	   *ahead;
	MemoryContext ahead_cxt;	/* its memory */
	/* hashes of the next links followed so far (in owner_cxt) */
	uint64	   *links;
	int			nlinks;
	int			maxlinks;
} D365Pages;

extern D365Pages *d365_pages_open(D365Client *client, const char *path,
								  const char *prefer, int max_pages);
extern D365Op *d365_pages_next(D365Pages *pages);
extern void d365_pages_prefetch(D365Pages *pages);
extern void d365_pages_pump(D365Pages *pages);
extern void d365_pages_restart(D365Pages *pages, const char *path);
extern void d365_pages_close(D365Pages *pages);

#endif							/* D365_ODATA_H */
