-- Privileges: nothing for PUBLIC.
-- ---------------------------------------------------------------------------

REVOKE ALL ON ALL TABLES IN SCHEMA d365 FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA d365 FROM PUBLIC;

-- The internals of d365_update_contact(), which runs with its caller's
-- rights.  Safe for anyone: they run as the caller, or run no user code,
-- or check the caller's right to update contacts (_contact_snapshot).
-- Without EXECUTE on d365_update_contact and USAGE on schema d365 a role
-- cannot reach them anyway.
-- The table-owner helpers (_contact_convert, _contact_apply, _contact_map)
-- check that their caller may update the columns they write.
GRANT EXECUTE ON FUNCTION d365._incoming_apply(jsonb, boolean),
      d365._incoming_value(jsonb, regtype, text, name), d365._incoming_convert(jsonb, jsonb),
      d365._contact_source(), d365._incoming_fields(), d365._contact_values_expr(), d365._contact_incoming_values_expr(),
      d365._outgoing_only_columns(), d365._is_guid(text), d365._bind_guid(text),
      d365._incoming_mapper(), d365._contact_snapshot(text, jsonb),
      d365._owner_sql(text, name[]), d365._contact_convert(jsonb),
      d365._contact_apply(jsonb, text), d365._contact_map(jsonb, jsonb, text),
      d365._contact_link_trusted(text, uuid) TO PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA d365 FROM PUBLIC;
