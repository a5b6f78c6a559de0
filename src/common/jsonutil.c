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
 * JSON is written by d365_json_dump(), not by jansson: jansson writes a
 * real number with 17 digits (1234.56 becomes 1234.5599999999999), which
 * would record in the application's tables numbers Dynamics never sent.
 *
 * JSON is read by d365_json_loadb(): jansson holds an integer in 64 bits
 * and a real in a double, and refuses a whole document with a number
 * beyond them, so one record's number would make a page unreadable, and a
 * pull or a load that reads it would stop there on every run.  Such a
 * document is read again with each of those numbers as a JSON string of
 * its exact text: the number is then data like any other, which a numeric
 * column takes as it is and a column it does not fit refuses (failing
 * that record alone).  No Dataverse type holds such a number.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "d365_json.h"

#include "common/shortest_dec.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
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

/* Whether tok (NUL-terminated) is a JSON number, exactly as RFC 8259 writes one. */
static bool
is_json_number(const char *tok)
{
	const char *p = tok;

	if (*p == '-')
		p++;
	if (*p == '0')
		p++;
	else if (*p >= '1' && *p <= '9')
		while (*p >= '0' && *p <= '9')
			p++;
	else
		return false;
	if (*p == '.')
	{
		if (!(*++p >= '0' && *p <= '9'))
			return false;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	if (*p == 'e' || *p == 'E')
	{
		p++;
		if (*p == '+' || *p == '-')
			p++;
		if (!(*p >= '0' && *p <= '9'))
			return false;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	return *p == '\0';
}

/*
 * Whether the number token tok (NUL-terminated) is one jansson refuses: a
 * well-formed JSON number that is an integer beyond 64 bits, or a real
 * beyond a double's range.  (A malformed token is left as it is, for
 * jansson to refuse.)
 */
static bool
number_overflows(const char *tok)
{
	char	   *end;

	if (!is_json_number(tok))
		return false;
	errno = 0;
	if (strpbrk(tok, ".eE") == NULL)
		(void) strtoll(tok, &end, 10);
	else
	{
		double		d = strtod(tok, &end);

		if (errno == ERANGE && !isinf(d))
			errno = 0;			/* jansson reads an underflow as it comes */
	}
	return errno == ERANGE;
}

/*
 * The document with each number jansson refuses put in double quotes (its
 * exact text as a JSON string), or NULL when it has none.  Strings are
 * skipped as JSON writes them (a backslash escapes the next character).
 */
static char *
quote_overflowing_numbers(const char *data, size_t len, size_t *outlen)
{
	StringInfoData out;
	size_t		i = 0;
	size_t		copied = 0;
	bool		changed = false;

	initStringInfo(&out);
	while (i < len)
	{
		char		c = data[i];

		if (c == '"')
		{
			for (i++; i < len && data[i] != '"'; i++)
				if (data[i] == '\\')
					i++;
			i++;
		}
		else if (c == '-' || (c >= '0' && c <= '9'))
		{
			size_t		start = i;
			size_t		j;
			char	   *tok;

			while (i < len && data[i] != '\0' && strchr("0123456789+-.eE", data[i]) != NULL)
				i++;
			tok = pnstrdup(data + start, i - start);
			/* a value, not an object's key (which JSON writes as a string) */
			for (j = i; j < len && (data[j] == ' ' || data[j] == '\t' ||
									data[j] == '\n' || data[j] == '\r'); j++)
				;
			if ((j >= len || data[j] != ':') && number_overflows(tok))
			{
				appendBinaryStringInfo(&out, data + copied, start - copied);
				appendStringInfoChar(&out, '"');
				appendStringInfoString(&out, tok);
				appendStringInfoChar(&out, '"');
				copied = i;
				changed = true;
			}
			pfree(tok);
		}
		else
			i++;
	}
	if (!changed)
	{
		pfree(out.data);
		return NULL;
	}
	appendBinaryStringInfo(&out, data + copied, len - copied);
	*outlen = out.len;
	return out.data;
}

/*
 * d365_json_loadb
 *		jansson's json_loadb() with d365sync's flags (any value at the top,
 *		U+0000 allowed in strings); a document refused for a number beyond
 *		what jansson holds is read again with those numbers as strings
 *		(see the file's header).  NULL and *jerr as json_loadb() on any
 *		other error.
 */
json_t *
d365_json_loadb(const char *data, size_t len, json_error_t *jerr)
{
	json_t	   *value;
	char	   *quoted;
	size_t		qlen;

	value = json_loadb(data, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, jerr);
	if (value == NULL && json_error_code(jerr) == json_error_numeric_overflow &&
		(quoted = quote_overflowing_numbers(data, len, &qlen)) != NULL)
	{
		json_error_t again;

		/* a document still refused reports its first error, where it is */
		value = json_loadb(quoted, qlen, JSON_DECODE_ANY | JSON_ALLOW_NUL, &again);
		pfree(quoted);
	}
	return value;
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

	value = d365_json_loadb(data, len, &jerr);
	if (value == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("%s is not valid JSON", what),
				 errdetail_internal("%s at line %d, column %d.",
									jerr.text, jerr.line, jerr.column)));
	return value;
}

/* The JSON of a string: escaped as RFC 8259 asks, UTF-8 left as it is. */
static void
dump_string(StringInfo out, const char *s, size_t len)
{
	/* the characters with a short escape, and the letter of each */
	static const char shortc[] = "\"\\\b\f\n\r\t";
	static const char letter[] = "\"\\bfnrt";
	static const char hex[] = "0123456789abcdef";
	size_t		start = 0;
	size_t		i;

	appendStringInfoChar(out, '"');
	for (i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];
		const char *esc;

		if (c >= 0x20 && c != '"' && c != '\\')
			continue;
		appendBinaryStringInfo(out, s + start, (int) (i - start));
		start = i + 1;
		appendStringInfoChar(out, '\\');
		esc = memchr(shortc, c, sizeof(shortc) - 1);
		if (esc != NULL)
			appendStringInfoChar(out, letter[esc - shortc]);
		else
		{
			appendStringInfoString(out, "u00");
			appendStringInfoChar(out, hex[c >> 4]);
			appendStringInfoChar(out, hex[c & 15]);
		}
	}
	appendBinaryStringInfo(out, s + start, (int) (len - start));
	appendStringInfoChar(out, '"');
}

