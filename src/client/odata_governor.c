/*-------------------------------------------------------------------------
 *
 * odata_governor.c
 *	  The throttling governor: how many requests each application user may
 *	  have in flight, and when it may send at all.
 *
 * Dataverse gives each application user an execution-time budget of
 * 1,200 s of server time per 300 s (d365sync.budget_seconds per
 * d365sync.budget_window_seconds): 4 s of server time per second.  A
 * request's server time never exceeds its duration, so a user with at most
 * 4 requests in flight can never spend more than that, whatever each
 * operation costs, and with 4 requests that are mostly server time (a
 * $batch of writes) it spends nearly all of it.  The server's x-ms-dop-hint
 * says how many requests in flight it wants at most; it knows nothing of
 * what the operations cost (plug-ins, workflows, table size), so it may be
 * above what the budget sustains, and a client that follows it blindly is
 * paced by 429s.  Hence, per user:
 *
 *	 - the hint (with d365sync.max_parallel) caps the requests in flight;
 *	   the sustained level is min(cap, budget / window);
 *
 *	 - above it, up to the cap, a request starts only while the window
 *	   provably has room (window_has_room): the durations of the user's
 *	   requests that ended in the trailing window, the time run by those in
 *	   flight and what the first answer showed the window held before, or
 *	   the server's time left as of the last answer less what ran since,
 *	   whichever is larger, plus a reservation per request, stay under the
 *	   budget.  After such a burst the burst is still in the window and the
 *	   sustained level would overfill it, so every request is checked the
 *	   same way until a window has passed.  Without the budget headers
 *	   nothing shows what other sessions spent: no burst;
 *
 *	 - where responses carry the budget headers, they stop a user before
 *	   the wall: while the last response said no execution time is left
 *	   (x-ms-ratelimit-time-remaining-xrm-requests) or no request is
 *	   (x-ms-ratelimit-burst-remaining-xrm-requests), no further request
 *	   goes out until one in flight answers with news, and the requests in
 *	   flight never outnumber the requests left; where the window holds
 *	   several waves at the cap, the sustained level also waits while the
 *	   time left would not cover its requests (stock_short);
 *
 *	 - a 429 (the whole request's, or a $batch part's) holds the user: not
 *	   one more request goes out as that user until its Retry-After has
 *	   passed (counted from when the 429 arrived; Dataverse lengthens the
 *	   wait of a client that keeps sending), exponential back-off without
 *	   one, but no longer than d365sync.retry_max_wait_ms (a longer wait
 *	   fails the operation and leaves its item pending).  The level drops below the one that met the wall (by a quarter,
 *	   at least one), once for the requests that were out together, and
 *	   for the next 300 s (Dataverse's window) stays below it; it climbs
 *	   back one request per second or two.  A 429 at the base level means
 *	   the budget is smaller than documented or shared with another client
 *	   of the same user: the level finds it from below.
 *
 * The HTTP layer asks d365_governor_admit() before each request of a user
 * starts and tells d365_governor_done() each outcome as soon as it is in
 * (D365HttpPacer), so a 429 stops the rest of a round at once.  Other
 * users keep sending; a round gives a held user no share while others are
 * free.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "utils/timestamp.h"

#include "d365sync.h"
#include "odata.h"

/* how long a wall is remembered: Dataverse's window */
#define D365_WALL_MEMORY_MS (300 * 1000L)

/* The level the budget sustains for requests that are all server time. */
static int
base_level(D365Client *client)
{
	int			rate = (int) floor((double) d365_budget_seconds /
								   Max(d365_budget_window_seconds, 1));

	return Max(1, Min(client->dop_limit, rate));
}

/*
 * d365_governor_init
 *		A new user's governor, at the base level.
 */
void
d365_governor_init(D365Lane *lane)
{
	memset(&lane->gov, 0, sizeof(D365Governor));
	lane->gov.requests_left = -1;
	lane->gov.budget_s = d365_budget_seconds;
	lane->gov.window_s = d365_budget_window_seconds;
	for (int i = 0; i < D365_GOV_SLOTS; i++)
		lane->gov.slot_id[i] = -1;
	lane->max_parallel = base_level(lane->client);
}

