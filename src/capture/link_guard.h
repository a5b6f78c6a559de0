/*-------------------------------------------------------------------------
 *
 * link_guard.h
 *	  The flag that tells the link-column guard d365sync itself is writing.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_LINK_GUARD_H
#define D365_LINK_GUARD_H

/* in link_guard.c */
extern bool d365_link_writer_set(bool active);

#endif							/* D365_LINK_GUARD_H */
