/*-------------------------------------------------------------------------
 *
 * map_capture.c
 *	  Change capture on mapped tables: the contact table's engine
 *	  (capture.c), fired by the triggers of a map.
 *
 * d365._map_capture_sql() (sql/install/11_table_maps.sql) puts on a mapped
 * table, besides the DELETE and TRUNCATE capture and the guard of the link
 * columns:
 *
 *	 d365_map_capture_insert  AFTER INSERT FOR EACH ROW, and
 *	 d365_map_capture_update  AFTER UPDATE FOR EACH ROW WHEN (the key or a
 *		column the map sends IS DISTINCT): d365._map_capture_row() notes
 *		NEW's key, as the writing user -- a conversion of a built-in key
 *		type to text and a copy -- unless d365sync itself is writing the
 *		table (its link columns, values from Dynamics, the rows of an
 *		initial load: nothing to send back).  The executor evaluates the
 *		WHEN clause, so an UPDATE of other columns never calls it.
 *	 d365_map_capture_insert_flush, d365_map_capture_update_flush  AFTER
 *		... FOR EACH STATEMENT: d365._map_capture_flush() (SECURITY DEFINER)
 *		checks that the table is a mapped one and writes the keys noted at
 *		this nest level to d365.map_change, one row per statement (per
 *		65,536 keys), and arms a wake of the background worker at commit.
 *
 * INSERT ... ON CONFLICT DO UPDATE fires both; a row that an UPDATE moves
 * to another partition fires the INSERT row trigger of its new partition
 * and the UPDATE statement trigger of the partitioned table, whose flush
 * writes every key noted at its level.  A statement that names a partition
 * itself fires no statement trigger of the mapped table: its keys are
 * written by the next flush of the same transaction level, if any.
 *
 * Both functions check, before anything else, that they fire as d365sync's
 * own trigger (d365_map_capture_check: name, timing, level, event and
 * function); no role holds EXECUTE on them, so only d365's owner
 * (d365._map_capture_install) can name them in CREATE TRIGGER.  The row
 * function runs as the writer with no rights of d365's; the keys it notes
 * on a table that is no mapped table are dropped by the flush, which
 * reads d365.table_map with d365's rights.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/partition.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"

#include "capture.h"
#include "writers.h"

PG_FUNCTION_INFO_V1(d365_map_capture_row);
PG_FUNCTION_INFO_V1(d365_map_capture_flush);

/* tables looked up this transaction and their maps (NULL: none) */
typedef struct MapOfRel
{
	Oid			relid;
	char	   *map;			/* in TopTransactionContext */
} MapOfRel;

static MapOfRel *map_cache = NULL;	/* in TopTransactionContext */
static int	n_map_cache = 0;
static int	max_map_cache = 0;
static LocalTransactionId map_cache_lxid = InvalidLocalTransactionId;
static bool map_cache_callback = false;
static SPIPlanPtr map_plan = NULL;

/*
 * A change of a table's triggers (d365_map_table, d365_unmap_table, the
 * column map) invalidates its relation cache entry: the next look-up reads
 * d365.table_map again.  The memory stays until the end of the transaction
 * (a caller may hold a name).
 */
static void
map_cache_invalidate(Datum arg, Oid relid)
{
	n_map_cache = 0;
}

/* the map whose local table is relid itself, or NULL; needs SPI */
static char *
map_of_table(Oid relid)
{
	Datum		args[1] = {ObjectIdGetDatum(relid)};
	bool		isnull;
	Datum		name;
	int			rc;

	if (map_plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare("SELECT t.name FROM d365.table_map t"
									" WHERE t.local_table OPERATOR(pg_catalog.=) $1"
									" AND t.name OPERATOR(pg_catalog.<>) 'contact'",
									1, (Oid[]) {REGCLASSOID});

		if (p == NULL || SPI_keepplan(p) != 0)
			elog(ERROR, "could not prepare the look-up of a mapped table: %s",
				 SPI_result_code_string(SPI_result));
		map_plan = p;
	}
	rc = SPI_execute_plan(map_plan, args, NULL, true, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "the look-up of a mapped table failed: %s", SPI_result_code_string(rc));
	if (SPI_processed == 0)
		return NULL;
	name = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? NULL : MemoryContextStrdup(TopTransactionContext, TextDatumGetCString(name));
}

/*
 * d365_map_of_relid
 *		The name of the map whose table is relid, or a table relid is a
 *		partition of; NULL for none.  Reads d365.table_map: the caller holds
 *		the rights of d365's owner.  Remembered for the transaction, until
 *		a relation cache invalidation; the name lives as long as the
 *		transaction.
 */
