/*-------------------------------------------------------------------------
 *
 * odata_batch.c
 *	  $batch requests of the OData client: building one from operations,
 *	  and splitting its response into the exchanges of its parts.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "common/pg_prng.h"
#include "lib/stringinfo.h"

#include "odata.h"

/*
 * d365_batch_build
 *		One $batch request carrying ops[idx[0..k-1]] as independent parts,
 *		with Prefer: odata.continue-on-error so that each part gets its own
 *		outcome.  The body is multipart/mixed with CRLF line ends; each part
 *		is an application/http request line (method, path under the service
 *		path), its headers, a blank line and its body.  The response holds
 *		one part per request, in the same order (d365_batch_parse).
 */
D365HttpRequest *
d365_batch_build(D365Client *client, D365Op **ops, const int *idx, int k,
				 const char *token)
{
	D365HttpRequest *h = palloc0(sizeof(D365HttpRequest));
	StringInfoData body;
	char	   *boundary;
	int			i;

	boundary = psprintf("batch_%08x%08x",
						(unsigned) pg_prng_uint32(&pg_global_prng_state),
						(unsigned) pg_prng_uint32(&pg_global_prng_state));
	initStringInfo(&body);
	for (i = 0; i < k; i++)
	{
		D365Op	   *op = ops[idx[i]];
		ListCell   *lc;

		appendStringInfo(&body,
						 "--%s\r\nContent-Type: application/http\r\n"
						 "Content-Transfer-Encoding: binary\r\n\r\n"
						 "%s %s%s HTTP/1.1\r\n",
						 boundary, op->method, client->service_path, op->path);
		foreach(lc, op->headers)
			appendStringInfo(&body, "%s\r\n", (char *) lfirst(lc));
		if (op->body != NULL)
			appendStringInfo(&body, "Content-Type: application/json; charset=utf-8\r\n\r\n%s\r\n",
							 op->body);
		else
			appendStringInfoString(&body, "\r\n");
	}
	appendStringInfo(&body, "--%s--\r\n", boundary);

	h->method = "POST";
	h->url = psprintf("%s$batch", client->service_root);
	h->body = body.data;
	h->body_len = body.len;
	h->headers = list_make5(psprintf("Authorization: Bearer %s", token),
							"OData-MaxVersion: 4.0",
							"OData-Version: 4.0",
							"Accept: application/json",
							psprintf("Content-Type: multipart/mixed; boundary=%s", boundary));
	h->headers = lappend(h->headers, "Prefer: odata.continue-on-error");
	return h;
}

/* The next line of buf at *pos (without its CR LF); NULL at the end. */
static char *
next_line(const char *buf, size_t len, size_t *pos)
{
	size_t		start = *pos;
	size_t		end;

	if (start >= len)
		return NULL;
	end = start;
	while (end < len && buf[end] != '\n')
		end++;
	*pos = end < len ? end + 1 : end;
	if (end > start && buf[end - 1] == '\r')
		end--;
	return pnstrdup(buf + start, end - start);
}

/*
 * d365_batch_parse
 *		Split a $batch response into the exchanges of its parts, in order:
 *		each becomes a D365HttpRequest with the part's status, headers and
 *		body (method and URL copied from its operation, for error context).
 *		Returns how many parts were found; a malformed response yields 0.
 */
int
d365_batch_parse(D365Client *client, D365HttpRequest *outer, D365Op **ops,
					 const int *idx, int k, D365HttpRequest **parts)
{
	char	   *ct = d365_http_header(outer, "Content-Type");
	char	   *b;
	char	   *delim;
	size_t		dlen;
	const char *buf = outer->response;
	size_t		len = outer->response_len;
	size_t		pos = 0;
	int			found = 0;
	char	   *line;

	if (ct == NULL || (b = strstr(ct, "boundary=")) == NULL)
		return 0;
	b += 9;
	if (*b == '"')
		b++;
	b = pnstrdup(b, strcspn(b, "\";, "));
	delim = psprintf("--%s", b);
	dlen = strlen(delim);

	/* skip the preamble up to the first delimiter */
	while ((line = next_line(buf, len, &pos)) != NULL && strncmp(line, delim, dlen) != 0)
		;
	while (line != NULL && found < k)
	{
		D365HttpRequest *p;
		StringInfoData headers;
		size_t		body_start;
		size_t		body_end;
		size_t		scan;

		if (strcmp(line + dlen, "--") == 0)
			break;				/* the closing delimiter */

		/* MIME headers of the part, up to a blank line */
		while ((line = next_line(buf, len, &pos)) != NULL && line[0] != '\0')
			;
		/* the HTTP status line */
		line = next_line(buf, len, &pos);
		if (line == NULL || strncmp(line, "HTTP/", 5) != 0)
			return found;
		p = palloc0(sizeof(D365HttpRequest));
		p->method = ops[idx[found]]->method;
		p->url = psprintf("%s%s", client->service_root, ops[idx[found]]->path);
		p->status = strtol(strchr(line, ' ') ? strchr(line, ' ') + 1 : "0", NULL, 10);
		/* the part's HTTP headers */
		initStringInfo(&headers);
		while ((line = next_line(buf, len, &pos)) != NULL && line[0] != '\0')
			appendStringInfo(&headers, "%s\r\n", line);
		p->response_headers = headers.data;
		p->response_headers_len = headers.len;
		/* the body runs to the next delimiter */
		body_start = body_end = pos;
		scan = pos;
		line = NULL;
		while (scan < len)
		{
			line = next_line(buf, len, &scan);
			if (strncmp(line, delim, dlen) == 0)
				break;			/* line is the next delimiter */
			body_end = scan;
			line = NULL;
		}
		while (body_end > body_start &&
			   (buf[body_end - 1] == '\n' || buf[body_end - 1] == '\r'))
			body_end--;
		p->response = pnstrdup(buf + body_start, body_end - body_start);
		p->response_len = body_end - body_start;
		pos = scan;
		parts[found++] = p;
	}
	return found;
}
