/*-------------------------------------------------------------------------
 *
 * odata_pages.c
 *	  Paged reads from the Dataverse Web API: the one loop that follows
 *	  @odata.nextLink.
 *
 * Every page is asked for with Prefer: odata.maxpagesize =
 * d365sync.page_size, or the iterator's own page_size (after the caller's own preferences, such as
 * odata.track-changes) and sent through d365_client_execute(), so retries,
 * throttling and token refresh are the client's.  A next link is an
 * absolute URL; the client sends the token only when it points into the
 * organization's Web API.  Memory stays flat: one page at a time.
 *
 * Users: d365._get_all() (metadata.c), the change-tracking pull
 * (incoming.c) and the foreign tables' scans (fdw_scan.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "miscadmin.h"
#include "utils/memutils.h"

#include "d365sync.h"
#include "odata.h"

/*
 * d365_pages_open
 *		Prepare to read path (relative to the service root, or absolute) and
 *		the pages after it.  prefer: extra Prefer preferences, or NULL.
 *		max_pages: raise past this many pages (0: no limit).  Sends nothing.
 */
D365Pages *
d365_pages_open(D365Client *client, const char *path, const char *prefer,
				int max_pages)
{
	D365Pages  *p;

	if (path == NULL)
		elog(ERROR, "d365_pages_open needs a path");
	p = palloc0(sizeof(D365Pages));
	p->client = client;
	p->prefer = prefer ? pstrdup(prefer) : NULL;
	p->max_pages = max_pages;
	p->owner_cxt = CurrentMemoryContext;
	p->next = pstrdup(path);
	p->cxt = AllocSetContextCreate(CurrentMemoryContext, "d365sync page",
								   ALLOCSET_DEFAULT_SIZES);
	return p;
}

/* set_next: the path the next d365_pages_next() fetches, or NULL */
static void
set_next(D365Pages *p, const char *path)
{
	if (p->next != NULL)
		pfree(p->next);
	p->next = path ? MemoryContextStrdup(p->owner_cxt, path) : NULL;
}

/*
 * d365_pages_next
 *		GET the next page and return its operation (allocated in p->cxt,
 *		valid until the next call); NULL when the page before had no
 *		@odata.nextLink (that page stays available as p->op).  A failed
 *		page is returned as it is: the caller reports it or restarts; a page
 *		that failed has no next link.
 */
D365Op *
d365_pages_next(D365Pages *p)
{
	MemoryContext old;
	D365Op	   *op;
	int			size = p->page_size > 0 ? p->page_size : d365_page_size;

	if (p->op != NULL)
	{
		set_next(p, p->op->ok ? d365_json_str(p->op->json, "@odata.nextLink") : NULL);
		if (p->next == NULL)
			return NULL;
	}
	if (p->next == NULL)
		return NULL;

	CHECK_FOR_INTERRUPTS();
	if (p->max_pages > 0 && p->pages >= p->max_pages)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("more than %d pages of results", p->max_pages)));

	p->op = NULL;
	MemoryContextReset(p->cxt);
	old = MemoryContextSwitchTo(p->cxt);
	p->path = pstrdup(p->next);
	op = d365_op_make("GET", p->path, NULL);
	if (p->prefer != NULL)
		op->headers = list_make1(psprintf("Prefer: %s, odata.maxpagesize=%d",
										  p->prefer, size));
	else
		op->headers = list_make1(psprintf("Prefer: odata.maxpagesize=%d", size));
	d365_client_execute(p->client, &op, 1);
	MemoryContextSwitchTo(old);

	p->op = op;
	p->pages++;
	return op;
}

/*
 * d365_pages_restart
 *		Continue with path instead of the current page's next link (say,
 *		after Dynamics refused a stored link).
 */
void
d365_pages_restart(D365Pages *p, const char *path)
{
	p->op = NULL;
	MemoryContextReset(p->cxt);
	set_next(p, path);
}

/*
 * d365_pages_close
 *		Free the iterator and its last page.
 */
void
d365_pages_close(D365Pages *p)
{
	MemoryContextDelete(p->cxt);
	if (p->next != NULL)
		pfree(p->next);
	pfree(p);
}
