/*-------------------------------------------------------------------------
 *
 * state_guard.c
 *	  The Dynamics ids of d365's sync state are written by d365sync only.
 *
 * A link column counts only when it equals the id d365sync linked the key
 * to: d365.contact_state.dynamics_id for a contact, d365.map_row.dynamics_id
 * for a row of a mapped table.  Those ids are the trust of the link rule,
 * so a role that may write the state for the jobs' sake (the operator set,
 * the background worker's role) must not be able to choose them: an id
 * written by an operator, together with the link column written through
 * d365's link writer, would send the operator's row to another person's
 * Dynamics record.
 *
 *	 d365._state_guard(id_column, key_column...)  BEFORE INSERT OR UPDATE FOR
 *		EACH ROW on d365.contact_state and d365.map_row: a row may get a
 *		Dynamics id, or keep its id under another key -- and on
 *		d365.pull_state and d365.metadata_cache, a row may get a delta link
 *		(which says what the next pull reads with the application's
 *		credentials) or a metadata body (which names Dynamics' tables,
 *		fields and users for the syncs), and on d365.map_lookup_pending and
 *		d365.load_state a waiting lookup's record (which the next pull,
 *		whoever runs it, writes into a row) or a load's delta and next
 *		links (what the load and the pull after it read) -- only
 *		  - while d365sync records what Dynamics answered (the pipeline's
 *			record statement of a sync or a pull, the pull's delta link,
 *			d365._metadata_store(): a flag of this backend
 *			that only C code sets, around that one statement, and that is
 *			cleared while code of a table's owner or of a mapper runs,
 *			src/privilege/table_owner.c);
 *		  - as the job role or a superuser (d365's SECURITY DEFINER
 *			functions, which run as the job role and move a contact's id
 *			with its key when the application changes a key; no set may
 *			run code as the job role but through d365's own functions);
 *		  - as a role holding the admin set, which links by hand
 *			(d365_link_contact(), and d365_map_table() keeps the links a
 *			table had before it was mapped).
 *		Clearing an id (unlinking) and changing other columns are always
 *		allowed.  The function checks where it fires: its trigger's name,
 *		timing, level and events, that the table is one of those of d365
 *		and the column one guarded there.
 *
 * No set holds EXECUTE on a trigger function, and the function reads only
 * attributes of the rows it is handed: it runs no user code.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "writers.h"
#include "job_role.h"

PG_FUNCTION_INFO_V1(d365_state_guard);

/* the tables guarded, the column each must get from Dynamics only */
typedef struct GuardedTable
{
	const char *relname;
	const char *column;
	const char *detail;
	const char *hint;
	const char *trigger;		/* its trigger's name (NULL: state_guard) */
} GuardedTable;

static const GuardedTable guarded[] =
{
	{"contact_state", "dynamics_id",
		"The id d365sync linked a key to decides which Dynamics 365 record the row is sent to; "
		"a role running the jobs may clear it, never set it or move it to another key.",
	"A sync links rows itself; an admin links a contact by hand with d365_link_contact()."},
	{"map_row", "dynamics_id",
		"The id d365sync linked a key to decides which Dynamics 365 record the row is sent to; "
		"a role running the jobs may clear it, never set it or move it to another key.",
	"A sync links rows itself; d365_map_table() keeps the links a table had before it was mapped."},
	{"pull_state", "delta_link",
		"The delta link says what the next pull reads with the application's credentials; "
		"a role running the jobs may clear it, never set it.",
	"Set it to NULL, or delete the row, to have the next pull take a new baseline."},
	{"metadata_cache", "body",
		"The cached metadata is what Dynamics 365 answered to its path; a role running the jobs may delete it, never write it.",
	"DELETE FROM d365.metadata_cache to have it fetched again."},
	{"map_lookup_pending", "dynamics_id",
		"A waiting lookup is written into its row by the next pull, whoever runs it; "
		"it names the record a loaded row's lookup pointed to in Dynamics 365, "
		"which a role running the jobs may delete, never write.",
	"DELETE the row to drop the waiting lookup; a load or a pull records the lookups itself."},
	{"load_state", "delta_link",
		"The delta link a load took says what the pull after it reads with the application's credentials; "
		"a role running the jobs may clear it, never set it.",
	"DELETE the row to have the next pull of the map load it again."},
	{"load_state", "next_link",
		"The next link says what the next page of a load reads with the application's credentials; "
		"a role running the jobs may clear it, never set it.",
	"DELETE the row to have the next pull of the map load it again.", "state_guard_next"},
};

