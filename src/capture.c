/*-------------------------------------------------------------------------
 *
 * capture.c
 *	  Change capture on the attached contact table, cheap enough to leave on.
 *
 * d365sync must learn which contacts changed a mapped column, without
 * making the application's writes slow and without running anything the
 * table's owner controls with d365sync's rights.  The UPDATE capture is two
 * triggers (created by d365._contact_capture_install(), see
 * sql/install/03_contact_source.sql):
 *
 *	 d365_capture_update  AFTER UPDATE FOR EACH ROW WHEN (the key or a mapped
 *		column IS DISTINCT): the executor evaluates the WHEN clause as the
 *		writing user, so an UPDATE of other columns never calls us.  Then
 *		d365_capture_row() notes the row's key: a conversion of a built-in
 *		key type to text and a copy, nothing else.
 *	 d365_capture_update_flush, d365_capture_insert_flush  AFTER ... FOR EACH
 *		STATEMENT: d365_capture_flush() (SECURITY DEFINER) appends the keys
 *		the statement noted to d365.contact_change in one INSERT, and hands
 *		key changes to d365._contact_keys_moved().
 *
 * The row function reads only the key column, by the attribute number given
 * as the trigger's argument: renaming the column changes nothing here.  A
 * key column that is gone or of another type is ignored (the application's
 * write goes on; d365_status() reports the attachment broken).
 *
 * Noted keys live in TopTransactionContext, tagged with the transaction
 * nest level that noted them.  A flush takes only the keys of its own level
 * (a statement in a subtransaction must not write the enclosing statement's
 * keys where a rollback of the subtransaction would lose them).  Committing
 * a subtransaction hands its keys to the parent level, aborting it forgets
 * them, and the end of the transaction forgets everything.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "worker.h"

PG_FUNCTION_INFO_V1(d365_capture_row);
PG_FUNCTION_INFO_V1(d365_capture_flush);

/* one noted row: its key, and the key it had before when the key changed */
typedef struct NotedKey
{
	int			level;			/* transaction nest level that noted it */
	text	   *key;
	text	   *old_key;		/* NULL unless the key changed */
} NotedKey;

static NotedKey *noted = NULL;	/* in TopTransactionContext */
static int	n_noted = 0;
static int	max_noted = 0;
static bool callbacks_registered = false;

static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr moved_plan = NULL;

/*
 * capture_xact_callback / capture_subxact_callback
 *		Forget keys at the end of the transaction (their memory goes with
 *		TopTransactionContext); move a committed subtransaction's keys to its
 *		parent; drop an aborted one's.
 */
static void
capture_xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
	{
		noted = NULL;
		n_noted = 0;
		max_noted = 0;
	}
}

static void
capture_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						 SubTransactionId parentSubid, void *arg)
{
	int			level = GetCurrentTransactionNestLevel();
	int			i,
				kept = 0;

	if (event != SUBXACT_EVENT_COMMIT_SUB && event != SUBXACT_EVENT_ABORT_SUB)
		return;
	for (i = 0; i < n_noted; i++)
	{
		if (noted[i].level >= level)
		{
			if (event == SUBXACT_EVENT_ABORT_SUB)
				continue;
			noted[i].level = level - 1;
		}
		noted[kept++] = noted[i];
	}
	n_noted = kept;
}

/*
 * key_text
 *		The text form of a key of one of the types attach allows (the same
 *		text as key::text in SQL), or NULL for another type.  The output
 *		functions of these types are built in.
 */
static text *
key_text(Datum value, Oid typid)
{
	switch (typid)
	{
		case INT2OID:
			return cstring_to_text(DatumGetCString(DirectFunctionCall1(int2out, value)));
		case INT4OID:
			return cstring_to_text(DatumGetCString(DirectFunctionCall1(int4out, value)));
		case INT8OID:
			return cstring_to_text(DatumGetCString(DirectFunctionCall1(int8out, value)));
		case UUIDOID:
			return cstring_to_text(DatumGetCString(DirectFunctionCall1(uuid_out, value)));
		case TEXTOID:
		case VARCHAROID:
			return DatumGetTextPCopy(value);
		default:
			return NULL;
	}
}

/*
 * note_key
 *		Remember one key (and the one it replaced) at the current level.
 *		Allocates in TopTransactionContext; errors only on out-of-memory.
 */
static void
note_key(text *key, text *old_key)
{
	if (!callbacks_registered)
	{
		RegisterXactCallback(capture_xact_callback, NULL);
		RegisterSubXactCallback(capture_subxact_callback, NULL);
		callbacks_registered = true;
	}
	if (n_noted == max_noted)
	{
		int			new_max = max_noted == 0 ? 1024 : max_noted * 2;

		if (noted == NULL)
			noted = MemoryContextAlloc(TopTransactionContext, new_max * sizeof(NotedKey));
		else
			noted = repalloc_huge(noted, (Size) new_max * sizeof(NotedKey));
		max_noted = new_max;
	}
	noted[n_noted].level = GetCurrentTransactionNestLevel();
	noted[n_noted].key = key;
	noted[n_noted].old_key = old_key;
	n_noted++;
}

/*
 * d365._contact_capture_row() -> trigger
 *		AFTER UPDATE FOR EACH ROW (behind the WHEN clause): notes NEW's key,
 *		and OLD's when the key changed.  tgargs[0] is the key column's
 *		attribute number.  Runs as the writing user and runs no SQL.
 */
