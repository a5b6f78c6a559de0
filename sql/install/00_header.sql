/*
 * d365sync install script, built by the Makefile from the parts in
 * sql/install/ (concatenated in file-name order) into sql/d365sync--X.Y.sql.
 *
 * One part per subsystem, each beside the C file that implements its send
 * stage or its SQL-callable functions (see docs/architecture.md):
 *   01_settings         the settings row, its validation, d365_whoami
 *   02_runs             the run history
 *   03_contact_source   the attached table, field map, sync state
 *   03_identity         tombstones, the capture triggers (src/capture/capture.c), broken attachments
 *   04_metadata         Dynamics metadata, cached; mapping validation
 *   05_contacts_out     outgoing contacts: work query, record step, API
 *   06_activities       the activity log, bodies, work query, record step
 *   07_incoming         incoming changes: push payloads and the pull
 *   08_status_schedule  d365_status and the pg_cron schedule
 *   09_privileges       nothing for PUBLIC; the few explicit grants
 *   10_fdw              foreign tables (d365_fdw), d365_tables, d365_describe
 *
 * Everything lives in schema d365, which CREATE EXTENSION creates.  Nothing
 * here is granted to PUBLIC: an application role gets exactly the GRANTs
 * docs/security.md lists.  Configuration tables are marked with
 * pg_extension_config_dump so pg_dump keeps what the user wrote.  Every
 * function pins its search_path.
 *
 * These parts are the one place each function is defined.  A change here
 * is a change of the next release: the function part of the upgrade script
 * sql/d365sync--A--B.sql is generated from them (make regen), what cannot
 * be re-created (tables, columns, data moves, drops) is written by hand in
 * sql/upgrade/A--B.sql, and the upgrade test proves that an updated
 * installation equals a fresh one (docs/development.md).
 */
\echo Use "CREATE EXTENSION d365sync" to load this file. \quit
