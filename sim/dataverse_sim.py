#!/usr/bin/python3
"""Dataverse (Dynamics 365 Web API) simulator for the d365sync tests, demo
and benchmark.

Python 3 standard library only.  Serves, on 127.0.0.1 only:

  * the Microsoft Entra ID v2 client-credentials token endpoint
    (POST /{tenant}/oauth2/v2.0/token) with Entra-shaped errors;
  * the Web API subset d365sync uses under /api/data/v9.x/: entity CRUD with
    OData semantics and Dataverse error bodies, metadata (EntityDefinitions),
    WhoAmI, $batch with change sets, the bulk messages
    (Create/Update/UpsertMultiple), change tracking (delta links), service
    protection throttling (429 + Retry-After) and fault injection;
  * a control API under /_sim/ (no auth) for tests: reset, request log,
    faults, config, token expiry, direct row edits "as a Dynamics user",
    statistics.

Design notes
  * All shared state lives in one State object guarded by one RLock.  Rows
    are dicts keyed by lowercase GUID; the change-tracking log is an
    append-only list of (version, entity, id, kind) tuples, so a delta read
    is a bisect plus a scan of what changed.
  * Atomic units (a $batch change set, a bulk message) run under the lock
    with an undo journal; a failure restores the previous Row objects and
    truncates the change log.  Rows are immutable once stored (an update
    stores a new Row), so the journal only keeps references.
  * Inner $batch operations go through exactly the same code as standalone
    requests (fault rules, validation, logging), only the token check and
    throttling are done once for the envelope.
  * Cost model: each outer request answers latency_ms + server time after
    it arrived, where server time is per_record_ms per record operation (a
    $batch runs its operations one after another; a bulk message costs
    bulk_target_ms per target).  The wait happens outside the lock, so
    requests of one user run in parallel as on a real server.
  * Service protection per application user (each client id has its own
    budgets): the execution-time budget (exec_budget_s of server time per
    window_s, 429 0x80072321), the request count (requests_per_window, 429
    0x80072322) and the concurrency limit (max_concurrent, 429 0x80072326),
    each 429 with an honest Retry-After.

See sim/README.md for the flags, the control API and the seed GUIDs.
"""

import argparse
import bisect
import base64
import collections
import datetime
import hashlib
import hmac
import http
import itertools
import json
import math
import os
import re
import secrets
import socket
import ssl
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, unquote_plus, urlsplit

# ---------------------------------------------------------------------------
# Constants and seed identifiers
# ---------------------------------------------------------------------------

DEFAULT_TENANT = "11111111-1111-1111-1111-111111111111"
DEFAULT_CLIENT_ID = "22222222-2222-2222-2222-222222222222"
DEFAULT_SECRET = "sim-secret"

ORGANIZATION_ID = "0a000000-0000-4000-8000-000000000001"
BUSINESS_UNIT_ID = "b0000000-0000-4000-8000-000000000001"
APP_USER_ID = "5e5e0000-0000-4000-8000-000000000001"
ALEX_USER_ID = "5e5e0000-0000-4000-8000-000000000002"
SAM_USER_ID = "5e5e0000-0000-4000-8000-000000000003"
SALES_TEAM_ID = "7ea70000-0000-4000-8000-000000000001"
SUPPORT_TEAM_ID = "7ea70000-0000-4000-8000-000000000002"
CONTOSO_ACCOUNT_ID = "acc00000-0000-4000-8000-000000000001"
FABRIKAM_ACCOUNT_ID = "acc00000-0000-4000-8000-000000000002"

NS = "Microsoft.Dynamics.CRM."
GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
API_PATH_RE = re.compile(r"^/api/data/(v9\.\d+)/(.*)$", re.S)
TOKEN_PATH_RE = re.compile(r"^/([^/]+)/oauth2/v2\.0/token/?$")
DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
    r"(Z|[+-]\d{2}:\d{2})$")
DATE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
LOOKUP_TYPES = ("Lookup", "Customer", "Owner")
INT32_MIN, INT32_MAX = -2147483648, 2147483647
MONEY_MAX = 922337203685477.0

ERR_NOT_FOUND = "0x80040217"
ERR_DUPLICATE = "0x80040237"
ERR_INVALID_PROP = "0x80060888"
ERR_SEGMENT = "0x8006088a"
ERR_READONLY = "0x80048d19"
ERR_TYPE = "0x80040203"
ERR_LENGTH = "0x80044331"
ERR_DELTA = "0x80044352"
ERR_CLOSED = "0x80040215"
ERR_CONCURRENT = "0x80072326"
ERR_REQUESTS = "0x80072322"
ERR_EXEC_TIME = "0x80072321"
ERR_ETAG = "0x80060882"


_now_cache = [0, ""]


def now_iso():
    t = int(time.time())
    if t != _now_cache[0]:
        _now_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
        _now_cache[0] = t
    return _now_cache[1]


def now_iso_ms():
    d = datetime.datetime.now(datetime.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (d.microsecond // 1000)


def det_uuid(*parts):
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "d365sim:" + ":".join(parts)))


