/*-------------------------------------------------------------------------
 *
 * link_guard.c
 *	  The link columns of the attached contact table belong to d365sync.
 *
 * dynamics365_related_id says which Dynamics 365 record a contact row is.
 * A value that someone else writes there must never make d365sync send
 * that row's data to another person's record.  Two defences:
 *
 *	 d365_link_guard, d365_link_guard_update  AFTER INSERT, and AFTER
 *		UPDATE OF the link columns, FOR EACH ROW (created with the capture
 *		triggers): a row may be inserted with both link columns NULL only,
 *		and an UPDATE may leave them as they are or clear them (unlink),
 *		nothing else -- unless d365sync's own link writer is running; the
 *		error undoes the statement.  Their WHEN clauses call the function
 *		only for a row that sets or changes a link value, so an unlinked
 *		insert costs two NULL tests.  AFTER rather than BEFORE: an AFTER
 *		UPDATE row trigger fetches no old row that the capture trigger does
 *		not fetch already, and a BEFORE INSERT row trigger would turn off
 *		COPY's batched inserts.  The writer's statement runs to its end,
 *		its AFTER triggers included, inside the flag.  The writer (d365._contact_set_links and
 *		_contact_unlink, src/privilege/table_owner.c) runs as the table's owner in a
 *		security-restricted operation, so it cannot be told apart by role:
 *		it is told apart by a flag of this backend that only C code sets,
 *		around that one statement.
 *	 d365.contact_state.dynamics_id  the id d365sync linked the key to.  A
 *		link column that disagrees with it (written by the table's owner
 *		with the guard disabled, or by a superuser) is never used: the
 *		contact sync refuses the row, the pull and the activity sync skip
 *		it (sql/install/05_contacts_out.sql, 07_incoming.sql).
 *
 * A unique index on dynamics365_related_id (made by d365_attach_contacts)
 * keeps two rows from holding one Dynamics id.
 *
 * The function reads two attributes of the new row (and of the old one)
 * and compares uuids and timestamps: it runs no user code.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "writers.h"

PG_FUNCTION_INFO_V1(d365_link_guard);

/* Whether a column changes: NULL to a value, a value to another. */
static bool
column_changes(HeapTuple newtup, HeapTuple oldtup, TupleDesc desc, int attnum)
{
	bool		newnull;
	bool		oldnull;
	Datum		newval;
	Datum		oldval;
	Form_pg_attribute att;

	newval = heap_getattr(newtup, attnum, desc, &newnull);
	if (newnull)
		return false;			/* cleared, or still NULL */
	if (oldtup == NULL)
		return true;			/* inserted with a value */
	oldval = heap_getattr(oldtup, attnum, desc, &oldnull);
	if (oldnull)
		return true;
	att = TupleDescAttr(desc, attnum - 1);
	return !datumIsEqual(newval, oldval, att->attbyval, att->attlen);
}

/*
 * d365._contact_link_guard() trigger
 *		AFTER (or BEFORE) INSERT OR UPDATE OF dynamics365_related_id,
 *		dynamics365_synchronized_on, FOR EACH ROW: refuses a value in the
 *		link columns that d365sync's link writer did not put there.  NULL
 *		(unlinking) and the value already stored are always allowed.
 */
Datum
d365_link_guard(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	HeapTuple	newtup;
	HeapTuple	oldtup;
	static const char *const cols[] = {"dynamics365_related_id", "dynamics365_synchronized_on"};
	int			i;

	if (!CALLED_AS_TRIGGER(fcinfo) || TRIGGER_FIRED_INSTEAD(td->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(td->tg_event) ||
		!(TRIGGER_FIRED_BY_INSERT(td->tg_event) || TRIGGER_FIRED_BY_UPDATE(td->tg_event)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("d365._contact_link_guard() must be fired AFTER INSERT OR UPDATE FOR EACH ROW")));

	if (TRIGGER_FIRED_BY_UPDATE(td->tg_event))
	{
		newtup = td->tg_newtuple;
		oldtup = td->tg_trigtuple;
	}
	else
	{
		newtup = td->tg_trigtuple;
		oldtup = NULL;
	}
	if (d365_link_writer_active())
		return PointerGetDatum(newtup);

	desc = RelationGetDescr(td->tg_relation);
	for (i = 0; i < lengthof(cols); i++)
	{
		int			attnum = SPI_fnumber(desc, cols[i]);

		if (attnum <= 0)
			continue;			/* dropped: d365_status() reports it */
		if (column_changes(newtup, oldtup, desc, attnum))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("column \"%s\" of %s is written by d365sync only",
							cols[i], quote_qualified_identifier(
								get_namespace_name(RelationGetNamespace(td->tg_relation)),
								RelationGetRelationName(td->tg_relation))),
					 errdetail("A Dynamics 365 id that d365sync did not link could make it send this row to another person's Dynamics 365 record."),
					 errhint("Leave the link columns out of INSERT and UPDATE, or set them to NULL to unlink the contact; d365_link_contact() links a contact to an existing Dynamics 365 record.")));
	}
	return PointerGetDatum(newtup);
}
