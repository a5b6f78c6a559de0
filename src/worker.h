/*-------------------------------------------------------------------------
 *
 * worker.h
 *	  The near-real-time background worker (src/worker.c); the shared
 *	  memory it and the backends meet in is in worker_shmem.h.
 *
 * The worker exists only when d365sync is in shared_preload_libraries.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_WORKER_H
#define D365_WORKER_H

#include "worker_shmem.h"

extern char *d365_worker_database;

extern void d365_worker_init(void);

#endif							/* D365_WORKER_H */
