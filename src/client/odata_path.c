/*-------------------------------------------------------------------------
 *
 * odata_path.c
 *	  Where a request with the application's token may go: under the
 *	  organization's Web API, {org_url}/api/data/{version}/, and nowhere
 *	  else on that host.
 *
 * A request path comes from d365sync's own SQL (entity sets and GUIDs), from
 * a link the server gave (@odata.nextLink, a delta link kept in
 * d365.pull_state) or from a caller of d365._get_all().  Before any request
 * of a batch of operations is sent, each path that is not anonymous (token
 * requests are) is checked: relative to the service root, or an absolute
 * URL that starts with it; and in its path part (up to '?' or '#') no dot
 * segment ("." or ".."), no percent-encoded dot, slash or backslash, no
 * backslash, no control character or space -- all of which libcurl or the
 * server could resolve to another path on the host.  The query string is
 * left alone: $filter values may hold anything, percent-encoded.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "odata.h"

/* Whether a path part of a URL could leave the directory it names. */
static const char *
path_part_problem(const char *p)
{
	const char *seg = p;
	const char *c;

	for (c = p;; c++)
	{
		if (*c == '\0' || *c == '?' || *c == '#' || *c == '/')
		{
			size_t		len = c - seg;

			if ((len == 1 && seg[0] == '.') || (len == 2 && seg[0] == '.' && seg[1] == '.'))
				return "a dot segment";
			if (*c != '/')
				return NULL;
			seg = c + 1;
			continue;
		}
		if ((unsigned char) *c <= ' ' || *c == 0x7f)
			return "a control character or space";
		if (*c == '\\')
			return "a backslash";
		if (*c == '%' && c[1] != '\0' && c[2] != '\0')
		{
			char		h1 = c[1];
			char		h2 = pg_ascii_tolower((unsigned char) c[2]);

			/* %2e (.), %2f (/), %5c (\) */
			if ((h1 == '2' && (h2 == 'e' || h2 == 'f')) || (h1 == '5' && h2 == 'c'))
				return "a percent-encoded dot, slash or backslash";
		}
	}
}

/*
 * d365_check_op_path
 *		Raise when operation op, sent with the application's token, would
 *		leave the organization's Web API.  Anonymous operations (token
 *		requests) are not checked here.
 */
void
d365_check_op_path(const D365Client *client, const D365Op *op)
{
	const char *rest;
	const char *problem;

	if (op->anonymous)
		return;
	if (pg_strncasecmp(op->path, "https://", 8) == 0 || pg_strncasecmp(op->path, "http://", 7) == 0)
	{
		if (pg_strncasecmp(op->path, client->service_root, strlen(client->service_root)) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("refusing to send the access token outside the organization's Web API"),
					 errdetail("A request URL does not start with %s.", client->service_root),
					 errhint("The address came from Dynamics 365 (a page's next link) or from a stored delta link; for a pull, deleting its row of d365.pull_state (entity 'map:NAME' for a table map) takes a new baseline.")));
		rest = op->path + strlen(client->service_root);
	}
	else
		rest = op->path;
	problem = path_part_problem(rest);
	if (problem != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("refusing to send the access token outside the organization's Web API"),
				 errdetail("The path of a request holds %s.", problem),
				 errhint("Requests go to paths under %s only.", client->service_root)));
}
