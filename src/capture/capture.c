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
 *		the statement noted to d365.contact_change as one row (a text[] of
 *		up to FLUSH_CHUNK keys), and hands key changes to
 *		d365._contact_keys_moved().  A statement that changes more rows than
 *		that is flushed from the row trigger every FLUSH_CHUNK keys, as the
 *		extension's owner, so memory stays bounded.
 *
 * The row function reads only the key column, by the attribute number given
 * as the trigger's argument: renaming the column changes nothing here.  A
 * key column that is gone or of another type is ignored (the application's
 * write goes on; d365_status() reports the attachment broken).
 *
 * Mapped tables use the same engine (src/capture/map_capture.c): their row
 * triggers note keys here, tagged with the table, and their statement
 * triggers flush them.  A flush writes every key noted at its level to the
 * queue of the table that noted it -- d365.contact_change for the attached
 * table, d365.map_change under the map's name for a mapped one -- whichever
 * trigger runs it, and forgets keys that a trigger on any other table
 * noted.
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

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"
#include "utils/syscache.h"

#include "capture.h"
#include "spi_util.h"
#include "worker_shmem.h"
#include "job_role.h"

PG_FUNCTION_INFO_V1(d365_capture_row);
PG_FUNCTION_INFO_V1(d365_capture_flush);

/* one noted row: its key, and the key it had before when the key changed */
typedef struct NotedKey
{
	int			level;			/* transaction nest level that noted it */
	Oid			relid;			/* the table whose trigger noted it */
	text	   *key;
	text	   *old_key;		/* NULL unless the key changed */
} NotedKey;

static NotedKey *noted = NULL;	/* in TopTransactionContext */
static int	n_noted = 0;
static int	max_noted = 0;
static bool callbacks_registered = false;

/* keys per row of d365.contact_change, and per flush from the row trigger */
#define FLUSH_CHUNK 65536

static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr map_insert_plan = NULL;
static SPIPlanPtr moved_plan = NULL;

static int	first_at_level(int level);
static void flush_as_owner(int level);

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
 * d365_key_text
 *		The text form of a key (the same text as key::text in SQL), through
 *		its type's output function.  Attach accepts only key types whose
 *		output function is built in (d365._key_types()), and the capture
 *		trigger's WHEN clause keeps the key column's type from changing while
 *		the table is attached; the row function runs as the writing user
 *		anyway.  The function is looked up once per type.
 */
text *
d365_key_text(Datum value, Oid typid)
{
	static Oid	cached_type = InvalidOid;
	static FmgrInfo cached_out;

	if (typid != cached_type)
	{
		Oid			outfunc;
		bool		isvarlena;

		getTypeOutputInfo(typid, &outfunc, &isvarlena);
		fmgr_info_cxt(outfunc, &cached_out, TopMemoryContext);
		cached_type = typid;
	}
	{
		char	   *str = OutputFunctionCall(&cached_out, value);
		text	   *result = cstring_to_text(str);

		pfree(str);
		return result;
	}
}

/*
 * note_key
 *		Remember one key (and the one it replaced) at the current level.
 *		Allocates in TopTransactionContext; errors only on out-of-memory.
 */
static void
note_key(Oid relid, text *key, text *old_key)
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
	noted[n_noted].relid = relid;
	noted[n_noted].key = key;
	noted[n_noted].old_key = old_key;
	n_noted++;
}

/*
 * d365_capture_key_attnum
 *		The key column a capture trigger watches: its arguments are the
 *		key's attribute number and (since 0.3) its name.  A table rebuilt
 *		by a restore numbers its columns afresh (dropped columns are not
 *		recreated), so where the name is given and a column has it, that
 *		column is the key; otherwise (the key column renamed) the number
 *		is.  The same rule as d365._capture_key_attnum() and
 *		d365._attachment_problem().  0 when neither names a live column.
 */
int
d365_capture_key_attnum(Trigger *trigger, TupleDesc tupdesc)
{
	int			attnum = atoi(trigger->tgargs[0]);
	int			i;

	if (trigger->tgnargs > 1)
	{
		if (attnum >= 1 && attnum <= tupdesc->natts &&
			!TupleDescAttr(tupdesc, attnum - 1)->attisdropped &&
			strcmp(NameStr(TupleDescAttr(tupdesc, attnum - 1)->attname), trigger->tgargs[1]) == 0)
			return attnum;
		for (i = 0; i < tupdesc->natts; i++)
		{
			Form_pg_attribute a = TupleDescAttr(tupdesc, i);

			if (!a->attisdropped && strcmp(NameStr(a->attname), trigger->tgargs[1]) == 0)
				return i + 1;
		}
	}
	if (attnum < 1 || attnum > tupdesc->natts || TupleDescAttr(tupdesc, attnum - 1)->attisdropped)
		return 0;
	return attnum;
}

