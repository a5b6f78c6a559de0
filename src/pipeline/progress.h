/*-------------------------------------------------------------------------
 *
 * progress.h
 *	  Progress of the sync run in progress, for other sessions to see
 *	  (src/pipeline/progress.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_PROGRESS_H
#define D365_PROGRESS_H

#include "datatype/timestamp.h"

/* What a run has done so far. */
typedef struct D365ProgressCounts
{
	int64		done;			/* items recorded, not failed */
	int64		failed;			/* items recorded as failed */
	int64		requests;		/* HTTP exchanges */
	int64		throttled;		/* 429 answers */
} D365ProgressCounts;

/* in progress.c */
extern bool d365_progress_start(const char *kind);
extern bool d365_progress_start_at(const char *kind, TimestampTz started);
extern int64 d365_progress_total(void);
extern bool d365_progress_active(void);
extern void d365_progress_add_total(int64 n);
extern void d365_progress_update(const void *run,
								 const D365ProgressCounts *counts);
extern void d365_progress_end(void);

/*
 * The shared-memory side (a slot per run; no-ops without the preload).
 * Only progress.c calls these.
 */
extern void d365_progress_shared_claim(const char *kind, TimestampTz started);
extern void d365_progress_shared_update(const D365ProgressCounts *counts,
										int64 total);
extern void d365_progress_shared_release(void);

#endif							/* D365_PROGRESS_H */
