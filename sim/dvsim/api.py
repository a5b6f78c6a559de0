"""The Web API (request -> Resp): routing, WhoAmI, writes, deletes and the
bulk messages; reads, change tracking and metadata come from mixins."""

import collections
import json
import re
import traceback
from urllib.parse import unquote

from .body import parse_body
from .common import (API_PATH_RE, ApiError, bad_segment, BUSINESS_UNIT_ID,
    DropConnection, ERR_INVALID_PROP, error_resp, guid_or_none, json_resp, not_exist,
    NS, ORGANIZATION_ID, parse_prefer, parse_query, Resp)
from .entities import SETS
from .formatting import format_party, format_row, parse_select
from .metadata import MetadataMixin
from .query import QueryMixin
from .tracking import TrackingMixin


class Req:
    """An API request (standalone or an inner $batch operation)."""
    __slots__ = ("method", "path", "query", "headers", "hdict", "body", "scheme",
                 "origin", "inner", "log", "ctx", "content_id", "changeset",
                 "batch_seq")


class Api(QueryMixin, TrackingMixin, MetadataMixin):
    def __init__(self, state):
        self.S = state

    # -- entry points ---------------------------------------------------------
    def handle(self, rq):
        """Handle an API request that passed the token check; returns Resp."""
        try:
            return self._route(rq)
        except ApiError as e:
            return error_resp(e)
        except DropConnection:
            raise
        except Exception as e:  # a bug in the simulator: answer 500 with a trace
            traceback.print_exc()
            return error_resp(ApiError(500, "0x80040216",
                                       "Simulator internal error: %s: %s"
                                       % (type(e).__name__, e)))

    def total_record_count(self, rq, first, q):
        """RetrieveTotalRecordCount(EntityNames=@p1)?@p1=["account",...]:
        the number of records of each table, as Dataverse's snapshot gives it
        (here the count at the time of the request)."""
        m = re.match(r"^RetrieveTotalRecordCount\(EntityNames=(@\w+|\[.*\])\)$", first)
        raw = None
        if m:
            raw = q.get(m.group(1)) if m.group(1).startswith("@") else m.group(1)
        try:
            names = json.loads((raw or "").replace("'", '"'))
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ApiError(400, "0x80040203", "Invalid parameter EntityNames: a JSON array "
                           "of table logical names is expected.")
        by_logical = {e.name: e for e in SETS.values()}
        keys, values = [], []
        with self.S.lock:
            for n in names:
                ent = by_logical.get(n.lower())
                if ent is None:
                    raise ApiError(404, "0x80040217",
                                   "Could not find an entity with name %s." % n)
                keys.append(ent.name)
                values.append(len(self.S.rows.get(ent.name, {})))
        base = rq.origin + rq.ctx.base_path
        return json_resp(200, collections.OrderedDict([
            ("@odata.context", base + "/$metadata#" + NS + "RetrieveTotalRecordCountResponse"),
            ("EntityRecordCountCollection", collections.OrderedDict([
                ("Count", len(keys)), ("IsReadOnly", False), ("Keys", keys), ("Values", values)]))]),
            nrec=1)

    def _route(self, rq):
        m = API_PATH_RE.match(rq.path)
        if not m:
            seg = rq.path.strip("/").split("/")
            raise bad_segment(seg[2] if len(seg) > 2 else rq.path)
        ver, rest = m.group(1), m.group(2)
        base_path = "/api/data/" + ver
        rq.ctx.base_path = base_path
        segs = [unquote(s) for s in rest.split("/")] if rest else [""]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs.pop()
        first = segs[0]
        q = parse_query(rq.query)
        if first == "$batch":
            raise ApiError(400, "0x0", "$batch requests cannot be nested.")
        if first in ("WhoAmI", "WhoAmI()"):
            if rq.method != "GET" or len(segs) > 1:
                raise ApiError(405, "0x0", "The requested resource does not support http "
                               "method '%s'." % rq.method)
            base = rq.origin + base_path
            return json_resp(200, {
                "@odata.context": base + "/$metadata#" + NS + "WhoAmIResponse",
                "BusinessUnitId": BUSINESS_UNIT_ID,
                "UserId": rq.ctx.user,
                "OrganizationId": ORGANIZATION_ID})
        if re.match(r"^RetrieveTotalRecordCount\(", first):
            if rq.method != "GET" or len(segs) > 1:
                raise ApiError(405, "0x0", "The requested resource does not support http "
                               "method '%s'." % rq.method)
            return self.total_record_count(rq, first, q)
        if first.startswith("EntityDefinitions"):
            if rq.method != "GET":
                raise ApiError(405, "0x0", "Metadata is read-only in the simulator.")
            return self.metadata(rq, segs, q)
        sm = re.match(r"^([A-Za-z_][\w]*)(?:\((.*)\))?$", first)
        if not sm or sm.group(1) not in SETS:
            raise bad_segment(re.split(r"[(]", first)[0] or first)
        ent = SETS[sm.group(1)]
        keytext = sm.group(2)
        rid = None
        if keytext is not None:
            k = keytext
            if "=" in k:
                kn, k = k.split("=", 1)
                if kn.strip() != ent.key:
                    raise ApiError(400, ERR_INVALID_PROP,
                                   "The key '%s' is not a defined alternate key of entity '%s' "
                                   "(alternate keys are not simulated)." % (keytext, ent.name))
            rid = guid_or_none(k.strip())
            if rid is None:
                raise ApiError(400, ERR_INVALID_PROP, "Bad Request - Error in query syntax.")
        if len(segs) == 1:
            if rid is None:
                if rq.method == "GET":
                    return self.get_collection(rq, ent, q)
                if rq.method == "POST":
                    return self.write(rq, ent, None, q)
            else:
                if rq.method == "GET":
                    return self.get_one(rq, ent, rid, q)
                if rq.method == "PATCH":
                    return self.write(rq, ent, rid, q)
                if rq.method == "DELETE":
                    return self.delete(rq, ent, rid)
            raise ApiError(405, "0x0", "The HTTP method '%s' is not allowed on '%s'."
                           % (rq.method, first))
        if len(segs) == 2 and rid is None and segs[1].startswith(NS):
            action = segs[1][len(NS):]
            if action in ("UpsertMultiple", "CreateMultiple", "UpdateMultiple"):
                if rq.method != "POST":
                    raise ApiError(405, "0x0", "%s requires POST." % action)
                return self.bulk(rq, ent, action)
            raise bad_segment(segs[1])
        if len(segs) == 2 and rid is not None and ent.party_nav and segs[1] == ent.party_nav \
                and rq.method == "GET":
            with self.S.lock:
                row = self.S.rows[ent.name].get(rid)
                if row is None:
                    raise not_exist(ent.name, rid)
                vals = [format_party(row, p) for p in (row.parties or [])]
            return json_resp(200, {"@odata.context": rq.origin + base_path +
                                   "/$metadata#activityparties", "value": vals}, nrec=1)
        raise bad_segment(segs[1])

    # -- common helpers ---------------------------------------------------------
    def _json_body(self, rq):
        if not rq.body:
            raise ApiError(400, "0x0", "The request body is empty; a JSON object is required.")
        ct = rq.hdict.get("content-type", "")
        if ct and not ct.lower().startswith("application/json"):
            raise ApiError(415, "0x0", "A supported MIME type could not be found that matches "
                           "the content type of the request: '%s'. Use application/json." % ct)
        try:
            return json.loads(rq.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "0x0", "Invalid JSON. %s" % e)

    def _prefer(self, rq):
        return parse_prefer(rq.hdict.get("prefer", ""))

    def _formatted(self, prefer):
        v = prefer.get("odata.include-annotations")
        return bool(v) and (v == "*" or "FormattedValue" in str(v) or
                            "OData.Community" in str(v))

    def _entity_url(self, rq, ent, rid):
        return "%s%s/%s(%s)" % (rq.origin, rq.ctx.base_path, ent.set_name, rid)

    # -- writes ------------------------------------------------------------------
    def write(self, rq, ent, rid, q):
        body = self._json_body(rq)
        p = parse_body(ent, body, rq.ctx)
        prefer = self._prefer(rq)
        if_match = rq.hdict.get("if-match")
        if_none = rq.hdict.get("if-none-match")
        if rq.method == "POST":
            mode = "create"
        elif if_match:
            mode = "update"
        elif if_none and if_none.strip() == "*":
            mode = "insert"
        else:
            mode = "upsert"
        repr_ = prefer.get("return") == "representation"
        cols = parse_select(ent, q["$select"]) if q.get("$select") else ent.read_cols
        with self.S.lock:
            created, row = self.S.apply_write(ent, p, mode, rid, rq.ctx, if_match)
            d = format_row(self.S, ent, row, cols, self._formatted(prefer), bool(p.parties)) \
                if repr_ else None
        url = self._entity_url(rq, ent, row.id)
        if repr_:
            ctx = "%s%s/$metadata#%s/$entity" % (rq.origin, rq.ctx.base_path, ent.set_name)
            out = collections.OrderedDict([("@odata.context", ctx)])
            out.update(d)
            r = json_resp(201 if created else 200, out,
                          [("Preference-Applied", "return=representation"),
                           ("ETag", d["@odata.etag"])], nrec=1)
        else:
            r = Resp(204, [("OData-Version", "4.0"), ("OData-EntityId", url)], b"", nrec=1)
        r.entity_path = "%s/%s(%s)" % (rq.ctx.base_path, ent.set_name, row.id)
        return r

    def delete(self, rq, ent, rid):
        with self.S.lock:
            self.S.apply_delete(ent, rid, rq.hdict.get("if-match"))
        return Resp(204, [("OData-Version", "4.0")], b"", nrec=1)

    def bulk(self, rq, ent, action):
        if ent.name not in ("contact", "account") and not ent.is_activity and not ent.custom:
            raise ApiError(400, "0x80040800",
                           "The message %s is not supported for entity '%s'." % (action, ent.name))
        body = self._json_body(rq)
        if not isinstance(body, dict) or not isinstance(body.get("Targets"), list):
            raise ApiError(400, "0x0", "%s expects a body {\"Targets\": [...]}." % action)
        for k in body:
            if k != "Targets" and not k.startswith("@"):
                raise ApiError(400, ERR_INVALID_PROP,
                               "Invalid parameter '%s' for %s." % (k, action))
        targets = body["Targets"]
        maxn = int(self.S.config.get("max_bulk") or 1000)
        if len(targets) > maxn:
            raise ApiError(400, "0x80040203",
                           "The number of Targets (%d) exceeds the maximum of %d for %s."
                           % (len(targets), maxn, action))
        if not targets:
            raise ApiError(400, "0x80040203", "Targets must not be empty.")
        parsed = []
        for i, t in enumerate(targets):
            try:
                if not isinstance(t, dict):
                    raise ApiError(400, "0x0", "Each target must be a JSON object.")
                ot = t.get("@odata.type")
                if ot is None:
                    raise ApiError(400, "0x80048d0b",
                                   "The @odata.type annotation is required for each target "
                                   "(expected '%s')." % ent.type_name)
                p = parse_body(ent, t, rq.ctx)
                if action == "UpdateMultiple" and p.key is None:
                    raise ApiError(400, "0x80040203",
                                   "The primary key '%s' is required for UpdateMultiple." % ent.key)
                parsed.append(p)
            except ApiError as e:
                raise ApiError(e.status, e.code, "Targets[%d]: %s" % (i, e.message))
        mode = {"UpsertMultiple": "upsert", "CreateMultiple": "create",
                "UpdateMultiple": "update"}[action]
        S = self.S
        ids = []
        with S.lock:
            marker = S.begin()
            try:
                for i, p in enumerate(parsed):
                    try:
                        created, row = S.apply_write(ent, p, mode, None, rq.ctx)
                    except ApiError as e:
                        raise ApiError(e.status, e.code, "Targets[%d]: %s" % (i, e.message))
                    ids.append(row.id)
            except BaseException:
                S.rollback(marker)
                raise
            S.commit(marker)
        n = len(parsed)
        if action == "UpdateMultiple":
            r = Resp(204, [("OData-Version", "4.0")], b"", nrec=n)
        else:
            ctx = "%s%s/$metadata#%s%sResponse" % (rq.origin, rq.ctx.base_path, NS, action)
            r = json_resp(200, collections.OrderedDict([("@odata.context", ctx), ("Ids", ids)]),
                          nrec=n)
        r.bulk = True
        return r
