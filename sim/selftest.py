#!/usr/bin/python3
"""Self-test of the Dataverse simulator (stdlib only).

Starts sim/dataverse_sim.py on free ports (HTTP, and HTTPS when openssl is
available), exercises the token endpoint, the Web API, $batch, bulk
messages, change tracking, throttling, faults and the control API, and
prints "N passed, N failed".  Exit status 1 when anything failed.

  /usr/bin/python3 sim/selftest.py [--bench N] [--verbose]

--bench N additionally times N $batch requests of 1000 upsert PATCH
operations each (latency model 0) and prints the throughput.
"""

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from urllib.parse import urlsplit, quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from simtest import (ACCOUNT, ALEX, API, batch_body, CLIENT, Client, op,  # noqa: E402
                     parse_batch_response, Sim, SIMCTL, TEAM, TENANT, token_form)

passed = 0
failed = 0
VERBOSE = False


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        if VERBOSE:
            print("ok   " + name)
    else:
        failed += 1
        print("FAIL " + name + ((": " + str(detail)[:600]) if detail else ""))



def main():
    global VERBOSE
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    VERBOSE = a.verbose
    tmp = tempfile.mkdtemp(prefix="d365sim-")
    sim = Sim(tmp)
    try:
        run(sim, a)
    except Exception:
        import traceback
        traceback.print_exc()
        check("no exception in the test driver", False)
    finally:
        sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)