/*
 * d365_governor_cap
 *		The client's cap (x-ms-dop-hint, d365sync.max_parallel) changed: no
 *		user above it, none below the base unless a 429 put it there.
 */
void
d365_governor_cap(D365Client *client)
{
	int			l;

	for (l = 0; l < client->nlanes; l++)
	{
		D365Lane   *lane = &client->lanes[l];

		lane->max_parallel = Min(lane->max_parallel, client->dop_limit);
		if (lane->gov.wall == 0)
			lane->max_parallel = Max(lane->max_parallel, base_level(client));
		lane->max_parallel = Max(lane->max_parallel, 1);
	}
}

/*
 * d365_governor_held
 *		Whether a user waits out a 429's Retry-After now.
 */
bool
d365_governor_held(D365Lane *lane)
{
	return GetCurrentTimestamp() < lane->gov.hold_until;
}

/*
 * Seconds of server time set aside for a request in flight or about to
 * start: one and a half times the longest answer so far (a round's first
 * answers can be a small probe; the longest bounds the batches).
 */
static double
reservation(D365Governor *g)
{
	return 1.5 * g->max_ms / 1000.0;
}

/* The width of a slot of the window, in microseconds. */
static int64
slot_width(D365Governor *g)
{
	return Max((int64) 1, (int64) (g->window_s * 1e6 / D365_GOV_WINDOW_SLOTS));
}

/* A request of this user ended now after elapsed_ms: into the window. */
static void
account_end(D365Governor *g, TimestampTz now, double elapsed_ms)
{
	int64		id = now / slot_width(g);
	int			k = (int) (id % D365_GOV_SLOTS);
	TimestampTz start = now - (TimestampTz) (Max(elapsed_ms, 0.0) * 1000.0);
	int			best = -1;
	int			i;

	if (g->slot_id[k] != id)
	{
		g->slot_id[k] = id;
		g->slot_s[k] = 0.0;
	}
	g->slot_s[k] += Max(elapsed_ms, 0.0) / 1000.0;
	/* the one in flight whose start is nearest to this request's */
	for (i = 0; i < g->ntrack; i++)
		if (best < 0 || Abs(g->track[i] - start) < Abs(g->track[best] - start))
			best = i;
	if (best >= 0)
		g->track[best] = g->track[--g->ntrack];
}

/*
 * Whether n requests in flight (the one about to start among them) fit in
 * the budget's window: an upper bound of what the server counts in it
 * stays under the budget.  The bound: the durations of the requests that
 * ended within the window (a slot counts until its end leaves it), the
 * time each request in flight has run, what the window held before the
 * first answer (while that can still be in it), and, for each of the n,
 * a reservation still to come, plus one more as a margin.  Only once a
 * wave at the sustained level has answered, so that the longest answer
 * is one of the run's requests, not the probe before the hint was known.
 * Where the answers say the time left, the server's own count as of the
 * last answer, with the same additions, bounds it as well, and the larger
 * bound counts.  Without the first answer's word nothing is known of what
 * was spent before this call or by another session: no room; without the
 * last answer's, no start above the sustained level (d365_governor_admit).
 */
static bool
window_has_room(D365Lane *lane, D365Governor *g, TimestampTz now, int n)
{
	int64		width = slot_width(g);
	int64		window_us = (int64) (g->window_s * 1e6);
	double		est = reservation(g);
	double		running = 0.0;
	double		own = 0.0;
	double		server;
	int			i;

	if (!g->prior_known || est <= 0 ||
		g->answers < lane->max_parallel || g->ntrack != g->inflight)
		return false;
	for (i = 0; i < D365_GOV_SLOTS; i++)
		if (g->slot_id[i] >= 0 && (g->slot_id[i] + 1) * width + window_us > now)
			own += g->slot_s[i];
	for (i = 0; i < g->ntrack; i++)
		running += Max(0, now - g->track[i]) / 1e6;
	own += running;
	if (now - g->started_at < window_us)
		own += g->prior_s;
	server = g->has_time_left ? Max(0.0, g->budget_s - g->time_left) + running : 0.0;
	return Max(own, server) + (n + 1) * est <= g->budget_s;
}

