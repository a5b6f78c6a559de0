/*-------------------------------------------------------------------------
 *
 * activity_sync.h
 *	  Activities engine, as the contact engine calls it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_ACTIVITY_SYNC_H
#define D365_ACTIVITY_SYNC_H

extern void d365_activities_after_contacts(void);

#endif							/* D365_ACTIVITY_SYNC_H */
