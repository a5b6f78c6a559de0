"""Cost model and service protection (governor limits) per application
user: server execution time per window, request count per window,
concurrent requests; the rate-limit headers of every answer; a longer
Retry-After for a client that sends while it is throttled."""

import collections
import math
import time
import uuid

from .common import ApiError, ERR_CONCURRENT, ERR_EXEC_TIME, ERR_REQUESTS, error_resp


class UserState:
    """Service-protection state of one application user (client id)."""

    def __init__(self, client_id):
        self.client_id = client_id
        self.inflight = 0
        self.max_inflight = 0
        self.window = collections.deque()     # admission times (request count)
        self.exec = collections.deque()       # (start, end) of server execution
        self.win = 300.0
        self.requests = 0
        self.ops = 0
        self.exec_total = 0.0
        self.throttled = collections.Counter()  # error code -> 429s
        # throttled from the moment a 429 of service protection has left
        # until its Retry-After has passed
        self.throttled_from = 0.0
        self.throttled_until = 0.0
        self.last_retry = 0
        self.last_error = None
        self.sent_while_throttled = 0

    def prune(self, now, win):
        w = self.window
        while w and w[0] <= now - win:
            w.popleft()
        e = self.exec
        while e and e[0][1] <= now - win:
            e.popleft()
        self.win = win

    def used(self, at):
        """Server seconds spent in the window that ends at time "at" (the
        part of each execution inside it: running requests count as far as
        they got)."""
        lo = at - self.win
        return sum(max(0.0, min(e, at) - max(s, lo)) for s, e in self.exec)

    def time_to_room(self, now, budget):
        """Whole seconds (at least 1) until the server time in the window is
        below the budget again, if no new request arrives."""
        horizon = max([e for _, e in self.exec] + [now]) + self.win
        k = 1
        while now + k < horizon and self.used(now + k) >= budget:
            k += 1
        return k

    def reset_counters(self):
        """Counters back to zero; what is in flight and the windows stay."""
        self.requests = 0
        self.ops = 0
        self.exec_total = 0.0
        self.max_inflight = self.inflight
        self.throttled = collections.Counter()
        self.sent_while_throttled = 0

    def clear_throttle(self):
        self.throttled_from = self.throttled_until = 0.0
        self.last_retry = 0
        self.last_error = None

    def throttle_sent(self, err, at):
        """A 429 of service protection (ApiError err) has left at "at": the
        user is throttled until its Retry-After has passed."""
        retry = int(dict(err.headers)["Retry-After"])
        self.throttled_from = at
        self.throttled_until = max(self.throttled_until, at + retry)
        self.last_retry = retry
        self.last_error = err

    def describe(self):
        return {"requests": self.requests, "ops": self.ops,
                "server_s": round(self.exec_total, 3),
                "throttled": sum(self.throttled.values()),
                "throttled_by_code": dict(self.throttled),
                "sent_while_throttled": self.sent_while_throttled,
                "inflight": self.inflight, "max_inflight": self.max_inflight,
                "window_server_s": round(self.used(time.time()), 3),
                "window_requests": len(self.window)}


class ServiceProtection:
    """Handler methods: the cost of a request and the 429s of service
    protection."""

    @staticmethod
    def server_time(S, resp):
        """Seconds of server execution time a request costs (its operations,
        one after another)."""
        per = float(S.config.get("per_record_ms") or 0)
        if resp.bulk and S.config.get("bulk_target_ms") is not None:
            per = float(S.config["bulk_target_ms"])
        return per * resp.nrec / 1000.0

    def api_headers(self, S, client):
        """The headers of every Web API answer, as of when it leaves; the
        two rate-limit headers only with ratelimit_headers on."""
        cfg = S.config
        rpw = cfg.get("requests_per_window")
        budget = cfg.get("exec_budget_s")
        with S.lock:
            u = S.users.get(client) if client else None
            if u is not None:
                u.prune(time.time(), float(cfg.get("window_s") or 300))
            used_req = len(u.window) if u is not None else 0
            used_s = u.used(time.time()) if u is not None else 0.0
        burst = max(0, int(rpw) - used_req) if rpw else 5999
        left = max(0.0, float(budget) - used_s) if budget else 1200.0
        limits = [("x-ms-ratelimit-burst-remaining-xrm-requests", str(burst)),
                  ("x-ms-ratelimit-time-remaining-xrm-requests", "{:,.2f}".format(left))]
        if not cfg.get("ratelimit_headers", True):
            limits = []
        return [("x-ms-dop-hint", str(cfg.get("dop_hint", 4)))] + limits + [
            ("x-ms-service-request-id", str(uuid.uuid4())),
            ("Cache-Control", "no-cache")]

    def throttle(self, S, client):
        """None when the request may run (and then it counts as in flight),
        and its ApiError, else the 429 that service protection answers for
        this user (the server calls throttle_sent once it has left).  A request that arrives while the user is
        throttled (after a 429 left, before its Retry-After passed) is
        refused again with twice the last Retry-After (at most the window,
        at least 1 s more than what was left), as Dataverse answers a client
        that keeps sending, and counted in sent_while_throttled."""
        cfg = S.config
        with S.lock:
            u = S.user(client)
            now = time.time()
            win = float(cfg.get("window_s") or 300)
            u.prune(now, win)
            err = None
            mc = cfg.get("max_concurrent")
            rpw = cfg.get("requests_per_window")
            budget = cfg.get("exec_budget_s")
            if u.last_error is not None and u.throttled_from <= now < u.throttled_until:
                left = int(math.ceil(u.throttled_until - now))
                retry = max(left + 1, min(2 * max(u.last_retry, 1), max(int(win), 1)))
                u.sent_while_throttled += 1
                S.stats["sent_while_throttled"] += 1
                err = ApiError(429, u.last_error.code, u.last_error.message,
                               [("Retry-After", str(retry))])
            elif mc and u.inflight + 1 > int(mc):
                err = ApiError(429, ERR_CONCURRENT,
                               "Number of concurrent requests exceeded the limit of %d."
                               % int(mc), [("Retry-After", "1")])
            elif rpw and len(u.window) >= int(rpw):
                retry = max(1, int(math.ceil(u.window[0] + win - now)))
                err = ApiError(429, ERR_REQUESTS,
                               "Number of requests exceeded the limit of %d over time window "
                               "of %d seconds." % (int(rpw), int(win)),
                               [("Retry-After", str(retry))])
            elif budget is not None and u.used(now) >= float(budget):
                # honest: the seconds until enough server time has left the
                # window for the sum to drop below the budget again
                retry = u.time_to_room(now, float(budget))
                err = ApiError(429, ERR_EXEC_TIME,
                               "Combined execution time of incoming requests exceeded limit of "
                               "{:,} milliseconds over time window of {} seconds.".format(
                                   int(float(budget) * 1000), int(win)),
                               [("Retry-After", str(retry))])
            if err is not None:
                S.stats["throttled"] += 1
                u.throttled[err.code] += 1
                return error_resp(err), err
            if rpw:
                u.window.append(now)
            u.requests += 1
            u.inflight += 1
            u.max_inflight = max(u.max_inflight, u.inflight)
            S.inflight += 1
        return None, None