/*
 * Whether, at the sustained level, the server's stock says to hold back:
 * the time left as of the last answer, less what the requests in flight
 * have run since, would not cover a reservation for each of them and the
 * next.  Only where the window holds several waves at the
 * cap, so that a burst -- this call's, or an earlier session's as the same
 * user -- can have left more in the window than the sustained level adds
 * back; with a window smaller than that no burst ever passes
 * window_has_room and the sustained level's proof stands alone.
 */
static bool
stock_short(D365Lane *lane, D365Governor *g, TimestampTz now)
{
	double		est = reservation(g);
	double		running = 0.0;
	int			i;

	if (!g->has_time_left || g->inflight == 0 || est <= 0 ||
		g->budget_s < 4.0 * lane->client->dop_limit * est)
		return false;
	for (i = 0; i < g->ntrack; i++)
		running += Max(0, now - g->track[i]) / 1e6;
	return g->time_left - running < (g->inflight + 1) * est;
}

/* One more request of this user starts now. */
static long
admit_one(D365Governor *g, TimestampTz now)
{
	g->inflight++;
	if (g->ntrack < D365_GOV_TRACK)
		g->track[g->ntrack++] = now;
	return 0;
}

/*
 * d365_governor_admit
 *		D365HttpPacer's admit for a user: 0 when one more request may start
 *		now (it counts as in flight from here), else how many milliseconds
 *		to wait before asking again.
 */
long
d365_governor_admit(void *arg)
{
	D365Lane   *lane = (D365Lane *) arg;
	D365Governor *g = &lane->gov;
	TimestampTz now = GetCurrentTimestamp();
	int			limit = lane->max_parallel;
	int			top;

	if (now < g->hold_until)
		return Max(1, (long) ((g->hold_until - now + 999) / 1000));
	if (g->requests_left >= 0)
		limit = Min(limit, Max(1, (int) Min(g->requests_left, (int64) PG_INT32_MAX)));
	if (g->inflight > 0 &&
		((g->has_time_left && g->time_left <= 0.0) || g->requests_left == 0))
		return 100;				/* wait for their answers' news of the budget */
	if (g->burst_at == 0 ||
		now - g->burst_at > (TimestampTz) (g->window_s * 1e6 + 2000.0 * g->max_ms))
	{
		/* nothing above the sustained level in the window: its proof holds */
		g->burst_at = 0;
		if (g->inflight < limit && !stock_short(lane, g, now))
			return admit_one(g, now);
		if (g->inflight < limit)
			return 100;
	}
	/* above the level, or any request while a burst is in the window */
	top = g->wall == 0 ? lane->client->dop_limit : limit;
	if (g->requests_left >= 0)
		top = Min(top, Max(1, (int) Min(g->requests_left, (int64) PG_INT32_MAX)));
	if (g->inflight >= top || (g->inflight >= limit && !g->has_time_left) ||
		!window_has_room(lane, g, now, g->inflight + 1))
		return 100;				/* asked again when one answers, or later */
	if (g->inflight + 1 > limit)
		g->burst_at = now;
	return admit_one(g, now);
}

/* The value of a ratelimit header: digits with "," grouping, a "." fraction. */
static bool
header_number(D365HttpRequest *h, const char *name, double *value)
{
	char	   *v = d365_http_header(h, name);
	char		digits[64];
	int			n = 0;
	char	   *end;
	double		d;

	if (v == NULL || v[0] == '\0')
		return false;
	for (; *v && n < (int) sizeof(digits) - 1; v++)
	{
		if (*v == ',')
			continue;
		if (!((*v >= '0' && *v <= '9') || *v == '.'))
			return false;
		digits[n++] = *v;
	}
	if (*v != '\0' || n == 0)
		return false;
	digits[n] = '\0';
	d = strtod(digits, &end);
	if (*end != '\0' || !isfinite(d) || d < 0)
		return false;
	*value = d;
	return true;
}

