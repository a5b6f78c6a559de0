#!/usr/bin/python3
"""Tests of the tables a table map uses: accounts (a choice, money), the
Customer lookup parentcustomerid of contacts, the custom table new_project
(a lookup to account with the navigation property new_AccountId, a choice
and a multi-select choice), their metadata (attributes, option sets,
relationships), change tracking and deletes, and a save/load round trip.

Starts its own simulator (through simtest.Sim) and prints one
"ok N - ..." or "not ok N - ..." line per check (test/sim_tables.sh runs
it); exits 0 when every check passed."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import simtest  # noqa: E402
from simtest import API, Client, Sim  # noqa: E402

N = [0, 0]


def check(name, cond, detail=""):
    N[0] += 1
    if cond:
        print("ok %d - %s" % (N[0], name))
    else:
        N[1] += 1
        print("not ok %d - %s" % (N[0], name))
        if detail:
            for line in str(detail)[:800].splitlines():
                print("# " + line)


def auth(sim):
    tok = sim.token().json()["access_token"]
    return {"Authorization": "Bearer " + tok, "OData-Version": "4.0"}


REPR = {"Prefer": 'return=representation,odata.include-annotations="*"'}


def run(sim):
    c = sim.c
    H = auth(sim)
    HR = dict(H, **REPR)

    # accounts: a choice and money ------------------------------------------
    r = c.req("POST", API + "accounts", {"name": "Tailspin Toys", "industrycode": 7,
                                         "revenue": 1234.5, "accountnumber": "ACC-9"}, HR)
    j = r.json() if r.status == 201 else {}
    acc = j.get("accountid")
    check("account with industrycode and revenue: stored, with formatted values",
          r.status == 201 and j["industrycode"] == 7 and j["revenue"] == 1234.5 and
          j["industrycode@OData.Community.Display.V1.FormattedValue"] == "Consulting" and
          j["revenue@OData.Community.Display.V1.FormattedValue"] == "$1,234.50", r)
    r = c.req("POST", API + "accounts", {"name": "X", "industrycode": 99}, H)
    check("industrycode outside its options: 400 0x80040203",
          r.status == 400 and r.code() == "0x80040203" and "industrycode" in r.msg(), r)
    r = c.req("GET", API + "EntityDefinitions(LogicalName='account')/Attributes/"
              "Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName"
              "&$expand=OptionSet", None, H)
    ind = [a for a in r.json()["value"] if a["LogicalName"] == "industrycode"] \
        if r.status == 200 else []
    opts = {o["Value"]: o["Label"]["UserLocalizedLabel"]["Label"]
            for o in ind[0]["OptionSet"]["Options"]} if ind else {}
    check("industrycode's option set through the Picklist cast: 33 options, 7 = Consulting",
          len(opts) == 33 and opts.get(7) == "Consulting" and
          ind[0]["@odata.type"] == "#Microsoft.Dynamics.CRM.PicklistAttributeMetadata", r)
    r = c.req("GET", API + "EntityDefinitions(LogicalName='account')/Attributes"
              "?$select=LogicalName,AttributeType,MaxLength,RequiredLevel", None, H)
    am = {a["LogicalName"]: a for a in r.json()["value"]} if r.status == 200 else {}
    check("account attributes: name String(160) ApplicationRequired, revenue Money, "
          "telephone1 String(50)",
          am.get("name", {}).get("MaxLength") == 160 and
          am["name"]["RequiredLevel"]["Value"] == "ApplicationRequired" and
          am["revenue"]["AttributeType"] == "Money" and
          am["telephone1"]["MaxLength"] == 50 and am["industrycode"]["AttributeType"] ==
          "Picklist", r)

    # contacts: the Customer lookup parentcustomerid ---------------------------
    r = c.req("POST", API + "contacts", {"lastname": "Lee",
                                         "parentcustomerid_account@odata.bind":
                                         "/accounts(%s)" % acc}, HR)
    j = r.json() if r.status == 201 else {}
    con = j.get("contactid")
    check("contact bound to an account: _parentcustomerid_value, lookuplogicalname account, "
          "navigation property parentcustomerid_account",
          j.get("_parentcustomerid_value") == acc and
          j["_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "account" and
          j["_parentcustomerid_value@Microsoft.Dynamics.CRM.associatednavigationproperty"] ==
          "parentcustomerid_account" and
          j["_parentcustomerid_value@OData.Community.Display.V1.FormattedValue"] ==
          "Tailspin Toys", r)
    r = c.req("POST", API + "contacts", {"lastname": "Kid",
                                         "parentcustomerid_contact@odata.bind":
                                         "/contacts(%s)" % con}, HR)
    j = r.json() if r.status == 201 else {}
    check("contact bound to a contact: lookuplogicalname contact",
          j.get("_parentcustomerid_value") == con and
          j["_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact", r)
    r = c.req("POST", API + "contacts", {"lastname": "Bad",
                                         "parentcustomerid_account@odata.bind":
                                         "/contacts(%s)" % con}, H)
    check("parentcustomerid_account bound to a contact: 400",
          r.status == 400 and r.code() == "0x80060888", r)
    r = c.req("PATCH", API + "contacts(%s)" % con,
              {"parentcustomerid_account@odata.bind": None}, HR)
    check("binding null clears the lookup",
          r.status == 200 and r.json()["_parentcustomerid_value"] is None, r)
    r = c.req("GET", API + "EntityDefinitions(LogicalName='contact')/ManyToOneRelationships"
              "?$select=SchemaName,ReferencingAttribute,ReferencedEntity,ReferencedAttribute,"
              "ReferencingEntityNavigationPropertyName"
              "&$filter=ReferencingAttribute%20eq%20'parentcustomerid'", None, H)
    rels = {x["ReferencedEntity"]: x for x in r.json()["value"]} if r.status == 200 else {}
    check("contact's ManyToOneRelationships: parentcustomerid to account and to contact",
          len(rels) == 2 and
          rels["account"]["SchemaName"] == "contact_customer_accounts" and
          rels["account"]["ReferencingEntityNavigationPropertyName"] ==
          "parentcustomerid_account" and rels["account"]["ReferencedAttribute"] == "accountid" and
          rels["contact"]["ReferencingEntityNavigationPropertyName"] ==
          "parentcustomerid_contact", r)

    # new_project: custom lookup, choice, multi-select choice --------------
    body = {"new_name": "Rollout", "new_AccountId@odata.bind": "/accounts(%s)" % acc,
            "new_stage": 100000001, "new_services": "100000000, 100000002",
            "new_budget": 50000, "new_startdate": "2026-01-15"}
    r = c.req("POST", API + "new_projects", body, HR)
    j = r.json() if r.status == 201 else {}
    p1 = j.get("new_projectid")
    check("new_project created with new_AccountId@odata.bind, a choice and a multi-select",
          j.get("_new_accountid_value") == acc and
          j["_new_accountid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "account" and
          j["_new_accountid_value@Microsoft.Dynamics.CRM.associatednavigationproperty"] ==
          "new_AccountId" and j["new_stage"] == 100000001 and
          j["new_services"] == "100000000,100000002" and
          j["new_services@OData.Community.Display.V1.FormattedValue"] ==
          "Consulting; Training" and j["new_startdate"] == "2026-01-15", r)
    r = c.req("POST", API + "new_projects", {"new_name": "x", "new_accountid@odata.bind":
                                             "/accounts(%s)" % acc}, H)
    check("navigation properties are case-sensitive: new_accountid@odata.bind is 400",
          r.status == 400 and r.code() == "0x80060888" and "new_accountid" in r.msg(), r)
    bad = [({"new_services": "100000000,7"}, "outside the valid range"),
           ({"new_services": [100000000]}, "Cannot convert"),
           ({"new_services": "a,b"}, "comma-separated"),
           ({"new_stage": 3}, "outside the valid range")]
    res = [c.req("POST", API + "new_projects", dict(b, new_name="x"), H) for b, _ in bad]
    check("bad choice and multi-select values: 400 0x80040203 each",
          all(x.status == 400 and x.code() == "0x80040203" and n in x.msg()
              for x, (_, n) in zip(res, bad)), res)
    r = c.req("GET", API + "new_projects?$select=new_name,_new_accountid_value,new_services"
              "&$filter=_new_accountid_value%%20eq%%20%s%%20and%%20new_stage%%20eq%%20100000001"
              % acc, None, H)
    check("$filter on _new_accountid_value and new_stage",
          r.status == 200 and [x["new_projectid"] for x in r.json()["value"]] == [p1], r)

    q = ("EntityDefinitions(LogicalName='new_project')?$select=LogicalName,SchemaName,"
         "EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute,IsCustomEntity,"
         "ChangeTrackingEnabled&$expand=Attributes($select=LogicalName,SchemaName,"
         "AttributeType,AttributeTypeName,MaxLength,RequiredLevel,IsCustomAttribute;"
         "$filter=startswith(LogicalName,'new_')),"
         "ManyToOneRelationships($select=SchemaName,ReferencingAttribute,ReferencedEntity,"
         "ReferencingEntityNavigationPropertyName;$filter=ReferencingAttribute%20eq%20"
         "'new_accountid'),Keys")
    r = c.req("GET", API + q, None, H)
    j = r.json() if r.status == 200 else {}
    at = {a["LogicalName"]: a for a in j.get("Attributes", [])}
    rel = j.get("ManyToOneRelationships", [])
    check("new_project's definition with Attributes (nested $select and $filter), "
          "ManyToOneRelationships and Keys expanded",
          j.get("SchemaName") == "new_Project" and j["EntitySetName"] == "new_projects" and
          j["PrimaryIdAttribute"] == "new_projectid" and j["PrimaryNameAttribute"] ==
          "new_name" and j["IsCustomEntity"] is True and j["ChangeTrackingEnabled"] is True and
          j["Keys"] == [] and "statecode" not in at and len(at) == 8 and
          at["new_services"]["AttributeType"] == "Virtual" and
          at["new_services"]["AttributeTypeName"]["Value"] == "MultiSelectPicklistType" and
          at["new_accountid"]["SchemaName"] == "new_AccountId" and
          at["new_accountid"]["Targets"] == ["account"] and
          at["new_name"]["MaxLength"] == 100 and
          at["new_name"]["RequiredLevel"]["Value"] == "ApplicationRequired" and
          "DisplayName" not in at["new_name"] and
          len(rel) == 1 and rel[0]["ReferencedEntity"] == "account" and
          rel[0]["ReferencingEntityNavigationPropertyName"] == "new_AccountId", r)
    r = c.req("GET", API + "EntityDefinitions(LogicalName='new_project')/Attributes/"
              "Microsoft.Dynamics.CRM.MultiSelectPicklistAttributeMetadata?$select=LogicalName"
              "&$expand=OptionSet", None, H)
    v = r.json()["value"] if r.status == 200 else []
    check("the multi-select's option set through the MultiSelectPicklist cast",
          [a["LogicalName"] for a in v] == ["new_services"] and
          [o["Value"] for o in v[0]["OptionSet"]["Options"]] ==
          [100000000, 100000001, 100000002, 100000003] and
          v[0]["OptionSet"]["Options"][2]["Label"]["UserLocalizedLabel"]["Label"] == "Training",
          r)
    r = c.req("GET", API + "EntityDefinitions(LogicalName='account')/OneToManyRelationships"
              "?$select=ReferencingEntity,ReferencingAttribute", None, H)
    pairs = {(x["ReferencingEntity"], x["ReferencingAttribute"]) for x in r.json()["value"]} \
        if r.status == 200 else set()
    check("account's OneToManyRelationships include new_project.new_accountid and "
          "contact.parentcustomerid",
          ("new_project", "new_accountid") in pairs and ("contact", "parentcustomerid") in pairs,
          r)

    # change tracking and deletes -----------------------------------------
    r = c.req("POST", API + "new_projects", {"new_name": "Second"}, HR)
    p2 = r.json().get("new_projectid") if r.status == 201 else None
    links = {}
    for es in ("new_projects", "accounts", "contacts"):
        r = c.req("GET", API + es + "?$select=" + {"new_projects": "new_name,new_services",
                                                   "accounts": "name,industrycode",
                                                   "contacts": "lastname"}[es],
                  None, dict(H, Prefer="odata.track-changes"))
        links[es] = r.json().get("@odata.deltaLink") if r.status == 200 else None
    c.req("PATCH", API + "new_projects(%s)" % p1, {"new_services": "100000003",
                                                 "new_AccountId@odata.bind": None}, H)
    c.req("DELETE", API + "new_projects(%s)" % p2, None, H)
    c.req("PATCH", API + "accounts(%s)" % acc, {"industrycode": 16}, H)
    r = c.req("GET", links["new_projects"] or "/none", None, H)
    v = r.json()["value"] if r.status == 200 else []
    check("new_projects delta: the update (lookup cleared, new multi-select) and the delete",
          len(v) == 2 and v[0]["new_projectid"] == p1 and v[0]["new_services"] == "100000003" and
          v[1].get("id") == p2 and v[1].get("reason") == "deleted", r)
    r = c.req("GET", API + "new_projects(%s)?$select=_new_accountid_value" % p1, None, H)
    check("binding null cleared _new_accountid_value",
          r.status == 200 and r.json()["_new_accountid_value"] is None, r)
    r = c.req("GET", links["accounts"] or "/none", None, H)
    v = r.json()["value"] if r.status == 200 else []
    check("accounts delta: the industrycode change",
          [(x["accountid"], x["industrycode"]) for x in v] == [(acc, 16)], r)
    r = c.req("DELETE", API + "contacts(%s)" % con, None, H)
    r2 = c.req("GET", links["contacts"] or "/none", None, H)
    v = r2.json()["value"] if r2.status == 200 else []
    check("contacts delta: the delete",
          r.status == 204 and any(x.get("id") == con and x.get("reason") == "deleted"
                                  for x in v), r2)
    r = c.req("POST", API + "new_projects/Microsoft.Dynamics.CRM.CreateMultiple", {"Targets": [
        {"@odata.type": "Microsoft.Dynamics.CRM.new_project", "new_name": "Bulk %d" % i,
         "new_AccountId@odata.bind": "/accounts(%s)" % acc} for i in range(3)]}, H)
    check("CreateMultiple on new_projects", r.status == 200 and len(r.json()["Ids"]) == 3, r)


def state_round_trip(tmp):
    """A new_project with a lookup and a multi-select survives a save and a
    restart with --state-file."""
    path = os.path.join(tmp, "state.json")
    pf = os.path.join(tmp, "ports2")
    procs = []

    def start():
        if os.path.exists(pf):
            os.unlink(pf)
        p = subprocess.Popen(["/usr/bin/python3", simtest.SIM, "--port", "0", "--port-file",
                              pf, "--state-file", path], stdout=subprocess.DEVNULL)
        procs.append(p)
        deadline = time.time() + 10
        while not os.path.exists(pf):
            if time.time() > deadline or p.poll() is not None:
                raise RuntimeError("simulator did not start")
            time.sleep(0.05)
        port = int(open(pf).read().split()[0])
        s = Sim.__new__(Sim)
        s.port, s.c, s.ctl = port, Client("127.0.0.1", port), Client("127.0.0.1", port)
        return p, s

    try:
        p, s = start()
        H = auth(s)
        r = s.c.req("POST", API + "new_projects",
                    {"new_name": "Kept", "new_services": "100000001,100000000",
                     "new_AccountId@odata.bind":
                     "/accounts(acc00000-0000-4000-8000-000000000001)"},
                    dict(H, Prefer="return=representation"))
        before = r.json() if r.status == 201 else {}
        saved = s.control("POST", "save")
        p.terminate()
        p.wait(10)
        p, s = start()
        H = auth(s)
        r = s.c.req("GET", API + "new_projects(%s)" % before.get("new_projectid"), None, H)
        after = r.json() if r.status == 200 else {}
        before.pop("@odata.context", None)
        after.pop("@odata.context", None)
        check("a new_project (lookup, multi-select) is the same after a save and a restart "
              "with --state-file",
              saved.get("ok") and before and before == after, json.dumps([before, after])[:700])
        p.terminate()
        p.wait(10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main():
    tmp = tempfile.mkdtemp(prefix="d365simtables-")
    sim = Sim(tmp)
    try:
        run(sim)
        state_round_trip(tmp)
    except Exception as e:
        import traceback
        check("no exception in the test driver", False, traceback.format_exc() or e)
    finally:
        sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if N[1] else 0)


if __name__ == "__main__":
    main()
