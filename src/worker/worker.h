/*-------------------------------------------------------------------------
 *
 * worker.h
 *	  The near-real-time background worker (src/worker/worker.c); the shared
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

/* in worker_role.c */
extern char *d365_worker_role;
extern void d365_worker_role_init(void);
extern const char *d365_worker_role_name(void);
extern char *d365_worker_role_problem(void);
extern char *d365_worker_operator_problem(void);
extern void d365_worker_note_role_problem(const char *problem, char **logged);
extern void d365_worker_pin_settings(void);
extern const char *d365_worker_settings_query(void);

#endif							/* D365_WORKER_H */
