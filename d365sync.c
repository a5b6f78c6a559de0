/*-------------------------------------------------------------------------
 *
 * d365sync.c
 *	  Module entry of d365sync: GUCs and library initialisation.
 *
 * d365sync keeps an application's contacts and activities in step with
 * Microsoft Dynamics 365 Sales through the Dataverse Web API.  One pipeline
 * serves every feature: select pending items with SQL, map rows to JSON,
 * send them through the OData client (src/client/odata.c over src/client/http.c), record
 * each outcome in ordinary tables.  See src/d365sync.h for the file map.
 *
 * GUCs (all prefixed d365sync., the prefix is reserved):
 *	  connect_timeout_ms, request_timeout_ms	libcurl timeouts
 *	  max_response_size		cap on one response body
 *	  max_retries			attempts after the first, for 429/5xx/transport
 *	  retry_max_wait_ms	longest single wait (Retry-After or back-off)
 *	  max_parallel			requests in flight (x-ms-dop-hint lowers it)
 *	  batch_size			items per pipeline chunk
 *	  page_size				rows per page when reading from Dynamics
 *	  max_run_time_ms		time budget of one sync run
 *	  budget_seconds		execution-time budget per window (superuser only)
 *	  budget_window_seconds	its window (superuser only)
 *	  ca_file				extra CA bundle (superuser only)
 * Secrets are never GUCs: pg_db_role_setting is readable by everyone.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "d365_json.h"

#include "fmgr.h"
#include "utils/guc.h"

#include "d365sync.h"
#include "http.h"
#include "worker.h"

PG_MODULE_MAGIC;

int			d365_connect_timeout_ms = 10000;
int			d365_request_timeout_ms = 120000;
int			d365_max_response_kb = 64 * 1024;
int			d365_max_retries = 3;
int			d365_retry_max_wait_ms = 60000;
int			d365_max_parallel = 8;
int			d365_batch_size = 100;
int			d365_page_size = 5000;
int			d365_max_run_time_ms = 55 * 60 * 1000;
int			d365_budget_seconds = 1200;
int			d365_budget_window_seconds = 300;
char	   *d365_ca_file = NULL;

void		_PG_init(void);

void
_PG_init(void)
{
	DefineCustomIntVariable("d365sync.connect_timeout_ms",
							"Time allowed to connect to Dynamics 365 or the token authority.",
							NULL, &d365_connect_timeout_ms, 10000, 100, 600000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("d365sync.request_timeout_ms",
							"Time allowed for one HTTP request, connection included.",
							NULL, &d365_request_timeout_ms, 120000, 100, 3600000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("d365sync.max_response_size",
							"Largest response body accepted from Dynamics 365.",
							NULL, &d365_max_response_kb, 64 * 1024, 64, 1024 * 1024,
							PGC_SUSET, GUC_UNIT_KB, NULL, NULL, NULL);
	DefineCustomIntVariable("d365sync.max_retries",
							"Times a request is sent again after a 429, a 5xx or a transport failure.",
							NULL, &d365_max_retries, 3, 0, 100,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("d365sync.retry_max_wait_ms",
							"Longest single wait before a retry; a longer Retry-After fails the request.",
							NULL, &d365_retry_max_wait_ms, 60000, 0, 3600000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("d365sync.max_parallel",
							"Most requests in flight at once (lowered by the server's x-ms-dop-hint).",
							NULL, &d365_max_parallel, 8, 1, 52,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("d365sync.batch_size",
							"Items sent and recorded together by a sync run.",
							NULL, &d365_batch_size, 100, 1, 1000,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("d365sync.page_size",
							"Rows per page asked of Dynamics 365 when reading (Prefer: odata.maxpagesize).",
							NULL, &d365_page_size, 5000, 1, 5000,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("d365sync.max_run_time_ms",
							"Time budget of one sync run; what is left then stays pending for the next run (0: no limit).",
							NULL, &d365_max_run_time_ms, 55 * 60 * 1000, 0, INT_MAX,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomStringVariable("d365sync.ca_file",
							   "Extra CA bundle (PEM) trusted for Dynamics 365 and the token authority.",
							   NULL, &d365_ca_file, NULL,
							   PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("d365sync.budget_seconds",
							"Seconds of server execution time Dataverse grants an application user per window.",
							NULL, &d365_budget_seconds, 1200, 1, 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("d365sync.budget_window_seconds",
							"The window of Dataverse's execution-time budget, in seconds.",
							NULL, &d365_budget_window_seconds, 300, 1, 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	/* with the preload: d365sync.database_name, shared memory, the worker */
	d365_worker_init();
	MarkGUCPrefixReserved("d365sync");

	d365_http_init();
	d365_json_init();
}