static void
dump_value(StringInfo out, const json_t *value)
{
	char		buf[64];

	check_stack_depth();
	switch (json_typeof(value))
	{
		case JSON_OBJECT:
			{
				const char *key;
				json_t	   *item;
				bool		first = true;

				appendStringInfoChar(out, '{');
				json_object_foreach((json_t *) value, key, item)
				{
					if (!first)
						appendStringInfoChar(out, ',');
					first = false;
					dump_string(out, key, strlen(key));
					appendStringInfoChar(out, ':');
					dump_value(out, item);
				}
				appendStringInfoChar(out, '}');
				break;
			}
		case JSON_ARRAY:
			{
				size_t		i;

				appendStringInfoChar(out, '[');
				for (i = 0; i < json_array_size(value); i++)
				{
					if (i > 0)
						appendStringInfoChar(out, ',');
					dump_value(out, json_array_get(value, i));
				}
				appendStringInfoChar(out, ']');
				break;
			}
		case JSON_STRING:
			dump_string(out, json_string_value(value), json_string_length(value));
			break;
		case JSON_INTEGER:
			snprintf(buf, sizeof(buf), "%lld", (long long) json_integer_value(value));
			appendStringInfoString(out, buf);
			break;
		case JSON_REAL:
			/* the shortest text that reads back as the same number */
			double_to_shortest_decimal_buf(json_real_value(value), buf);
			appendStringInfoString(out, buf);
			break;
		case JSON_TRUE:
			appendStringInfoString(out, "true");
			break;
		case JSON_FALSE:
			appendStringInfoString(out, "false");
			break;
		case JSON_NULL:
			appendStringInfoString(out, "null");
			break;
	}
}

/*
 * d365_json_dump
 *		Compact serialisation, palloc'd in CurrentMemoryContext.  A real
 *		number is written in its shortest form that reads back as the same
 *		double (1234.56, not jansson's 1234.5599999999999): what Dynamics
 *		sent as 1234.56 is recorded as 1234.56.
 */
char *
d365_json_dump(const json_t *value)
{
	StringInfoData out;

	initStringInfo(&out);
	dump_value(&out, value);
	return out.data;
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

/*
 * d365_json_scrub_nul
 *		Replace U+0000 in every string of value (keys excepted) with U+FFFD,
 *		in place: PostgreSQL's text and jsonb cannot hold U+0000, and one
 *		such character in a list that Dynamics returns must not fail the
 *		whole list.  For values that are only shown or compared, never
 *		stored as a contact's data.
 */
void
d365_json_scrub_nul(json_t *value)
{
	size_t		i;
	const char *key;
	json_t	   *item;

	if (json_is_object(value))
	{
		json_object_foreach(value, key, item)
			d365_json_scrub_nul(item);
	}
	else if (json_is_array(value))
	{
		json_array_foreach(value, i, item)
			d365_json_scrub_nul(item);
	}
	else if (json_is_string(value))
	{
		const char *s = json_string_value(value);
		size_t		len = json_string_length(value);
		StringInfoData buf;

		if (strlen(s) == len)
			return;
		initStringInfo(&buf);
		for (i = 0; i < len; i++)
		{
			if (s[i] == '\0')
				appendBinaryStringInfo(&buf, "\xEF\xBF\xBD", 3);
			else
				appendStringInfoChar(&buf, s[i]);
		}
		json_string_setn(value, buf.data, buf.len);
		pfree(buf.data);
	}
}