/*
 * d365._contact_capture_row() -> trigger
 *		AFTER UPDATE FOR EACH ROW (behind the WHEN clause): notes NEW's key,
 *		and OLD's when the key changed.  tgargs[0] is the key column's
 *		attribute number, tgargs[1] (when given) its name: see
 *		d365_capture_key_attnum.  Runs as the writing user; runs d365's SQL only
 *		every FLUSH_CHUNK keys (flush_as_owner).
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

	/*
	 * Only as d365sync's own trigger (its name, AFTER UPDATE, per row).  The
	 * table is checked when the keys are written (flush_level), which runs
	 * with the rights of d365's owner: this function runs as the writer.
	 */
	d365_capture_check(fcinfo, "d365._contact_capture_row()", "d365_capture_update",
					   TRIGGER_EVENT_UPDATE, true, false);
	if (trigdata->tg_trigger->tgnargs < 1 || trigdata->tg_trigger->tgnargs > 2)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("d365._contact_capture_row() must be an AFTER UPDATE row trigger with one or two arguments")));

	tupdesc = RelationGetDescr(trigdata->tg_relation);
	attnum = d365_capture_key_attnum(trigdata->tg_trigger, tupdesc);
	if (attnum < 1)
		return PointerGetDatum(NULL);
	att = TupleDescAttr(tupdesc, attnum - 1);

	oldcxt = MemoryContextSwitchTo(TopTransactionContext);
	value = heap_getattr(trigdata->tg_newtuple, attnum, tupdesc, &isnull);
	new_key = isnull ? NULL : d365_key_text(value, att->atttypid);
	value = heap_getattr(trigdata->tg_trigtuple, attnum, tupdesc, &isnull);
	old_key = isnull ? NULL : d365_key_text(value, att->atttypid);
	MemoryContextSwitchTo(oldcxt);

	if (old_key != NULL && new_key != NULL &&
		VARSIZE_ANY_EXHDR(old_key) == VARSIZE_ANY_EXHDR(new_key) &&
		memcmp(VARDATA_ANY(old_key), VARDATA_ANY(new_key), VARSIZE_ANY_EXHDR(new_key)) == 0)
	{
		pfree(old_key);
		old_key = NULL;
	}
	/* old_key set: the key changed (to new_key, or to NULL) */
	d365_capture_note(RelationGetRelid(trigdata->tg_relation), new_key, old_key);
	return PointerGetDatum(NULL);
}

/*
 * d365_capture_note
 *		Note a key (and the key it replaced, or NULL) that a row trigger on
 *		relid saw change, both allocated in TopTransactionContext (NULL
 *		both: nothing).  Every FLUSH_CHUNK keys of one statement are
 *		written at once, as the extension's owner, so that memory stays
 *		bounded however many rows a statement changes.
 */
void
d365_capture_note(Oid relid, text *key, text *old_key)
{
	if (key == NULL && old_key == NULL)
		return;
	note_key(relid, key, old_key);
	if (n_noted % FLUSH_CHUNK == 0 &&
		n_noted - first_at_level(GetCurrentTransactionNestLevel()) >= FLUSH_CHUNK)
		flush_as_owner(GetCurrentTransactionNestLevel());
}

/*
 * first_at_level
 *		Index of the first noted key of nest level >= level.  The array is
 *		ordered by level: a key is noted at the current level, and a
 *		subtransaction's keys are relabelled or dropped when it ends.
 */
static int
first_at_level(int level)
{
	int			i = n_noted;

	while (i > 0 && noted[i - 1].level >= level)
		i--;
	return i;
}

/*
 * text_array
 *		A text[] of n datums (NULL pointers become NULL elements).
 */
static ArrayType *
text_array(Datum *items, int n)
{
	bool	   *nulls = palloc0(sizeof(bool) * n);
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int			i;

	for (i = 0; i < n; i++)
		nulls[i] = (items[i] == (Datum) 0);
	return construct_md_array(items, nulls, 1, dims, lbs, TEXTOID, -1, false, TYPALIGN_INT);
}

/*
 * run_plan
 *		Executes a saved plan (prepared on first use) with text[] arguments.
 *		The SQL names only d365's own objects, schema-qualified.
 */
