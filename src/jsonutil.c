/*-------------------------------------------------------------------------
 *
 * jsonutil.c
 *	  jansson glued to PostgreSQL memory contexts.
 *
 * jansson is told to allocate with palloc in CurrentMemoryContext.  That
 * makes every json_t a plain part of the memory context it was built in:
 * when an ERROR unwinds, the context is reset and the JSON goes with it, so
 * no error path can leak jansson memory and no reset callback is needed for
 * it.  The rule that comes with this: a json_t must not outlive the context
 * that was current when it (or any value put into it) was created.
 *
 * Allocation failures are reported to jansson as NULL (it handles them) so
 * that no ERROR is ever thrown from inside a jansson call.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "utils/memutils.h"

static void *
d365_json_malloc(size_t size)
{
	return MemoryContextAllocExtended(CurrentMemoryContext, size == 0 ? 1 : size,
									  MCXT_ALLOC_NO_OOM | MCXT_ALLOC_HUGE);
}

static void
d365_json_free(void *ptr)
{
	if (ptr != NULL)
		pfree(ptr);
}

/*
 * d365_json_init
 *		Route jansson's allocations through palloc.  Called once from
 *		_PG_init, before any JSON is made.
 */
void
d365_json_init(void)
{
	json_set_alloc_funcs(d365_json_malloc, d365_json_free);
}

/*
 * d365_json_parse
 *		Parse len bytes of JSON.  Any JSON value is accepted at the top level.
 *		On a syntax error, raises ERRCODE_INVALID_TEXT_REPRESENTATION naming
 *		"what" (for example "Dynamics 365 response") and jansson's position;
 *		the text itself is not quoted (it may be large or hold personal data).
 */
json_t *
d365_json_parse(const char *data, size_t len, const char *what)
{
	json_error_t jerr;
	json_t	   *value;

	value = json_loadb(data, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
	if (value == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("%s is not valid JSON", what),
				 errdetail_internal("%s at line %d, column %d.",
									jerr.text, jerr.line, jerr.column)));
	return value;
}

/*
 * d365_json_dump
 *		Compact serialisation, palloc'd in CurrentMemoryContext.
 */
char *
d365_json_dump(const json_t *value)
{
	char	   *text = json_dumps(value, JSON_COMPACT | JSON_ENCODE_ANY);

	if (text == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory while serialising JSON")));
	return text;
}

/*
 * d365_json_str
 *		obj[key] when obj is an object and the member is a string, else NULL.
 *		The result points into obj.
 */
const char *
d365_json_str(const json_t *obj, const char *key)
{
	json_t	   *member;

	if (obj == NULL || !json_is_object(obj))
		return NULL;
	member = json_object_get(obj, key);
	return json_is_string(member) ? json_string_value(member) : NULL;
}
