/*-------------------------------------------------------------------------
 *
 * d365_json.h
 *	  The one way d365sync includes jansson.
 *
 * PostgreSQL's fmgrprotos.h (pulled in by utils/builtins.h) declares SQL
 * functions named json_object and json_typeof, which clash with jansson's
 * json_object() and json_typeof() macro.  This header includes builtins.h
 * with those two names renamed, then jansson, so a file may use both.
 * Include it right after postgres.h and before any header that could pull
 * in builtins.h.
 *
 * Memory: jansson allocates with palloc in CurrentMemoryContext (see
 * jsonutil.c), so every json_t belongs to the memory context that was
 * current when it was made and an ERROR cannot leak it.  Never keep a json_t
 * in a context that outlives its parts, and never json_decref() a value
 * whose context is already gone.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_JSON_H
#define D365_JSON_H

#define json_object pg_fmgr_json_object
#define json_typeof pg_fmgr_json_typeof
#include "utils/builtins.h"
#undef json_object
#undef json_typeof

#include <jansson.h>

extern void d365_json_init(void);
extern json_t *d365_json_loadb(const char *data, size_t len, json_error_t *jerr);
extern json_t *d365_json_parse(const char *data, size_t len, const char *what);
extern char *d365_json_dump(const json_t *value);
extern const char *d365_json_str(const json_t *obj, const char *key);
extern void d365_json_scrub_nul(json_t *value);

#endif							/* D365_JSON_H */
