"""The schema model: attributes, entities and the type names the Web API
and the metadata use for them."""

import collections

from .common import NS


class Attr:
    """One attribute of an entity: type, limits, create/update validity."""
    __slots__ = ("name", "type", "label", "maxlen", "create", "update",
                 "targets", "options", "date_only", "minv", "maxv",
                 "schema", "custom", "status_state", "state_default",
                 "primary_id", "primary_name", "optionset_name", "required",
                 "nav", "rels")

    def __init__(self, name, typ, label, maxlen=None, create=True,
                 update=True, targets=None, options=None, date_only=False,
                 minv=None, maxv=None, custom=False, required=None, nav=None,
                 schema=None, rels=None):
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
        self.schema = schema or ("".join(p.capitalize() for p in name.split("_"))
                                 if not custom else name)
        # RequiredLevel in the metadata (the Web API enforces only
        # SystemRequired, as Dataverse does)
        self.required = required
        # a lookup's single-valued navigation property when it is not the
        # attribute's name (custom lookups: the schema name, case-sensitive)
        self.nav = nav
        # a lookup's relationship schema names by target, where known
        self.rels = rels or {}
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
        if attr.type in ("State", "Status", "Picklist", "MultiSelectPicklist"):
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
                    self.navs[a.nav or a.name] = (a.name, list(a.targets))
        self.read_cols = list(self.attrs.keys())
        self.relationships = [self._relationship(a, t) for a in self.attrs.values()
                              if a.type in ("Lookup", "Customer", "Owner")
                              for t in a.targets]

    def _relationship(self, a, target):
        """One many-to-one relationship of lookup a to target: (schema name,
        attribute, target, single-valued navigation property)."""
        if a.type == "Customer":
            nav = "%s_%s" % (a.name, target)
        elif a.name == "regardingobjectid":
            nav = "regardingobjectid_%s_%s" % (target, self.name)
        else:
            nav = a.nav or a.name
        name = a.rels.get(target)
        if name is None:
            if a.type == "Owner":
                name = "%s_%s" % ("user" if target == "systemuser" else target, self.set_name)
            elif a.name in ("createdby", "modifiedby"):
                name = "lk_%s_%s" % (self.name, a.name)
            elif a.name == "regardingobjectid":
                name = "%s_%s" % (target.capitalize(), self.set_name.capitalize())
            else:
                name = "%s_%s_%s" % (self.name, a.name, target)
        return (name, a.name, target, nav)


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


ACTIVITY_PARTY_TARGETS = ("contact", "systemuser", "account")

EDM_NAMES = {"String": "Edm.String", "Memo": "Edm.String",
             "Integer": "Edm.Int32", "Money": "Edm.Decimal",
             "Boolean": "Edm.Boolean", "DateTime": "Edm.DateTimeOffset",
             "Picklist": "Edm.Int32", "State": "Edm.Int32",
             "MultiSelectPicklist": "Edm.String",
             "Status": "Edm.Int32", "BigInt": "Edm.Int64",
             "Uniqueidentifier": "Edm.Guid", "EntityName": "Edm.String"}

META_TYPE = {"String": "StringAttributeMetadata",
             "Memo": "MemoAttributeMetadata",
             "Integer": "IntegerAttributeMetadata",
             "Money": "MoneyAttributeMetadata",
             "Boolean": "BooleanAttributeMetadata",
             "DateTime": "DateTimeAttributeMetadata",
             "Picklist": "PicklistAttributeMetadata",
             "MultiSelectPicklist": "MultiSelectPicklistAttributeMetadata",
             "Lookup": "LookupAttributeMetadata",
             "Customer": "LookupAttributeMetadata",
             "Owner": "LookupAttributeMetadata",
             "State": "StateAttributeMetadata",
             "Status": "StatusAttributeMetadata",
             "BigInt": "BigIntAttributeMetadata",
             "Uniqueidentifier": "UniqueIdentifierAttributeMetadata",
             "EntityName": "EntityNameAttributeMetadata"}
