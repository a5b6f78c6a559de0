/*-------------------------------------------------------------------------
 *
 * odata.h
 *	  The Dataverse Web API client: the single place where requests get
 *	  their headers and token, where responses are judged, and where retry,
 *	  token refresh and throttling are decided.  Every feature sends through
 *	  d365_client_execute().
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_ODATA_H
#define D365_ODATA_H

#include "d365_json.h"
#include "catalog.h"
#include "http.h"

/* A connection to one organization for the length of one SQL call. */
typedef struct D365Client
{
	D365Settings *settings;
	char	   *service_root;	/* {org_url}/api/data/{version}/ */
	char	   *service_path;	/* /api/data/{version}/ */
	int			max_parallel;	/* requests in flight now (the governor's) */
	int			dop_limit;		/* upper bound: x-ms-dop-hint and the GUC */
	int			dop_hint;		/* last x-ms-dop-hint seen, 0 if none */

	/* counters for d365.sync_run */
	int64		requests;		/* HTTP exchanges, token requests included */
	int64		throttled;		/* 429 responses */
	int64		retries;		/* requests sent again */
} D365Client;

/*
 * One Web API operation.  The caller sets method, path (relative to the
 * service root, e.g. "contacts(<id>)"; or an absolute URL), body and extra
 * headers; d365_client_execute sets the outcome.  ok means a 2xx response
 * whose body, if any, parsed.
 */
typedef struct D365Op
{
	const char *method;
	char	   *path;
	char	   *body;			/* JSON text, or NULL */
	List	   *headers;		/* extra "Name: value" lines */
	bool		anonymous;		/* no Authorization header (token requests) */
	const char *content_type;	/* default application/json */

	/* outcome */
	bool		ok;
	int			status;			/* HTTP status; 0 when none arrived */
	char	   *error_code;		/* Dynamics/Entra error code, or NULL */
	char	   *error_message;	/* why it failed, or NULL */
	bool		transport_failure;	/* no usable HTTP response */
	json_t	   *json;			/* parsed body of a JSON response */
	char	   *entity_id;		/* OData-EntityId header, or NULL */
	D365HttpRequest *http;		/* the last exchange */
} D365Op;

extern D365Client *d365_client_open(void);
extern D365Op *d365_op_make(const char *method, const char *path, const char *body);
/* the first round of d365_client_execute in flight (see d365_client_start) */
typedef struct D365Sending D365Sending;

extern void d365_client_execute(D365Client *client, D365Op **ops, int n);
extern D365Sending *d365_client_start(D365Client *client, D365Op **ops, int n);
extern void d365_client_finish(D365Sending *sending);
extern json_t *d365_client_call(D365Client *client, const char *method,
								const char *path, const char *body);
extern void d365_op_report(D365Op *op, int elevel);
extern char *d365_op_summary(const D365Op *op);
extern char *d365_uri_escape(const char *s);

/* auth.c */
extern const char *d365_auth_token(D365Client *client, bool refresh);
extern void d365_auth_forget(void);

#endif							/* D365_ODATA_H */