def jdump(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------

class Attr:
    """One attribute of an entity: type, limits, create/update validity."""
    __slots__ = ("name", "type", "label", "maxlen", "create", "update",
                 "targets", "options", "date_only", "minv", "maxv",
                 "schema", "custom", "status_state", "state_default",
                 "primary_id", "primary_name", "optionset_name")

    def __init__(self, name, typ, label, maxlen=None, create=True,
                 update=True, targets=None, options=None, date_only=False,
                 minv=None, maxv=None, custom=False):
        self.name = name
        self.type = typ
        self.label = label
        self.maxlen = maxlen
        self.create = create
        self.update = update
        self.targets = targets or []
        self.options = options or []   # list of tuples, see below
        self.date_only = date_only
        self.minv = minv
        self.maxv = maxv
        self.custom = custom
        self.schema = "".join(p.capitalize() for p in name.split("_")) \
            if not custom else name
        self.primary_id = False
        self.primary_name = False
        self.optionset_name = None
        # Status: options are (value, label, state); State: (value, label,
        # default_status, invariant)
        self.status_state = {}
        self.state_default = {}


class Entity:
    """One entity: logical name, entity set, key and attributes."""

    def __init__(self, name, set_name, key, display, plural, otc,
                 is_activity=False, change_tracking=False, custom=False,
                 primary_name=None):
        self.name = name
        self.set_name = set_name
        self.key = key
        self.display = display
        self.plural = plural
        self.otc = otc
        self.is_activity = is_activity
        self.change_tracking = change_tracking
        self.custom = custom
        self.primary_name = primary_name
        self.attrs = collections.OrderedDict()
        self.navs = {}        # nav property name -> (attr name, [targets])
        self.party_nav = (name + "_activity_parties") if is_activity else None
        self.type_name = NS + name

    def add(self, attr):
        self.attrs[attr.name] = attr
        if attr.type in ("State", "Status", "Picklist"):
            attr.optionset_name = "%s_%s" % (self.name, attr.name)
        return attr

    def finish(self):
        k = self.attrs[self.key]
        k.primary_id = True
        if self.primary_name and self.primary_name in self.attrs:
            self.attrs[self.primary_name].primary_name = True
        st = self.attrs.get("statuscode")
        if st is not None:
            st.status_state = {o[0]: o[2] for o in st.options}
        sc = self.attrs.get("statecode")
        if sc is not None:
            sc.state_default = {o[0]: o[2] for o in sc.options}
        for a in self.attrs.values():
            if a.type == "Owner":
                self.navs[a.name] = (a.name, list(a.targets))
            elif a.type == "Customer":
                for t in a.targets:
                    self.navs["%s_%s" % (a.name, t)] = (a.name, [t])
            elif a.type == "Lookup":
                if a.name == "regardingobjectid":
                    for t in a.targets:
                        self.navs["regardingobjectid_%s" % t] = (a.name, [t])
                        self.navs["regardingobjectid_%s_%s" % (t, self.name)] = \
                            (a.name, [t])
                else:
                    self.navs[a.name] = (a.name, list(a.targets))
        self.read_cols = list(self.attrs.keys())


def _string(name, label, maxlen, **kw):
    return Attr(name, "String", label, maxlen=maxlen, **kw)


def _common_tail(e, owner=True):
    if owner:
        e.add(Attr("ownerid", "Owner", "Owner", targets=["systemuser", "team"]))
    e.add(Attr("createdby", "Lookup", "Created By", targets=["systemuser"],
               create=False, update=False))
    e.add(Attr("modifiedby", "Lookup", "Modified By", targets=["systemuser"],
               create=False, update=False))
    e.add(Attr("createdon", "DateTime", "Created On", create=False, update=False))
    e.add(Attr("modifiedon", "DateTime", "Modified On", create=False, update=False))
    e.add(Attr("versionnumber", "BigInt", "Version Number", create=False,
               update=False))


def _state_status(e, states, statuses, create_state=False, create_status=False):
    e.add(Attr("statecode", "State", "Status", options=states,
               create=create_state))
    e.add(Attr("statuscode", "Status", "Status Reason", options=statuses,
               create=create_status))


def build_schema():
    ents = collections.OrderedDict()

    # contact -------------------------------------------------------------
    c = Entity("contact", "contacts", "contactid", "Contact", "Contacts", 2,
               change_tracking=True, primary_name="fullname")
    c.add(Attr("contactid", "Uniqueidentifier", "Contact", update=False))
    c.add(_string("firstname", "First Name", 50))
    c.add(_string("lastname", "Last Name", 50))
    c.add(_string("middlename", "Middle Name", 50))
    c.add(_string("fullname", "Full Name", 160, create=False, update=False))
    c.add(_string("jobtitle", "Job Title", 100))
    c.add(_string("emailaddress1", "Email", 100))
    c.add(_string("emailaddress2", "Email Address 2", 100))
    c.add(_string("telephone1", "Business Phone", 50))
    c.add(_string("mobilephone", "Mobile Phone", 50))
    c.add(_string("address1_line1", "Address 1: Street 1", 250))
    c.add(_string("address1_city", "Address 1: City", 80))
    c.add(_string("address1_postalcode", "Address 1: ZIP/Postal Code", 20))
    c.add(_string("address1_country", "Address 1: Country/Region", 80))
    c.add(Attr("description", "Memo", "Description", maxlen=2000))
    c.add(Attr("numberofchildren", "Integer", "No. of Children", minv=0,
               maxv=1000000000))
    c.add(Attr("annualincome", "Money", "Annual Income", minv=0.0,
               maxv=MONEY_MAX))
    c.add(Attr("creditlimit", "Money", "Credit Limit", minv=0.0,
               maxv=MONEY_MAX))
    c.add(Attr("donotemail", "Boolean", "Do not allow Emails",
               options=[(False, "Allow"), (True, "Do Not Allow")]))
    c.add(Attr("donotphone", "Boolean", "Do not allow Phone Calls",
               options=[(False, "Allow"), (True, "Do Not Allow")]))
    c.add(Attr("birthdate", "DateTime", "Birthday", date_only=True))
    c.add(Attr("lastusedincampaign", "DateTime", "Last Date Included in Campaign"))
    c.add(Attr("gendercode", "Picklist", "Gender",
               options=[(1, "Male"), (2, "Female")]))
    c.add(Attr("preferredcontactmethodcode", "Picklist",
               "Preferred Method of Contact",
               options=[(1, "Any"), (2, "Email"), (3, "Phone")]))
    c.add(Attr("parentcustomerid", "Customer", "Company Name",
               targets=["account", "contact"]))
    _state_status(c, [(0, "Active", 1, "Active"), (1, "Inactive", 2, "Inactive")],
                  [(1, "Active", 0), (2, "Inactive", 1)], create_status=True)
    _common_tail(c)
    ents["contact"] = c

    # account -------------------------------------------------------------
    a = Entity("account", "accounts", "accountid", "Account", "Accounts", 1,
               change_tracking=True, primary_name="name")
    a.add(Attr("accountid", "Uniqueidentifier", "Account", update=False))
    a.add(_string("name", "Account Name", 160))
    a.add(_string("accountnumber", "Account Number", 20))
    a.add(_string("telephone1", "Main Phone", 50))
    a.add(_string("emailaddress1", "Email", 100))
    a.add(_string("websiteurl", "Website", 200))
    a.add(_string("address1_city", "Address 1: City", 80))
    a.add(Attr("description", "Memo", "Description", maxlen=2000))
    a.add(Attr("revenue", "Money", "Annual Revenue", minv=0.0, maxv=MONEY_MAX))
    a.add(Attr("numberofemployees", "Integer", "Number of Employees", minv=0,
               maxv=1000000000))
    a.add(Attr("parentaccountid", "Lookup", "Parent Account", targets=["account"]))
    a.add(Attr("primarycontactid", "Lookup", "Primary Contact", targets=["contact"]))
    _state_status(a, [(0, "Active", 1, "Active"), (1, "Inactive", 2, "Inactive")],
                  [(1, "Active", 0), (2, "Inactive", 1)], create_status=True)
    _common_tail(a)
    ents["account"] = a

    # systemuser ----------------------------------------------------------
    u = Entity("systemuser", "systemusers", "systemuserid", "User", "Users", 8,
               primary_name="fullname")
    u.add(Attr("systemuserid", "Uniqueidentifier", "User", update=False))
    u.add(_string("firstname", "First Name", 64))
    u.add(_string("lastname", "Last Name", 64))
    u.add(_string("fullname", "Full Name", 200, create=False, update=False))
    u.add(_string("internalemailaddress", "Primary Email", 100))
    u.add(_string("domainname", "User Name", 1024))
    u.add(Attr("accessmode", "Picklist", "Access Mode",
               options=[(0, "Read-Write"), (1, "Administrative"), (2, "Read"),
                        (3, "Support User"), (4, "Non-interactive"),
                        (5, "Delegated Admin")]))
    u.add(Attr("isdisabled", "Boolean", "Status",
               options=[(False, "Enabled"), (True, "Disabled")]))
    u.add(Attr("applicationid", "Uniqueidentifier", "Application ID"))
    u.add(Attr("azureactivedirectoryobjectid", "Uniqueidentifier",
               "Azure AD Object ID"))
    _common_tail(u, owner=False)
    ents["systemuser"] = u

    # team ----------------------------------------------------------------
    t = Entity("team", "teams", "teamid", "Team", "Teams", 9, primary_name="name")
    t.add(Attr("teamid", "Uniqueidentifier", "Team", update=False))
    t.add(_string("name", "Team Name", 160))
    t.add(Attr("teamtype", "Picklist", "Team Type",
               options=[(0, "Owner"), (1, "Access"), (2, "Security Group"),
                        (3, "Office Group")]))
    t.add(Attr("description", "Memo", "Description", maxlen=2000))
    t.add(_string("emailaddress", "Email", 100))
    _common_tail(t, owner=False)
    ents["team"] = t

    # activities ----------------------------------------------------------
    def activity(name, set_name, display, plural, otc, states, statuses,
                 extra, desc_len=2000, custom=False):
        e = Entity(name, set_name, "activityid", display, plural, otc,
                   is_activity=True, custom=custom, primary_name="subject")
        e.add(Attr("activityid", "Uniqueidentifier", display, update=False))
        e.add(_string("subject", "Subject", 200))
        e.add(Attr("description", "Memo", "Description", maxlen=desc_len))
        e.add(Attr("scheduledstart", "DateTime", "Start Date"))
        e.add(Attr("scheduledend", "DateTime", "Due Date"))
        e.add(Attr("actualstart", "DateTime", "Actual Start"))
        e.add(Attr("actualend", "DateTime", "Actual End"))
        e.add(Attr("actualdurationminutes", "Integer", "Actual Duration",
                   minv=0, maxv=2147483647))
        e.add(Attr("scheduleddurationminutes", "Integer", "Duration",
                   minv=0, maxv=2147483647))
        e.add(Attr("isregularactivity", "Boolean", "Is Regular Activity",
                   options=[(False, "No"), (True, "Yes")]))
        e.add(Attr("prioritycode", "Picklist", "Priority",
                   options=[(0, "Low"), (1, "Normal"), (2, "High")]))
        for x in extra:
            e.add(x)
        e.add(Attr("regardingobjectid", "Lookup", "Regarding",
                   targets=["account", "contact"]))
        e.add(Attr("activitytypecode", "EntityName", "Activity Type",
                   create=False, update=False))
        _state_status(e, states, statuses)
        _common_tail(e)
        ents[name] = e

    activity("phonecall", "phonecalls", "Phone Call", "Phone Calls", 4210,
             [(0, "Open", 1, "Open"), (1, "Completed", 2, "Completed"),
              (2, "Canceled", 3, "Canceled")],
             [(1, "Open", 0), (2, "Made", 1), (4, "Received", 1),
              (3, "Canceled", 2)],
             [_string("phonenumber", "Phone Number", 200),
              Attr("directioncode", "Boolean", "Direction",
                   options=[(False, "Incoming"), (True, "Outgoing")])])
    activity("email", "emails", "Email", "Email Messages", 4202,
             [(0, "Open", 1, "Open"), (1, "Completed", 2, "Completed"),
              (2, "Canceled", 5, "Canceled")],
             [(1, "Draft", 0), (2, "Completed", 1), (3, "Sent", 1),
              (4, "Received", 1), (5, "Canceled", 2)],
             [Attr("directioncode", "Boolean", "Direction",
                   options=[(False, "Incoming"), (True, "Outgoing")])],
             desc_len=1048576)
    activity("task", "tasks", "Task", "Tasks", 4212,
             [(0, "Open", 2, "Open"), (1, "Completed", 5, "Completed"),
              (2, "Canceled", 6, "Canceled")],
             [(2, "Not Started", 0), (3, "In Progress", 0),
              (4, "Waiting on someone else", 0), (7, "Deferred", 0),
              (5, "Completed", 1), (6, "Canceled", 2)],
             [])
    activity("appointment", "appointments", "Appointment", "Appointments", 4201,
             [(0, "Open", 1, "Open"), (1, "Completed", 3, "Completed"),
              (2, "Canceled", 4, "Canceled"), (3, "Scheduled", 5, "Scheduled")],
             [(1, "Free", 0), (2, "Tentative", 0), (3, "Completed", 1),
              (4, "Canceled", 2), (5, "Busy", 3), (6, "Out of Office", 3)],
             [_string("location", "Location", 200),
              Attr("isalldayevent", "Boolean", "All Day Event",
                   options=[(False, "No"), (True, "Yes")])],
             desc_len=10000)
    activity("new_pageview", "new_pageviews", "Page View", "Page Views", 10001,
             [(0, "Open", 1, "Open"), (1, "Completed", 2, "Completed"),
              (2, "Canceled", 3, "Canceled")],
             [(1, "Open", 0), (2, "Completed", 1), (3, "Canceled", 2)],
             [Attr("new_url", "String", "URL", maxlen=500, custom=True)],
             custom=True)

    for e in ents.values():
        e.finish()
    return ents


ENTITIES = build_schema()
SETS = {e.set_name: e for e in ENTITIES.values()}
ACTIVITY_PARTY_TARGETS = ("contact", "systemuser", "account")

EDM_NAMES = {"String": "Edm.String", "Memo": "Edm.String",
             "Integer": "Edm.Int32", "Money": "Edm.Decimal",
             "Boolean": "Edm.Boolean", "DateTime": "Edm.DateTimeOffset",
             "Picklist": "Edm.Int32", "State": "Edm.Int32",
             "Status": "Edm.Int32", "BigInt": "Edm.Int64",
             "Uniqueidentifier": "Edm.Guid", "EntityName": "Edm.String"}

META_TYPE = {"String": "StringAttributeMetadata",
             "Memo": "MemoAttributeMetadata",
             "Integer": "IntegerAttributeMetadata",
             "Money": "MoneyAttributeMetadata",
             "Boolean": "BooleanAttributeMetadata",
             "DateTime": "DateTimeAttributeMetadata",
             "Picklist": "PicklistAttributeMetadata",
             "Lookup": "LookupAttributeMetadata",
             "Customer": "LookupAttributeMetadata",
             "Owner": "LookupAttributeMetadata",
             "State": "StateAttributeMetadata",
             "Status": "StatusAttributeMetadata",
             "BigInt": "BigIntAttributeMetadata",
             "Uniqueidentifier": "UniqueIdentifierAttributeMetadata",
             "EntityName": "EntityNameAttributeMetadata"}


# ---------------------------------------------------------------------------
# Errors, responses, small helpers
# ---------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status, code, message, headers=None):
        Exception.__init__(self, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


class DropConnection(Exception):
    """A fault rule asked to close the connection without answering."""


class Resp:
    __slots__ = ("status", "headers", "body", "code", "nrec", "entity_path", "bulk")

    def __init__(self, status, headers=None, body=b"", code=None, nrec=0):
        self.status = status
        self.headers = headers if headers is not None else []
        self.body = body
        self.code = code
        self.nrec = nrec
        self.entity_path = None
        self.bulk = False


def error_resp(e):
    body = jdump({"error": {"code": e.code, "message": e.message}})
    h = [("Content-Type", "application/json; odata.metadata=minimal"),
         ("OData-Version", "4.0")] + list(e.headers)
    return Resp(e.status, h, body, code=e.code)


def json_resp(status, obj, extra=None, nrec=0):
    h = [("Content-Type", "application/json; odata.metadata=minimal"),
         ("OData-Version", "4.0")]
    if extra:
        h.extend(extra)
    return Resp(status, h, jdump(obj), nrec=nrec)


def bad_segment(seg):
    return ApiError(404, ERR_SEGMENT, "Resource not found for the segment '%s'." % seg)


def not_exist(ent_name, rid):
    return ApiError(404, ERR_NOT_FOUND, "%s With Id = %s Does Not Exist" % (ent_name, rid))


def no_property(name, type_name):
    return ApiError(400, ERR_INVALID_PROP,
                    "Could not find a property named '%s' on type '%s'." % (name, type_name))


def parse_prefer(value):
    """Parse a Prefer header into {name: value or True}; quoted values may
    contain commas."""
    out = {}
    if not value:
        return out
    for m in re.finditer(r'\s*([^=,\s]+)(?:\s*=\s*("[^"]*"|[^,]*))?\s*(?:,|$)', value):
        k = m.group(1).lower()
        v = m.group(2)
        if v is None:
            out[k] = True
        else:
            out[k] = v.strip().strip('"')
    return out


def parse_query(qs):
    """Parse a query string into an ordered dict (last wins)."""
    out = collections.OrderedDict()
    if not qs:
        return out
    for part in qs.split("&"):
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
        else:
            k, v = part, ""
        out[unquote_plus(k)] = unquote_plus(v)
    return out


def parse_media(value):
    """'multipart/mixed; boundary="x"' -> ('multipart/mixed', {'boundary': 'x'})"""
    if not value:
        return "", {}
    parts = value.split(";")
    mt = parts[0].strip().lower()
    params = {}
    for p in parts[1:]:
        if "=" in p:
            k, v = p.split("=", 1)
            v = v.strip()
            if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                v = v[1:-1]
            params[k.strip().lower()] = v
    return mt, params


def b64e(obj):
    return base64.urlsafe_b64encode(jdump(obj)).decode("ascii").rstrip("=")


def b64d(s):
    s = s + "=" * (-len(s) % 4)
    return json.loads(base64.urlsafe_b64decode(s.encode("ascii")).decode("utf-8"))


def guid_or_none(s):
    if isinstance(s, str) and GUID_RE.match(s):
        return s.lower()
    return None


# ---------------------------------------------------------------------------
# Value coercion (body validation)
# ---------------------------------------------------------------------------

def _type_error(ent, a, v, detail=None):
    lit = json.dumps(v, ensure_ascii=False)
    if len(lit) > 60:
        lit = lit[:57] + "..."
    msg = ("Cannot convert the literal %s to the expected type '%s' for attribute "
           "'%s' of entity '%s'." % (lit, EDM_NAMES.get(a.type, a.type), a.name, ent.name))
    if detail:
        msg += " " + detail
    return ApiError(400, ERR_TYPE, msg)


def _range_error(ent, a, v):
    return ApiError(400, ERR_LENGTH,
                    "A validation error occurred. The value %s of '%s' on record of type "
                    "'%s' is outside the valid range. Accepted Values: %s to %s"
                    % (v, a.name, ent.name, a.minv, a.maxv))


def norm_datetime(s):
    """Validate an Edm.DateTimeOffset literal; return 'YYYY-MM-DDTHH:MM:SSZ' (UTC)
    or raise ValueError."""
    m = DATETIME_RE.match(s)
    if not m:
        raise ValueError("bad format")
    y, mo, d, hh, mi = (int(m.group(i)) for i in range(1, 6))
    ss = int(m.group(6) or 0)
    tz = m.group(8)
    dt = datetime.datetime(y, mo, d, hh, mi, ss)
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        off = datetime.timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
        dt = dt - sign * off
    if dt.year < 1753:
        raise OverflowError("before 1753")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def norm_date(s):
    m = DATE_RE.match(s)
    if not m:
        raise ValueError("bad format")
    dt = datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if dt.year < 1753:
        raise OverflowError("before 1753")
    return dt.strftime("%Y-%m-%d")


def coerce(ent, a, v):
    """Validate JSON value v for attribute a; return the stored value."""
    if v is None:
        return None
    t = a.type
    if t == "String" or t == "Memo":
        if not isinstance(v, str):
            raise _type_error(ent, a, v)
        if len(v) > a.maxlen:
            raise ApiError(400, ERR_LENGTH,
                           "A validation error occurred. The length of the '%s' attribute of "
                           "the '%s' entity exceeded the maximum allowed length of '%d'."
                           % (a.name, ent.name, a.maxlen))
        return v
    if t == "Integer":
        if isinstance(v, bool) or not isinstance(v, int):
            raise _type_error(ent, a, v)
        if v < INT32_MIN or v > INT32_MAX:
            raise _type_error(ent, a, v, "The value is outside the range of Edm.Int32.")
        if (a.minv is not None and v < a.minv) or (a.maxv is not None and v > a.maxv):
            raise _range_error(ent, a, v)
        return v
    if t == "Money":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _type_error(ent, a, v)
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            raise _type_error(ent, a, v)
        if (a.minv is not None and v < a.minv) or (a.maxv is not None and v > a.maxv):
            raise _range_error(ent, a, v)
        return round(float(v), 4)
    if t == "Boolean":
        if not isinstance(v, bool):
            raise _type_error(ent, a, v)
        return v
    if t == "DateTime":
        if not isinstance(v, str):
            raise _type_error(ent, a, v)
        try:
            if a.date_only:
                return norm_date(v)
            return norm_datetime(v)
        except OverflowError:
            raise ApiError(400, ERR_TYPE,
                           "The date-time value %s of attribute '%s' of entity '%s' is outside "
                           "the supported range (dates before 1753-01-01 are not allowed)."
                           % (json.dumps(v), a.name, ent.name))
        except ValueError:
            if a.date_only:
                raise _type_error(ent, a, v, "Expected 'Edm.Date' (YYYY-MM-DD): "
                                  "'%s' is a date-only column." % a.name)
            raise _type_error(ent, a, v, "Expected an ISO 8601 date-time with "
                              "offset, e.g. 2023-04-07T21:59:01Z.")
    if t in ("Picklist", "State", "Status"):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _type_error(ent, a, v)
        if t == "Picklist" and v not in {o[0] for o in a.options}:
            raise ApiError(400, ERR_TYPE,
                           "A validation error occurred. The value %d of '%s' on record of "
                           "type '%s' is outside the valid range." % (v, a.name, ent.name))
        return v
    if t == "Uniqueidentifier":
        g = guid_or_none(v)
        if g is None:
            raise _type_error(ent, a, v)
        return g
    raise _type_error(ent, a, v)


# ---------------------------------------------------------------------------
# $filter parsing (subset of OData: eq ne gt ge lt le, and or not,
# parentheses, contains/startswith/endswith, and Dataverse's query functions
# Microsoft.Dynamics.CRM.In / NotIn(PropertyName='x',PropertyValues=[...]))
# ---------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"""\s*(?:
   (?P<str>'(?:[^']|'')*')
  |(?P<typed>[A-Za-z][\w.]*'(?:[^']|'')*')
  |(?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?![\w-])
  |(?P<dt>\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)(?![\w:.])
  |(?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)[mMdDfFlL]?(?![\w])
  |(?P<punc>[(),=\[\]])
  |(?P<ident>[A-Za-z_$@][\w.@/]*)
)""", re.X)

_CMP = {"eq", "ne", "gt", "ge", "lt", "le"}


class FilterError(Exception):
    pass


def _tokenize(s):
    pos = 0
    out = []
    s = s.rstrip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m or m.end() == pos:
            raise FilterError("Syntax error at position %d in '%s'." % (pos, s))
        pos = m.end()
        kind = m.lastgroup
        val = m.group(kind)
        if kind == "str":
            out.append(("lit", val[1:-1].replace("''", "'")))
        elif kind == "typed":
            q = val.index("'")
            out.append(("lit", val[q + 1:-1].replace("''", "'")))
        elif kind == "guid":
            out.append(("lit", val.lower()))
        elif kind == "dt":
            if "T" in val:
                try:
                    if val.endswith("Z") or "+" in val[10:] or "-" in val[10:]:
                        v = norm_datetime(val if re.search(r"(Z|[+-]\d\d:\d\d)$", val)
                                          else val + "Z")
                    else:
                        v = norm_datetime(val + "Z")
                except (ValueError, OverflowError):
                    raise FilterError("Invalid date-time literal '%s'." % val)
                out.append(("lit", v))
            else:
                out.append(("lit", val))
        elif kind == "num":
            out.append(("lit", float(val) if ("." in val or "e" in val.lower()) else int(val)))
        elif kind == "punc":
            out.append((val, val))
        else:
            low = val.lower()
            if low == "null":
                out.append(("lit", None))
            elif low == "true":
                out.append(("lit", True))
            elif low == "false":
                out.append(("lit", False))
            elif low in _CMP or low in ("and", "or", "not"):
                out.append(("kw", low))
            else:
                out.append(("id", val))
    return out


def _norm(v):
    return v.lower() if isinstance(v, str) else v


def _cmp(op, a, b):
    if op == "eq":
        return _norm(a) == _norm(b)
    if op == "ne":
        return _norm(a) != _norm(b)
    if a is None or b is None:
        return False
    a, b = _norm(a), _norm(b)
    try:
        if op == "gt":
            return a > b
        if op == "ge":
            return a >= b
        if op == "lt":
            return a < b
        return a <= b
    except TypeError:
        return False


def _in_values(values):
    """The value list of an In/NotIn call, prepared for look-ups: strings
    compared case-insensitively, numbers as numbers."""
    strs = set()
    nums = set()
    for v in values:
        if v is None:
            continue
        strs.add(str(v).lower())
        try:
            nums.add(float(v))
        except (TypeError, ValueError):
            pass
    return strs, nums


def _in_list(value, prepared):
    """Dataverse's In: the property equals one of the values (given as
    strings); strings compare case-insensitively, numbers as numbers."""
    strs, nums = prepared
    if value is None:
        return False
    if isinstance(value, bool):
        return str(value).lower() in strs
    if isinstance(value, (int, float)):
        return float(value) in nums
    return str(value).lower() in strs


def compile_filter(text, resolve):
    """Compile an OData $filter into a predicate f(row) -> bool.

    resolve(name) returns a getter g(row) -> value or raises ApiError."""
    toks = _tokenize(text)
    pos = [0]

    def peek():
        return toks[pos[0]] if pos[0] < len(toks) else (None, None)

    def take(kind=None, val=None):
        t = peek()
        if t[0] is None or (kind and t[0] != kind) or (val and t[1] != val):
            raise FilterError("Syntax error in $filter '%s'." % text)
        pos[0] += 1
        return t

    def parse_or():
        left = parse_and()
        while peek() == ("kw", "or"):
            take()
            right = parse_and()
            left = (lambda l, r: lambda row: l(row) or r(row))(left, right)
        return left

    def parse_and():
        left = parse_not()
        while peek() == ("kw", "and"):
            take()
            right = parse_not()
            left = (lambda l, r: lambda row: l(row) and r(row))(left, right)
        return left

    def parse_not():
        if peek() == ("kw", "not"):
            take()
            inner = parse_not()
            return lambda row: not inner(row)
        return parse_cmp()

    def parse_cmp():
        left = parse_primary()
        t = peek()
        if t[0] == "kw" and t[1] in _CMP:
            take()
            right = parse_primary()
            op = t[1]
            return lambda row: _cmp(op, left(row), right(row))
        return left

    def parse_primary():
        t = peek()
        if t[0] == "(":
            take()
            e = parse_or()
            take(")")
            return e
        if t[0] == "lit":
            take()
            v = t[1]
            return lambda row: v
        if t[0] == "id":
            take()
            name = t[1]
            if peek()[0] == "(" and name.lower() in ("microsoft.dynamics.crm.in",
                                                      "microsoft.dynamics.crm.notin"):
                return parse_query_function(name)
            if peek()[0] == "(":
                take()
                args = [parse_or()]
                while peek()[0] == ",":
                    take()
                    args.append(parse_or())
                take(")")
                fn = name.lower()
                if fn in ("contains", "startswith", "endswith") and len(args) == 2:
                    x, y = args

                    def f(row, fn=fn, x=x, y=y):
                        a, b = x(row), y(row)
                        if not isinstance(a, str) or not isinstance(b, str):
                            return False
                        a, b = a.lower(), b.lower()
                        if fn == "contains":
                            return b in a
                        if fn == "startswith":
                            return a.startswith(b)
                        return a.endswith(b)
                    return f
                raise FilterError("Unknown function '%s' in $filter." % name)
            return resolve(name)
        raise FilterError("Syntax error in $filter '%s'." % text)

    def parse_query_function(name):
        # Name(Param='value',Param=['a','b'],...): named parameters whose
        # values are literals or bracketed lists of literals
        take("(")
        params = {}
        while True:
            pname = take("id")[1]
            take("=")
            if peek()[0] == "[":
                take()
                vals = []
                while peek()[0] != "]":
                    vals.append(take("lit")[1])
                    if peek()[0] == ",":
                        take()
                    elif peek()[0] != "]":
                        raise FilterError("Syntax error in $filter '%s'." % text)
                take("]")
                params[pname] = vals
            else:
                params[pname] = take("lit")[1]
            if peek()[0] == ",":
                take()
                continue
            take(")")
            break
        prop = params.get("PropertyName")
        vals = params.get("PropertyValues")
        if not isinstance(prop, str) or not isinstance(vals, list):
            raise FilterError("Function '%s' needs the parameters PropertyName and "
                              "PropertyValues." % name)
        if not vals:
            raise FilterError("PropertyValues of '%s' must not be empty." % name)
        g = resolve(prop)
        negate = name.lower().endswith("notin")
        prepared = _in_values(vals)
        return lambda row: _in_list(g(row), prepared) != negate

    if not toks:
        raise FilterError("Empty $filter.")
    f = parse_or()
    if pos[0] != len(toks):
        raise FilterError("Syntax error in $filter '%s'." % text)
    return lambda row: f(row) is True


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------

class Row:
    """A stored row.  Immutable once stored: updates store a new Row."""
    __slots__ = ("id", "a", "seq", "parties")

    def __init__(self, rid, a, seq, parties=None):
        self.id = rid
        self.a = a
        self.seq = seq
        self.parties = parties


class Parsed:
    __slots__ = ("vals", "binds", "parties", "key")

    def __init__(self):
        self.vals = {}
        self.binds = {}
        self.parties = None
        self.key = None


class Ctx:
    """Per-operation context: service base, content-id map of a change set,
    the user acting (systemuserid)."""
    __slots__ = ("base_path", "content_ids", "user")

    def __init__(self, base_path, content_ids=None, user=APP_USER_ID):
        self.base_path = base_path
        self.content_ids = content_ids
        self.user = user


def parse_bind(value, ctx):
    """'/accounts(<id>)', 'accounts(<id>)', full URL or '$n' -> (entity, id)."""
    v = value.strip()
    if v.startswith("$") and ctx is not None and ctx.content_ids is not None:
        m = re.match(r"^\$([^/]+)$", v)
        if m and m.group(1) in ctx.content_ids:
            v = ctx.content_ids[m.group(1)]
    if v.startswith("http://") or v.startswith("https://"):
        v = urlsplit(v).path
    m = re.match(r"^/?(?:api/data/v9\.\d+/)?([A-Za-z_][\w]*)\(([^)]*)\)$", v.lstrip("/")
                 if v.startswith("/api/") else v)
    if not m:
        raise ApiError(400, ERR_INVALID_PROP,
                       "The value '%s' of an @odata.bind annotation is not a valid entity "
                       "reference; expected '/<entityset>(<guid>)'." % value)
    set_name, key = m.group(1), m.group(2)
    ent = SETS.get(set_name)
    if ent is None:
        raise bad_segment(set_name)
    if "=" in key:
        k, key = key.split("=", 1)
        if k != ent.key:
            raise ApiError(400, ERR_INVALID_PROP,
                           "Alternate keys are not supported by the simulator in '%s'." % value)
    rid = guid_or_none(key)
    if rid is None:
        raise ApiError(400, ERR_INVALID_PROP, "Bad Request - Error in query syntax: '%s'." % value)
    return ent.name, rid


def parse_parties(ent, items, ctx):
    if not isinstance(items, list):
        raise ApiError(400, ERR_INVALID_PROP,
                       "The property '%s' must be a JSON array of activityparty objects."
                       % ent.party_nav)
    out = []
    for it in items:
        if not isinstance(it, dict):
            raise ApiError(400, ERR_INVALID_PROP,
                           "Each item of '%s' must be an object." % ent.party_nav)
        party = None
        mask = None
        addr = None
        for k, v in it.items():
            if k.endswith("@odata.bind"):
                nav = k[:-len("@odata.bind")]
                if not nav.startswith("partyid_") or nav[8:] not in ACTIVITY_PARTY_TARGETS:
                    raise ApiError(400, ERR_INVALID_PROP,
                                   "An undeclared property '%s' which only has property "
                                   "annotations in the payload but no property value was "
                                   "found in the payload." % nav)
                if not isinstance(v, str):
                    raise ApiError(400, ERR_INVALID_PROP,
                                   "The value of '%s' must be a string." % k)
                tent, tid = parse_bind(v, ctx)
                if tent != nav[8:]:
                    raise ApiError(400, ERR_INVALID_PROP,
                                   "The entity set in '%s' does not match navigation "
                                   "property '%s'." % (v, nav))
                party = (tent, tid)
            elif k == "participationtypemask":
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 11:
                    raise ApiError(400, ERR_TYPE,
                                   "A validation error occurred. The value %s of "
                                   "'participationtypemask' on record of type 'activityparty' "
                                   "is outside the valid range." % json.dumps(v))
                mask = v
            elif k == "addressused":
                if v is not None and not isinstance(v, str):
                    raise ApiError(400, ERR_TYPE, "Invalid value for 'addressused'.")
                addr = v
            elif k.startswith("@") or "@" in k:
                continue
            else:
                raise ApiError(400, ERR_INVALID_PROP,
                               "Invalid property '%s' was found in entity "
                               "'Microsoft.Dynamics.CRM.activityparty'." % k)
        if mask is None:
            raise ApiError(400, ERR_TYPE,
                           "participationtypemask is required for an activity party.")
        if party is None and not addr:
            raise ApiError(400, ERR_TYPE,
                           "An activity party needs partyid_<entity>@odata.bind or "
                           "addressused.")
        out.append({"party": party, "mask": mask, "addr": addr})
    return out


def parse_body(ent, body, ctx):
    """Type-check a JSON body for entity ent; no existence checks here."""
    if not isinstance(body, dict):
        raise ApiError(400, "0x0", "The request body must be a JSON object.")
    p = Parsed()
    attrs = ent.attrs
    for k, v in body.items():
        if "@" in k:
            name, ann = k.split("@", 1)
            if ann == "odata.bind":
                nav = ent.navs.get(name)
                if nav is None:
                    raise ApiError(400, ERR_INVALID_PROP,
                                   "An undeclared property '%s' which only has property "
                                   "annotations in the payload but no property value was "
                                   "found in the payload. In OData, only declared navigation "
                                   "properties and declared named streams can be represented "
                                   "as properties without values." % name)
                aname, targets = nav
                if v is None:
                    p.binds[aname] = None
                    continue
                if not isinstance(v, str):
                    raise ApiError(400, ERR_INVALID_PROP,
                                   "The value of '%s' must be a string like "
                                   "'/<entityset>(<guid>)'." % k)
                tent, tid = parse_bind(v, ctx)
                if tent not in targets:
                    raise ApiError(400, ERR_INVALID_PROP,
                                   "The entity '%s' is not a valid target of navigation "
                                   "property '%s' (valid: %s)."
                                   % (tent, name, ", ".join(targets)))
                p.binds[aname] = (tent, tid)
            elif name == "" and ann == "odata.type":
                if v not in (ent.type_name, "#" + ent.type_name):
                    raise ApiError(400, ERR_INVALID_PROP,
                                   "The @odata.type '%s' does not match entity '%s'."
                                   % (v, ent.type_name))
            continue
        if ent.party_nav is not None and k == ent.party_nav:
            p.parties = parse_parties(ent, v, ctx)
            continue
        a = attrs.get(k)
        if a is None or a.type in LOOKUP_TYPES:
            raise ApiError(400, ERR_INVALID_PROP,
                           "Invalid property '%s' was found in entity '%s'." % (k, ent.type_name))
        if k == ent.key:
            g = guid_or_none(v)
            if g is None:
                raise _type_error(ent, a, v)
            p.key = g
            continue
        p.vals[k] = coerce(ent, a, v)
    return p


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------

class Fault:
    def __init__(self, spec, fid):
        if not isinstance(spec, dict):
            raise ValueError("a fault rule must be a JSON object")
        known = {"method", "path_regex", "body_regex", "status", "body", "json",
                 "headers", "content_type", "delay_ms", "drop", "times", "skip",
                 "scope", "comment", "body_size"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError("unknown fault rule keys: %s" % ", ".join(sorted(unknown)))
        self.id = fid
        self.spec = spec
        self.method = (spec.get("method") or None)
        if self.method:
            self.method = self.method.upper()
        self.path_re = re.compile(spec["path_regex"]) if spec.get("path_regex") else None
        self.body_re = re.compile(spec["body_regex"]) if spec.get("body_regex") else None
        self.status = spec.get("status")
        self.body = spec.get("body")
        if spec.get("body_size") is not None:
            # a valid JSON document of (at least) body_size bytes
            n = int(spec["body_size"])
            self.body = '{"padding":"' + "x" * max(0, n - 14) + '"}'
        self.json = spec.get("json")
        self.headers = spec.get("headers") or {}
        self.content_type = spec.get("content_type")
        self.delay_ms = spec.get("delay_ms") or 0
        self.drop = bool(spec.get("drop"))
        self.times = spec.get("times", 1)
        self.skip = spec.get("skip") or 0
        self.scope = spec.get("scope") or "any"
        if self.scope not in ("any", "outer", "inner"):
            raise ValueError("scope must be any, outer or inner")
        if self.status is None and not self.drop and not self.delay_ms:
            raise ValueError("a fault rule needs status, drop or delay_ms")
        self.matched = 0
        self.fired = 0

    def exhausted(self):
        return self.times is not None and self.fired >= self.times

    def describe(self):
        d = dict(self.spec)
        d["id"] = self.id
        d["matched"] = self.matched
        d["fired"] = self.fired
        return d

    def response(self):
        """The Resp this rule produces (status set)."""
        headers = []
        if self.json is not None:
            body = jdump(self.json)
            ct = self.content_type or "application/json; odata.metadata=minimal"
        elif self.body is not None:
            body = self.body.encode("utf-8") if isinstance(self.body, str) else jdump(self.body)
            ct = self.content_type or "text/plain; charset=utf-8"
        elif self.status >= 400:
            body = jdump({"error": {"code": "0x80040216",
                                    "message": "Simulated fault (HTTP %d)." % self.status}})
            ct = self.content_type or "application/json; odata.metadata=minimal"
        else:
            body = b""
            ct = self.content_type
        if ct:
            headers.append(("Content-Type", ct))
        for k, v in self.headers.items():
            headers.append((k, str(v)))
        code = None
        if self.json is not None and isinstance(self.json, dict):
            err = self.json.get("error")
            if isinstance(err, dict):
                code = err.get("code")
        elif self.status >= 400 and self.body is None:
            code = "0x80040216"
        return Resp(self.status, headers, body, code=code)


class LogEntry:
    __slots__ = ("seq", "time", "method", "path", "scheme", "headers", "raw",
                 "btype", "status", "error_code", "batch", "changeset", "kind",
                 "content_id", "rolled_back", "conn", "client")

    def to_json(self):
        body = None
        if self.raw:
            if self.btype == "json":
                try:
                    body = json.loads(self.raw.decode("utf-8"))
                except Exception:
                    body = self.raw.decode("utf-8", "replace")
            elif self.btype == "form":
                body = {}
                for part in self.raw.decode("utf-8", "replace").split("&"):
                    if not part:
                        continue
                    k, _, v = part.partition("=")
                    k, v = unquote_plus(k), unquote_plus(v)
                    body[k] = "***" if k == "client_secret" else v
            else:
                body = self.raw.decode("utf-8", "replace")
        d = {"seq": self.seq, "time": self.time, "kind": self.kind,
             "method": self.method, "path": self.path, "scheme": self.scheme,
             "headers": self.headers, "body": body, "status": self.status,
             "error_code": self.error_code, "batch": self.batch,
             "changeset": self.changeset, "conn": self.conn, "client": self.client}
        if self.content_id is not None:
            d["content_id"] = self.content_id
        if self.rolled_back:
            d["rolled_back"] = True
        return d


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

    def describe(self):
        return {"requests": self.requests, "ops": self.ops,
                "server_s": round(self.exec_total, 3),
                "throttled": sum(self.throttled.values()),
                "throttled_by_code": dict(self.throttled),
                "inflight": self.inflight, "max_inflight": self.max_inflight,
                "window_server_s": round(self.used(time.time()), 3),
                "window_requests": len(self.window)}


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


# ---------------------------------------------------------------------------
# Formatting rows
# ---------------------------------------------------------------------------

def primary_name_of(state, tent, tid):
    e = ENTITIES.get(tent)
    r = state.rows.get(tent, {}).get(tid)
    if e is None or r is None or not e.primary_name:
        return None
    return r.a.get(e.primary_name)


def format_row(state, ent, row, cols, formatted=False, expand_parties=False):
    a = row.a
    out = {"@odata.etag": 'W/"%s"' % a.get("versionnumber")}
    attrs = ent.attrs
    for c in cols:
        at = attrs[c]
        v = a.get(c)
        if at.type in LOOKUP_TYPES:
            n = "_%s_value" % c
            if v is None:
                out[n] = None
            else:
                if formatted:
                    nm = primary_name_of(state, v[0], v[1])
                    if nm is not None:
                        out[n + "@OData.Community.Display.V1.FormattedValue"] = nm
                    out[n + "@Microsoft.Dynamics.CRM.associatednavigationproperty"] = (
                        c if at.type == "Owner" or c not in ("parentcustomerid",
                                                               "regardingobjectid")
                        else "%s_%s" % (c, v[0]))
                out[n + "@Microsoft.Dynamics.CRM.lookuplogicalname"] = v[0]
                out[n] = v[1]
        else:
            if formatted and v is not None:
                fv = None
                if at.type in ("Picklist", "State", "Status", "Boolean"):
                    for o in at.options:
                        if o[0] == v and type(o[0]) is type(v):
                            fv = o[1]
                            break
                elif at.type == "Money":
                    fv = "$%s" % format(v, ",.2f")
                elif at.type == "Integer" or at.type == "BigInt":
                    fv = format(v, ",")
                elif at.type == "DateTime":
                    fv = v
                if fv is not None:
                    out[c + "@OData.Community.Display.V1.FormattedValue"] = fv
            out[c] = v
    if ent.key not in cols:
        out[ent.key] = row.id
    if expand_parties and ent.party_nav:
        out[ent.party_nav] = [format_party(row, p) for p in (row.parties or [])]
    return out


def format_party(row, p):
    d = {"activitypartyid": p["activitypartyid"],
         "participationtypemask": p["mask"],
         "addressused": p["addr"],
         "_activityid_value": row.id}
    if p["party"] is not None:
        d["_partyid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] = p["party"][0]
        d["_partyid_value"] = p["party"][1]
    else:
        d["_partyid_value"] = None
    return d


def parse_select(ent, sel):
    """$select text -> list of attribute names (lookups given as _x_value)."""
    cols = []
    for raw in sel.split(","):
        c = raw.strip()
        if not c:
            continue
        name = c
        if c.startswith("_") and c.endswith("_value"):
            inner = c[1:-6]
            at = ent.attrs.get(inner)
            if at is None or at.type not in LOOKUP_TYPES:
                raise no_property(c, ent.type_name)
            name = inner
        else:
            at = ent.attrs.get(c)
            if at is None or at.type in LOOKUP_TYPES:
                raise no_property(c, ent.type_name)
        if name not in cols:
            cols.append(name)
    return cols


def entity_resolver(ent):
    def resolve(name):
        if name.startswith("_") and name.endswith("_value"):
            inner = name[1:-6]
            at = ent.attrs.get(inner)
            if at is not None and at.type in LOOKUP_TYPES:
                def g(row, k=inner):
                    v = row.a.get(k)
                    return v[1] if v is not None else None
                return g
            raise no_property(name, ent.type_name)
        at = ent.attrs.get(name)
        if at is None or at.type in LOOKUP_TYPES:
            raise no_property(name, ent.type_name)
        return lambda row, k=name: row.a.get(k)
    return resolve


def dict_resolver(name):
    return lambda d, k=name: d.get(k)


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------

def label(text):
    lab = {"Label": text, "LanguageCode": 1033, "IsManaged": True,
           "MetadataId": det_uuid("label", text), "HasChanged": None}
    return {"LocalizedLabels": [lab], "UserLocalizedLabel": lab}


def option_json(ent, at, o):
    d = {"Value": o[0], "Color": None, "IsManaged": True, "ExternalValue": None,
         "Label": label(o[1]), "Description": label("")}
    if at.type == "Status":
        d["State"] = o[2]
    elif at.type == "State":
        d["DefaultStatus"] = o[2]
        d["InvariantName"] = o[3]
    return d


def attribute_meta(ent, at, expand_optionset=False):
    mt = META_TYPE.get(at.type, "AttributeMetadata")
    d = collections.OrderedDict()
    d["@odata.type"] = "#" + NS + mt
    d["LogicalName"] = at.name
    d["SchemaName"] = at.schema
    d["EntityLogicalName"] = ent.name
    d["AttributeType"] = at.type
    d["AttributeTypeName"] = {"Value": at.type + "Type"}
    d["IsValidForCreate"] = at.create
    d["IsValidForUpdate"] = at.update
    d["IsValidForRead"] = True
    d["IsPrimaryId"] = at.primary_id
    d["IsPrimaryName"] = at.primary_name
    d["IsCustomAttribute"] = at.custom
    d["IsLogical"] = False
    d["AttributeOf"] = None
    d["RequiredLevel"] = {"Value": "SystemRequired" if at.primary_id else "None",
                          "CanBeChanged": False,
                          "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings"}
    d["DisplayName"] = label(at.label)
    d["Description"] = label("")
    d["MetadataId"] = det_uuid("attr", ent.name, at.name)
    if at.type in ("String", "Memo"):
        d["MaxLength"] = at.maxlen
        d["Format"] = "Email" if "email" in at.name else ("Text" if at.type == "String"
                                                           else "TextArea")
    if at.type in ("Integer", "Money"):
        d["MinValue"] = at.minv
        d["MaxValue"] = at.maxv
    if at.type == "Money":
        d["Precision"] = 2
    if at.type == "DateTime":
        d["Format"] = "DateOnly" if at.date_only else "DateAndTime"
        d["DateTimeBehavior"] = {"Value": "DateOnly" if at.date_only else "UserLocal"}
    if at.type in LOOKUP_TYPES:
        d["Targets"] = list(at.targets)
    if expand_optionset and at.type in ("Picklist", "State", "Status", "Boolean"):
        os_ = {"MetadataId": det_uuid("optionset", ent.name, at.name),
               "Name": at.optionset_name or "%s_%s" % (ent.name, at.name),
               "IsGlobal": False, "IsCustomOptionSet": at.custom,
               "OptionSetType": at.type if at.type != "Boolean" else "Boolean",
               "DisplayName": label(at.label)}
        if at.type == "Boolean":
            f = next(o for o in at.options if o[0] is False)
            t = next(o for o in at.options if o[0] is True)
            os_["TrueOption"] = {"Value": 1, "Label": label(t[1])}
            os_["FalseOption"] = {"Value": 0, "Label": label(f[1])}
        else:
            os_["Options"] = [option_json(ent, at, o) for o in at.options]
        d["OptionSet"] = os_
        d["GlobalOptionSet"] = None
    return d


def select_meta(d, select, always=("LogicalName", "MetadataId")):
    if select is None:
        return d
    out = collections.OrderedDict()
    if "@odata.type" in d:
        out["@odata.type"] = d["@odata.type"]
    for k in select:
        if k in d:
            out[k] = d[k]
    for k in always:
        if k in d and k not in out:
            out[k] = d[k]
    for k in ("Targets", "OptionSet"):
        if k in d and k not in out:
            out[k] = d[k]
    return out


def entity_meta(ent):
    d = collections.OrderedDict()
    d["LogicalName"] = ent.name
    d["SchemaName"] = ent.name.capitalize() if not ent.custom else ent.name
    d["EntitySetName"] = ent.set_name
    d["LogicalCollectionName"] = ent.set_name
    d["CollectionSchemaName"] = ent.plural.replace(" ", "")
    d["ObjectTypeCode"] = ent.otc
    d["IsActivity"] = ent.is_activity
    d["IsCustomEntity"] = ent.custom
    d["PrimaryIdAttribute"] = ent.key
    d["PrimaryNameAttribute"] = ent.primary_name
    d["ChangeTrackingEnabled"] = ent.change_tracking
    d["OwnershipType"] = "UserOwned" if "ownerid" in ent.attrs else "BusinessOwned"
    d["DisplayName"] = label(ent.display)
    d["DisplayCollectionName"] = label(ent.plural)
    d["MetadataId"] = det_uuid("entity", ent.name)
    return d


# ---------------------------------------------------------------------------
# Multipart ($batch)
# ---------------------------------------------------------------------------

class StreamError(Exception):
    pass


def split_multipart(body, boundary):
    """Split a multipart body (CRLF line ends required) into part bytes."""
    delim = b"\r\n--" + boundary.encode("latin-1")
    pieces = (b"\r\n" + body).split(delim)
    if len(pieces) < 2:
        raise StreamError()
    parts = []
    closed = False
    for p in pieces[1:]:
        if p.startswith(b"--"):
            closed = True
            break
        i = p.find(b"\r\n")
        if i < 0 or p[:i].strip(b" \t"):
            raise StreamError()
        parts.append(p[i + 2:])
    if not closed:
        raise StreamError()
    return parts


def split_headers(block):
    """b'Name: v\\r\\nName2: v2' -> list of (name, value)."""
    out = []
    if not block:
        return out
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if b"\n" in line or b":" not in line:
            raise StreamError()
        k, v = line.split(b":", 1)
        out.append((k.decode("latin-1").strip(), v.decode("utf-8", "replace").strip()))
    return out


class InnerOp:
    __slots__ = ("method", "url", "headers", "body", "content_id", "changeset")


def parse_inner_request(part, changeset):
    """Parse one application/http part into an InnerOp."""
    sep = part.find(b"\r\n\r\n")
    if sep < 0:
        raise StreamError()
    part_headers = split_headers(part[:sep])
    msg = part[sep + 4:]
    ph = {k.lower(): v for k, v in part_headers}
    mt, _ = parse_media(ph.get("content-type"))
    if mt != "application/http":
        raise ApiError(400, "0x0", "Each $batch part must have Content-Type application/http "
                       "or multipart/mixed (got '%s')." % ph.get("content-type"))
    # request line
    i = msg.find(b"\r\n")
    if i < 0:
        line, rest = msg, b""
    else:
        line, rest = msg[:i], msg[i + 2:]
    m = re.match(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$", line.strip())
    if not m:
        raise ApiError(400, "0x0", "Invalid request line in $batch part: '%s'."
                       % line.decode("utf-8", "replace")[:200])
    op = InnerOp()
    op.method = m.group(1).decode("ascii")
    op.url = m.group(2).decode("utf-8", "replace")
    j = rest.find(b"\r\n\r\n")
    if j >= 0:
        hblock, body = rest[:j], rest[j + 4:]
    elif rest.startswith(b"\r\n"):
        hblock, body = b"", rest[2:]
    else:
        hblock, body = rest, b""
    op.headers = split_headers(hblock)
    op.body = body.strip(b"\r\n \t")
    op.content_id = ph.get("content-id")
    if op.content_id is None:
        for k, v in op.headers:
            if k.lower() == "content-id":
                op.content_id = v
    op.changeset = changeset
    return op


# ---------------------------------------------------------------------------
# The Web API and token endpoint (request -> Resp)
# ---------------------------------------------------------------------------

class Req:
    """An API request (standalone or an inner $batch operation)."""
    __slots__ = ("method", "path", "query", "headers", "hdict", "body", "scheme",
                 "origin", "inner", "log", "ctx", "content_id", "changeset",
                 "batch_seq")


class Api:
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

    # -- reads -------------------------------------------------------------------
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
        if ent.name not in ("contact", "account") and not ent.is_activity:
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

    # -- metadata ----------------------------------------------------------------
    def metadata(self, rq, segs, q):
        sel = [s.strip() for s in q["$select"].split(",")] if q.get("$select") else None
        base = rq.origin + rq.ctx.base_path
        m = re.match(r"^EntityDefinitions(?:\((.*)\))?$", segs[0])
        if not m:
            raise bad_segment(segs[0])
        key = m.group(1)
        if key is None:
            if len(segs) > 1:
                raise bad_segment(segs[1])
            items = [entity_meta(e) for e in ENTITIES.values()]
            if q.get("$filter"):
                try:
                    pred = compile_filter(q["$filter"], dict_resolver)
                except FilterError as e:
                    raise ApiError(400, "0x0", str(e))
                items = [d for d in items if pred(d)]
            items = [select_meta(d, sel) for d in items]
            ctx = base + "/$metadata#EntityDefinitions"
            if sel:
                ctx += "(%s)" % ",".join(sel)
            return json_resp(200, {"@odata.context": ctx, "value": items})
        ent = self._meta_entity(key)
        if len(segs) == 1:
            d = select_meta(entity_meta(ent), sel)
            out = collections.OrderedDict([("@odata.context",
                                            base + "/$metadata#EntityDefinitions/$entity")])
            out.update(d)
            if q.get("$expand", "").split("(")[0].strip() == "Attributes":
                out["Attributes"] = [attribute_meta(ent, a) for a in ent.attrs.values()]
            return json_resp(200, out)
        am = re.match(r"^Attributes(?:\((.*)\))?$", segs[1])
        if not am:
            raise bad_segment(segs[1])
        cast = None
        if len(segs) >= 3:
            if not segs[2].startswith(NS) or len(segs) > 3:
                raise bad_segment(segs[2])
            cast = segs[2][len(NS):]
            if cast not in set(META_TYPE.values()):
                raise bad_segment(segs[2])
        expand = [x.strip().split("(")[0] for x in q.get("$expand", "").split(",") if x.strip()]
        exp_os = "OptionSet" in expand or "GlobalOptionSet" in expand
        akey = am.group(1)
        if akey is None:
            items = []
            for a in ent.attrs.values():
                if cast and META_TYPE.get(a.type) != cast:
                    continue
                items.append(attribute_meta(ent, a, exp_os))
            if q.get("$filter"):
                try:
                    pred = compile_filter(q["$filter"], dict_resolver)
                except FilterError as e:
                    raise ApiError(400, "0x0", str(e))
                items = [d for d in items if pred(d)]
            items = [select_meta(d, sel) for d in items]
            ctx = base + "/$metadata#EntityDefinitions('%s')/Attributes" % ent.name
            if cast:
                ctx += "/" + NS + cast
            if sel:
                ctx += "(%s)" % ",".join(sel)
            return json_resp(200, {"@odata.context": ctx, "value": items})
        at = None
        km = re.match(r"^LogicalName='(.*)'$", akey)
        if km:
            at = ent.attrs.get(km.group(1).replace("''", "'"))
        else:
            g = guid_or_none(akey)
            if g:
                for a in ent.attrs.values():
                    if det_uuid("attr", ent.name, a.name) == g:
                        at = a
        if at is None:
            raise ApiError(404, "0x80041102",
                           "Could not find attribute %s on entity %s." % (akey, ent.name))
        if cast and META_TYPE.get(at.type) != cast:
            raise ApiError(400, "0x0", "The attribute '%s' is of type %s, not %s."
                           % (at.name, META_TYPE.get(at.type), cast))
        d = select_meta(attribute_meta(ent, at, exp_os), sel)
        ctx = base + "/$metadata#EntityDefinitions('%s')/Attributes" % ent.name
        if cast:
            ctx += "/" + NS + cast
        out = collections.OrderedDict([("@odata.context", ctx + "/$entity")])
        out.update(d)
        return json_resp(200, out)

    def _meta_entity(self, key):
        km = re.match(r"^LogicalName='(.*)'$", key)
        name = None
        if km:
            name = km.group(1).replace("''", "'")
            ent = ENTITIES.get(name)
        else:
            g = guid_or_none(key)
            ent = None
            if g:
                for e in ENTITIES.values():
                    if det_uuid("entity", e.name) == g:
                        ent = e
        if ent is None:
            raise ApiError(404, "0x80040217",
                           "Could not find an entity with LogicalName = '%s'." % (name or key))
        return ent


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, addr, handler, state, api, scheme, verbose):
        self.state = state
        self.api = api
        self.scheme = scheme
        self.verbose = verbose
        ThreadingHTTPServer.__init__(self, addr, handler)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, ssl.SSLError, socket.timeout, TimeoutError)):
            return
        if self.verbose:
            ThreadingHTTPServer.handle_error(self, request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "DataverseSim/1.0"
    sys_version = ""
    timeout = 300

    def version_string(self):
        return self.server_version

    _conn_ids = itertools.count(1)

    def setup(self):
        # every TCP connection gets a number, logged with its requests, so
        # tests can see connections being reused
        self.conn_id = next(Handler._conn_ids)
        BaseHTTPRequestHandler.setup(self)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.settimeout(30)
            self.connection.do_handshake()
            self.connection.settimeout(self.timeout)

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    def do_GET(self):
        self.handle_any()

    do_POST = do_PATCH = do_DELETE = do_PUT = do_HEAD = do_OPTIONS = do_GET

    # -- plumbing ----------------------------------------------------------------
    def read_body(self):
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    break
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def send(self, resp):
        self.send_response(resp.status)
        has_ct = False
        for k, v in resp.headers:
            if k.lower() == "content-type":
                has_ct = True
            self.send_header(k, v)
        if not has_ct and resp.body:
            self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if resp.body and self.command != "HEAD":
            self.wfile.write(resp.body)

    def origin(self):
        host = self.headers.get("Host") or "127.0.0.1:%d" % self.server.server_address[1]
        return "%s://%s" % (self.server.scheme, host)

    def handle_any(self):
        S = self.server.state
        try:
            body = self.read_body()
        except (ValueError, ConnectionError):
            self.close_connection = True
            return
        raw_path = self.path
        if raw_path.startswith("http://") or raw_path.startswith("https://"):
            sp = urlsplit(raw_path)
            raw_path = sp.path + ("?" + sp.query if sp.query else "")
        path, _, query = raw_path.partition("?")
        if path.startswith("/_sim/") or path == "/_sim":
            try:
                resp = Control(self.server.state, self.server.api).handle(
                    self.command, path, query, body)
            except Exception as e:
                traceback.print_exc()
                resp = Resp(500, [("Content-Type", "application/json")],
                            jdump({"error": "%s: %s" % (type(e).__name__, e)}))
            self.send(resp)
            return
        try:
            self.handle_service(S, path, query, raw_path, body)
        except DropConnection:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_service(self, S, path, query, raw_path, body):
        tm = TOKEN_PATH_RE.match(path)
        kind = "token" if tm else "api"
        hdrs = list(self.headers.items())
        ct = (self.headers.get("Content-Type") or "").lower()
        btype = "json" if "json" in ct else ("form" if "x-www-form-urlencoded" in ct else "text")
        if kind == "api" and path.rstrip("/").endswith("/$batch"):
            btype = "text"
        arrived = time.time()
        entry = S.log_start(kind, self.command, raw_path, self.server.scheme,
                            S.redact_headers(hdrs), body, btype,
                            conn=getattr(self, "conn_id", None))
        nrec = 0
        server_s = 0.0
        user = None
        try:
            fault = S.match_fault(self.command, raw_path, body, False)
            resp = None
            if fault is not None:
                if fault.delay_ms:
                    time.sleep(fault.delay_ms / 1000.0)
                if fault.drop:
                    entry.status = 0
                    entry.error_code = "dropped"
                    raise DropConnection()
                if fault.status is not None:
                    resp = fault.response()
            if resp is None:
                if kind == "token":
                    resp = self.token(S, tm.group(1), body)
                elif not path.startswith("/api/data/"):
                    resp = Resp(404, [("Content-Type", "text/plain")], b"Not Found")
                else:
                    hd = {k.lower(): v for k, v in hdrs}
                    resp, client = self.check_auth(S, hd)
                    entry.client = client
                    if resp is None:
                        resp = self.throttle(S, client)
                        if resp is None:
                            with S.lock:
                                user = S.user(client)
                            if path.rstrip("/").endswith("/$batch") and \
                                    re.match(r"^/api/data/v9\.\d+/\$batch/?$", path):
                                resp = self.batch(S, path, query, hd, body, entry)
                            else:
                                rq = self.make_req(S, self.command, path, query, hdrs, hd, body)
                                rq.log = entry
                                resp = self.server.api.handle(rq)
                            nrec = resp.nrec
                            server_s = self.server_time(S, resp)
                            if server_s > 0:
                                # the server works on it from its arrival
                                with S.lock:
                                    user.exec.append((arrived, arrived + server_s))
                    resp.headers.extend(self.api_headers(S, client))
            elif kind == "token":
                entry.client = self.token_client(body)
            entry.status = resp.status
            entry.error_code = resp.code
            # the response leaves latency + server time after the request
            # arrived, whatever the simulator's own processing took
            due = arrived + float(S.config.get("latency_ms") or 0) / 1000.0 + server_s
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            self.send(resp)
        finally:
            if user is not None:
                with S.lock:
                    S.inflight -= 1
                    user.inflight -= 1
                    user.ops += nrec
                    user.exec_total += server_s

    @staticmethod
    def server_time(S, resp):
        """Seconds of server execution time a request costs (its operations,
        one after another)."""
        per = float(S.config.get("per_record_ms") or 0)
        if resp.bulk and S.config.get("bulk_target_ms") is not None:
            per = float(S.config["bulk_target_ms"])
        return per * resp.nrec / 1000.0

    @staticmethod
    def token_client(body):
        for part in body.decode("utf-8", "replace").split("&"):
            k, _, v = part.partition("=")
            if unquote_plus(k) == "client_id":
                return unquote_plus(v).lower()
        return None

    def api_headers(self, S, client):
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
        return [("x-ms-dop-hint", str(cfg.get("dop_hint", 4))),
                ("x-ms-ratelimit-burst-remaining-xrm-requests", str(burst)),
                ("x-ms-ratelimit-time-remaining-xrm-requests", "{:,.2f}".format(left)),
                ("x-ms-service-request-id", str(uuid.uuid4())),
                ("Cache-Control", "no-cache")]

    def make_req(self, S, method, path, query, hdrs, hd, body):
        rq = Req()
        rq.method = method
        rq.path = path
        rq.query = query
        rq.headers = hdrs
        rq.hdict = hd
        rq.body = body
        rq.scheme = self.server.scheme
        rq.origin = self.origin()
        rq.inner = False
        rq.log = None
        rq.ctx = Ctx("/api/data/v9.2")
        rq.content_id = None
        rq.changeset = None
        rq.batch_seq = None
        return rq

    # -- auth / throttling ---------------------------------------------------------
    def check_auth(self, S, hd):
        auth = hd.get("authorization", "")
        parts = auth.split(None, 1)
        tenant = S.config["tenant"]
        www = ('Bearer authorization_uri=https://login.microsoftonline.com/%s/oauth2/authorize, '
               'resource_id=%s/' % (tenant, self.origin()))
        if len(parts) != 2 or parts[0].lower() != "bearer":
            return Resp(401, [("WWW-Authenticate", www)], b"", code=None), None
        with S.lock:
            info = S.token_info(parts[1].strip())
        if info is None:
            return Resp(401, [("WWW-Authenticate",
                               'Bearer error=invalid_token, error_description=Error during '
                               'token validation!, ' + www[len("Bearer "):])], b""), None
        if S.config.get("check_audience", True):
            aud = info["scope"][:-len("/.default")].rstrip("/")
            if not same_origin(aud, self.origin()):
                return Resp(401, [("WWW-Authenticate",
                                   'Bearer error=invalid_token, error_description=The token '
                                   'audience is not this organization, ' +
                                   www[len("Bearer "):])], b""), info["client"]
        return None, info["client"]

    def throttle(self, S, client):
        """None when the request may run (and then it counts as in flight),
        else the 429 that service protection answers for this user."""
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
            if mc and u.inflight + 1 > int(mc):
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
                return error_resp(err)
            if rpw:
                u.window.append(now)
            u.requests += 1
            u.inflight += 1
            u.max_inflight = max(u.max_inflight, u.inflight)
            S.inflight += 1
        return None

    # -- token endpoint --------------------------------------------------------------
    def token(self, S, tenant, body):
        cfg = S.config

        def err(status, error, code, desc):
            trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
            ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
            full = "AADSTS%d: %s\r\nTrace ID: %s\r\nCorrelation ID: %s\r\nTimestamp: %s" % (
                code, desc, trace, corr, ts)
            return Resp(status, [("Content-Type", "application/json; charset=utf-8"),
                                 ("Cache-Control", "no-store, no-cache")],
                        jdump({"error": error, "error_description": full,
                               "error_codes": [code], "timestamp": ts, "trace_id": trace,
                               "correlation_id": corr,
                               "error_uri": "https://login.microsoftonline.com/error?code=%d"
                               % code}), code="AADSTS%d" % code)

        if self.command != "POST":
            return err(405, "invalid_request", 900561,
                       "The endpoint only accepts POST requests. Received a %s request."
                       % self.command)
        if tenant.lower() != cfg["tenant"].lower():
            return err(400, "invalid_request", 90002,
                       "Tenant '%s' not found. Check to make sure you have the correct tenant "
                       "ID and are signing into the correct cloud. Check with your "
                       "subscription administrator, this may happen if there are no active "
                       "subscriptions for the tenant." % tenant)
        form = {}
        for part in body.decode("utf-8", "replace").split("&"):
            if part:
                k, _, v = part.partition("=")
                form[unquote_plus(k)] = unquote_plus(v)
        gt = form.get("grant_type")
        if not gt:
            return err(400, "invalid_request", 900144,
                       "The request body must contain the following parameter: 'grant_type'.")
        if gt != "client_credentials":
            return err(400, "unsupported_grant_type", 70003,
                       "The app requested an unsupported grant type '%s'." % gt)
        cid = form.get("client_id")
        if not cid:
            return err(400, "invalid_request", 900144,
                       "The request body must contain the following parameter: 'client_id'.")
        expected = S.secret_of(cid)
        if expected is None:
            return err(400, "unauthorized_client", 700016,
                       "Application with identifier '%s' was not found in the directory "
                       "'%s'. This can happen if the application has not been installed by the "
                       "administrator of the tenant or consented to by any user in the tenant. "
                       "You may have sent your authentication request to the wrong tenant."
                       % (cid, tenant))
        scope = form.get("scope")
        if not scope:
            return err(400, "invalid_request", 900144,
                       "The request body must contain the following parameter: 'scope'.")
        if not scope.endswith("/.default") or " " in scope.strip():
            return err(400, "invalid_scope", 1002012,
                       "The provided value for scope %s is not valid. Client credential flows "
                       "must have a scope value with /.default suffixed to the resource "
                       "identifier (application ID URI)." % scope)
        resource = scope[:-len("/.default")]
        if cfg.get("check_audience", True) and not self.our_resource(S, resource):
            return err(400, "invalid_resource", 500011,
                       "The resource principal named %s was not found in the tenant named %s. "
                       "This can happen if the application has not been installed by the "
                       "administrator of the tenant or consented to by any user in the tenant. "
                       "You might have sent your authentication request to the wrong tenant."
                       % (resource, tenant))
        secret = form.get("client_secret")
        if not secret:
            return err(401, "invalid_client", 7000216,
                       "'client_assertion', 'client_secret' or 'request' is required for the "
                       "'client_credentials' grant type.")
        if secret != expected:
            return err(401, "invalid_client", 7000215,
                       "Invalid client secret provided. Ensure the secret being sent in the "
                       "request is the client secret value, not the client secret ID, for a "
                       "secret added to app '%s'." % cid.lower())
        if cfg.get("secret_expired"):
            return err(401, "invalid_client", 7000222,
                       "The provided client secret keys for app '%s' are expired. Visit the "
                       "Azure portal to create new keys for your app." % cid.lower())
        tok, life = S.issue_token(scope, cid)
        return Resp(200, [("Content-Type", "application/json; charset=utf-8"),
                          ("Cache-Control", "no-store, no-cache")],
                    jdump({"token_type": "Bearer", "expires_in": life, "ext_expires_in": life,
                           "access_token": tok}))

    def our_resource(self, S, resource):
        try:
            sp = urlsplit(resource.rstrip("/"))
        except ValueError:
            return False
        if sp.scheme not in ("http", "https") or sp.path not in ("", "/"):
            return False
        if (sp.hostname or "").lower() not in ("127.0.0.1", "localhost", "::1"):
            return False
        try:
            port = sp.port or (443 if sp.scheme == "https" else 80)
        except ValueError:
            return False
        return port in S.ports

    # -- $batch ------------------------------------------------------------------------
    def batch(self, S, path, query, hd, body, entry):
        api = self.server.api
        if self.command != "POST":
            return error_resp(ApiError(405, "0x0", "$batch requires POST."))
        mt, params = parse_media(hd.get("content-type"))
        boundary = params.get("boundary")
        if mt != "multipart/mixed" or not boundary:
            return error_resp(ApiError(400, "0x0", "The $batch request must have Content-Type "
                                       "multipart/mixed with a boundary parameter."))
        base_path = path[:path.rindex("/$batch")] if "/$batch" in path else "/api/data/v9.2"
        try:
            parts = split_multipart(body, boundary)
            items = []
            nops = 0
            for part in parts:
                sep = part.find(b"\r\n\r\n")
                if sep < 0:
                    raise StreamError()
                ph = {k.lower(): v for k, v in split_headers(part[:sep])}
                pmt, pparams = parse_media(ph.get("content-type"))
                if pmt == "multipart/mixed":
                    cb = pparams.get("boundary")
                    if not cb:
                        raise ApiError(400, "0x0", "Change set without boundary.")
                    ops = [parse_inner_request(cp, cb) for cp in
                           split_multipart(part[sep + 4:], cb)]
                    for op in ops:
                        if op.method == "GET":
                            raise ApiError(400, "0x0", "A change set must not contain a GET "
                                           "request (%s)." % op.url)
                    nops += len(ops)
                    items.append(("cs", cb, ops))
                else:
                    items.append(("op", None, parse_inner_request(part, None)))
                    nops += 1
        except StreamError:
            return error_resp(ApiError(400, "0x0", "Stream was not readable."))
        except ApiError as e:
            return error_resp(e)
        maxops = int(S.config.get("max_batch") or 1000)
        if nops > maxops:
            return error_resp(ApiError(400, "0x0",
                                       "The number of requests in the batch (%d) exceeds the "
                                       "maximum of %d." % (nops, maxops)))
        prefer = parse_prefer(hd.get("prefer", ""))
        coe = bool(prefer.get("odata.continue-on-error"))
        rb = "batchresponse_" + str(uuid.uuid4())
        out = []
        nrec = 0
        stop = False
        # The whole batch runs under the state lock: operations are serialised
        # by the GIL anyway, and taking the lock once avoids lock convoys when
        # several batches arrive in parallel.
        S.lock.acquire()
        try:
            nrec, stop = self.run_batch_items(S, api, items, base_path, entry, coe, rb, out)
        finally:
            S.lock.release()
        out.append(b"--" + rb.encode() + b"--\r\n")
        h = [("Content-Type", "multipart/mixed; boundary=" + rb), ("OData-Version", "4.0")]
        if coe:
            h.append(("Preference-Applied", "odata.continue-on-error"))
        r = Resp(200, h, b"".join(out), nrec=nrec)
        return r

    def run_batch_items(self, S, api, items, base_path, entry, coe, rb, out):
        nrec = 0
        stop = False
        for kind, cb, x in items:
            if stop:
                break
            if kind == "op":
                resp = self.inner(S, api, x, base_path, entry, None)
                nrec += 1
                out.append(b"--" + rb.encode() + b"\r\n" + render_part(resp, x.content_id))
                if resp.status >= 400 and not coe:
                    stop = True
            else:
                csr = "changesetresponse_" + str(uuid.uuid4())
                content_ids = {}
                results = []
                failed = None
                logged = []
                with S.lock:
                    marker = S.begin()
                    try:
                        for op in x:
                            resp = self.inner(S, api, op, base_path, entry, content_ids,
                                              logged)
                            nrec += 1
                            results.append((op, resp))
                            if resp.status >= 400:
                                failed = (op, resp)
                                break
                            if op.content_id and resp.entity_path:
                                content_ids[op.content_id] = resp.entity_path
                    except BaseException:
                        S.rollback(marker)
                        raise
                    if failed:
                        S.rollback(marker)
                        for e in logged:
                            if e is not logged[-1]:
                                e.rolled_back = True
                    else:
                        S.commit(marker)
                if failed:
                    out.append(b"--" + rb.encode() + b"\r\n" +
                               render_part(failed[1], failed[0].content_id))
                    if not coe:
                        stop = True
                else:
                    buf = [b"--" + rb.encode() + b"\r\n",
                           ("Content-Type: multipart/mixed; boundary=%s\r\n\r\n" % csr).encode()]
                    for op, resp in results:
                        buf.append(b"--" + csr.encode() + b"\r\n")
                        buf.append(render_part(resp, op.content_id))
                    buf.append(b"--" + csr.encode() + b"--\r\n")
                    out.append(b"".join(buf))
        return nrec, stop

    def inner(self, S, api, op, base_path, entry, content_ids, logged=None):
        url = op.url
        if url.startswith("$") and content_ids is not None:
            m = re.match(r"^\$([^/?]+)(.*)$", url)
            if m and m.group(1) in content_ids:
                url = content_ids[m.group(1)] + m.group(2)
        if url.startswith("http://") or url.startswith("https://"):
            sp = urlsplit(url)
            url = sp.path + ("?" + sp.query if sp.query else "")
        elif not url.startswith("/"):
            url = base_path + "/" + url
        path, _, query = url.partition("?")
        hd = {}
        for k, v in op.headers:
            hd[k.lower()] = v
        ct = hd.get("content-type", "").lower()
        e = S.log_start("api", op.method, url, self.server.scheme, S.redact_headers(op.headers),
                        op.body, "json" if ("json" in ct or (op.body[:1] in (b"{", b"[")))
                        else "text", batch=entry.seq, changeset=op.changeset,
                        content_id=op.content_id, conn=entry.conn)
        e.client = entry.client
        if logged is not None:
            logged.append(e)
        fault = S.match_fault(op.method, url, op.body, True)
        resp = None
        if fault is not None:
            if fault.delay_ms:
                time.sleep(fault.delay_ms / 1000.0)
            if fault.drop:
                e.status = 0
                e.error_code = "dropped"
                raise DropConnection()
            if fault.status is not None:
                resp = fault.response()
        if resp is None:
            rq = Req()
            rq.method = op.method
            rq.path = path
            rq.query = query
            rq.headers = op.headers
            rq.hdict = hd
            rq.body = op.body
            rq.scheme = self.server.scheme
            rq.origin = self.origin()
            rq.inner = True
            rq.log = e
            rq.ctx = Ctx(base_path, content_ids)
            rq.content_id = op.content_id
            rq.changeset = op.changeset
            rq.batch_seq = entry.seq
            resp = api.handle(rq)
        e.status = resp.status
        e.error_code = resp.code
        return resp


def render_part(resp, content_id):
    head = [b"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"]
    if content_id is not None:
        head.append(("Content-ID: %s\r\n" % content_id).encode())
    head.append(b"\r\n")
    try:
        phrase = http.HTTPStatus(resp.status).phrase
    except ValueError:
        phrase = "Status"
    head.append(("HTTP/1.1 %d %s\r\n" % (resp.status, phrase)).encode())
    for k, v in resp.headers:
        head.append(("%s: %s\r\n" % (k, v)).encode("utf-8"))
    head.append(b"\r\n")
    head.append(resp.body)
    head.append(b"\r\n")
    return b"".join(head)


def same_origin(a, b):
    try:
        sa, sb = urlsplit(a), urlsplit(b)
        pa = sa.port or (443 if sa.scheme == "https" else 80)
        pb = sb.port or (443 if sb.scheme == "https" else 80)
    except ValueError:
        return False
    loop = ("127.0.0.1", "localhost", "::1")
    ha, hb = (sa.hostname or "").lower(), (sb.hostname or "").lower()
    if ha in loop and hb in loop:
        ha = hb
    return sa.scheme == sb.scheme and ha == hb and pa == pb


# ---------------------------------------------------------------------------
# Control API
# ---------------------------------------------------------------------------

CONFIG_KEYS = {"token_lifetime": int, "latency_ms": float, "per_record_ms": float,
               "dop_hint": int, "max_concurrent": int, "requests_per_window": int,
               "window_s": float, "max_page_size": int, "check_audience": bool,
               "secret_expired": bool, "log_bodies": bool, "log_limit": int,
               "max_batch": int, "max_bulk": int, "tenant": str, "client_id": str,
               "client_secret": str, "exec_budget_s": float, "bulk_target_ms": float,
               "app_users": dict}


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
                    "faults_fired": st.get("faults_fired", 0),
                    "rows": {k: len(v) for k, v in S.rows.items()},
                    "version": S.version,
                    "changelog": len(S.changelog),
                    "inflight": S.inflight,
                    "users": {k: u.describe() for k, u in S.users.items()}})
        if p == "/_sim/reset-stats" and method == "POST":
            with S.lock:
                S.stats = collections.Counter()
                for u in S.users.values():
                    u.reset_counters()
            return self.ok({"ok": True})
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


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="Dataverse Web API simulator (127.0.0.1 only)")
    ap.add_argument("--port", type=int, default=0, help="HTTP port (0 = pick a free one)")
    ap.add_argument("--https-port", type=int, default=None,
                    help="also serve HTTPS on this port (0 = free port); needs --cert/--key")
    ap.add_argument("--cert", help="PEM certificate for HTTPS")
    ap.add_argument("--key", help="PEM private key for HTTPS")
    ap.add_argument("--port-file", help="write 'http_port https_port' here after binding")
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--per-record-ms", type=float, default=0.0)
    ap.add_argument("--tenant", default=DEFAULT_TENANT)
    ap.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    ap.add_argument("--client-secret", default=DEFAULT_SECRET)
    ap.add_argument("--token-lifetime", type=int, default=3599)
    ap.add_argument("--dop-hint", type=int, default=4)
    ap.add_argument("--exec-budget-s", type=float, default=1200.0,
                    help="server execution time per user per window (0 = no budget)")
    ap.add_argument("--window-s", type=float, default=300.0,
                    help="service-protection window (execution time and request count)")
    ap.add_argument("--requests-per-window", type=int, default=None)
    ap.add_argument("--max-concurrent", type=int, default=None)
    ap.add_argument("--bulk-target-ms", type=float, default=None,
                    help="server time per target of a bulk message (default per-record-ms)")
    ap.add_argument("--app-user", action="append", default=[], metavar="CLIENT_ID:SECRET",
                    help="another application user (repeatable)")
    ap.add_argument("--no-check-audience", action="store_true",
                    help="accept any scope/resource and any token audience")
    ap.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = ap.parse_args(argv)

    defaults = {"tenant": args.tenant.lower(), "client_id": args.client_id.lower(),
                "client_secret": args.client_secret, "token_lifetime": args.token_lifetime,
                "latency_ms": args.latency_ms, "per_record_ms": args.per_record_ms,
                "dop_hint": args.dop_hint, "max_concurrent": args.max_concurrent,
                "requests_per_window": args.requests_per_window, "window_s": args.window_s,
                "exec_budget_s": args.exec_budget_s or None,
                "bulk_target_ms": args.bulk_target_ms, "max_page_size": 5000,
                "app_users": dict(u.split(":", 1) for u in args.app_user if ":" in u),
                "check_audience": not args.no_check_audience, "secret_expired": False,
                "log_bodies": True, "log_limit": 300000, "max_batch": 1000, "max_bulk": 1000}
    state = State(defaults)
    api = Api(state)

    httpd = Server(("127.0.0.1", args.port), Handler, state, api, "http", args.verbose)
    http_port = httpd.server_address[1]
    state.ports.add(http_port)
    httpsd = None
    https_port = 0
    if args.https_port is not None:
        if not args.cert or not args.key:
            ap.error("--https-port needs --cert and --key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        httpsd = Server(("127.0.0.1", args.https_port), Handler, state, api, "https",
                        args.verbose)
        httpsd.socket = ctx.wrap_socket(httpsd.socket, server_side=True,
                                        do_handshake_on_connect=False)
        https_port = httpsd.server_address[1]
        state.ports.add(https_port)

    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d %d\n" % (http_port, https_port))
        os.replace(tmp, args.port_file)
    sys.stdout.write("dataverse_sim listening on http://127.0.0.1:%d%s\n" % (
        http_port, (" and https://127.0.0.1:%d" % https_port) if https_port else ""))
    sys.stdout.flush()
    if httpsd is not None:
        t = threading.Thread(target=httpsd.serve_forever, daemon=True)
        t.start()
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
