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

#endif							/* D365_PIPELINE_H */
