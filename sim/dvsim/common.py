"""Constants, seed identifiers, errors, responses and small helpers shared by
every module of the simulator."""

import base64
import collections
import datetime
import json
import re
import time
import uuid
from urllib.parse import unquote_plus


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
