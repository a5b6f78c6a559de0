/*-------------------------------------------------------------------------
 *
 * job_role.h
 *	  The jobs run as d365sync's own role, d365sync_job (src/common/job_role.c),
 *	  and remember who called them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_JOB_ROLE_H
#define D365_JOB_ROLE_H

#include "fmgr.h"

/* the role the jobs run as (created by the install and upgrade scripts) */
#define D365_JOB_ROLE "d365sync_job"

extern Oid	d365_job_role(void);
extern Datum d365_as_job(PGFunction body, FunctionCallInfo fcinfo);
extern Oid	d365_job_caller(void);

/* the background worker's transactions (src/worker/worker.c) */
typedef struct D365JobSave
{
	Oid			userid;
	int			sec;
	Oid			caller;
	bool		switched;
} D365JobSave;

extern void d365_job_begin(D365JobSave *save);
extern void d365_job_end(D365JobSave *save);
extern void d365_job_commit(void);

#endif							/* D365_JOB_ROLE_H */
