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
 *	  src/catalog.c		settings and bookkeeping tables, read through SPI
 *	  src/jsonutil.c	jansson glued to memory contexts
 *	  src/admin.c		diagnostic SQL functions (d365_whoami)
 *
 * src/include-free rule: jansson headers come only through d365_json.h.
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
extern char *d365_ca_file;

#endif							/* D365SYNC_H */
