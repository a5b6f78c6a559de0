"""Reads: one row, and collections with $select, $filter, $orderby, $top,
$count, $expand and server-driven paging."""

import collections
import re
from urllib.parse import quote

from .common import ApiError, b64d, b64e, json_resp, no_property, not_exist, Resp
from .formatting import entity_resolver, format_row, parse_select
from .odata_filter import compile_filter, FilterError, _norm


class QueryMixin:
    """Api methods: GET of a row or of a collection."""

    def _expand(self, ent, q):
        exp = q.get("$expand")
        if not exp:
            return False
        names = [x.strip() for x in re.split(r",(?![^()]*\))", exp) if x.strip()]
        ok = False
        for n in names:
            base = n.split("(", 1)[0].strip()
            if ent.party_nav and base == ent.party_nav:
                ok = True
            else:
                raise no_property(base, ent.type_name)
        return ok

    def get_one(self, rq, ent, rid, q):
        cols = parse_select(ent, q["$select"]) if q.get("$select") else ent.read_cols
        expand = self._expand(ent, q)
        prefer = self._prefer(rq)
        fmt = self._formatted(prefer)
        with self.S.lock:
            row = self.S.rows[ent.name].get(rid)
            if row is None:
                raise not_exist(ent.name, rid)
            d = format_row(self.S, ent, row, cols, fmt, expand)
        ctx = "%s%s/$metadata#%s" % (rq.origin, rq.ctx.base_path, ent.set_name)
        if q.get("$select"):
            ctx += "(%s)" % q["$select"]
        ctx += "/$entity"
        out = collections.OrderedDict([("@odata.context", ctx)])
        out.update(d)
        extra = []
        if fmt:
            extra.append(("Preference-Applied",
                          'odata.include-annotations="%s"' % prefer["odata.include-annotations"]))
        inm = rq.hdict.get("if-none-match")
        if inm and inm.strip() == d["@odata.etag"]:
            return Resp(304, [("OData-Version", "4.0"), ("ETag", d["@odata.etag"])], b"",
                        nrec=1)
        extra.append(("ETag", d["@odata.etag"]))
        return json_resp(200, out, extra, nrec=1)

    def _page_size(self, prefer):
        mx = int(self.S.config.get("max_page_size") or 5000)
        n = prefer.get("odata.maxpagesize")
        if n is None or n is True:
            return mx, False
        try:
            n = int(n)
        except ValueError:
            return mx, False
        if n <= 0:
            return mx, False
        return min(n, mx), True

    def _next_link(self, rq, ent, q, token):
        parts = []
        for k, v in q.items():
            if k in ("$skiptoken", "$deltatoken"):
                continue
            parts.append("%s=%s" % (quote(k, safe="$"), quote(v, safe="$,()'=:")))
        parts.append("$skiptoken=" + quote(token, safe=""))
        return "%s%s/%s?%s" % (rq.origin, rq.ctx.base_path, ent.set_name, "&".join(parts))

    def get_collection(self, rq, ent, q):
        S = self.S
        prefer = self._prefer(rq)
        fmt = self._formatted(prefer)
        cols = parse_select(ent, q["$select"]) if q.get("$select") else ent.read_cols
        tracking = bool(prefer.get("odata.track-changes")) or "$deltatoken" in q
        skip = None
        if q.get("$skiptoken"):
            try:
                skip = b64d(q["$skiptoken"])
                if not isinstance(skip, dict):
                    raise ValueError()
            except Exception:
                raise ApiError(400, "0x0", "The $skiptoken is not valid.")
            if skip.get("t") is not None or skip.get("d") is not None:
                tracking = True
        if tracking:
            if not ent.change_tracking:
                raise ApiError(400, "0x80044353",
                               "Change tracking is not enabled for entity '%s'." % ent.name)
            for opt in ("$filter", "$orderby", "$expand", "$top"):
                if opt in q:
                    raise ApiError(400, "0x0",
                                   "The query option %s is not supported with change tracking "
                                   "(Prefer: odata.track-changes)." % opt)
            return self.tracked(rq, ent, q, cols, prefer, fmt, skip)
        expand = self._expand(ent, q)
        pred = None
        if q.get("$filter"):
            try:
                pred = compile_filter(q["$filter"], entity_resolver(ent))
            except FilterError as e:
                raise ApiError(400, "0x0", str(e))
        top = None
        if "$top" in q:
            try:
                top = int(q["$top"])
                if top < 0:
                    raise ValueError()
            except ValueError:
                raise ApiError(400, "0x0", "Invalid value for $top: '%s'." % q["$top"])
        order = None
        if q.get("$orderby"):
            order = []
            for item in q["$orderby"].split(","):
                bits = item.strip().split()
                if not bits:
                    continue
                g = entity_resolver(ent)(bits[0])
                desc = len(bits) > 1 and bits[1].lower() == "desc"
                order.append((g, desc))
        size, size_applied = self._page_size(prefer)
        count = q.get("$count", "").lower() == "true"
        with S.lock:
            table = S.ordered_rows(ent.name)
            if order is None:
                last = skip.get("s", -1) if skip else -1
                rows = []
                total = 0
                limit = top if top is not None else size + 1
                for r in table.values():
                    if pred is not None and not pred(r):
                        continue
                    total += 1
                    if r.seq <= last:
                        continue
                    if len(rows) < limit:
                        rows.append(r)
                    elif not count:
                        break
                offset = None
            else:
                allrows = [r for r in table.values() if pred is None or pred(r)]
                total = len(allrows)
                for g, desc in reversed(order):
                    nones = [r for r in allrows if g(r) is None]
                    vals = [r for r in allrows if g(r) is not None]
                    vals.sort(key=lambda r: _norm(g(r)), reverse=desc)
                    allrows = (nones + vals) if not desc else (vals + nones)
                offset = skip.get("o", 0) if skip else 0
                limit = top if top is not None else size + 1
                rows = allrows[offset:offset + limit]
            more = top is None and len(rows) > size
            if more:
                rows = rows[:size]
            values = [format_row(S, ent, r, cols, fmt, expand) for r in rows]
        ctx = "%s%s/$metadata#%s" % (rq.origin, rq.ctx.base_path, ent.set_name)
        if q.get("$select"):
            ctx += "(%s)" % q["$select"]
        out = collections.OrderedDict([("@odata.context", ctx)])
        if count:
            out["@odata.count"] = total
        out["value"] = values
        if more:
            if order is None:
                tok = b64e({"s": rows[-1].seq, "p": (skip or {}).get("p", 1) + 1})
            else:
                tok = b64e({"o": offset + size})
            out["@odata.nextLink"] = self._next_link(rq, ent, q, tok)
        applied = []
        if size_applied:
            applied.append("odata.maxpagesize=%d" % size)
        if fmt:
            applied.append('odata.include-annotations="%s"' % prefer["odata.include-annotations"])
        extra = [("Preference-Applied", ",".join(applied))] if applied else []
        return json_resp(200, out, extra, nrec=1)
