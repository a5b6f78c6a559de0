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
 * organization's Web API.  Memory stays flat: one page at a time (when the
 * caller asks for the next page ahead, that page's raw bytes arrive beside
 * the current page, which is freed before they are parsed).
 *
 * The pipeline.  A reader that works through each page (records it with
 * SQL, turns its rows into tuples) asks for the next page ahead with
 * d365_pages_prefetch() as soon as it holds the current one: Dataverse
 * prepares page N+1 while the backend applies page N, and the next
 * d365_pages_next() waits only for what is left of it.  Between its
 * statements the reader may call d365_pages_pump(), which reads what has
 * arrived without waiting.  The page ahead goes through the same client
 * as any request (d365_client_start/finish): its retries, 429 back-off
 * and token refresh happen when it is waited for.  Its memory and its
 * curl handles belong to the iterator (ahead_cxt): a cancel or an error
 * that drops the iterator's context cancels the transfer; nothing of it
 * is recorded before d365_pages_next() returns it, so a reader that keeps
 * its position (a load's next link) loses nothing when a page fails or
 * never arrives.  Pages come back in order: one page at most is asked for
 * ahead, the one the current page links to.
 *
 * Users: d365._get_all() (metadata.c), the change-tracking pull and the
 * initial load (pipeline_pull.c: the pulls of the contact table and of
 * the table maps) and the foreign tables' scans (fdw_scan.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "d365_json.h"

#include "common/hashfn.h"
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
 * follow_link
 *		Note that link, a page's @odata.nextLink, is about to be followed;
 *		ERROR when this iterator followed it before.  A next link that leads
 *		back to a page already read (a server's fault, or a hostile one)
 *		would otherwise make the reader loop forever -- a pull or a scan
 *		that never ends, the same rows applied again and again.  Links are
 *		kept as 64-bit hashes: 8 bytes a page.
 */
static void
follow_link(D365Pages *p, const char *link)
{
	uint64		h = hash_bytes_extended((const unsigned char *) link, strlen(link), 0);
	int			i;

	for (i = 0; i < p->nlinks; i++)
		if (p->links[i] == h)
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("Dynamics 365 sent a next link that was followed already"),
					 errdetail("Page %d of the results links back to an earlier page; reading on would never end.",
							   p->pages),
					 errhint("The read stops here; try it again later (a pull starts again from its last delta link).")));
	if (p->nlinks == p->maxlinks)
	{
		p->maxlinks = p->maxlinks ? p->maxlinks * 2 : 16;
		p->links = p->links
			? repalloc(p->links, sizeof(uint64) * p->maxlinks)
			: MemoryContextAlloc(p->owner_cxt, sizeof(uint64) * p->maxlinks);
	}
	p->links[p->nlinks++] = h;
}

/* the GET of one page, with its Prefer header, in CurrentMemoryContext */
static D365Op *
page_op(D365Pages *p, const char *path)
{
	int			size = p->page_size > 0 ? p->page_size : d365_page_size;
	D365Op	   *op = d365_op_make("GET", pstrdup(path), NULL);

	if (p->prefer != NULL)
		op->headers = list_make1(psprintf("Prefer: %s, odata.maxpagesize=%d",
										  p->prefer, size));
	else
		op->headers = list_make1(psprintf("Prefer: odata.maxpagesize=%d", size));
	return op;
}

/* Drop a page asked for ahead (its transfer is cancelled with its memory). */
static void
drop_prefetch(D365Pages *p)
{
	if (p->sending != NULL)
	{
		MemoryContextReset(p->ahead_cxt);
		p->sending = NULL;
		p->ahead = NULL;
	}
}

/*
 * d365_pages_prefetch
 *		Send the GET of the page after the current one now, without waiting
 *		for it, so that the server prepares it while the caller works
 *		through the current page; the next d365_pages_next() waits for it.
 *		Does nothing when the current page failed or has no next link.  The
 *		arriving page's bytes are then in memory beside the current page; it
 *		is parsed once the current page is freed.
 */
void
d365_pages_prefetch(D365Pages *p)
{
	MemoryContext old;
	const char *link;
	D365Op	  **ops;

	if (p->sending != NULL || p->op == NULL || !p->op->ok)
		return;
	link = d365_json_str(p->op->json, "@odata.nextLink");
	if (link == NULL || (p->max_pages > 0 && p->pages >= p->max_pages))
		return;
	follow_link(p, link);
	if (p->ahead_cxt == NULL)
		p->ahead_cxt = AllocSetContextCreate(p->owner_cxt, "d365sync page ahead",
											 ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(p->ahead_cxt);
	ops = palloc(sizeof(D365Op *));
	ops[0] = page_op(p, link);
	p->ahead = ops[0];
	p->sending = d365_client_start(p->client, ops, 1);
	MemoryContextSwitchTo(old);
}

/*
 * d365_pages_pump
 *		Read what has arrived of the page asked for ahead, without waiting
 *		(nothing to do when none is).  Cheap: callers put it between their
 *		statements.
 */
void
d365_pages_pump(D365Pages *p)
{
	MemoryContext old;

	if (p->sending == NULL)
		return;
	old = MemoryContextSwitchTo(p->ahead_cxt);
	d365_client_progress(p->sending);
	MemoryContextSwitchTo(old);
}

/*
 * d365_pages_next
 *		GET the next page and return its operation (allocated in p->cxt,
 *		valid until the next call); NULL when the page before had no
 *		@odata.nextLink (that page stays available as p->op).  A failed
 *		page is returned as it is: the caller reports it or restarts; a page
 *		that failed has no next link.  A page asked for ahead
 *		(d365_pages_prefetch) is waited for instead of sent.
 */
D365Op *
d365_pages_next(D365Pages *p)
{
	MemoryContext old;
	D365Op	   *op;

	if (p->sending != NULL)
	{
		MemoryContext done;

		CHECK_FOR_INTERRUPTS();
		/*
		 * The current page is no longer needed: free it before the page
		 * ahead is parsed, so that only one parsed page is ever in memory
		 * (beside the raw bytes of the one arriving).
		 */
		p->op = NULL;
		MemoryContextReset(p->cxt);
		old = MemoryContextSwitchTo(p->ahead_cxt);
		d365_client_finish(p->sending);
		MemoryContextSwitchTo(old);
		/* the page ahead becomes the current one */
		done = p->cxt;
		p->cxt = p->ahead_cxt;
		p->ahead_cxt = done;
		p->op = p->ahead;
		p->path = (char *) p->op->path;
		p->sending = NULL;
		p->ahead = NULL;
		p->pages++;
		return p->op;
	}

	if (p->op != NULL)
	{
		set_next(p, p->op->ok ? d365_json_str(p->op->json, "@odata.nextLink") : NULL);
		if (p->next == NULL)
			return NULL;
		follow_link(p, p->next);
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
	op = page_op(p, p->next);
	p->path = op->path;
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
	drop_prefetch(p);
	p->op = NULL;
	MemoryContextReset(p->cxt);
	set_next(p, path);
	p->nlinks = 0;				/* read again from there on purpose */
}

/*
 * d365_pages_close
 *		Free the iterator and its last page.
 */
void
d365_pages_close(D365Pages *p)
{
	drop_prefetch(p);
	if (p->ahead_cxt != NULL)
		MemoryContextDelete(p->ahead_cxt);
	MemoryContextDelete(p->cxt);
	if (p->next != NULL)
		pfree(p->next);
	if (p->links != NULL)
		pfree(p->links);
	pfree(p);
}