const char *
d365_map_of_relid(Oid relid)
{
	char	   *name;
	int			i;

	if (!map_cache_callback)
	{
		CacheRegisterRelcacheCallback(map_cache_invalidate, (Datum) 0);
		map_cache_callback = true;
	}
	if (map_cache_lxid != MyProc->lxid || map_cache_lxid == InvalidLocalTransactionId)
	{
		map_cache = NULL;		/* went with the last transaction's memory */
		n_map_cache = max_map_cache = 0;
		map_cache_lxid = MyProc->lxid;
	}
	for (i = 0; i < n_map_cache; i++)
		if (map_cache[i].relid == relid)
			return map_cache[i].map;

	SPI_connect();
	name = map_of_table(relid);
	if (name == NULL && get_rel_relispartition(relid))
	{
		List	   *ancestors = get_partition_ancestors(relid);
		ListCell   *lc;

		foreach(lc, ancestors)
		{
			if ((name = map_of_table(lfirst_oid(lc))) != NULL)
				break;
		}
		list_free(ancestors);
	}
	SPI_finish();

	if (n_map_cache == max_map_cache)
	{
		int			new_max = max_map_cache == 0 ? 8 : max_map_cache * 2;
		MapOfRel   *grown = MemoryContextAlloc(TopTransactionContext, sizeof(MapOfRel) * new_max);

		if (n_map_cache > 0)
			memcpy(grown, map_cache, sizeof(MapOfRel) * n_map_cache);
		map_cache = grown;
		max_map_cache = new_max;
	}
	map_cache[n_map_cache].relid = relid;
	map_cache[n_map_cache].map = name;
	n_map_cache++;
	return name;
}

/*
 * d365._map_capture_row() -> trigger
 *		AFTER INSERT (d365_map_capture_insert) or AFTER UPDATE behind the
 *		WHEN clause (d365_map_capture_update), per row: notes NEW's key
 *		(capture.c).  tgargs: the key column's attribute number and name
 *		(d365_capture_key_attnum).  Runs as the writing user; the table is
 *		checked when the keys are written, with the rights of d365's owner.
 */
Datum
d365_map_capture_row(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	bool		insert = CALLED_AS_TRIGGER(fcinfo) && TRIGGER_FIRED_BY_INSERT(td->tg_event);
	TupleDesc	desc;
	int			attnum;
	Datum		value;
	bool		isnull;
	text	   *key;
	MemoryContext oldcxt;

	d365_map_capture_check(fcinfo, "d365._map_capture_row()",
						   insert ? "d365_map_capture_insert" : "d365_map_capture_update",
						   insert ? TRIGGER_EVENT_INSERT : TRIGGER_EVENT_UPDATE, true);
	if (td->tg_trigger->tgnargs < 1 || td->tg_trigger->tgnargs > 2)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("d365._map_capture_row() must be an AFTER row trigger with one or two arguments")));
	/* d365sync's own write: nothing to send back */
	if (d365_map_own_write_active(RelationGetRelid(td->tg_relation)))
		return PointerGetDatum(NULL);

	desc = RelationGetDescr(td->tg_relation);
	attnum = d365_capture_key_attnum(td->tg_trigger, desc);
	if (attnum < 1)
		return PointerGetDatum(NULL);	/* broken map: d365_sync() reports it */
	value = heap_getattr(insert ? td->tg_trigtuple : td->tg_newtuple, attnum, desc, &isnull);
	if (isnull)
		return PointerGetDatum(NULL);
	oldcxt = MemoryContextSwitchTo(TopTransactionContext);
	key = d365_key_text(value, TupleDescAttr(desc, attnum - 1)->atttypid);
	MemoryContextSwitchTo(oldcxt);
	d365_capture_note(RelationGetRelid(td->tg_relation), key, NULL);
	return PointerGetDatum(NULL);
}

/*
 * d365._map_capture_flush() -> trigger
 *		AFTER INSERT (d365_map_capture_insert_flush) or AFTER UPDATE
 *		(d365_map_capture_update_flush) FOR EACH STATEMENT, SECURITY
 *		DEFINER, on a mapped table only: writes and forgets the keys noted
 *		at this nest level.  Runs only d365's own SQL, on text arrays.
 */
Datum
d365_map_capture_flush(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	bool		insert = CALLED_AS_TRIGGER(fcinfo) && TRIGGER_FIRED_BY_INSERT(td->tg_event);

	d365_map_capture_check(fcinfo, "d365._map_capture_flush()",
						   insert ? "d365_map_capture_insert_flush" : "d365_map_capture_update_flush",
						   insert ? TRIGGER_EVENT_INSERT : TRIGGER_EVENT_UPDATE, false);
	if (d365_map_of_relid(RelationGetRelid(td->tg_relation)) == NULL)
		d365_capture_refuse(fcinfo, "d365._map_capture_flush()", true);
	d365_capture_flush_noted();
	return PointerGetDatum(NULL);
}
