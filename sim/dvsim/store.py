"""The data store: rows, the change-tracking log, transactions (undo
journal), writes and deletes with Dataverse's rules, tokens, the request
log and fault matching.  One State object guarded by one RLock."""

import collections
import secrets
import threading
import time
import uuid

from .body import Ctx, parse_body
from .common import (ALEX_USER_ID, ApiError, APP_USER_ID, CONTOSO_ACCOUNT_ID,
    ERR_CLOSED, ERR_DUPLICATE, ERR_ETAG, ERR_NOT_FOUND, ERR_READONLY, ERR_TYPE,
    FABRIKAM_ACCOUNT_ID, not_exist, now_iso, now_iso_ms, SALES_TEAM_ID, SAM_USER_ID,
    SUPPORT_TEAM_ID)
from .entities import ENTITIES
from .governor import UserState
from .reqlog import LogEntry


class Row:
    """A stored row.  Immutable once stored: updates store a new Row."""
    __slots__ = ("id", "a", "seq", "parties")

    def __init__(self, rid, a, seq, parties=None):
        self.id = rid
        self.a = a
        self.seq = seq
        self.parties = parties


class State:
    def __init__(self, defaults):
        self.lock = threading.RLock()
        self.defaults = dict(defaults)
        self.config = dict(defaults)
        self.version = 1000
        self.seq = 0
        self.log_seq = 0
        self.delta_gen = 1
        self.delta_secret = secrets.token_bytes(16)
        self.tokens = {}
        self.token_count = 0
        self.token_gen = 0
        self.inflight = 0
        self.window = collections.deque()
        self.ports = set()
        self.stats = collections.Counter()
        self.state_file = None      # --state-file: where /_sim/save writes
        self.reset()

    # -- reset / seed --------------------------------------------------------
    def reset(self):
        with self.lock:
            self.config = dict(self.defaults)
            self.rows = {name: {} for name in ENTITIES}
            self.order_dirty = set()
            self.changelog = []
            self.journal = None
            self.txn_depth = 0
            self.requests = []
            self.faults = []
            self.fault_ids = 0
            self.tokens = {}
            self.token_count = 0
            self.token_gen += 1
            self.delta_gen += 1
            self.window.clear()
            self.users = {}
            self.stats = collections.Counter()
            self._seed()
            self.changelog = []

    def _seed(self):
        ctx = Ctx("/api/data/v9.2", user=APP_USER_ID)
        seeds = [
            ("systemuser", APP_USER_ID, {"firstname": "#", "lastname": "d365sync",
                                         "internalemailaddress": "d365sync-app@contoso.example",
                                         "domainname": "d365sync-app@contoso.example",
                                         "accessmode": 4, "isdisabled": False,
                                         "applicationid": self.config["client_id"]}),
            ("systemuser", ALEX_USER_ID, {"firstname": "Alex", "lastname": "Sales",
                                          "internalemailaddress": "alex@contoso.example",
                                          "domainname": "alex@contoso.example",
                                          "accessmode": 0, "isdisabled": False}),
            ("systemuser", SAM_USER_ID, {"firstname": "Sam", "lastname": "Manager",
                                         "internalemailaddress": "sam@contoso.example",
                                         "domainname": "sam@contoso.example",
                                         "accessmode": 0, "isdisabled": False}),
            ("team", SALES_TEAM_ID, {"name": "Sales Team", "teamtype": 0,
                                     "emailaddress": "sales@contoso.example"}),
            ("team", SUPPORT_TEAM_ID, {"name": "Support Team", "teamtype": 0,
                                       "emailaddress": "support@contoso.example"}),
            ("account", CONTOSO_ACCOUNT_ID, {"name": "Contoso Ltd",
                                             "accountnumber": "ACC-0001",
                                             "telephone1": "+1 555 0100",
                                             "address1_city": "Redmond"}),
            ("account", FABRIKAM_ACCOUNT_ID, {"name": "Fabrikam Inc",
                                              "accountnumber": "ACC-0002",
                                              "telephone1": "+1 555 0200",
                                              "address1_city": "Seattle"}),
        ]
        for ent_name, rid, vals in seeds:
            ent = ENTITIES[ent_name]
            p = parse_body(ent, vals, ctx)
            self.apply_write(ent, p, "create", rid, ctx)
        # the application user's fullname is "# d365sync"
        u = self.rows["systemuser"][APP_USER_ID]
        u.a["fullname"] = "# d365sync"

    # -- transactions -------------------------------------------------------
    def begin(self):
        if self.txn_depth == 0:
            self.journal = []
        self.txn_depth += 1
        return (len(self.journal), len(self.changelog))

    def commit(self, marker):
        self.txn_depth -= 1
        if self.txn_depth == 0:
            self.journal = None

    def rollback(self, marker):
        jpos, lpos = marker
        while len(self.journal) > jpos:
            ent_name, rid, old = self.journal.pop()
            table = self.rows[ent_name]
            if old is None:
                table.pop(rid, None)
            else:
                if rid not in table:
                    self.order_dirty.add(ent_name)
                table[rid] = old
        del self.changelog[lpos:]
        self.txn_depth -= 1
        if self.txn_depth == 0:
            self.journal = None

    def _store(self, ent_name, rid, row):
        table = self.rows[ent_name]
        if self.journal is not None:
            self.journal.append((ent_name, rid, table.get(rid)))
        if row is None:
            del table[rid]
        else:
            table[rid] = row

    def ordered_rows(self, ent_name):
        table = self.rows[ent_name]
        if ent_name in self.order_dirty:
            items = sorted(table.values(), key=lambda r: r.seq)
            table.clear()
            for r in items:
                table[r.id] = r
            self.order_dirty.discard(ent_name)
        return table

    # -- writes (caller holds the lock) ---------------------------------------
    def apply_write(self, ent, p, mode, rid, ctx, if_match=None):
        """mode: create (POST; duplicate -> 412), insert (If-None-Match: *),
        update (If-Match), upsert (PATCH).  Returns (created, row)."""
        if rid is None:
            rid = p.key or str(uuid.uuid4())
        elif p.key is not None and p.key != rid:
            raise ApiError(400, ERR_TYPE,
                           "Entity Id must be the same as the value set in property bag "
                           "('%s' in the URL, '%s' in the body)." % (rid, p.key))
        table = self.rows[ent.name]
        existing = table.get(rid)
        if existing is not None and mode in ("create", "insert"):
            raise ApiError(412, ERR_DUPLICATE, "A record with matching key values already exists.")
        if existing is None and mode == "update":
            raise not_exist(ent.name, rid)
        if if_match and if_match != "*" and existing is not None:
            want = if_match.strip()
            have = 'W/"%s"' % existing.a.get("versionnumber")
            if want != have:
                raise ApiError(412, ERR_ETAG,
                               "The version of the existing record doesn't match the RowVersion "
                               "property provided.")
        creating = existing is None
        attrs = ent.attrs
        for k, v in p.vals.items():
            a = attrs[k]
            if (creating and not a.create) or (not creating and not a.update):
                raise ApiError(400, ERR_READONLY,
                               "Field '%s' of entity '%s' is not valid for %s "
                               "(IsValidFor%s is false)."
                               % (k, ent.name, "create" if creating else "update",
                                  "Create" if creating else "Update"))
        for k, target in p.binds.items():
            a = attrs[k]
            if (creating and not a.create) or (not creating and not a.update):
                raise ApiError(400, ERR_READONLY,
                               "Field '%s' of entity '%s' is not valid for %s."
                               % (k, ent.name, "create" if creating else "update"))
            if target is not None and target[1] not in self.rows[target[0]]:
                raise not_exist(target[0], target[1])
        if p.parties is not None:
            for pt in p.parties:
                if pt["party"] is not None and pt["party"][1] not in self.rows[pt["party"][0]]:
                    raise ApiError(400, ERR_NOT_FOUND,
                                   "Activity party: %s With Id = %s Does Not Exist"
                                   % (pt["party"][0], pt["party"][1]))
        vals = p.vals
        # state / status
        has_state = "statecode" in attrs
        new_state = new_status = None
        if has_state:
            cur_state = existing.a.get("statecode") if existing else 0
            cur_status = existing.a.get("statuscode") if existing else None
            sc, st = attrs["statecode"], attrs["statuscode"]
            if ("statecode" in vals and vals["statecode"] is None) or \
                    ("statuscode" in vals and vals["statuscode"] is None):
                raise ApiError(400, ERR_TYPE, "statecode and statuscode cannot be null.")
            if "statecode" in vals or "statuscode" in vals or creating:
                new_state = vals.get("statecode", cur_state)
                if new_state not in sc.state_default:
                    raise ApiError(400, ERR_TYPE,
                                   "%s is not a valid state code on %s." % (new_state, ent.name))
                if "statuscode" in vals:
                    new_status = vals["statuscode"]
                elif "statecode" in vals or creating:
                    new_status = sc.state_default[new_state]
                else:
                    new_status = cur_status
                if st.status_state.get(new_status) != new_state:
                    state_label = next(o[1] for o in sc.options if o[0] == new_state)
                    raise ApiError(400, ERR_TYPE,
                                   "%s is not a valid status code for state code %sState.%s "
                                   "on %s with Id %s."
                                   % (new_status, ent.name, state_label, ent.name, rid))
            if ent.is_activity and existing is not None and cur_state != 0:
                other = [k for k in vals if k not in ("statecode", "statuscode")]
                if p.binds or p.parties is not None:
                    other.append("lookups")
                if other and (new_state is None or new_state != 0):
                    raise ApiError(400, ERR_CLOSED,
                                   "This %s is closed (statecode %s) and cannot be edited: "
                                   "only statecode/statuscode may change on a closed activity "
                                   "(%s With Id = %s)." % (ent.name, cur_state, ent.name, rid))
        # build the new row
        now = now_iso()
        self.version += 1
        ver = self.version
        if creating:
            a = {}
            self.seq += 1
            seq = self.seq
            parties = [] if ent.is_activity else None
        else:
            a = dict(existing.a)
            seq = existing.seq
            parties = existing.parties
        for k, v in vals.items():
            if v is None:
                a.pop(k, None)
            else:
                a[k] = v
        for k, t in p.binds.items():
            if t is None:
                a.pop(k, None)
            else:
                a[k] = t
        if p.parties is not None:
            parties = [{"activitypartyid": str(uuid.uuid4()), "party": pt["party"],
                        "mask": pt["mask"], "addr": pt["addr"]} for pt in p.parties]
        if new_state is not None:
            a["statecode"] = new_state
            a["statuscode"] = new_status
        if creating:
            a[ent.key] = rid
            a["createdon"] = now
            a["createdby"] = ("systemuser", ctx.user)
            if "ownerid" in attrs and "ownerid" not in a:
                a["ownerid"] = ("systemuser", ctx.user)
            if ent.is_activity:
                a["activitytypecode"] = ent.name
        if (creating or "firstname" in vals or "lastname" in vals) and "fullname" in attrs \
                and ent.name in ("contact", "systemuser"):
            fn = " ".join(x for x in (a.get("firstname"), a.get("lastname")) if x)
            if fn:
                a["fullname"] = fn
            else:
                a.pop("fullname", None)
        a["modifiedon"] = now
        a["modifiedby"] = ("systemuser", ctx.user)
        a["versionnumber"] = ver
        row = Row(rid, a, seq, parties)
        self._store(ent.name, rid, row)
        self.changelog.append((ver, ent.name, rid, "u"))
        return creating, row

    def apply_delete(self, ent, rid, if_match=None):
        row = self.rows[ent.name].get(rid)
        if row is None:
            raise not_exist(ent.name, rid)
        if if_match and if_match != "*":
            if if_match.strip() != 'W/"%s"' % row.a.get("versionnumber"):
                raise ApiError(412, ERR_ETAG,
                               "The version of the existing record doesn't match the RowVersion "
                               "property provided.")
        self.version += 1
        self._store(ent.name, rid, None)
        self.changelog.append((self.version, ent.name, rid, "d"))

    # -- tokens ----------------------------------------------------------------
    def user(self, client_id):
        """The service-protection state of a client id (caller holds the lock)."""
        u = self.users.get(client_id)
        if u is None:
            u = self.users[client_id] = UserState(client_id)
        return u

    def secret_of(self, client_id):
        """The configured secret of a client id, or None if it is unknown."""
        cid = client_id.lower()
        if cid == self.config["client_id"].lower():
            return self.config["client_secret"]
        for k, v in (self.config.get("app_users") or {}).items():
            if k.lower() == cid:
                return v
        return None

    def issue_token(self, scope, client_id=None):
        with self.lock:
            self.token_count += 1
            tok = secrets.token_urlsafe(48)
            life = int(self.config["token_lifetime"])
            self.tokens[tok] = {"index": self.token_count, "expires": time.time() + life,
                                "scope": scope, "gen": self.token_gen,
                                "client": (client_id or self.config["client_id"]).lower()}
            self.stats["tokens_issued"] += 1
            return tok, life

    def token_info(self, tok):
        info = self.tokens.get(tok)
        if info is None or info["gen"] != self.token_gen or time.time() >= info["expires"]:
            return None
        return info

    # -- request log -------------------------------------------------------------
    def log_start(self, kind, method, path, scheme, headers, raw, btype,
                  batch=None, changeset=None, content_id=None, conn=None):
        e = LogEntry()
        e.conn = conn
        e.time = now_iso_ms()
        e.kind = kind
        e.method = method
        e.path = path
        e.scheme = scheme
        e.headers = headers
        e.raw = raw if self.config.get("log_bodies", True) else None
        e.btype = btype
        e.status = None
        e.error_code = None
        e.batch = batch
        e.changeset = changeset
        e.content_id = content_id
        e.rolled_back = False
        e.client = None
        with self.lock:
            self.log_seq += 1
            e.seq = self.log_seq
            self.requests.append(e)
            if batch is not None:
                self.stats["requests_inner"] += 1
            else:
                self.stats["requests_" + kind] += 1
            limit = int(self.config.get("log_limit") or 0)
            if limit and len(self.requests) > limit + limit // 10 + 100:
                del self.requests[:len(self.requests) - limit]
        return e

    def redact_headers(self, headers):
        out = {}
        for k, v in headers:
            lk = k.lower()
            if lk == "authorization":
                parts = v.split(None, 1)
                if len(parts) == 2 and parts[0].lower() == "bearer":
                    info = self.tokens.get(parts[1].strip())
                    v = "Bearer <token #%d>" % info["index"] if info else "Bearer <unknown token>"
                else:
                    v = "<redacted>"
            if lk in out:
                out[lk] = out[lk] + ", " + v
            else:
                out[lk] = v
        return out

    # -- faults ------------------------------------------------------------------
    def match_fault(self, method, path, body, inner):
        if not self.faults:
            return None
        text = None
        with self.lock:
            for f in self.faults:
                if f.exhausted():
                    continue
                if f.scope == "outer" and inner or f.scope == "inner" and not inner:
                    continue
                if f.method and f.method != method:
                    continue
                if f.path_re and not f.path_re.search(path):
                    continue
                if f.body_re:
                    if text is None:
                        text = body.decode("utf-8", "replace") if body else ""
                    if not f.body_re.search(text):
                        continue
                f.matched += 1
                if f.matched <= f.skip:
                    continue
                f.fired += 1
                self.stats["faults_fired"] += 1
                return f
        return None
