/*-------------------------------------------------------------------------
 *
 * activities.h
 *	  Activities engine, as the contact engine calls it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_ACTIVITIES_H
#define D365_ACTIVITIES_H

extern void d365_activities_after_contacts(void);

#endif							/* D365_ACTIVITIES_H */