static void
run_plan(SPIPlanPtr *plan, const char *sql, int nargs, Datum *args)
{
	Oid			types[2] = {nargs == 2 && plan == &map_insert_plan ? TEXTOID : TEXTARRAYOID,
	TEXTARRAYOID};
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
 * insert_direct
 *		Appends one row to d365.<relname> with a plain heap insert, which
 *		costs a single-row statement far less than an INSERT through SPI:
 *		(keys, now()) to contact_change, (map, keys, now()) to map_change
 *		(map not NULL).  Only while the table is as the extension made it --
 *		a heap with exactly those columns of those types, no index,
 *		trigger, rule or row security -- so that nothing the executor would
 *		do is skipped; returns false otherwise, and the caller inserts
 *		through SPI.
 */
static bool
insert_direct(const char *relname, const char *map, Datum keys)
{
	Oid			relid = get_relname_relid(relname, get_namespace_oid("d365", false));
	int			natts = map != NULL ? 3 : 2;
	Oid			types[3] = {TEXTOID, TEXTARRAYOID, TIMESTAMPTZOID};
	Oid		   *want = map != NULL ? types : types + 1;
	Relation	rel;
	TupleDesc	desc;
	bool		plain;
	int			i;

	if (!OidIsValid(relid))
		return false;
	rel = table_open(relid, RowExclusiveLock);
	desc = RelationGetDescr(rel);
	plain = rel->rd_rel->relkind == RELKIND_RELATION &&
		rel->rd_rel->relam == HEAP_TABLE_AM_OID &&
		!rel->rd_rel->relhasindex && !rel->rd_rel->relhastriggers &&
		!rel->rd_rel->relhasrules && !rel->rd_rel->relrowsecurity &&
		desc->natts == natts;
	for (i = 0; plain && i < natts; i++)
		plain = !TupleDescAttr(desc, i)->attisdropped &&
			TupleDescAttr(desc, i)->atttypid == want[i];
	if (plain)
	{
		Datum		values[3];
		bool		nulls[3] = {false, false, false};
		HeapTuple	tuple;

		i = 0;
		if (map != NULL)
			values[i++] = CStringGetTextDatum(map);
		values[i++] = keys;
		values[i] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
		tuple = heap_form_tuple(desc, values, nulls);
		simple_heap_insert(rel, tuple);
		heap_freetuple(tuple);
	}
	table_close(rel, RowExclusiveLock);
	return plain;
}

/* where a table's noted keys go: its map's name, or NULL for the contact table */
typedef struct KeyTarget
{
	Oid			relid;
	bool		contact;		/* the attached table or a partition of it */
	const char *map;			/* else the map of relid, or NULL: none */
} KeyTarget;

/*
 * key_target
 *		The target of the keys noted on relid, looked up once per flush
 *		(targets holds those seen so far, *n of them).
 */
static KeyTarget *
key_target(KeyTarget *targets, int *n, Oid relid, Oid attached)
{
	int			i;

	for (i = 0; i < *n; i++)
		if (targets[i].relid == relid)
			return &targets[i];
	targets[*n].relid = relid;
	targets[*n].contact = relid == attached || d365_is_attached_relation(relid, attached);
	targets[*n].map = targets[*n].contact ? NULL : d365_map_of_relid(relid);
	return &targets[(*n)++];
}

/*
 * write_keys
 *		Appends keys (a text[]) to d365.contact_change (map NULL) or to
 *		d365.map_change under map's name.  Needs an SPI connection.
 */
static void
write_keys(const char *map, Datum keys)
{
	if (map == NULL)
	{
		if (!insert_direct("contact_change", NULL, keys))
			run_plan(&insert_plan, "INSERT INTO d365.contact_change (keys) VALUES ($1)", 1, &keys);
	}
	else if (!insert_direct("map_change", map, keys))
	{
		Datum		args[2] = {CStringGetTextDatum(map), keys};

		run_plan(&map_insert_plan, "INSERT INTO d365.map_change (map, keys) VALUES ($1, $2)", 2, args);
	}
}

/*
 * flush_level
 *		Writes the keys noted at nest level >= level and forgets them: those
 *		of the attached table as key changes through
 *		d365._contact_keys_moved() and changed keys into d365.contact_change,
 *		those of a mapped table into d365.map_change under its map's name
 *		(the keys only: a map's state follows its key through the row's
 *		link), one row per FLUSH_CHUNK keys of a table.  Keys that a trigger
 *		on any other table noted are forgotten unwritten.  The caller holds
 *		the rights of d365's owner.
 */
static void
flush_level(int level)
{
	Oid			attached;
	int			first = first_at_level(level);
	int			n = n_noted - first;
	Datum	   *olds;
	Datum	   *news;
	Datum	   *keys;
	KeyTarget  *targets;
	KeyTarget **target_of;
	int			n_targets = 0;
	int			n_moved = 0;
	int			n_written = 0;
	int			t,
				i;

	if (n <= 0)
		return;
	attached = d365_attached_relid();
	olds = palloc(sizeof(Datum) * n);
	news = palloc(sizeof(Datum) * n);
	keys = palloc(sizeof(Datum) * Min(n, FLUSH_CHUNK));
	targets = palloc(sizeof(KeyTarget) * n);
	target_of = palloc(sizeof(KeyTarget *) * n);
	SPI_connect();
	for (i = first; i < n_noted; i++)
	{
		KeyTarget  *kt = NULL;

		/* consecutive keys are mostly of one table */
		if (i > first && noted[i].relid == noted[i - 1].relid)
			kt = target_of[i - first - 1];
		else
			kt = key_target(targets, &n_targets, noted[i].relid, attached);
		target_of[i - first] = kt;
		if (kt->contact && noted[i].old_key != NULL)
		{
			olds[n_moved] = PointerGetDatum(noted[i].old_key);
			news[n_moved++] = PointerGetDatum(noted[i].key);
		}
	}
	if (n_moved > 0)
	{
		Datum		args[2] = {PointerGetDatum(text_array(olds, n_moved)),
		PointerGetDatum(text_array(news, n_moved))};

		run_plan(&moved_plan, "SELECT d365._contact_keys_moved($1, $2)", 2, args);
	}
	/* each target's keys, in the order noted */
	for (t = 0; t < n_targets; t++)
	{
		KeyTarget  *kt = &targets[t];
		int			n_keys = 0;

		if (!kt->contact && kt->map == NULL)
			continue;
		for (i = first; i <= n_noted; i++)
		{
			if (n_keys == FLUSH_CHUNK || (i == n_noted && n_keys > 0))
			{
				write_keys(kt->contact ? NULL : kt->map, PointerGetDatum(text_array(keys, n_keys)));
				n_written += n_keys;
				n_keys = 0;
			}
			if (i < n_noted && target_of[i - first] == kt && noted[i].key != NULL)
				keys[n_keys++] = PointerGetDatum(noted[i].key);
		}
	}
	SPI_finish();
	for (i = first; i < n_noted; i++)
	{
		if (noted[i].key != NULL)
			pfree(noted[i].key);
		if (noted[i].old_key != NULL)
			pfree(noted[i].old_key);
	}
	n_noted = first;
	/* with realtime on, the background worker sends them at commit */
	if (n_written > 0 || n_moved > 0)
		d365_worker_wake_at_commit(false);
}

/*
 * flush_as_owner
 *		flush_level() from the row trigger, which runs as the writing user:
 *		as the owner of schema d365 (the extension's owner), in a
 *		security-restricted operation.  Used when a statement has noted
 *		FLUSH_CHUNK keys, so that memory stays bounded however many rows it
 *		changes.
 */
static void
flush_level_body(void *arg)
{
	flush_level(*(int *) arg);
}

static void
flush_as_owner(int level)
{
	Oid			owner;
	HeapTuple	tup;

	/* the job role (no superuser), or d365's owner before it has its rights */
	owner = d365_job_role();
	if (!OidIsValid(owner))
	{
		tup = SearchSysCache1(NAMESPACEOID, ObjectIdGetDatum(get_namespace_oid("d365", false)));
		if (!HeapTupleIsValid(tup))
			elog(ERROR, "cache lookup failed for schema d365");
		owner = ((Form_pg_namespace) GETSTRUCT(tup))->nspowner;
		ReleaseSysCache(tup);
	}
	d365_as_table_owner(owner, flush_level_body, &level);
}

/*
 * d365._contact_capture_flush() -> trigger
 *		AFTER INSERT or UPDATE FOR EACH STATEMENT, SECURITY DEFINER: writes
 *		and forgets the keys noted at this nest level.  Runs only d365's own
 *		SQL, on text arrays.
 */
Datum
d365_capture_flush(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	bool		insert = CALLED_AS_TRIGGER(fcinfo) && TRIGGER_FIRED_BY_INSERT(td->tg_event);

	/* only as d365sync's own statement triggers of the attached table */
	d365_capture_check(fcinfo, "d365._contact_capture_flush()",
					   insert ? "d365_capture_insert_flush" : "d365_capture_update_flush",
					   insert ? TRIGGER_EVENT_INSERT : TRIGGER_EVENT_UPDATE, false, true);
	/*
	 * New rows are found by the contact job's work query, not through the
	 * queue: an INSERT wakes the background worker (with realtime on) at
	 * commit all the same.
	 */
	if (TRIGGER_FIRED_BY_INSERT(((TriggerData *) fcinfo->context)->tg_event))
		d365_worker_wake_at_commit(false);
	if (n_noted > 0)
		flush_level(GetCurrentTransactionNestLevel());
	return PointerGetDatum(NULL);
}

/*
 * d365_capture_flush_noted
 *		Writes and forgets the keys noted at the current nest level, from a
 *		statement trigger that holds the rights of d365's owner
 *		(d365._map_capture_flush(), src/capture/map_capture.c).
 */
void
d365_capture_flush_noted(void)
{
	if (n_noted > 0)
		flush_level(GetCurrentTransactionNestLevel());
}
