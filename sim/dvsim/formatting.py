"""Rows as the Web API returns them (lookups as _x_value with annotations,
formatted values), $select and the name resolvers of $filter/$orderby."""

from .common import LOOKUP_TYPES, no_property
from .entities import ENTITIES


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
                        "%s_%s" % (c, v[0]) if at.type == "Customer" or
                        c == "regardingobjectid" else (at.nav or c))
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
                elif at.type == "MultiSelectPicklist":
                    labels = {o[0]: o[1] for o in at.options}
                    fv = "; ".join(labels.get(int(x), x) for x in v.split(","))
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
