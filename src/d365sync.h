/*-------------------------------------------------------------------------
 *
 * d365sync.h
 *	  Declarations shared by every d365sync module: the GUC variables that
 *	  d365sync.c defines and the module-wide conventions.
 *
 * Layout of the extension.  The folders are the layers of the path every
 * feature runs on, each using only the ones above it in this list
 * (docs/architecture.md has the file map, with the SQL part in
 * sql/install/NN_<room>.sql beside each C file):
 *
 *	  d365sync.c		module entry, GUCs, library initialisation
 *	  src/common/		SPI and JSON helpers, the shared memory, the job role,
 *						the flags of d365sync's own writes
 *	  src/client/		send: the one OData client (settings, HTTP, token,
 *						$batch, retries, governor, paging, where a request
 *						may go)
 *	  src/capture/		triggers on application tables and the guards of
 *						what only d365sync writes and of the tables a run
 *						reads
 *	  src/privilege/	running as a table's owner; the sets of rights
 *	  src/pipeline/		select -> map -> send -> record; a run, its
 *						record and progress; the incoming half and the load
 *	  src/engines/		thin engines on the pipeline: contacts out,
 *						incoming, activities, table maps, metadata
 *	  src/worker/		the jobs' entry points: the background worker and
 *						d365_run_job()
 *	  src/fdw/			the foreign data wrapper d365_fdw
 *
 * One contact's way out: its capture trigger marks it pending; the engine
 * (contacts_out.c) runs the work query of 05_contacts_out, which selects
 * and maps it to requests; pipeline.c sends them through odata.c and hands
 * the outcomes to the record function of 05_contacts_out.  See
 * docs/architecture.md for the contract between C and SQL.
 *
 * jansson is included only through d365_json.h.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365SYNC_H
#define D365SYNC_H

/* GUC variables (d365sync.c) */
extern int	d365_connect_timeout_ms;
extern int	d365_request_timeout_ms;
extern int	d365_max_response_kb;
extern int	d365_max_retries;
extern int	d365_retry_max_wait_ms;
extern int	d365_max_parallel;
extern int	d365_budget_seconds;
extern int	d365_budget_window_seconds;
extern int	d365_batch_size;
extern int	d365_page_size;
extern int	d365_max_run_time_ms;
extern char *d365_ca_file;

#endif							/* D365SYNC_H */
