-- Privileges: nothing for PUBLIC.
-- ---------------------------------------------------------------------------

REVOKE ALL ON ALL TABLES IN SCHEMA d365 FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA d365 FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA d365 FROM PUBLIC;

-- Every right a role needs comes from d365.d365_grant(role, set)
-- (sql/install/08_roles.sql, docs/security.md).  No role but the
-- extension's owner holds EXECUTE on a trigger function.
