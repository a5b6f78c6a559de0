/*-------------------------------------------------------------------------
 *
 * capture.h
 *	  Change capture on the attached contact table (capture.c) and the
 *	  checks that keep its trigger functions on d365sync's own triggers
 *	  (capture_guard.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_CAPTURE_H
#define D365_CAPTURE_H

#include "fmgr.h"
#include "access/tupdesc.h"
#include "utils/reltrigger.h"

/* in capture.c */
extern text *d365_key_text(Datum value, Oid typid);
extern int	d365_capture_key_attnum(Trigger *trigger, TupleDesc tupdesc);

/* in capture_guard.c */
extern Oid	d365_attached_relid(void);
extern bool d365_is_attached_relation(Oid relid, Oid attached);
extern void d365_capture_check(FunctionCallInfo fcinfo, const char *fn, const char *tgname,
							   uint32 event, bool row, bool check_table);

#endif							/* D365_CAPTURE_H */
