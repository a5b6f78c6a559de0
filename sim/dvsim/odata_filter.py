"""$filter: a subset of OData (eq ne gt ge lt le, and or not, parentheses,
contains/startswith/endswith) and Dataverse's query functions
Microsoft.Dynamics.CRM.In / NotIn, compiled into predicates."""

import re

from .values import norm_datetime


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
