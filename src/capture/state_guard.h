/*-------------------------------------------------------------------------
 *
 * state_guard.h
 *	  The flag that tells the guard of d365's sync state that d365sync is
 *	  recording what Dynamics answered.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_STATE_GUARD_H
#define D365_STATE_GUARD_H

/*
 * in state_guard.c: mark the start (true) or end (false) of a record
 * statement; returns the earlier state, to be restored (also on error)
 */
extern bool d365_recorder_set(bool active);

#endif							/* D365_STATE_GUARD_H */