/* How long a level is kept before the next step back up after a 429. */
static long
settle_ms(D365Governor *g)
{
	return Max(1000L, (long) (2.0 * g->mean_ms));
}

/* What a response says of the user's budget. */
static void
note_budget(D365Governor *g, D365HttpRequest *h)
{
	double		v;

	g->has_time_left = header_number(h, "x-ms-ratelimit-time-remaining-xrm-requests", &v);
	if (g->has_time_left)
		g->time_left = v;
	if (header_number(h, "x-ms-ratelimit-burst-remaining-xrm-requests", &v))
		g->requests_left = (int64) Min(v, 1e12);
	else
		g->requests_left = -1;
}

/* After a response that was not a 429: back to the base, one at a time. */
static void
adjust(D365Lane *lane, TimestampTz now)
{
	D365Governor *g = &lane->gov;
	int			top = base_level(lane->client);

	if (g->wall > 0 && now - g->wall_at > D365_WALL_MEMORY_MS * 1000L)
		g->wall = 0;
	if (g->wall > 0)
		top = Max(1, Min(top, g->wall - 1));
	if (lane->max_parallel > top)
	{
		lane->max_parallel = top;
		g->changed_at = now;
	}
	else if (lane->max_parallel < top &&
			 now - g->changed_at >= (TimestampTz) settle_ms(g) * 1000)
	{
		lane->max_parallel++;
		g->changed_at = now;
	}
}

/*
 * d365_governor_done
 *		D365HttpPacer's done for a user: one of its requests has its outcome.
 */
void
d365_governor_done(D365HttpRequest *req, void *arg)
{
	D365Lane   *lane = (D365Lane *) arg;
	D365Governor *g = &lane->gov;
	TimestampTz now = GetCurrentTimestamp();

	g->inflight = Max(0, g->inflight - 1);
	account_end(g, now, req->elapsed_ms);
	if (req->transport_error != 0 || req->status == 0)
		return;
	note_budget(g, req);
	if (g->started_at == 0)
	{
		/* what the window held before: the first answer shows it */
		g->started_at = now;
		g->prior_known = g->has_time_left;
		g->prior_s = g->has_time_left ? Max(0.0, g->budget_s - g->time_left) : 0.0;
	}
	if (req->status == 429)
	{
		d365_governor_throttled(lane, req);
		return;
	}
	g->throttled_streak = 0;
	g->mean_ms = g->mean_ms > 0 ? 0.8 * g->mean_ms + 0.2 * req->elapsed_ms : req->elapsed_ms;
	g->max_ms = Max(g->max_ms, req->elapsed_ms);
	g->answers++;
	adjust(lane, now);
}

/*
 * d365_governor_throttled
 *		A 429 for a user (h: the request's, or a $batch part's): hold the
 *		user for its Retry-After and lower its level (see the top).
 */
void
d365_governor_throttled(D365Lane *lane, D365HttpRequest *h)
{
	D365Governor *g = &lane->gov;
	TimestampTz now = GetCurrentTimestamp();
	long		ms = d365_retry_after_ms(h);
	TimestampTz sent = now - (TimestampTz) (h->elapsed_ms * 1000.0);

	g->throttled_streak++;
	if (ms < 0)
		ms = 1000L << Min(g->throttled_streak - 1, 6);
	/*
	 * a wait longer than d365sync.retry_max_wait_ms fails its operation
	 * (classify); the user is held no longer than that either, so a run
	 * never sits out a wait it has given up on
	 */
	ms = Min(ms, (long) d365_retry_max_wait_ms);
	g->hold_until = Max(g->hold_until, now + (TimestampTz) ms * 1000);

	/* requests that went out together meet the wall together: lower once */
	if (h->elapsed_ms <= 0 || sent >= g->changed_at || g->wall == 0)
	{
		g->wall = lane->max_parallel;
		g->wall_at = now;
		lane->max_parallel = Max(1, Min(lane->max_parallel - 1,
										lane->max_parallel * 3 / 4));
		g->changed_at = now;
	}
}