Datum
d365_capture_row(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	tupdesc;
	Form_pg_attribute att;
	int			attnum;
	Datum		value;
	bool		isnull;
	text	   *new_key;
	text	   *old_key;
	MemoryContext oldcxt;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ||
		trigdata->tg_trigger->tgnargs != 1)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("d365._contact_capture_row() must be an AFTER UPDATE row trigger with one argument")));

	tupdesc = RelationGetDescr(trigdata->tg_relation);
	attnum = atoi(trigdata->tg_trigger->tgargs[0]);
	if (attnum < 1 || attnum > tupdesc->natts)
		return PointerGetDatum(NULL);
	att = TupleDescAttr(tupdesc, attnum - 1);
	if (att->attisdropped)
		return PointerGetDatum(NULL);

	oldcxt = MemoryContextSwitchTo(TopTransactionContext);
	value = heap_getattr(trigdata->tg_newtuple, attnum, tupdesc, &isnull);
	new_key = isnull ? NULL : key_text(value, att->atttypid);
	value = heap_getattr(trigdata->tg_trigtuple, attnum, tupdesc, &isnull);
	old_key = isnull ? NULL : key_text(value, att->atttypid);
	MemoryContextSwitchTo(oldcxt);

	if (new_key == NULL && old_key == NULL)
		return PointerGetDatum(NULL);
	if (old_key != NULL && new_key != NULL &&
		VARSIZE_ANY_EXHDR(old_key) == VARSIZE_ANY_EXHDR(new_key) &&
		memcmp(VARDATA_ANY(old_key), VARDATA_ANY(new_key), VARSIZE_ANY_EXHDR(new_key)) == 0)
	{
		pfree(old_key);
		old_key = NULL;
	}
	/* old_key set: the key changed (to new_key, or to NULL) */
	note_key(new_key, old_key);
	return PointerGetDatum(NULL);
}

/*
 * keys_array
 *		The noted keys of nest level >= level as a text[]: the new keys
 *		(moved = false) or the pairs' old and new keys (moved = true, into
 *		*news too).  NULL when there is none.
 */
static ArrayType *
keys_array(int level, bool moved, ArrayType **news)
{
	Datum	   *keys = palloc(sizeof(Datum) * Max(n_noted, 1));
	Datum	   *to = palloc(sizeof(Datum) * Max(n_noted, 1));
	int			n = 0;
	int			i;

	for (i = 0; i < n_noted; i++)
	{
		if (noted[i].level < level)
			continue;
		if (moved && noted[i].old_key != NULL)
		{
			keys[n] = PointerGetDatum(noted[i].old_key);
			to[n++] = noted[i].key ? PointerGetDatum(noted[i].key) : (Datum) 0;
		}
		else if (!moved && noted[i].key != NULL)
			keys[n++] = PointerGetDatum(noted[i].key);
	}
	if (n == 0)
		return NULL;
	if (moved)
	{
		bool	   *nulls = palloc0(sizeof(bool) * n);

		for (i = 0; i < n; i++)
			nulls[i] = (to[i] == (Datum) 0);
		*news = construct_md_array(to, nulls, 1, &n, (int[]) {1}, TEXTOID, -1, false, TYPALIGN_INT);
	}
	return construct_array(keys, n, TEXTOID, -1, false, TYPALIGN_INT);
}

/*
 * run_plan
 *		Executes a saved plan (prepared on first use) with array arguments.
 */
static void
run_plan(SPIPlanPtr *plan, const char *sql, int nargs, Datum *args)
{
	Oid			types[2] = {TEXTARRAYOID, TEXTARRAYOID};
	int			rc;

	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(sql, nargs, types);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s", sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(p) != 0)
			elog(ERROR, "SPI_keepplan failed");
		*plan = p;
	}
	rc = SPI_execute_plan(*plan, args, NULL, false, 0);
	if (rc < 0)
		elog(ERROR, "SPI_execute_plan failed for \"%s\": %s", sql, SPI_result_code_string(rc));
}

/*
 * d365._contact_capture_flush() -> trigger
 *		AFTER INSERT or UPDATE FOR EACH STATEMENT, SECURITY DEFINER: writes
 *		the keys noted at this nest level -- key changes through
 *		d365._contact_keys_moved(), changed keys into d365.contact_change --
 *		and forgets them.  Runs only d365's own SQL, on text arrays.
 */
Datum
d365_capture_flush(PG_FUNCTION_ARGS)
{
	int			level = GetCurrentTransactionNestLevel();
	ArrayType  *news = NULL;
	ArrayType  *olds;
	ArrayType  *changed;
	int			i,
				kept = 0;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("d365._contact_capture_flush() must be called as a trigger")));
	/*
	 * New rows are found by the contact job's work query, not through the
	 * queue: an INSERT wakes the background worker (with realtime on) at
	 * commit all the same.
	 */
	if (TRIGGER_FIRED_BY_INSERT(((TriggerData *) fcinfo->context)->tg_event))
		d365_worker_wake_at_commit(false);
	if (n_noted == 0)
		return PointerGetDatum(NULL);

	olds = keys_array(level, true, &news);
	changed = keys_array(level, false, NULL);
	if (olds != NULL || changed != NULL)
	{
		SPI_connect();
		if (olds != NULL)
		{
			Datum		args[2] = {PointerGetDatum(olds), PointerGetDatum(news)};

			run_plan(&moved_plan, "SELECT d365._contact_keys_moved($1, $2)", 2, args);
		}
		if (changed != NULL)
		{
			Datum		args[1] = {PointerGetDatum(changed)};

			run_plan(&insert_plan,
					 "INSERT INTO d365.contact_change (contact_key) SELECT unnest($1)",
					 1, args);
		}
		SPI_finish();
		/* with realtime on, the background worker sends them at commit */
		d365_worker_wake_at_commit(false);
	}

	for (i = 0; i < n_noted; i++)
		if (noted[i].level < level)
			noted[kept++] = noted[i];
	n_noted = kept;
	return PointerGetDatum(NULL);
}
