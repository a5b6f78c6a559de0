-- Hand-written steps of the upgrade from 0.2 to 0.3: only what cannot be
-- re-created from sql/install/ (new tables, columns, indexes, constraints,
-- triggers, views and types; data moves; drops).  Never a function: every
-- function and procedure of 0.3 is copied from sql/install/ into
-- sql/d365sync--0.2--0.3.sql by scripts/gen-sql.py (make regen), between
-- the part above the line "-- @functions" and the part below it.
-- docs/development.md says which step goes where.
--
-- Before the functions: new tables, columns, types and indexes (a
-- LANGUAGE sql function's body is checked when it is created, so what it
-- reads must exist); drops of functions whose signature, return type,
-- argument names or defaults change, with the views and triggers that
-- depend on them.

-- @functions
-- After the functions: triggers and views that use new functions, data
-- moves done with the new functions, drops of what 0.3 no longer has,
-- REVOKEs of grants 0.3 no longer makes.

-- Foreign tables (10_fdw.sql): the wrapper, on its handler and validator.
CREATE FOREIGN DATA WRAPPER d365_fdw
    HANDLER d365._fdw_handler
    VALIDATOR d365._fdw_validator;
COMMENT ON FOREIGN DATA WRAPPER d365_fdw IS
    'Dataverse tables as read-only foreign tables, through d365sync''s connection (d365.settings)';