def run(sim, a):
    c = sim.c
    # ---------------------------------------------------------------- token
    r = sim.token()
    check("token 200", r.status == 200 and r.json()["token_type"] == "Bearer"
          and r.json()["expires_in"] == 3599, r)
    tok = r.json()["access_token"]
    H = {"Authorization": "Bearer " + tok, "Accept": "application/json",
         "OData-Version": "4.0", "OData-MaxVersion": "4.0"}

    def tok_err(path_tenant, body, status, error, code):
        r = c.req("POST", "/%s/oauth2/v2.0/token" % path_tenant, body,
                  {"Content-Type": "application/x-www-form-urlencoded"})
        j = r.json() if r.body else {}
        ok = (r.status == status and j.get("error") == error and j.get("error_codes") == [code]
              and j.get("error_description", "").startswith("AADSTS%d:" % code)
              and "Trace ID:" in j.get("error_description", "")
              and "Correlation ID:" in j["error_description"]
              and j.get("trace_id") and j.get("correlation_id") and j.get("timestamp"))
        check("token error %s %d" % (error, code), ok, r)
        return j

    scope = "http://127.0.0.1:%d/.default" % sim.port
    tok_err("99999999-9999-9999-9999-999999999999", token_form(scope=scope), 400,
            "invalid_request", 90002)
    tok_err(TENANT, token_form(scope=scope, client_id="33333333-3333-3333-3333-333333333333"),
            400, "unauthorized_client", 700016)
    j = tok_err(TENANT, token_form(scope=scope, client_secret="nope"), 401, "invalid_client",
                7000215)
    check("7000215 text", "Invalid client secret provided. Ensure the secret being sent" in
          j.get("error_description", "") and CLIENT in j.get("error_description", ""), j)
    tok_err(TENANT, token_form(scope=scope, grant_type="password"), 400,
            "unsupported_grant_type", 70003)
    tok_err(TENANT, token_form(scope="http://127.0.0.1:%d" % sim.port), 400, "invalid_scope",
            1002012)
    tok_err(TENANT, token_form(scope="https://contoso.crm.dynamics.com/.default"), 400,
            "invalid_resource", 500011)

    # ---------------------------------------------------------------- WhoAmI
    r = c.req("GET", API + "WhoAmI", headers=H)
    check("WhoAmI 200", r.status == 200 and r.json().get("UserId") and
          r.headers.get("x-ms-dop-hint") == "4" and r.headers.get("odata-version") == "4.0"
          and "WhoAmIResponse" in r.json()["@odata.context"], r)
    r = c.req("GET", API + "WhoAmI")
    check("WhoAmI no token 401", r.status == 401 and r.body == b"" and
          r.headers.get("www-authenticate", "").startswith("Bearer authorization_uri="), r)
    r = c.req("GET", API + "WhoAmI", headers={"Authorization": "Bearer junk"})
    check("WhoAmI bad token 401", r.status == 401, r)
    r = c.req("GET", "/api/data/v9.1/WhoAmI", headers=H)
    check("any v9.x accepted", r.status == 200, r)

    # ------------------------------------------------ RetrieveTotalRecordCount
    r = c.req("GET", API + "RetrieveTotalRecordCount(EntityNames=@p1)?@p1=%5B%22account%22%5D",
              headers=H)
    coll = r.json().get("EntityRecordCountCollection", {}) if r.status == 200 else {}
    check("RetrieveTotalRecordCount 200: the seed accounts",
          coll.get("Keys") == ["account"] and coll.get("Values") == [2] and coll.get("Count") == 1
          and "RetrieveTotalRecordCountResponse" in r.json()["@odata.context"], r)
    r = c.req("GET", API + "RetrieveTotalRecordCount(EntityNames=@p1)?@p1=%5B%22nosuch%22%5D",
              headers=H)
    check("RetrieveTotalRecordCount of an unknown table 404", r.status == 404, r)
    r = c.req("GET", API + "RetrieveTotalRecordCount(EntityNames=@p1)?@p1=junk", headers=H)
    check("RetrieveTotalRecordCount without a list 400", r.status == 400, r)

    # ---------------------------------------------------------------- contacts
    r = c.req("POST", API + "contacts", {"firstname": "Ann", "lastname": "Lee",
                                         "emailaddress1": "ann@example.com",
                                         "parentcustomerid_account@odata.bind":
                                         "/accounts(%s)" % ACCOUNT}, H)
    eid = r.headers.get("odata-entityid", "")
    check("POST contact 204 + OData-EntityId", r.status == 204 and "/contacts(" in eid, r)
    cid = eid[eid.index("(") + 1:-1] if "(" in eid else None
    r = c.req("GET", API + "contacts(%s)?$select=fullname,_parentcustomerid_value" % cid,
              headers=H)
    j = r.json() if r.status == 200 else {}
    check("GET contact", r.status == 200 and j.get("fullname") == "Ann Lee" and
          j.get("_parentcustomerid_value") == ACCOUNT and
          j.get("_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname") == "account"
          and j.get("contactid") == cid and j.get("@odata.etag", "").startswith('W/"')
          and "firstname" not in j, r)
    r = c.req("POST", API + "contacts", {"firstname": "Bo"},
              dict(H, Prefer="return=representation"))
    check("POST return=representation 201", r.status == 201 and r.json()["fullname"] == "Bo"
          and r.json().get("@odata.etag"), r)
    r = c.req("POST", API + "contacts", {"contactid": cid, "firstname": "Dup"}, H)
    check("POST duplicate id 412", r.status == 412 and r.code() == "0x80040237", r)
    new_id = str(uuid.uuid4())
    r = c.req("PATCH", API + "contacts(%s)" % new_id, {"firstname": "Up"}, H)
    check("PATCH upsert creates 204", r.status == 204 and new_id in r.headers.get(
        "odata-entityid", ""), r)
    r = c.req("PATCH", API + "contacts(%s)" % new_id, {"lastname": "Sert"},
              dict(H, Prefer="return=representation"))
    check("PATCH upsert update repr 200", r.status == 200 and r.json()["fullname"] == "Up Sert",
          r)
    r = c.req("PATCH", API + "contacts(%s)" % str(uuid.uuid4()), {"firstname": "X"},
              dict(H, Prefer="return=representation"))
    check("PATCH upsert create repr 201", r.status == 201, r)
    missing = str(uuid.uuid4())
    r = c.req("PATCH", API + "contacts(%s)" % missing, {"firstname": "X"},
              dict(H, **{"If-Match": "*"}))
    check("If-Match * missing 404", r.status == 404 and r.code() == "0x80040217" and
          r.msg() == "contact With Id = %s Does Not Exist" % missing, r)
    r = c.req("PATCH", API + "contacts(%s)" % cid, {"firstname": "X"},
              dict(H, **{"If-None-Match": "*"}))
    check("If-None-Match * existing 412", r.status == 412 and r.code() == "0x80040237" and
          r.msg() == "A record with matching key values already exists.", r)
    r = c.req("PATCH", API + "contacts(%s)" % cid, {"jobtitle": "CTO"},
              dict(H, **{"If-Match": "*"}))
    check("If-Match * existing 204", r.status == 204, r)
    r = c.req("GET", API + "contacts(%s)?$select=firstname,nosuch" % cid, headers=H)
    check("unknown $select 400", r.status == 400 and r.msg() ==
          "Could not find a property named 'nosuch' on type 'Microsoft.Dynamics.CRM.contact'.", r)
    r = c.req("GET", API + "nosuchset", headers=H)
    check("unknown set 404", r.status == 404 and r.code() == "0x8006088a" and
          r.msg() == "Resource not found for the segment 'nosuchset'.", r)
    r = c.req("GET", API + "contacts(%s)" % missing, headers=H)
    check("GET missing 404", r.status == 404 and r.code() == "0x80040217", r)

    def bad(name, body, status, code, needle=None, method="POST", url="contacts"):
        r = c.req(method, API + url, body, H)
        ok = r.status == status and r.code() == code and (needle is None or needle in r.msg())
        check(name, ok, r)

    bad("invalid property", {"nosuch": 1}, 400, "0x80060888",
        "Invalid property 'nosuch' was found in entity 'Microsoft.Dynamics.CRM.contact'.")
    bad("read-only fullname", {"fullname": "x"}, 400, "0x80048d19", "fullname")
    bad("read-only createdon", {"createdon": "2020-01-01T00:00:00Z"}, 400, "0x80048d19",
        "createdon")
    bad("contactid not valid for update", {"firstname": "a", "contactid": str(uuid.uuid4())},
        400, "0x80040203", None, "PATCH", "contacts(%s)" % cid)
    bad("string for Integer", {"numberofchildren": "3"}, 400, "0x80040203", "numberofchildren")
    bad("number for String", {"firstname": 5}, 400, "0x80040203", "firstname")
    bad("datetime for DateOnly", {"birthdate": "1990-01-02T00:00:00Z"}, 400, "0x80040203",
        "birthdate")
    bad("date without time for DateTime", {"lastusedincampaign": "2020-01-01"}, 400,
        "0x80040203", "lastusedincampaign")
    bad("datetime without offset", {"lastusedincampaign": "2020-01-01T10:00:00"}, 400,
        "0x80040203", "lastusedincampaign")
    bad("non-boolean", {"donotemail": "yes"}, 400, "0x80040203", "donotemail")
    bad("bad picklist", {"gendercode": 7}, 400, "0x80040203", "gendercode")
    bad("date before 1753", {"birthdate": "1700-01-01"}, 400, "0x80040203", "birthdate")
    bad("firstname too long", {"firstname": "x" * 51}, 400, "0x80044331", "firstname")
    bad("bind to missing account", {"parentcustomerid_account@odata.bind":
                                    "/accounts(%s)" % missing}, 404, "0x80040217", missing)
    bad("bind wrong set", {"parentcustomerid_account@odata.bind": "/contacts(%s)" % cid},
        400, "0x80060888")
    bad("unknown nav", {"foo_account@odata.bind": "/accounts(%s)" % ACCOUNT}, 400, "0x80060888")
    bad("statecode not valid for create", {"statecode": 1}, 400, "0x80048d19", "statecode")
    r = c.req("PATCH", API + "contacts(%s)" % cid,
              {"firstname": "Ann", "lastname": "O'Bryan", "numberofchildren": 2,
               "annualincome": 5000000, "donotemail": True, "birthdate": "1990-01-02",
               "lastusedincampaign": "2023-04-07T23:59:01+02:00", "gendercode": 2,
               "ownerid@odata.bind": "/teams(%s)" % TEAM, "description": None}, H)
    check("PATCH typed values 204", r.status == 204, r)
    r = c.req("GET", API + "contacts(%s)" % cid, headers=H)
    j = r.json()
    check("typed values stored", j["lastusedincampaign"] == "2023-04-07T21:59:01Z" and
          j["birthdate"] == "1990-01-02" and j["annualincome"] == 5000000.0 and
          j["_ownerid_value"] == TEAM and
          j["_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "team" and
          j["fullname"] == "Ann O'Bryan" and j["description"] is None, j)
    r = c.req("PATCH", API + "contacts(%s)" % cid, {"jobtitle": None,
                                                  "parentcustomerid_account@odata.bind": None}, H)
    r = c.req("GET", API + "contacts(%s)?$select=jobtitle,_parentcustomerid_value" % cid,
              headers=H)
    check("null clears", r.json()["jobtitle"] is None and
          r.json()["_parentcustomerid_value"] is None, r)
    r = c.req("GET", API + "contacts?$select=fullname&$filter=" +
              quote("lastname eq 'O''Bryan' and firstname ne null"), headers=H)
    check("$filter doubled quote", r.status == 200 and len(r.json()["value"]) == 1 and
          r.json()["value"][0]["contactid"] == cid, r)
    r = c.req("GET", API + "systemusers?$select=fullname,accessmode&$filter=" +
              quote("internalemailaddress eq 'alex@contoso.example'"), headers=H)
    check("systemuser filter", r.status == 200 and r.json()["value"][0]["systemuserid"] == ALEX,
          r)
    r = c.req("GET", API + "contacts?$select=firstname&$orderby=" + quote("firstname desc") +
              "&$filter=" + quote("startswith(lastname,'o''b') or (contains(firstname,'nn')"
                                  " and numberofchildren ge 2)"), headers=H)
    check("$filter functions/or/ge + $orderby", r.status == 200 and
          [v["contactid"] for v in r.json()["value"]] == [cid], r)
    r = c.req("GET", API + "contacts?$filter=" + quote("nosuch eq 1"), headers=H)
    check("filter unknown property 400", r.status == 400, r)
    # Dataverse's In / NotIn query functions, as look-ups by a match field use them
    inids = []
    for em, kids in (("In.One@Example.com", 1), ("in.two@example.com", 2), ("in.three@example.com", 3)):
        r = c.req("POST", API + "contacts", {"lastname": "InTest", "emailaddress1": em,
                                             "numberofchildren": kids}, H)
        inids.append(r.headers.get("odata-entityid", "")[-37:-1])
    r = c.req("GET", API + "contacts?$select=emailaddress1&$filter=" + quote(
        "Microsoft.Dynamics.CRM.In(PropertyName='emailaddress1',"
        "PropertyValues=['in.one@example.com','IN.TWO@example.com','nobody@example.com'])"), headers=H)
    check("$filter In, strings compared case-insensitively", r.status == 200 and
          sorted(v["contactid"] for v in r.json()["value"]) == sorted(inids[:2]) and
          all(set(v) >= {"emailaddress1", "contactid"} and "lastname" not in v
              for v in r.json()["value"]), r)
    r = c.req("GET", API + "contacts?$select=lastname&$top=1&$filter=" + quote(
        "(Microsoft.Dynamics.CRM.In(PropertyName='numberofchildren',PropertyValues=['2','3']))"
        " and lastname eq 'intest' and statecode eq 0"), headers=H)
    check("$filter In on a number, with and + $top", r.status == 200 and
          len(r.json()["value"]) == 1 and r.json()["value"][0]["contactid"] in inids[1:], r)
    r = c.req("GET", API + "contacts?$select=lastname&$filter=" + quote(
        "Microsoft.Dynamics.CRM.NotIn(PropertyName='numberofchildren',PropertyValues=['2','3'])"
        " and lastname eq 'InTest'"), headers=H)
    check("$filter NotIn", r.status == 200 and
          [v["contactid"] for v in r.json()["value"]] == [inids[0]], r)
    r = c.req("GET", API + "contacts?$select=lastname&$filter=" + quote(
        "(emailaddress1 eq 'IN.ONE@example.com' and numberofchildren eq 1) or "
        "(emailaddress1 eq 'in.three@example.com' and numberofchildren eq 2)"), headers=H)
    check("$filter or chain of and groups", r.status == 200 and
          [v["contactid"] for v in r.json()["value"]] == [inids[0]], r)
    r = c.req("GET", API + "contacts?$filter=" + quote(
        "Microsoft.Dynamics.CRM.In(PropertyName='nosuch',PropertyValues=['x'])"), headers=H)
    check("$filter In unknown property 400", r.status == 400, r)
    r = c.req("GET", API + "contacts?$filter=" + quote(
        "Microsoft.Dynamics.CRM.In(PropertyName='emailaddress1')"), headers=H)
    check("$filter In without values 400", r.status == 400, r)
    B = "batch_in"
    r = c.req("POST", API + "$batch", batch_body(B, [op("GET", API + "contacts?$select=emailaddress1&$filter=" + quote(
        "Microsoft.Dynamics.CRM.In(PropertyName='emailaddress1',PropertyValues=['in.three@example.com'])"))]),
        dict(H, **{"Content-Type": "multipart/mixed; boundary=" + B}))
    st, text = parse_batch_response(r)
    check("GET with In inside $batch", r.status == 200 and st == [200] and inids[2] in text, text[:300])
    # paging
    r = c.req("GET", API + "contacts?$select=firstname", headers=dict(
        H, Prefer="odata.maxpagesize=2"))
    j = r.json()
    pages = [j]
    while "@odata.nextLink" in j and len(pages) < 20:
        nl = urlsplit(j["@odata.nextLink"])
        r = c.req("GET", nl.path + "?" + nl.query, headers=dict(H, Prefer="odata.maxpagesize=2"))
        j = r.json()
        pages.append(j)
    ids = [v["contactid"] for p in pages for v in p["value"]]
    r = c.req("GET", API + "contacts?$select=firstname&$count=true", headers=H)
    check("paging with maxpagesize", len(pages) >= 2 and len(ids) == len(set(ids)) ==
          len(r.json()["value"]) and r.json()["@odata.count"] == len(ids), (len(pages), ids))
    check("Preference-Applied maxpagesize", "odata.maxpagesize=2" in
          c.req("GET", API + "contacts", headers=dict(H, Prefer="odata.maxpagesize=2"))
          .headers.get("preference-applied", ""))
    r = c.req("GET", API + "contacts?$top=1", headers=H)
    check("$top", r.status == 200 and len(r.json()["value"]) == 1, r)
    r = c.req("DELETE", API + "contacts(%s)" % new_id, headers=H)
    check("DELETE 204", r.status == 204, r)
    r = c.req("DELETE", API + "contacts(%s)" % new_id, headers=H)
    check("DELETE again 404", r.status == 404 and r.code() == "0x80040217", r)
    # chunked request body
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=30)
    conn.request("POST", API + "contacts", body=iter([b'{"firstname":', b'"Chunk"}']),
                 headers=dict(H, **{"Content-Type": "application/json"}), encode_chunked=True)
    rr = conn.getresponse()
    rr.read()
    check("chunked body", rr.status == 204, rr.status)
    conn.close()

    # ---------------------------------------------------------------- activities
    r = c.req("POST", API + "phonecalls", {
        "subject": "Call", "phonenumber": "+1 555", "directioncode": True,
        "regardingobjectid_contact_phonecall@odata.bind": "/contacts(%s)" % cid,
        "ownerid@odata.bind": "/systemusers(%s)" % ALEX,
        "phonecall_activity_parties": [
            {"partyid_contact@odata.bind": "/contacts(%s)" % cid, "participationtypemask": 2},
            {"partyid_systemuser@odata.bind": "/systemusers(%s)" % ALEX,
             "participationtypemask": 1}]}, H)
    check("create phonecall", r.status == 204, r)
    pc = r.headers.get("odata-entityid", "(x)").split("(")[1][:-1]
    r = c.req("GET", API + "phonecalls(%s)?$select=subject,_regardingobjectid_value,statecode"
              "&$expand=phonecall_activity_parties($select=participationtypemask)" % pc,
              headers=H)
    j = r.json()
    parties = j.get("phonecall_activity_parties", [])
    check("phonecall read with parties", r.status == 200 and
          j["_regardingobjectid_value"] == cid and
          j["_regardingobjectid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact"
          and j["statecode"] == 0 and len(parties) == 2 and
          {p["participationtypemask"] for p in parties} == {1, 2} and
          parties[0]["_partyid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact", j)
    r = c.req("POST", API + "tasks", {"subject": "T", "prioritycode": 2,
                                      "regardingobjectid_contact@odata.bind":
                                      "/contacts(%s)" % cid}, H)
    check("create task (unsuffixed regarding)", r.status == 204, r)
    bad("activity statecode on create", {"subject": "x", "statecode": 1}, 400, "0x80048d19",
        "statecode", "POST", "phonecalls")
    bad("subject too long", {"subject": "s" * 201}, 400, "0x80044331", "subject", "POST",
        "phonecalls")
    bad("party missing target", {"subject": "x", "phonecall_activity_parties": [
        {"partyid_contact@odata.bind": "/contacts(%s)" % missing, "participationtypemask": 2}]},
        400, "0x80040217", missing, "POST", "phonecalls")
    bad("regarding wrong entity suffix", {"subject": "x",
                                          "regardingobjectid_contact_task@odata.bind":
                                          "/contacts(%s)" % cid}, 400, "0x80060888", None,
        "POST", "phonecalls")
    bad("invalid state pair", {"statecode": 1, "statuscode": 5}, 400, "0x80040203",
        "is not a valid status code for state code", "PATCH", "phonecalls(%s)" % pc)
    r = c.req("PATCH", API + "phonecalls(%s)" % pc, {"statecode": 1, "statuscode": 2}, H)
    check("complete phonecall", r.status == 204, r)
    bad("closed activity rejects edits", {"subject": "changed"}, 400, "0x80040215", None,
        "PATCH", "phonecalls(%s)" % pc)
    r = c.req("POST", API + "new_pageviews", {"subject": "Visit", "new_url": "https://x/y",
                                              "regardingobjectid_contact_new_pageview"
                                              "@odata.bind": "/contacts(%s)" % cid}, H)
    check("custom activity new_pageview", r.status == 204, r)

    # ---------------------------------------------------------------- metadata
    r = c.req("GET", API + "EntityDefinitions(LogicalName='contact')/Attributes?$select="
              "LogicalName,AttributeType,IsValidForCreate,IsValidForUpdate,DisplayName",
              headers=H)
    attrs = {x["LogicalName"]: x for x in r.json().get("value", [])} if r.status == 200 else {}
    check("contact attributes metadata", r.status == 200 and
          attrs["firstname"]["AttributeType"] == "String" and
          attrs["firstname"]["DisplayName"]["UserLocalizedLabel"]["Label"] == "First Name" and
          attrs["fullname"]["IsValidForCreate"] is False and
          attrs["parentcustomerid"]["Targets"] == ["account", "contact"] and
          attrs["contactid"]["IsValidForUpdate"] is False and "MaxLength" not in attrs["firstname"],
          r)
    r = c.req("GET", API + "EntityDefinitions?$select=LogicalName,EntitySetName&$filter=" +
              quote("IsActivity eq true"), headers=H)
    names = {x["LogicalName"]: x["EntitySetName"] for x in r.json()["value"]}
    check("activity entities", names == {"phonecall": "phonecalls", "email": "emails",
                                         "task": "tasks", "appointment": "appointments",
                                         "new_pageview": "new_pageviews"}, names)
    r = c.req("GET", API + "EntityDefinitions(LogicalName='contact')", headers=H)
    check("entity definition", r.json().get("ChangeTrackingEnabled") is True and
          r.json().get("PrimaryIdAttribute") == "contactid", r)
    r = c.req("GET", API + "EntityDefinitions(LogicalName='nosuch')", headers=H)
    check("unknown entity definition 404", r.status == 404, r)
    r = c.req("GET", API + "EntityDefinitions(LogicalName='contact')/Attributes(LogicalName="
              "'gendercode')/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select="
              "LogicalName&$expand=OptionSet", headers=H)
    opts = r.json().get("OptionSet", {}).get("Options", [])
    check("picklist options", [(o["Value"], o["Label"]["UserLocalizedLabel"]["Label"])
                               for o in opts] == [(1, "Male"), (2, "Female")], r)
    r = c.req("GET", API + "EntityDefinitions(LogicalName='phonecall')/Attributes(LogicalName="
              "'statuscode')/Microsoft.Dynamics.CRM.StatusAttributeMetadata?$expand=OptionSet",
              headers=H)
    opts = r.json().get("OptionSet", {}).get("Options", [])
    check("status options carry State", any(o["Value"] == 2 and o["State"] == 1 for o in opts),
          r)
    r = c.req("GET", API + "EntityDefinitions(LogicalName='task')/Attributes(LogicalName="
              "'statecode')/Microsoft.Dynamics.CRM.StateAttributeMetadata?$expand=OptionSet",
              headers=H)
    opts = r.json().get("OptionSet", {}).get("Options", [])
    check("state options", any(o["Value"] == 1 and o["DefaultStatus"] == 5 for o in opts), r)

    # ---------------------------------------------------------------- $batch
    B = "batch_" + uuid.uuid4().hex
    ids3 = [str(uuid.uuid4()) for _ in range(3)]
    body = batch_body(B, [op("PATCH", API + "contacts(%s)" % i, {"firstname": "B%d" % n})
                          for n, i in enumerate(ids3)])
    r = c.req("POST", API + "$batch", body, dict(H, **{
        "Content-Type": "multipart/mixed;boundary=" + B}))
    st, text = parse_batch_response(r)
    check("batch CRLF 3 upserts", r.status == 200 and st == [204, 204, 204] and
          "OData-EntityId: http://127.0.0.1:%d/api/data/v9.2/contacts(%s)" % (sim.port, ids3[0])
          in text and r.headers.get("content-type", "").startswith(
              "multipart/mixed; boundary=batchresponse_"), r)
    rows = {x["contactid"] for x in sim.control("GET", "rows/contact")["value"]}
    check("batch rows stored", set(ids3) <= rows)
    body_lf = batch_body(B, [op("PATCH", API + "contacts(%s)" % ids3[0], {"firstname": "L"},
                                nl="\n")], nl="\n")
    r = c.req("POST", API + "$batch", body_lf, dict(H, **{
        "Content-Type": 'multipart/mixed; boundary="%s"' % B}))
    check("batch LF 400", r.status == 400 and r.msg() == "Stream was not readable.", r)
    # full URL, relative URL and GET
    body = batch_body(B, [op("GET", "http://127.0.0.1:%d%scontacts(%s)?$select=firstname"
                             % (sim.port, API, ids3[0])),
                          op("GET", "contacts(%s)?$select=firstname" % ids3[1])])
    r = c.req("POST", API + "$batch", body, dict(H, **{
        "Content-Type": "multipart/mixed; boundary=" + B}))
    st, text = parse_batch_response(r)
    check("batch GET full & relative URL", st == [200, 200] and '"firstname":"B0"' in text and
          '"firstname":"B1"' in text, r)
    # change set with Content-ID reference
    CS = "changeset_" + uuid.uuid4().hex
    body = batch_body(B, [("cs", CS, [op("POST", API + "contacts", {"firstname": "CS1"}),
                                      op("PATCH", "$1", {"lastname": "Ref"}),
                                      op("POST", API + "tasks", {
                                          "subject": "t",
                                          "regardingobjectid_contact_task@odata.bind": "$1"})])])
    r = c.req("POST", API + "$batch", body, dict(H, **{
        "Content-Type": "multipart/mixed; boundary=" + B}))
    st, text = parse_batch_response(r)
    check("changeset with $1", st == [204, 204, 204] and "changesetresponse_" in text and
          "Content-ID: 1" in text, r)
    cs_rows = [x for x in sim.control("GET", "rows/contact")["value"] if x["firstname"] == "CS1"]
    check("changeset $1 applied", len(cs_rows) == 1 and cs_rows[0]["lastname"] == "Ref", cs_rows)
    # failing change set rolls back
    fid = str(uuid.uuid4())
    body = batch_body(B, [("cs", CS, [op("PATCH", API + "contacts(%s)" % fid, {"firstname": "RB"}),
                                      op("PATCH", API + "contacts(%s)" % cid, {"nosuch": 1})])])
    r = c.req("POST", API + "$batch", body, dict(H, **{
        "Content-Type": "multipart/mixed; boundary=" + B}))
    st, text = parse_batch_response(r)
    rows = {x["contactid"] for x in sim.control("GET", "rows/contact")["value"]}
    check("changeset failure atomic", st == [400] and fid not in rows and "0x80060888" in text,
          (st, text[:300]))
    # continue-on-error
    parts = [op("PATCH", API + "contacts(%s)" % str(uuid.uuid4()), {"firstname": "A"}),
             op("PATCH", API + "contacts(%s)" % cid, {"nosuch": 1}),
             op("PATCH", API + "contacts(%s)" % str(uuid.uuid4()), {"firstname": "C"})]
    body = batch_body(B, parts)
    r = c.req("POST", API + "$batch", body, dict(H, **{
        "Content-Type": "multipart/mixed; boundary=" + B}))
    st, _ = parse_batch_response(r)
    check("batch stops at first failure", st == [204, 400], st)
    r = c.req("POST", API + "$batch", body, dict(H, **{
        "Content-Type": "multipart/mixed; boundary=" + B, "Prefer": "odata.continue-on-error"}))
    st, _ = parse_batch_response(r)
    check("batch continue-on-error", st == [204, 400, 204] and
          r.headers.get("preference-applied") == "odata.continue-on-error", (st, r.headers))
    body = batch_body(B, [("cs", CS, [op("GET", API + "contacts")])])
    r = c.req("POST", API + "$batch", body, dict(H, **{
        "Content-Type": "multipart/mixed; boundary=" + B}))
    check("GET in changeset 400", r.status == 400, r)
    body = batch_body(B, [op("GET", "WhoAmI")] * 1001)
    r = c.req("POST", API + "$batch", body, dict(H, **{
        "Content-Type": "multipart/mixed; boundary=" + B}))
    check("1001 ops 400", r.status == 400, r)
    # request log for batches
    reqs = sim.control("GET", "requests?since=0")["requests"]
    outer = [e for e in reqs if e["path"].endswith("$batch") and e["status"] == 200][-1]
    inner = [e for e in reqs if e["batch"] == outer["seq"]]
    check("batch inner ops logged", len(inner) == 3 and all(e["seq"] > outer["seq"]
                                                            for e in inner) and
          inner[1]["error_code"] == "0x80060888" and inner[0]["body"] == {"firstname": "A"},
          inner)
    check("auth redacted in log", outer["headers"]["authorization"] == "Bearer <token #1>",
          outer["headers"])
    tokreq = [e for e in reqs if e["kind"] == "token"][0]
    check("token log secret hidden", tokreq["body"]["client_secret"] == "***", tokreq)

    # ---------------------------------------------------------------- bulk
    targets = [{"@odata.type": "Microsoft.Dynamics.CRM.contact", "contactid": str(uuid.uuid4()),
                "firstname": "U%d" % i, "emailaddress1": "u%d@example.com" % i}
               for i in range(1000)]
    t0 = time.time()
    r = c.req("POST", API + "contacts/Microsoft.Dynamics.CRM.UpsertMultiple",
              {"Targets": targets}, H)
    dt = time.time() - t0
    check("UpsertMultiple 1000", r.status == 200 and len(r.json()["Ids"]) == 1000 and
          r.json()["Ids"][0] == targets[0]["contactid"], r)
    n_before = sim.control("GET", "stats")["rows"]["contact"]
    bad_t = [dict(t, contactid=str(uuid.uuid4())) for t in targets[:10]]
    bad_t[5]["numberofchildren"] = "x"
    r = c.req("POST", API + "contacts/Microsoft.Dynamics.CRM.UpsertMultiple",
              {"Targets": bad_t}, H)
    check("UpsertMultiple invalid target", r.status == 400 and "Targets[5]" in r.msg() and
          sim.control("GET", "stats")["rows"]["contact"] == n_before, r)
    bad_t = [dict(t, contactid=str(uuid.uuid4())) for t in targets[:10]]
    bad_t[7]["contactid"] = cid   # existing -> CreateMultiple must fail atomically
    r = c.req("POST", API + "contacts/Microsoft.Dynamics.CRM.CreateMultiple",
              {"Targets": bad_t}, H)
    check("CreateMultiple duplicate rolls back", r.status == 412 and "Targets[7]" in r.msg()
          and sim.control("GET", "stats")["rows"]["contact"] == n_before, r)
    r = c.req("POST", API + "contacts/Microsoft.Dynamics.CRM.CreateMultiple",
              {"Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.contact",
                            "firstname": "CM"}]}, H)
    check("CreateMultiple", r.status == 200 and len(r.json()["Ids"]) == 1, r)
    r = c.req("POST", API + "contacts/Microsoft.Dynamics.CRM.UpdateMultiple",
              {"Targets": [dict(targets[0], lastname="UM")]}, H)
    check("UpdateMultiple 204", r.status == 204, r)
    r = c.req("POST", API + "contacts/Microsoft.Dynamics.CRM.UpsertMultiple",
              {"Targets": targets + targets[:1]}, H)
    check("bulk > 1000 400", r.status == 400, r)
    r = c.req("POST", API + "phonecalls/Microsoft.Dynamics.CRM.CreateMultiple",
              {"Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.phonecall", "subject": "b"}]},
              H)
    check("CreateMultiple activity", r.status == 200, r)

    # ---------------------------------------------------------------- many rows at once
    sim.control("POST", "reset")
    r = sim.control("POST", "rows/account/generate",
                    {"count": 300, "values": {"name": "Gen {i}", "numberofemployees": {"mod": 7}}})
    H["Authorization"] = "Bearer " + sim.token().json()["access_token"]
    r2 = c.req("GET", API + "accounts?$select=name&$orderby=numberofemployees%20desc,name%20asc&$top=3"
               "&$filter=" + quote("numberofemployees eq 6 and startswith(name,'gen 1')"), headers=H)
    check("generate: rows with {i} and mod, filtered, ordered and topped",
          r == {"created": 300} and r2.status == 200 and
          [v["name"] for v in r2.json()["value"]] == ["Gen 104", "Gen 111", "Gen 118"], r2)
    r = sim.ctl.req("POST", "/_sim/rows/account/generate", {"count": 0})
    check("generate: a count out of range 400", r.status == 400, r)

    # ---------------------------------------------------------------- change tracking
    sim.control("POST", "reset")
    r = sim.token()
    tok = r.json()["access_token"]
    H["Authorization"] = "Bearer " + tok
    for i in range(5):
        c.req("POST", API + "contacts", {"firstname": "CT%d" % i, "lastname": "L"}, H)
    TH = dict(H, Prefer="odata.track-changes,odata.maxpagesize=2")
    r = c.req("GET", API + "contacts?$select=firstname,lastname", headers=TH)
    j = r.json()
    allrows = list(j["value"])
    check("tracking first page", r.status == 200 and "@odata.nextLink" in j and
          "@odata.deltaLink" not in j and "odata.track-changes" in
          r.headers.get("preference-applied", ""), r)
    while "@odata.nextLink" in j:
        nl = urlsplit(j["@odata.nextLink"])
        r = c.req("GET", nl.path + "?" + nl.query, headers=TH)
        j = r.json()
        allrows += j["value"]
    check("tracking baseline complete", len(allrows) == 5 and "@odata.deltaLink" in j and
          "$deltatoken=" in j["@odata.deltaLink"] and
          "$select=firstname,lastname" in j["@odata.deltaLink"], j)
    dl = urlsplit(j["@odata.deltaLink"])
    first_delta = dl.path + "?" + dl.query
    ids = [x["contactid"] for x in allrows]
    sim.control("POST", "rows/contact", {"op": "update", "id": ids[0],
                                         "values": {"firstname": "Edited"}})
    r = c.req("GET", first_delta, headers=dict(H, Prefer="odata.track-changes"))
    j = r.json()
    check("delta shows edit", r.status == 200 and len(j["value"]) == 1 and
          j["value"][0]["firstname"] == "Edited" and j["value"][0]["contactid"] == ids[0] and
          "@odata.deltaLink" in j and "@odata.etag" in j["value"][0], j)
    dl = urlsplit(j["@odata.deltaLink"])
    second = dl.path + "?" + dl.query
    sim.control("POST", "rows/contact", {"op": "delete", "id": ids[1]})
    created = sim.control("POST", "rows/contact", {"op": "create",
                                                   "values": {"firstname": "Tmp"}})
    sim.control("POST", "rows/contact", {"op": "delete", "id": created["contactid"]})
    sim.control("POST", "rows/contact", {"op": "update", "id": ids[2],
                                         "values": {"lastname": "Z"}})
    r = c.req("GET", second, headers=dict(H, Prefer="odata.track-changes"))
    j = r.json()
    vals = j.get("value", [])
    dels = [v for v in vals if v.get("reason") == "deleted"]
    check("delta deletions", len(vals) == 3 and vals[0].get("contactid") == ids[2] and
          {d["id"] for d in dels} == {ids[1], created["contactid"]} and
          dels[0]["@odata.context"].endswith("/$metadata#contacts/$deletedEntity"), vals)
    r = c.req("GET", API + "contacts?$select=firstname&$filter=firstname eq 'x'".replace(
        " ", "%20"), headers=dict(H, Prefer="odata.track-changes"))
    check("track-changes with $filter 400", r.status == 400, r)
    sim.control("POST", "expire-delta-tokens")
    r = c.req("GET", second, headers=dict(H, Prefer="odata.track-changes"))
    check("expired delta token", r.status == 400 and r.code() == "0x80044352", r)
    r = c.req("GET", API + "contacts?$select=firstname&$deltatoken=garbage",
              headers=dict(H, Prefer="odata.track-changes"))
    check("malformed delta token", r.status == 400 and r.code() == "0x80044352", r)

    # ---------------------------------------------------------------- faults
    sim.control("POST", "faults", {"method": "GET", "path_regex": "WhoAmI", "status": 503,
                                   "json": {"error": {"code": "0x0", "message": "down"}},
                                   "headers": {"Retry-After": "1"}, "times": 1, "skip": 1})
    s1 = c.req("GET", API + "WhoAmI", headers=H).status
    r2 = c.req("GET", API + "WhoAmI", headers=H)
    s3 = c.req("GET", API + "WhoAmI", headers=H).status
    check("fault skip/times", (s1, r2.status, s3) == (200, 503, 200) and
          r2.headers.get("retry-after") == "1", (s1, r2, s3))
    f = sim.control("GET", "faults")
    check("faults listing", f["faults"] == [] and f["exhausted"][0]["fired"] == 1, f)
    sim.control("POST", "faults", {"path_regex": "WhoAmI", "delay_ms": 300})
    t0 = time.time()
    r = c.req("GET", API + "WhoAmI", headers=H)
    check("fault delay", r.status == 200 and time.time() - t0 >= 0.29, time.time() - t0)
    sim.control("POST", "faults", {"path_regex": "contacts", "status": 200,
                                   "body": '{"value": [', "content_type": "application/json"})
    r = c.req("GET", API + "contacts", headers=H)
    check("malformed JSON fault", r.status == 200 and r.body == b'{"value": [', r)
    sim.control("POST", "faults", {"path_regex": "WhoAmI", "drop": True})
    dropped = False
    try:
        c.req("GET", API + "WhoAmI", headers=H, raw=True)
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        dropped = True
    check("drop fault", dropped)
    sim.control("POST", "faults", {"method": "PATCH", "path_regex": r"contacts\(",
                                   "scope": "inner", "status": 500, "times": None})
    body = batch_body(B, [op("PATCH", API + "contacts(%s)" % str(uuid.uuid4()),
                             {"firstname": "A"})])
    r = c.req("POST", API + "$batch", body, dict(H, **{
        "Content-Type": "multipart/mixed; boundary=" + B}))
    st, _ = parse_batch_response(r)
    check("inner fault", r.status == 200 and st == [500], (r, st))
    sim.control("DELETE", "faults")
    sim.control("POST", "faults", {"path_regex": "oauth2", "status": 500, "times": 1})
    r = sim.token()
    check("token fault", r.status == 500, r)
    r = sim.token()
    check("token after fault", r.status == 200, r)

    # ---------------------------------------------------------------- throttling
    sim.control("POST", "config", {"max_concurrent": 1, "latency_ms": 400})
    results = []

    def hit():
        cl = Client("127.0.0.1", sim.port)
        results.append(cl.req("GET", API + "WhoAmI", headers=H))
    ts = [threading.Thread(target=hit) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    codes = sorted(x.status for x in results)
    t429 = [x for x in results if x.status == 429]
    check("max_concurrent 429", codes.count(200) >= 1 and len(t429) >= 1 and
          t429[0].headers.get("retry-after") == "1" and t429[0].code() == "0x80072326", codes)
    sim.control("POST", "config", {"max_concurrent": None, "latency_ms": 0,
                                   "requests_per_window": 2, "window_s": 5})
    sts = [c.req("GET", API + "WhoAmI", headers=H) for _ in range(3)]
    check("requests_per_window 429", [x.status for x in sts] == [200, 200, 429] and
          sts[2].code() == "0x80072322" and 1 <= int(sts[2].headers.get("retry-after", 0)) <= 5,
          sts)
    sim.control("POST", "config", {"requests_per_window": None})
    sim.control("POST", "config", {"latency_ms": 200, "per_record_ms": 1})
    t0 = time.time()
    c.req("GET", API + "WhoAmI", headers=H)
    check("latency model", time.time() - t0 >= 0.19)
    sim.control("POST", "config", {"latency_ms": 0, "per_record_ms": 0})

    # execution-time budget: a $batch runs its operations one after another
    # (wall clock = latency + server time), the server time of each user is
    # summed over a sliding window, and a user over budget gets 429
    # 0x80072321 with the seconds until the window has room again
    OTHER, OTHER_SECRET = "33333333-3333-3333-3333-333333333333", "other-secret"
    sim.control("POST", "config", {"latency_ms": 10, "per_record_ms": 100,
                                   "exec_budget_s": 0.5, "window_s": 2,
                                   "app_users": {OTHER: OTHER_SECRET}})
    sim.control("POST", "reset-stats")
    six = batch_body(B, [op("PATCH", API + "contacts(%s)" % str(uuid.uuid4()),
                            {"firstname": "Budget%d" % i}) for i in range(6)])
    bh = dict(H, **{"Content-Type": "multipart/mixed; boundary=" + B,
                    "Prefer": "odata.continue-on-error"})
    t0 = time.time()
    r1 = c.req("POST", API + "$batch", six, bh)
    dt = time.time() - t0
    check("batch wall clock = latency + operations one after another", r1.status == 200 and
          0.6 <= dt < 1.5, (r1.status, dt))
    r2 = c.req("GET", API + "WhoAmI", headers=H)
    ra = int(r2.headers.get("retry-after", "0"))
    check("execution-time budget 429", r2.status == 429 and r2.code() == "0x80072321" and
          "1,200" not in r2.msg() and "500 milliseconds over time window of 2 seconds" in
          r2.msg() and 1 <= ra <= 2, (r2, ra))
    ot = sim.token(client_id=OTHER, client_secret=OTHER_SECRET)
    check("second application user token", ot.status == 200, ot)
    OH = dict(H, Authorization="Bearer " + ot.json()["access_token"])
    r3 = c.req("GET", API + "WhoAmI", headers=OH)
    check("each application user has its own budget", r3.status == 200, r3)
    bad = sim.token(client_id=OTHER, client_secret="wrong")
    check("application user with a wrong secret", bad.status == 401 and
          "AADSTS7000215" in bad.body.decode(), bad)
    time.sleep(ra)
    r4 = c.req("GET", API + "WhoAmI", headers=H)
    check("Retry-After is honest", r4.status == 200, (r4, ra))
    st = sim.control("GET", "stats")["users"]
    u1 = st.get(CLIENT, {})
    check("per-user stats", u1.get("throttled_by_code") == {"0x80072321": 1} and
          u1.get("ops") == 6 and abs(u1.get("server_s", 0) - 0.6) < 0.01 and
          st.get(OTHER, {}).get("requests") == 1, st)
    reqs = sim.control("GET", "requests?since=0&kind=api")["requests"]
    check("request log names the client", reqs[-1]["client"] == CLIENT and
          any(e["client"] == OTHER for e in reqs), [e["client"] for e in reqs[-3:]])
    # requests in flight per user: the most at once is recorded
    sim.control("POST", "config", {"latency_ms": 300, "per_record_ms": 0,
                                   "exec_budget_s": None})
    sim.control("POST", "reset-stats")
    got = []

    def one():
        got.append(Client("127.0.0.1", sim.port).req("GET", API + "WhoAmI", headers=H).status)
    ts = [threading.Thread(target=one) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    st = sim.control("GET", "stats")["users"]
    check("max requests in flight per user", got == [200] * 3 and
          st[CLIENT]["max_inflight"] == 3 and st.get(OTHER, {}).get("max_inflight") == 0, st)
    sim.control("POST", "config", {"latency_ms": 0, "per_record_ms": 0, "exec_budget_s": 1200,
                                   "window_s": 300, "app_users": {}})

    # ---------------------------------------------------------------- tokens
    sim.control("POST", "expire-tokens")
    r = c.req("GET", API + "WhoAmI", headers=H)
    check("expire-tokens -> 401", r.status == 401, r)
    sim.control("POST", "config", {"token_lifetime": 1})
    r = sim.token()
    check("short token lifetime", r.json()["expires_in"] == 1, r)
    H["Authorization"] = "Bearer " + r.json()["access_token"]
    ok1 = c.req("GET", API + "WhoAmI", headers=H).status
    time.sleep(1.1)
    ok2 = c.req("GET", API + "WhoAmI", headers=H).status
    check("token expires", (ok1, ok2) == (200, 401), (ok1, ok2))
    sim.control("POST", "config", {"token_lifetime": 3599})
    H["Authorization"] = "Bearer " + sim.token().json()["access_token"]
    reqs = sim.control("GET", "requests?since=0")["requests"]
    toks = {e["headers"].get("authorization") for e in reqs if e["kind"] == "api"}
    check("distinct tokens countable", {"Bearer <token #1>", "Bearer <token #3>"} <= toks and
          "Bearer <token #2>" not in toks, toks)

    # ---------------------------------------------------------------- simctl --copy
    c.req("POST", API + "contacts", {"firstname": "Back\\slash", "lastname": "Ünï \"q\"\ttab"},
          H)
    env = dict(os.environ, D365_SIM_URL=sim.url)
    out = subprocess.run([SIMCTL, "requests", "--copy", "--kind", "api"], env=env,
                         capture_output=True, text=True)
    lines = out.stdout.splitlines()
    ok = out.returncode == 0 and lines
    parsed = []
    for ln in lines:
        # COPY text format: \\ -> \ ; everything else in ensure_ascii JSON is literal
        parsed.append(json.loads(ln.replace("\\\\", "\\")))
    last = parsed[-1] if parsed else {}
    check("simctl requests --copy", ok and all(ord(ch) < 128 for ch in out.stdout) and
          last.get("body", {}).get("firstname") == "Back\\slash" and
          last["body"]["lastname"] == "Ünï \"q\"\ttab", out.stdout[-400:] + out.stderr)
    out = subprocess.run([SIMCTL, "last-seq"], env=env, capture_output=True, text=True)
    check("simctl last-seq", out.returncode == 0 and int(out.stdout) >= last.get("seq", 0), out)
    out = subprocess.run([SIMCTL, "edit", "contact", '{"op":"update","id":"%s","values":{}}'
                          % missing], env=env, capture_output=True, text=True)
    check("simctl error exit", out.returncode != 0 and "404" in out.stderr, out)
    out = subprocess.run([SIMCTL, "rows", "systemuser"], env=env, capture_output=True, text=True)
    check("simctl rows", out.returncode == 0 and len(json.loads(out.stdout)["value"]) == 3, out)

    # ---------------------------------------------------------------- https
    if sim.https_port:
        hc = Client("127.0.0.1", sim.https_port, https=True, cafile=sim.cert)
        r = hc.req("POST", "/%s/oauth2/v2.0/token" % TENANT,
                   token_form(scope="https://127.0.0.1:%d/.default" % sim.https_port),
                   {"Content-Type": "application/x-www-form-urlencoded"})
        check("https token", r.status == 200, r)
        ht = r.json().get("access_token", "")
        r = hc.req("GET", API + "WhoAmI", headers={"Authorization": "Bearer " + ht})
        check("https WhoAmI", r.status == 200, r)
        r = c.req("GET", API + "WhoAmI", headers={"Authorization": "Bearer " + ht})
        check("token audience enforced (https token on http)", r.status == 401, r)
        if shutil.which("curl"):
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  "--cacert", sim.cert, "-H", "Authorization: Bearer " + ht,
                                  "https://127.0.0.1:%d%sWhoAmI" % (sim.https_port, API)],
                                 capture_output=True, text=True)
            check("curl --cacert https", out.stdout == "200", out)
        reqs = sim.control("GET", "requests?since=0")["requests"]
        check("scheme logged", any(e["scheme"] == "https" for e in reqs))

    # ------------------------------------------------- rate-limit headers
    # the time left is what the user has as the answer leaves (the batch's
    # own server time spent); ratelimit_headers false leaves both out; a
    # request sent while throttled is refused with a longer Retry-After
    # and counted
    sim.control("POST", "config", {"latency_ms": 10, "per_record_ms": 100,
                                   "exec_budget_s": 10, "window_s": 5})
    sim.control("POST", "reset-stats")
    rb = c.req("POST", API + "$batch", batch_body(B, [
        op("PATCH", API + "contacts(%s)" % str(uuid.uuid4()), {"firstname": "Left%d" % i})
        for i in range(6)]), dict(H, **{"Content-Type": "multipart/mixed; boundary=" + B}))
    left = rb.headers.get("x-ms-ratelimit-time-remaining-xrm-requests", "")
    check("time left as the answer leaves", rb.status == 200 and
          9.3 <= float(left.replace(",", "") or 0) <= 9.45 and
          rb.headers.get("x-ms-ratelimit-burst-remaining-xrm-requests") is not None, (rb, left))
    sim.control("POST", "config", {"ratelimit_headers": False})
    rn = c.req("GET", API + "WhoAmI", headers=H)
    check("rate-limit headers left out", rn.status == 200 and
          "x-ms-ratelimit-time-remaining-xrm-requests" not in rn.headers and
          "x-ms-ratelimit-burst-remaining-xrm-requests" not in rn.headers and
          rn.headers.get("x-ms-dop-hint") is not None, rn.headers)
    sim.control("POST", "config", {"ratelimit_headers": True, "exec_budget_s": 0.5,
                                   "window_s": 2})
    sim.control("POST", "reset-stats")
    c.req("POST", API + "$batch", batch_body(B, [
        op("PATCH", API + "contacts(%s)" % str(uuid.uuid4()), {"firstname": "Wall%d" % i})
        for i in range(6)]), dict(H, **{"Content-Type": "multipart/mixed; boundary=" + B}))
    t1 = c.req("GET", API + "WhoAmI", headers=H)
    ra1 = int(t1.headers.get("retry-after", "0"))
    t2 = c.req("GET", API + "WhoAmI", headers=H)
    ra2 = int(t2.headers.get("retry-after", "0"))
    st = sim.control("GET", "stats")
    check("sent while throttled: a longer Retry-After, counted", t1.status == 429 and
          t2.status == 429 and t2.code() == "0x80072321" and ra2 > ra1 >= 1 and
          st["sent_while_throttled"] == 1 and
          st["users"][CLIENT]["sent_while_throttled"] == 1 and
          st["users"][CLIENT]["throttled"] == 2, (t1, ra1, t2, ra2, st))
    time.sleep(ra2)
    t3 = c.req("GET", API + "WhoAmI", headers=H)
    st = sim.control("GET", "stats")
    check("after the Retry-After, admitted and not counted", t3.status == 200 and
          st["sent_while_throttled"] == 1, (t3, st))
    sim.control("POST", "config", {"latency_ms": 0, "per_record_ms": 0, "exec_budget_s": 1200,
                                   "window_s": 300})

    # ---------------------------------------------------------------- reset
    sim.control("POST", "reset")
    st = sim.control("GET", "stats")
    check("reset", st["rows"]["contact"] == 0 and st["rows"]["systemuser"] == 3 and
          st["rows"]["account"] == 2 and st["rows"]["team"] == 2 and
          sim.control("GET", "requests?since=0")["requests"] == [], st)

    # ---------------------------------------------------------------- throughput
    H["Authorization"] = "Bearer " + sim.token().json()["access_token"]
    n = a.bench or 2
    bodies = []
    for b in range(n):
        parts = [op("PATCH", API + "contacts(%s)" % str(uuid.uuid4()),
                    {"firstname": "F%d" % i, "lastname": "L%d" % b,
                     "emailaddress1": "p%d.%d@example.com" % (b, i), "numberofchildren": i % 5,
                     "birthdate": "1980-01-01"}) for i in range(1000)]
        bodies.append(batch_body(B, parts).encode())
    t0 = time.time()
    okb = True
    for body in bodies:
        r = c.req("POST", API + "$batch", body, dict(H, **{
            "Content-Type": "multipart/mixed; boundary=" + B}))
        okb = okb and r.status == 200 and r.body.count(b"HTTP/1.1 204") == 1000
    dt = time.time() - t0
    check("batch of 1000 upserts x%d" % n, okb and
          sim.control("GET", "stats")["rows"]["contact"] == n * 1000)
    print("throughput: %d upserts in %d $batch requests: %.2f s, %.0f ops/s" % (
        n * 1000, n, dt, n * 1000 / dt))


if __name__ == "__main__":
    main()
