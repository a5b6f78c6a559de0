/*-------------------------------------------------------------------------
 *
 * pipeline.h
 *	  The chunk pipeline every engine runs on: select pending items with
 *	  SQL (mapped to requests there), send the requests through the OData
 *	  client, record each outcome with SQL.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_PIPELINE_H
#define D365_PIPELINE_H

#include "runs.h"

extern void d365_pipeline_process(D365Run *run, const char *work_sql,
								  int nargs, Oid *argtypes, Datum *args,
								  const char *record_fn);

/*
 * Look-ups: at most this many items share one look-up request, and a
 * look-up path stays this short (the Web API takes URLs of up to 32,768
 * characters, the service root included).
 */
#define D365_LOOKUP_GROUP 50
#define D365_LOOKUP_PATH_MAX 30000

extern void d365_pipeline_process_lookup(D365Run *run, const char *work_sql,
										 int nargs, Oid *argtypes, Datum *args,
										 const char *record_fn,
										 const char *lookup_fn);

/*
 * The incoming half (pipeline_pull.c): a change-tracking read of one
 * Dataverse table, recorded page by page.
 */
struct D365PullEngine;

/* The page size of a load's reads: the most the Web API gives per page. */
#define D365_LOAD_PAGE_SIZE 5000

/*
 * An initial load (pipeline_pull.c): before its first change-tracking
 * read, the engine's table is read whole, page by page, each page
 * recorded and its position kept in d365.load_state.
 */
typedef struct D365PullLoad
{
	/* the request of Dataverse's count of the records, or NULL */
	char	   *(*count_path) (const struct D365PullEngine *engine);
	/* the first page of the load: every record, with change tracking */
	char	   *(*path) (const struct D365PullEngine *engine);
	const char *record_sql;		/* as the engine's record_sql */
	const char *done_sql;		/* run after the last page ($1 text arg), or
								 * NULL */
	int			page_size;		/* odata.maxpagesize of its reads */
	int			step_pages;		/* return after this many pages, to commit
								 * (0: read to the end) */
	/* kept between steps: the reader and the link it fetches next */
	MemoryContext cxt;
	D365Pages  *pages;
	char	   *expect;
	bool		more;			/* set when a step stopped before the end */
} D365PullLoad;

typedef struct D365PullEngine
{
	const char *state_key;		/* d365.pull_state.entity */
	/* the first request of a full read; may raise when there is none */
	char	   *(*start_path) (const struct D365PullEngine *engine);
	const char *record_sql;		/* $1 json page rows, $2 text arg -> counts */
	const char *arg;			/* $2 of record_sql, or NULL */
	const char *no_delta_hint;	/* HINT when Dynamics returns no delta link */
	void	   *private;		/* the engine's own */
	D365PullLoad *load;			/* an initial load first, or NULL */
} D365PullEngine;

extern int	d365_pipeline_pull(D365Run *run, const D365PullEngine *engine,
							   bool *baseline);

#endif							/* D365_PIPELINE_H */
