"""The control API under /_sim/ (no auth, for tests)."""

import bisect
import collections
import json
import re

from .body import Ctx, parse_body
from .common import ApiError, guid_or_none, jdump, parse_query, Resp, SAM_USER_ID
from .entities import ENTITIES
from .faults import Fault
from .formatting import format_row
from .persist import save


CONFIG_KEYS = {"token_lifetime": int, "latency_ms": float, "per_record_ms": float,
               "dop_hint": int, "max_concurrent": int, "requests_per_window": int,
               "window_s": float, "max_page_size": int, "check_audience": bool,
               "secret_expired": bool, "log_bodies": bool, "log_limit": int,
               "max_batch": int, "max_bulk": int, "tenant": str, "client_id": str,
               "client_secret": str, "exec_budget_s": float, "bulk_target_ms": float,
               "app_users": dict, "ratelimit_headers": bool}


class Control:
    def __init__(self, state, api):
        self.S = state
        self.api = api

    def ok(self, obj, status=200):
        return Resp(status, [("Content-Type", "application/json")], jdump(obj))

    def fail(self, status, msg):
        return Resp(status, [("Content-Type", "application/json")], jdump({"error": msg}))

    def handle(self, method, path, query, body):
        S = self.S
        q = parse_query(query)
        p = path.rstrip("/")
        try:
            data = json.loads(body) if body.strip() else None
        except ValueError as e:
            return self.fail(400, "invalid JSON: %s" % e)
        if p == "/_sim/ping":
            return self.ok({"ok": True, "version": S.version})
        if p == "/_sim/reset" and method == "POST":
            S.reset()
            return self.ok({"ok": True})
        if p == "/_sim/requests":
            if method == "DELETE":
                with S.lock:
                    S.requests = []
                return self.ok({"ok": True, "last_seq": S.log_seq})
            since = int(q.get("since") or 0)
            kind = q.get("kind")
            with S.lock:
                reqs = S.requests
                i = bisect.bisect_right(reqs, since, key=lambda e: e.seq)
                sel = [e for e in reqs[i:] if not kind or e.kind == kind]
                last = S.log_seq
            return self.ok({"requests": [e.to_json() for e in sel], "last_seq": last})
        if p == "/_sim/last-seq":
            return self.ok({"last_seq": S.log_seq})
        if p == "/_sim/faults":
            if method == "DELETE":
                with S.lock:
                    S.faults = []
                return self.ok({"ok": True})
            if method == "POST":
                rules = data if isinstance(data, list) else [data]
                added = []
                try:
                    with S.lock:
                        new = []
                        for r in rules:
                            S.fault_ids += 1
                            new.append(Fault(r, S.fault_ids))
                        S.faults.extend(new)
                        added = [f.describe() for f in new]
                except (ValueError, re.error, TypeError) as e:
                    return self.fail(400, "bad fault rule: %s" % e)
                return self.ok({"added": added})
            with S.lock:
                return self.ok({"faults": [f.describe() for f in S.faults if not f.exhausted()],
                                "exhausted": [f.describe() for f in S.faults if f.exhausted()]})
        if p == "/_sim/config":
            if method == "POST":
                if not isinstance(data, dict):
                    return self.fail(400, "config body must be a JSON object")
                with S.lock:
                    for k, v in data.items():
                        if k not in CONFIG_KEYS:
                            return self.fail(400, "unknown config key '%s'" % k)
                        if k == "app_users" and v is not None and not (
                                isinstance(v, dict) and all(isinstance(x, str) and
                                                            isinstance(y, str)
                                                            for x, y in v.items())):
                            return self.fail(400, "app_users must map client ids to secrets")
                    for k, v in data.items():
                        S.config[k] = None if v is None else CONFIG_KEYS[k](v)
                    if "requests_per_window" in data or "window_s" in data or \
                            "exec_budget_s" in data:
                        for u in S.users.values():
                            u.window.clear()
                            u.exec.clear()
                            u.clear_throttle()
            return self.ok({"config": S.config})
        if p == "/_sim/expire-tokens" and method == "POST":
            with S.lock:
                S.token_gen += 1
            return self.ok({"ok": True})
        if p == "/_sim/expire-delta-tokens" and method == "POST":
            with S.lock:
                S.delta_gen += 1
            return self.ok({"ok": True})
        if p == "/_sim/stats":
            with S.lock:
                st = dict(S.stats)
                return self.ok({
                    "requests": {"api": st.get("requests_api", 0),
                                 "token": st.get("requests_token", 0),
                                 "inner": st.get("requests_inner", 0)},
                    "tokens_issued": st.get("tokens_issued", 0),
                    "throttled": st.get("throttled", 0),
                    "sent_while_throttled": st.get("sent_while_throttled", 0),
                    "faults_fired": st.get("faults_fired", 0),
                    "rows": {k: len(v) for k, v in S.rows.items()},
                    "version": S.version,
                    "changelog": len(S.changelog),
                    "inflight": S.inflight,
                    "users": {k: u.describe() for k, u in S.users.items()}})
        if p == "/_sim/save" and method == "POST":
            if not S.state_file:
                return self.fail(409, "no state file: start the simulator with --state-file PATH")
            try:
                n = save(S, S.state_file)
            except OSError as e:
                return self.fail(500, "saving %s failed: %s" % (S.state_file, e))
            return self.ok({"ok": True, "path": S.state_file, "rows": n})
        if p == "/_sim/reset-stats" and method == "POST":
            with S.lock:
                S.stats = collections.Counter()
                for u in S.users.values():
                    u.reset_counters()
            return self.ok({"ok": True})
        m = re.match(r"^/_sim/rows/([a-z_]+)/generate$", p)
        if m and method == "POST":
            ent = ENTITIES.get(m.group(1))
            if ent is None:
                return self.fail(404, "unknown entity '%s'" % m.group(1))
            return self.generate(ent, data)
        m = re.match(r"^/_sim/rows/([a-z_]+)$", p)
        if m:
            ent = ENTITIES.get(m.group(1))
            if ent is None:
                return self.fail(404, "unknown entity '%s'" % m.group(1))
            if method == "GET":
                with S.lock:
                    rows = [format_row(S, ent, r, ent.read_cols, False, True)
                            for r in S.ordered_rows(ent.name).values()]
                return self.ok({"value": rows})
            if method == "POST":
                return self.edit(ent, data)
        return self.fail(404, "unknown control endpoint %s %s" % (method, path))

    def generate(self, ent, data):
        """Create count rows at once (for large reads): each value of the
        template is a literal, a string in which {i} is the row's number
        (0 .. count-1), or {"mod": m} for i % m."""
        S = self.S
        if not isinstance(data, dict) or not isinstance(data.get("count"), int) or \
                not 0 < data["count"] <= 1000000 or not isinstance(data.get("values", {}), dict):
            return self.fail(400, 'body must be {"count": 1..1000000, "values": {...}}')
        tmpl = data.get("values") or {}
        ctx = Ctx("/api/data/v9.2", user=SAM_USER_ID)

        def value(v, i):
            if isinstance(v, str):
                return v.replace("{i}", str(i))
            if isinstance(v, dict) and isinstance(v.get("mod"), int) and v["mod"] > 0:
                return i % v["mod"]
            return v
        try:
            with S.lock:
                for i in range(data["count"]):
                    p = parse_body(ent, {k: value(v, i) for k, v in tmpl.items()}, ctx)
                    S.apply_write(ent, p, "insert", None, ctx)
        except ApiError as e:
            return Resp(e.status, [("Content-Type", "application/json")],
                        jdump({"error": {"code": e.code, "message": e.message}}))
        return self.ok({"created": data["count"]})

    def edit(self, ent, data):
        S = self.S
        if not isinstance(data, dict) or data.get("op") not in ("create", "update", "delete"):
            return self.fail(400, 'body must be {"op": "create"|"update"|"delete", "id": ..., '
                                  '"values": {...}}')
        op = data["op"]
        rid = data.get("id")
        if rid is not None:
            rid = guid_or_none(rid)
            if rid is None:
                return self.fail(400, "id must be a GUID")
        user = guid_or_none(data.get("user") or SAM_USER_ID) or SAM_USER_ID
        ctx = Ctx("/api/data/v9.2", user=user)
        try:
            if op == "delete":
                if rid is None:
                    return self.fail(400, "delete needs an id")
                with S.lock:
                    S.apply_delete(ent, rid)
                return self.ok({"deleted": rid})
            p = parse_body(ent, data.get("values") or {}, ctx)
            with S.lock:
                if op == "update" and rid is None:
                    return self.fail(400, "update needs an id")
                created, row = S.apply_write(ent, p, "insert" if op == "create" else "update",
                                             rid, ctx)
                return self.ok(format_row(S, ent, row, ent.read_cols, False, True))
        except ApiError as e:
            return Resp(e.status, [("Content-Type", "application/json")],
                        jdump({"error": {"code": e.code, "message": e.message}}))