/* A column's value in a row, compared as its type's binary image. */
static bool
same_value(HeapTuple a, HeapTuple b, TupleDesc desc, int attnum)
{
	bool		anull;
	bool		bnull;
	Datum		av = heap_getattr(a, attnum, desc, &anull);
	Datum		bv = heap_getattr(b, attnum, desc, &bnull);
	Form_pg_attribute att = TupleDescAttr(desc, attnum - 1);

	if (anull || bnull)
		return anull && bnull;
	return datumIsEqual(av, bv, att->attbyval, att->attlen);
}

/* Whether the current role may give a row of the state a Dynamics id. */
static bool
may_link(void)
{
	Oid			settings;

	/* d365sync's own code runs as the job role (src/common/job_role.c) */
	if (d365_recorder_active() || superuser() ||
		(OidIsValid(d365_job_role()) && GetUserId() == d365_job_role()))
		return true;
	/* the admin set: its rights WITH GRANT OPTION (as d365._check_granter) */
	settings = get_relname_relid("settings", get_namespace_oid("d365", false));
	return OidIsValid(settings) &&
		pg_class_aclcheck(settings, GetUserId(), ACL_GRANT_OPTION_FOR(ACL_UPDATE)) == ACLCHECK_OK;
}

/*
 * d365._state_guard() trigger, arguments: the id column, then the key
 * columns.  See the header.
 */
Datum
d365_state_guard(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Trigger    *tg;
	TupleDesc	desc;
	HeapTuple	newtup;
	HeapTuple	oldtup = NULL;
	Relation	rel;
	const char *relname;
	int			idcol;
	bool		isnull;
	bool		moved = false;
	int			i;
	const GuardedTable *what;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(td->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(td->tg_event) ||
		!(TRIGGER_FIRED_BY_INSERT(td->tg_event) || TRIGGER_FIRED_BY_UPDATE(td->tg_event)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("d365._state_guard() must be fired BEFORE INSERT OR UPDATE FOR EACH ROW")));
	rel = td->tg_relation;
	tg = td->tg_trigger;
	relname = RelationGetRelationName(rel);
	for (i = 0; i < lengthof(guarded); i++)
		if (strcmp(relname, guarded[i].relname) == 0 && tg->tgnargs >= 2 &&
			strcmp(tg->tgargs[0], guarded[i].column) == 0 &&
			strcmp(tg->tgname, guarded[i].trigger ? guarded[i].trigger : "state_guard") == 0)
			break;
	if (RelationGetNamespace(rel) != get_namespace_oid("d365", false) || i == lengthof(guarded))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("d365._state_guard() guards d365.contact_state, map_row, pull_state, metadata_cache, map_lookup_pending and load_state only")));
	what = &guarded[i];

	desc = RelationGetDescr(rel);
	if (TRIGGER_FIRED_BY_UPDATE(td->tg_event))
	{
		newtup = td->tg_newtuple;
		oldtup = td->tg_trigtuple;
	}
	else
		newtup = td->tg_trigtuple;

	idcol = SPI_fnumber(desc, tg->tgargs[0]);
	if (idcol <= 0)
		elog(ERROR, "d365._state_guard(): no column \"%s\"", tg->tgargs[0]);
	(void) heap_getattr(newtup, idcol, desc, &isnull);
	if (isnull)
		return PointerGetDatum(newtup);		/* no id, or unlinked */
	if (oldtup != NULL)
	{
		moved = !same_value(newtup, oldtup, desc, idcol);
		for (i = 1; i < tg->tgnargs && !moved; i++)
		{
			int			k = SPI_fnumber(desc, tg->tgargs[i]);

			if (k <= 0)
				elog(ERROR, "d365._state_guard(): no column \"%s\"", tg->tgargs[i]);
			moved = !same_value(newtup, oldtup, desc, k);
		}
		if (!moved)
			return PointerGetDatum(newtup);
	}
	if (may_link())
		return PointerGetDatum(newtup);
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("column \"%s\" of d365.%s is written by d365sync only", what->column, relname),
			 errdetail("%s", what->detail),
			 errhint("%s", what->hint)));
	PG_RETURN_NULL();			/* not reached */
}
