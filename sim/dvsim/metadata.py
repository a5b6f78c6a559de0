"""Metadata: EntityDefinitions, Attributes (with casts to the attribute
metadata types), option sets, many-to-one and one-to-many relationships."""

import collections
import re

from .common import (ApiError, bad_segment, det_uuid, guid_or_none, json_resp,
    LOOKUP_TYPES, no_property, NS)
from .entities import ENTITIES
from .formatting import dict_resolver
from .odata_filter import compile_filter, FilterError
from .schema import META_TYPE


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
    if at.type == "MultiSelectPicklist":
        # as Dataverse reports a multi-select choice
        d["AttributeType"] = "Virtual"
    else:
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
    d["RequiredLevel"] = {"Value": at.required or ("SystemRequired" if at.primary_id
                                                   else "None"),
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
    if expand_optionset and at.type in ("Picklist", "State", "Status", "Boolean",
                                        "MultiSelectPicklist"):
        os_ = {"MetadataId": det_uuid("optionset", ent.name, at.name),
               "Name": at.optionset_name or "%s_%s" % (ent.name, at.name),
               "IsGlobal": False, "IsCustomOptionSet": at.custom,
               "OptionSetType": "Picklist" if at.type == "MultiSelectPicklist" else at.type,
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
    d["SchemaName"] = ent.name.capitalize() if not ent.custom else \
        ent.name.split("_", 1)[0] + "_" + ent.name.split("_", 1)[1].capitalize()
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


def relationship_meta(ent, rel):
    """A many-to-one relationship of ent (OneToManyRelationshipMetadata)."""
    name, attr, target, nav = rel
    d = collections.OrderedDict()
    d["MetadataId"] = det_uuid("relationship", ent.name, attr, target)
    d["SchemaName"] = name
    d["RelationshipType"] = "OneToManyRelationship"
    d["IsCustomRelationship"] = ent.attrs[attr].custom
    d["IsHierarchical"] = False
    d["IsValidForAdvancedFind"] = True
    d["ReferencedAttribute"] = ENTITIES[target].key
    d["ReferencedEntity"] = target
    d["ReferencingAttribute"] = attr
    d["ReferencingEntity"] = ent.name
    d["ReferencedEntityNavigationPropertyName"] = name
    d["ReferencingEntityNavigationPropertyName"] = nav
    return d


def relationships(ent, kind):
    """The relationship metadata of ent: ManyToOne (its lookups) or
    OneToMany (lookups of any entity to it)."""
    if kind == "ManyToOneRelationships":
        return [relationship_meta(ent, r) for r in ent.relationships]
    return [relationship_meta(e, r) for e in ENTITIES.values()
            for r in e.relationships if r[2] == ent.name]


ENTITY_NAVS = ("Attributes", "ManyToOneRelationships", "OneToManyRelationships", "Keys")


def split_top(text, sep):
    """Split text at sep outside parentheses and quotes."""
    parts, depth, quoted, cur = [], 0, False, []
    for ch in text:
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_expand(text):
    """'A($select=x,y;$filter=...),B' -> [('A', {'$select': 'x,y', ...}), ('B', {})]"""
    out = []
    for item in split_top(text or "", ","):
        item = item.strip()
        if not item:
            continue
        m = re.match(r"^([A-Za-z]\w*)(?:\((.*)\))?$", item)
        if not m:
            raise ApiError(400, "0x0", "Invalid $expand item '%s'." % item)
        opts = {}
        for o in split_top(m.group(2) or "", ";"):
            if "=" in o:
                k, v = o.split("=", 1)
                opts[k.strip()] = v.strip()
        out.append((m.group(1), opts))
    return out


def meta_collection(items, q):
    """$filter and $select (of a query or of a nested $expand) on metadata."""
    if q.get("$filter"):
        try:
            pred = compile_filter(q["$filter"], dict_resolver)
        except FilterError as e:
            raise ApiError(400, "0x0", str(e))
        items = [d for d in items if pred(d)]
    sel = [s.strip() for s in q["$select"].split(",")] if q.get("$select") else None
    return [select_meta(d, sel) for d in items]


def entity_nav(ent, name, q):
    """The items of a collection-valued navigation property of an entity's
    metadata (Attributes, relationships, Keys)."""
    if name == "Attributes":
        items = [attribute_meta(ent, a) for a in ent.attrs.values()]
    elif name == "Keys":
        items = []     # alternate keys are not simulated
    elif name in ENTITY_NAVS:
        items = relationships(ent, name)
    else:
        raise no_property(name, NS + "EntityMetadata")
    return meta_collection(items, q)


class MetadataMixin:
    """Api methods: GET EntityDefinitions[...]"""

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
            for name, opts in parse_expand(q.get("$expand")):
                out[name] = entity_nav(ent, name, opts)
            return json_resp(200, out)
        if segs[1] in ENTITY_NAVS[1:]:
            if len(segs) > 2:
                raise bad_segment(segs[2])
            ctx = base + "/$metadata#EntityDefinitions('%s')/%s" % (ent.name, segs[1])
            if sel:
                ctx += "(%s)" % ",".join(sel)
            return json_resp(200, {"@odata.context": ctx,
                                   "value": entity_nav(ent, segs[1], q)})
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
