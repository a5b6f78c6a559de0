/*-------------------------------------------------------------------------
 *
 * capture.h
 *	  Change capture on the attached contact table and on mapped tables
 *	  (capture.c, map_capture.c) and the checks that keep its trigger
 *	  functions on d365sync's own triggers (capture_guard.c).
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
extern void d365_capture_note(Oid relid, text *key, text *old_key);
extern void d365_capture_flush_noted(void);

/* in map_capture.c */
extern const char *d365_map_of_relid(Oid relid);

/* in capture_guard.c */
extern Oid	d365_attached_relid(void);
extern bool d365_is_attached_relation(Oid relid, Oid attached);
extern void d365_capture_check(FunctionCallInfo fcinfo, const char *fn, const char *tgname,
							   uint32 event, bool row, bool check_table);
extern void d365_capture_refuse(FunctionCallInfo fcinfo, const char *fn, bool map);
extern void d365_map_capture_check(FunctionCallInfo fcinfo, const char *fn,
								   const char *tgname, uint32 event, bool row);

#endif							/* D365_CAPTURE_H */
