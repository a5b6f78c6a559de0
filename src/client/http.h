/*-------------------------------------------------------------------------
 *
 * http.h
 *	  libcurl transport for d365sync: the only file that talks to libcurl.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_HTTP_H
#define D365_HTTP_H

#include "nodes/pg_list.h"

/*
 * One HTTP exchange.  The caller fills the first block; d365_http_execute
 * fills the second.  Everything is palloc'd in the caller's memory context.
 */
typedef struct D365HttpRequest
{
	/* filled by the caller */
	const char *method;			/* GET, POST, PATCH, DELETE */
	const char *url;			/* absolute http(s) URL */
	List	   *headers;		/* char * "Name: value" lines */
	const char *body;			/* request body or NULL; must stay valid */
	size_t		body_len;

	/* filled by d365_http_execute */
	long		status;			/* HTTP status; 0 when no response arrived */
	int			transport_error;	/* CURLcode; 0 when the transfer ended well */
	char	   *transport_message;	/* libcurl's explanation, or NULL */
	bool		too_large;		/* body exceeded d365sync.max_response_size */
	char	   *response;		/* body, NUL-terminated ("" when none) */
	size_t		response_len;
	char	   *response_headers;	/* header lines of the final response */
	size_t		response_headers_len;
	double		elapsed_ms;
} D365HttpRequest;

/* a call started by d365_http_start, completed by d365_http_wait */
typedef struct D365HttpCall D365HttpCall;

/*
 * The pace of a call (d365_http_start_paced).  Before each request of the
 * call starts, admit(arg) is asked: 0 lets it start now (and the pacer
 * counts it as in flight); a positive number of milliseconds holds it, and
 * the call asks again after at most that long, or when one of its requests
 * finishes.  done(req, arg) is told each request's outcome as soon as it
 * is in, before anything else of the call starts.  Neither may raise.
 */
typedef struct D365HttpPacer
{
	long		(*admit) (void *arg);
	void		(*done) (D365HttpRequest *req, void *arg);
	void	   *arg;
} D365HttpPacer;

extern void d365_http_execute(D365HttpRequest **reqs, int n, int max_parallel);
extern D365HttpCall *d365_http_start(D365HttpRequest **reqs, int n, int max_parallel);
extern D365HttpCall *d365_http_start_paced(D365HttpRequest **reqs, int n, int max_parallel,
										   const D365HttpPacer *pacer, bool push);
extern void d365_http_push(D365HttpCall **calls, int n);
extern void d365_http_progress(D365HttpCall **calls, int n);
extern void d365_http_wait(D365HttpCall *call);
extern void d365_http_wait_many(D365HttpCall **calls, int n);
extern char *d365_http_header(const D365HttpRequest *req, const char *name);
extern char *d365_http_url_problem(const char *url);
extern void d365_http_sleep(long ms);
extern void d365_http_require_primary(void);
extern void d365_http_init(void);

#endif							/* D365_HTTP_H */
