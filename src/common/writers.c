/*-------------------------------------------------------------------------
 *
 * writers.c
 *	  d365sync's own writers, as this backend knows them.
 *
 * Some writes are d365sync's alone: the link columns of a synced table,
 * the Dynamics ids of its sync state, values that came from Dynamics.  The
 * guards of src/capture/ refuse such a write from anyone else, and the
 * capture triggers do not note it as a local change.  They tell d365sync's
 * own write apart by a flag of this backend that only C code sets, around
 * that one statement (src/privilege/, src/pipeline/, src/engines/), and
 * that is cleared while code of a table's owner or of a mapper runs
 * (d365_as_owner_restricted, src/common/spi_util.c).  A flag says who is
 * writing, never what may be written: each setter restores the earlier
 * state, also on error.
 *
 *	  recorder		d365sync records what Dynamics answered (the state
 *					guard lets it write Dynamics ids and links)
 *	  link writer	d365sync writes the link columns of the contact table
 *					(the link guard lets it)
 *	  own write		d365sync writes a mapped table, named by its OID (its
 *					capture triggers note nothing)
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/partition.h"
#include "fmgr.h"
#include "nodes/pg_list.h"
#include "utils/lsyscache.h"

#include "writers.h"

static bool recorder_active = false;
static bool link_writer_active = false;
static Oid	own_write_relid = InvalidOid;

PG_FUNCTION_INFO_V1(d365_map_own_write);

/*
 * d365_recorder_set
 *		Mark the start (true) or end (false) of d365sync's own write of what
 *		Dynamics answered; returns the earlier state, to be restored.
 */
bool
d365_recorder_set(bool active)
{
	bool		was = recorder_active;

	recorder_active = active;
	return was;
}

bool
d365_recorder_active(void)
{
	return recorder_active;
}

/*
 * d365_link_writer_set
 *		Mark the start (true) or end (false) of d365sync's own link write;
 *		returns the earlier state, to be restored (also on error).
 */
bool
d365_link_writer_set(bool active)
{
	bool		was = link_writer_active;

	link_writer_active = active;
	return was;
}

bool
d365_link_writer_active(void)
{
	return link_writer_active;
}

/*
 * d365_map_own_write_set
 *		Mark (a valid OID) or unmark (InvalidOid) the table whose rows
 *		d365sync itself is writing (its link columns, or values that came
 *		from Dynamics) while that statement runs; returns the earlier one,
 *		to be restored (also on error).
 */
Oid
d365_map_own_write_set(Oid relid)
{
	Oid			was = own_write_relid;

	own_write_relid = relid;
	return was;
}

/*
 * d365_map_own_write_active
 *		Whether the statement now writing relid (the mapped table, or a
 *		partition of it, where a row trigger fires) is d365sync's own write
 *		of the link columns or of incoming values.
 */
bool
d365_map_own_write_active(Oid relid)
{
	List	   *ancestors;
	bool		found;

	if (!OidIsValid(own_write_relid))
		return false;
	if (relid == own_write_relid)
		return true;
	if (!get_rel_relispartition(relid))
		return false;
	ancestors = get_partition_ancestors(relid);
	found = list_member_oid(ancestors, own_write_relid);
	list_free(ancestors);
	return found;
}

/*
 * d365._map_own_write(tbl regclass) -> boolean
 *		d365_map_own_write_active() from SQL.
 */
Datum
d365_map_own_write(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(!PG_ARGISNULL(0) && d365_map_own_write_active(PG_GETARG_OID(0)));
}
