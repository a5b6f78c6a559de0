"""Request bodies: @odata.bind references, activity parties and the
type check of an entity body (no existence checks here)."""

import json
import re
from urllib.parse import urlsplit

from .common import (ApiError, APP_USER_ID, bad_segment, ERR_INVALID_PROP, ERR_TYPE,
    guid_or_none, LOOKUP_TYPES)
from .entities import SETS
from .schema import ACTIVITY_PARTY_TARGETS
from .values import coerce, _type_error


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
