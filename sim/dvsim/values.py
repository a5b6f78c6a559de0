"""Value coercion: a JSON value of a request body checked against the type
and limits of its attribute, as Dataverse validates it."""

import datetime
import json
import math

from .common import (ApiError, DATE_RE, DATETIME_RE, ERR_LENGTH, ERR_TYPE,
    guid_or_none, INT32_MAX, INT32_MIN)
from .schema import EDM_NAMES


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
    if t == "MultiSelectPicklist":
        # written as a string of comma-separated values ("1, 9"), read back
        # without spaces ("1,9")
        if not isinstance(v, str):
            raise _type_error(ent, a, v)
        if not v.strip():
            return None
        allowed = {o[0] for o in a.options}
        picked = []
        for part in v.split(","):
            try:
                n = int(part.strip())
            except ValueError:
                raise _type_error(ent, a, v, "Expected a string of comma-separated "
                                  "option values, e.g. \"100000000,100000002\".")
            if n not in allowed:
                raise ApiError(400, ERR_TYPE,
                               "A validation error occurred. The value %d of '%s' on record "
                               "of type '%s' is outside the valid range." % (n, a.name, ent.name))
            if n not in picked:
                picked.append(n)
        if len(picked) > 150:
            raise ApiError(400, ERR_TYPE, "At most 150 options can be selected in '%s'."
                           % a.name)
        return ",".join(str(n) for n in picked)
    if t == "Uniqueidentifier":
        g = guid_or_none(v)
        if g is None:
            raise _type_error(ent, a, v)
        return g
    raise _type_error(ent, a, v)
