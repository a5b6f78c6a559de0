/*-------------------------------------------------------------------------
 *
 * d365sync.h
 *	  Declarations shared by every d365sync module: the GUC variables that
 *	  d365sync.c defines and the module-wide conventions.
 *
 * Layout of the extension (the file names are the architecture):
 *
 *	  d365sync.c		module entry, GUCs, library initialisation
 *	  src/http.c		libcurl transport: parallel requests, timeouts, TLS,
 *						interrupts, size caps
 *	  src/auth.c		OAuth 2.0 client-credentials token, cached per backend
 *	  src/odata.c		Dataverse Web API client: headers, errors, retries,
 *						token refresh, throttling
 *	  src/catalog.c		the settings row, read through SPI as its owner
 *	  src/pipeline.c	select -> map -> send -> record, and the run wrapper
 *						(lock, error capture, d365.sync_run)
 *	  src/contact_sync.c outgoing contacts: engine on the pipeline
 *	  src/activity_sync.c activities: engine on the pipeline
 *	  src/incoming.c	incoming changes: push payloads and the change-
 *						tracking pull
 *	  src/jsonutil.c	jansson glued to memory contexts
 *	  src/admin.c		d365_whoami and the generic paged GET
 *	  sql/d365sync.sql	tables, the SQL stages of each engine (work
 *						queries that select and map, record functions),
 *						the SQL API
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
extern int	d365_batch_size;
extern int	d365_page_size;
extern int	d365_max_run_time_ms;
extern char *d365_ca_file;

#endif							/* D365SYNC_H */
