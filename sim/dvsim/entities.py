"""The entities the simulator serves (what build_schema() returns)."""

import collections

from .common import MONEY_MAX
from .schema import Attr, _common_tail, Entity, _state_status, _string


def build_schema():
    ents = collections.OrderedDict()

    # contact -------------------------------------------------------------
    c = Entity("contact", "contacts", "contactid", "Contact", "Contacts", 2,
               change_tracking=True, primary_name="fullname")
    c.add(Attr("contactid", "Uniqueidentifier", "Contact", update=False))
    c.add(_string("firstname", "First Name", 50))
    c.add(_string("lastname", "Last Name", 50, required="ApplicationRequired"))
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
               targets=["account", "contact"], schema="ParentCustomerId",
               rels={"account": "contact_customer_accounts",
                     "contact": "contact_customer_contacts"}))
    _state_status(c, [(0, "Active", 1, "Active"), (1, "Inactive", 2, "Inactive")],
                  [(1, "Active", 0), (2, "Inactive", 1)], create_status=True)
    _common_tail(c)
    ents["contact"] = c

    # account -------------------------------------------------------------
    a = Entity("account", "accounts", "accountid", "Account", "Accounts", 1,
               change_tracking=True, primary_name="name")
    a.add(Attr("accountid", "Uniqueidentifier", "Account", update=False))
    a.add(_string("name", "Account Name", 160, required="ApplicationRequired"))
    a.add(_string("accountnumber", "Account Number", 20))
    a.add(_string("telephone1", "Main Phone", 50))
    a.add(_string("emailaddress1", "Email", 100))
    a.add(_string("websiteurl", "Website", 200))
    a.add(_string("address1_city", "Address 1: City", 80))
    a.add(Attr("description", "Memo", "Description", maxlen=2000))
    a.add(Attr("revenue", "Money", "Annual Revenue", minv=0.0, maxv=MONEY_MAX))
    a.add(Attr("numberofemployees", "Integer", "Number of Employees", minv=0,
               maxv=1000000000))
    a.add(Attr("industrycode", "Picklist", "Industry", options=INDUSTRIES))
    a.add(Attr("parentaccountid", "Lookup", "Parent Account", targets=["account"],
               schema="ParentAccountId", rels={"account": "account_parent_account"}))
    a.add(Attr("primarycontactid", "Lookup", "Primary Contact", targets=["contact"],
               schema="PrimaryContactId", rels={"contact": "account_primary_contact"}))
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

    # new_project: a custom table with a lookup to account, a choice and
    # a multi-select choice --------------------------------------------
    p = Entity("new_project", "new_projects", "new_projectid", "Project", "Projects",
               10002, change_tracking=True, custom=True, primary_name="new_name")
    p.add(Attr("new_projectid", "Uniqueidentifier", "Project", update=False, custom=True,
               schema="new_projectId"))
    p.add(_string("new_name", "Name", 100, custom=True, schema="new_Name",
                  required="ApplicationRequired"))
    p.add(Attr("new_accountid", "Lookup", "Account", targets=["account"], custom=True,
               schema="new_AccountId", nav="new_AccountId",
               rels={"account": "new_new_project_AccountId_account"}))
    p.add(Attr("new_stage", "Picklist", "Stage", custom=True, schema="new_Stage",
               options=[(100000000, "Proposed"), (100000001, "Active"),
                        (100000002, "On Hold"), (100000003, "Completed")]))
    p.add(Attr("new_services", "MultiSelectPicklist", "Services", custom=True,
               schema="new_Services",
               options=[(100000000, "Consulting"), (100000001, "Implementation"),
                        (100000002, "Training"), (100000003, "Support")]))
    p.add(Attr("new_budget", "Money", "Budget", minv=0.0, maxv=MONEY_MAX, custom=True,
               schema="new_Budget"))
    p.add(Attr("new_startdate", "DateTime", "Start Date", date_only=True, custom=True,
               schema="new_StartDate"))
    p.add(Attr("new_description", "Memo", "Description", maxlen=4000, custom=True,
               schema="new_Description"))
    _state_status(p, [(0, "Active", 1, "Active"), (1, "Inactive", 2, "Inactive")],
                  [(1, "Active", 0), (2, "Inactive", 1)], create_status=True)
    _common_tail(p)
    ents["new_project"] = p

    for e in ents.values():
        e.finish()
    return ents


# account.industrycode, as Dataverse ships it
INDUSTRIES = [
    (1, "Accounting"), (2, "Agriculture and Non-petrol Natural Resource Extraction"),
    (3, "Broadcasting Printing and Publishing"), (4, "Brokers"),
    (5, "Building Supply Retail"), (6, "Business Services"), (7, "Consulting"),
    (8, "Consumer Services"), (9, "Design, Direction and Creative Management"),
    (10, "Distributors, Dispatchers and Processors"), (11, "Doctor's Offices and Clinics"),
    (12, "Durable Manufacturing"), (13, "Eating and Drinking Places"),
    (14, "Entertainment Retail"), (15, "Equipment Rental and Leasing"), (16, "Financial"),
    (17, "Food and Tobacco Processing"), (18, "Inbound Capital Intensive Processing"),
    (19, "Inbound Repair and Services"), (20, "Insurance"), (21, "Legal Services"),
    (22, "Non-Durable Merchandise Retail"), (23, "Outbound Consumer Service"),
    (24, "Petrochemical Extraction and Distribution"), (25, "Service Retail"),
    (26, "SIG Affiliations"), (27, "Social Services"),
    (28, "Special Outbound Trade Contractors"), (29, "Specialty Realty"),
    (30, "Transportation"), (31, "Utility Creation and Distribution"),
    (32, "Vehicle Retail"), (33, "Wholesale")]


ENTITIES = build_schema()
SETS = {e.set_name: e for e in ENTITIES.values()}
