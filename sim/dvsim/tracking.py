"""Change tracking: delta links and tokens, full and delta reads
(Prefer: odata.track-changes)."""

import bisect
import collections
import hashlib
import hmac
import re
from urllib.parse import quote

from .common import ApiError, b64e, ERR_DELTA, json_resp
from .formatting import format_row


class TrackingMixin:
    """Api methods: delta tokens and change-tracked reads."""

    def _delta_link(self, rq, ent, q, version):
        tok = self.make_delta_token(ent, version)
        parts = []
        for k, v in q.items():
            if k in ("$skiptoken", "$deltatoken"):
                continue
            parts.append("%s=%s" % (quote(k, safe="$"), quote(v, safe="$,()'=:")))
        parts.append("$deltatoken=" + quote(tok, safe=""))
        return "%s%s/%s?%s" % (rq.origin, rq.ctx.base_path, ent.set_name, "&".join(parts))

    def make_delta_token(self, ent, version):
        sig = hmac.new(self.S.delta_secret, ("%d|%d|%s" % (version, self.S.delta_gen,
                                                            ent.name)).encode(),
                       hashlib.sha256).hexdigest()[:16]
        return "%d!%x-%s" % (version, self.S.delta_gen, sig)

    def check_delta_token(self, ent, tok):
        m = re.match(r"^(\d+)!([0-9a-f]+)-([0-9a-f]{16})$", tok or "")
        expired = ApiError(400, ERR_DELTA,
                           "The delta token is expired or invalid; please start over with a "
                           "full read (request without $deltatoken).")
        if not m:
            raise expired
        version, gen, sig = int(m.group(1)), int(m.group(2), 16), m.group(3)
        want = hmac.new(self.S.delta_secret, ("%d|%d|%s" % (version, gen, ent.name)).encode(),
                        hashlib.sha256).hexdigest()[:16]
        if not hmac.compare_digest(want, sig) or gen != self.S.delta_gen or \
                version > self.S.version:
            raise expired
        return version

    def tracked(self, rq, ent, q, cols, prefer, fmt, skip):
        S = self.S
        size, size_applied = self._page_size(prefer)
        ctx = "%s%s/$metadata#%s" % (rq.origin, rq.ctx.base_path, ent.set_name)
        if q.get("$select"):
            ctx += "(%s)" % q["$select"]
        ctx += "/$delta"
        out = collections.OrderedDict([("@odata.context", ctx)])
        with S.lock:
            if skip is not None and skip.get("d") is not None:
                frm, to, off = int(skip["d"]), int(skip["t"]), int(skip.get("o", 0))
                if skip.get("g") != S.delta_gen:
                    raise ApiError(400, ERR_DELTA, "The delta token is expired or invalid; "
                                   "please start over with a full read.")
                mode = "delta"
            elif "$deltatoken" in q:
                frm = self.check_delta_token(ent, q["$deltatoken"])
                to = S.version
                off = 0
                mode = "delta"
            else:
                mode = "full"
                if skip is not None:
                    to = int(skip["t"])
                    last = int(skip.get("s", -1))
                else:
                    to = S.version
                    last = -1
            values = []
            if mode == "full":
                table = S.ordered_rows(ent.name)
                rows = []
                for r in table.values():
                    if r.seq <= last:
                        continue
                    rows.append(r)
                    if len(rows) > size:
                        break
                more = len(rows) > size
                rows = rows[:size]
                values = [format_row(S, ent, r, cols, fmt) for r in rows]
                if more:
                    tok = b64e({"t": to, "s": rows[-1].seq})
            else:
                log = S.changelog
                i = bisect.bisect_right(log, frm, key=lambda e: e[0])
                last_kind = {}
                for e in log[i:]:
                    if e[0] > to:
                        break
                    if e[1] != ent.name:
                        continue
                    last_kind.pop(e[2], None)
                    last_kind[e[2]] = e[3]
                changed = [rid for rid, k in last_kind.items() if k == "u"]
                deleted = [rid for rid, k in last_kind.items() if k == "d"]
                table = S.rows[ent.name]
                items = [("u", rid) for rid in changed if rid in table] + \
                        [("d", rid) for rid in deleted]
                page = items[off:off + size]
                more = len(items) > off + size
                delctx = "%s%s/$metadata#%s/$deletedEntity" % (rq.origin, rq.ctx.base_path,
                                                               ent.set_name)
                for kind, rid in page:
                    if kind == "u":
                        values.append(format_row(S, ent, table[rid], cols, fmt))
                    else:
                        values.append(collections.OrderedDict([
                            ("@odata.context", delctx), ("id", rid), ("reason", "deleted")]))
                if more:
                    tok = b64e({"d": frm, "t": to, "o": off + size, "g": S.delta_gen})
            out["value"] = values
            if more:
                out["@odata.nextLink"] = self._next_link(rq, ent, q, tok)
            else:
                out["@odata.deltaLink"] = self._delta_link(rq, ent, q, to)
        applied = []
        if prefer.get("odata.track-changes"):
            applied.append("odata.track-changes")
        if size_applied:
            applied.append("odata.maxpagesize=%d" % size)
        extra = [("Preference-Applied", ",".join(applied))] if applied else []
        return json_resp(200, out, extra, nrec=1)
