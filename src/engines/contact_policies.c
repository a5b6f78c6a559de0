/*-------------------------------------------------------------------------
 *
 * contact_policies.c
 *	  The settings of the map "contact" (the attached contact table) as the
 *	  contact engine honours them.
 *
 * enabled.  The contact table's runs that cover it without naming the map
 * -- d365_sync_contacts() and d365_pull_changes(), hence the pg_cron jobs
 * contacts and pull and the background worker's contact jobs, and
 * d365_sync() / d365_pull() without a map -- pass it by while its row of
 * d365.table_map says enabled = false: the run does nothing and says so in
 * its message, as it does while contact_sync_enabled is false.  A call
 * that names the map, d365_sync('contact') or d365_pull('contact'), runs it
 * as for every other map.  Without a row (an attachment made before the
 * maps existed, or an installation not yet updated to them) the map
 * counts as enabled.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"

#include "jobs.h"
#include "runs.h"
#include "spi_util.h"

/*
 * d365_contact_map_disabled
 *		true (and the run's message says why) when the map "contact" is
 *		switched off.  Needs an open SPI connection.
 */
bool
d365_contact_map_disabled(D365Run *run)
{
	MemoryContext old;

	/* an installation not yet updated to a version with table maps */
	if (!d365_sql_bool("SELECT to_regclass('d365.table_map') IS NOT NULL", 0, NULL, NULL, NULL) ||
		!d365_sql_bool("SELECT EXISTS (SELECT FROM d365.table_map t"
					   " WHERE t.name OPERATOR(pg_catalog.=) 'contact' AND NOT t.enabled)",
					   0, NULL, NULL, NULL))
		return false;
	old = MemoryContextSwitchTo(run->cxt);
	run->message = pstrdup("map contact is disabled (enabled = false in d365.table_map):"
						   " only d365_sync('contact') and d365_pull('contact') run it");
	MemoryContextSwitchTo(old);
	return true;
}
