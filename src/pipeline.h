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

#endif							/* D365_PIPELINE_H */
