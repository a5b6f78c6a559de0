/*-------------------------------------------------------------------------
 *
 * d365sync.h
 *	  Declarations shared by every d365sync module: the GUC variables that
 *	  d365sync.c defines and the module-wide conventions.
 *
 * Layout of the extension.  The file names are the architecture: read
 * from the bottom (transport) up to the rooms, each of which has its SQL
 * beside it in sql/install/NN_<room>.sql.  Dependencies point down only.
 *
 *	  d365sync.c			module entry, GUCs, library initialisation
 *
 *	  The wire (how a request reaches Dynamics 365)
 *	  src/http.c			libcurl transport: parallel requests, timeouts, TLS,
 *							interrupts, size caps
 *	  src/odata.c			Dataverse Web API client: headers, errors, retries,
 *							$batch, throttling; asks its token source for tokens
 *	  src/odata_batch.c		$batch: one request from operations, its response
 *							split into the exchanges of its parts
 *	  src/odata_pages.c		the paged GET (@odata.nextLink) over the client
 *	  src/auth.c			OAuth 2.0 client-credentials token, cached per
 *							backend; d365_client_open() (settings + token)
 *	  src/jsonutil.c		jansson glued to memory contexts
 *
 *	  The house rules (how C reads d365's tables)
 *	  src/spi_util.c		typed single-value queries; running as the owner
 *							of d365's tables
 *	  src/runs.c			a run: client, counts, lock, error capture,
 *							d365.sync_run, the SQL result row
 *	  src/pipeline.c		select -> map -> send -> record, chunk by chunk
 *
 *	  The rooms (C beside sql/install/NN_<room>.sql)
 *	  src/settings.c		01_settings: the settings row, the URL rule
 *	  src/whoami.c			01_settings: d365_whoami(), the connection check
 *	  src/runs.c			02_runs
 *	  src/progress.c		02_runs: progress of the run in progress, for
 *							other sessions (activity text, shared slots)
 *	  src/contact_source.c	03_contact_source: the contact-state privilege gate
 *	  src/table_owner.c		03_contact_source: writes to the contact table and
 *							conversions into its types, as the table's owner
 *	  src/capture.c			03_identity: the capture triggers' C side
 *	  src/metadata.c		04_metadata: d365._get_all() under the metadata SQL
 *	  src/contacts_out.c	05_contacts_out: the outgoing contact engine
 *	  src/activities.c		06_activities: the activity engine
 *	  src/incoming.c		07_incoming: the change-tracking pull
 *	  src/jobs.h			the three scheduled jobs as runs (in the rooms
 *							above), shared by the SQL functions and the worker
 *	  src/worker.c			the background worker (with the preload): woken
 *							at commit, runs the jobs; its shared memory, which
 *							08_status_schedule reads
 *	  (08_status_schedule -- d365_status, d365_schedule, d365_run_job --
 *	  and 09_privileges are SQL only)
 *	  src/fdw.c				10_fdw: the foreign data wrapper d365_fdw (options,
 *							planning, costs, EXPLAIN, IMPORT FOREIGN SCHEMA)
 *	  src/fdw_deparse.c		10_fdw: conditions and orderings sent as OData
 *	  src/fdw_scan.c		10_fdw: the foreign scan, page by page
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
