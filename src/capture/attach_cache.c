/*-------------------------------------------------------------------------
 *
 * attach_cache.c
 *	  The check of the contact table's attachment, remembered while the
 *	  catalog says nothing it reads has changed.
 *
 * d365._attachment_problem (sql/install/03_identity.sql) reads the catalog:
 * the table and its kind, its key, score and link columns, each capture
 * trigger (name, function, arguments, enabled) and the link column's unique
 * index.  Every call of d365._contact_source() ran it -- three times per
 * incoming change, a third of the cost of a push.  Here its "nothing is
 * wrong" is remembered for the attachment it was found for (table, key
 * column, score column), and forgotten at the first invalidation that may
 * concern it:
 *
 *	 - a relation cache invalidation of the table, or of all relations: what
 *	   PostgreSQL sends whenever a trigger is created, dropped, enabled,
 *	   disabled or renamed, a column renamed, dropped or retyped, an index
 *	   created, dropped or validated, a rule created (a view in the table's
 *	   place), the table dropped -- and after a lost invalidation queue;
 *	 - any change of pg_proc (the capture functions are named by signature)
 *	   or pg_index.
 *
 * Every check still takes the table's ACCESS SHARE lock (kept to the end of
 * the transaction, as d365._contact_table_problem does), then reads the
 * invalidations other sessions have committed, and only then trusts what it
 * remembers.  A problem is never remembered: a broken attachment is checked
 * again at every call.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/inval.h"
#include "utils/syscache.h"

PG_FUNCTION_INFO_V1(d365_attachment_problem_cached);

/* bumped by every invalidation that may concern the attachment */
static uint64 generation = 1;
static bool callbacks_registered = false;

/* the table whose invalidations count (the one checked last) */
static Oid	watched_table = InvalidOid;

/* the attachment last found whole, and the generation it was found in */
static Oid	ok_table = InvalidOid;
static NameData ok_key;
static NameData ok_score;
static uint64 ok_generation = 0;

static void
relcache_changed(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == watched_table)
		generation++;
}

static void
syscache_changed(Datum arg, int cacheid, uint32 hashvalue)
{
	generation++;
}

/* A text or name field of the contact_source row, as a C string. */
static char *
row_name(HeapTupleHeader row, const char *field, bool *isnull)
{
	Datum		d = GetAttributeByName(row, field, isnull);

	if (*isnull)
		return NULL;
	return pstrdup(NameStr(*DatumGetName(d)));
}

/*
 * d365._attachment_problem_cached(src d365.contact_source) -> text
 *		d365._attachment_problem(src), or NULL without asking it again when
 *		it found this attachment whole and nothing it reads has changed.
 */
Datum
d365_attachment_problem_cached(PG_FUNCTION_ARGS)
{
	HeapTupleHeader row;
	Oid			relid;
	char	   *key;
	char	   *score;
	bool		isnull;
	uint64		before;
	Datum		problem;
	bool		problem_null;
	Oid			argtype;
	Datum		arg = PG_GETARG_DATUM(0);
	MemoryContext caller_cxt = CurrentMemoryContext;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	row = PG_GETARG_HEAPTUPLEHEADER(0);
	relid = DatumGetObjectId(GetAttributeByName(row, "contact_table", &isnull));
	if (isnull)
		relid = InvalidOid;
	key = row_name(row, "key_column", &isnull);
	score = row_name(row, "score_column", &isnull);
	/* (a field NULL: never remembered, the check says what is wrong) */
	if (key == NULL || score == NULL)
		relid = InvalidOid;

	if (!callbacks_registered)
	{
		CacheRegisterRelcacheCallback(relcache_changed, (Datum) 0);
		CacheRegisterSyscacheCallback(PROCOID, syscache_changed, (Datum) 0);
		CacheRegisterSyscacheCallback(INDEXRELID, syscache_changed, (Datum) 0);
		callbacks_registered = true;
	}

	/* the table's lock first, then what other sessions changed */
	if (watched_table != relid)
	{
		watched_table = relid;
		generation++;
	}
	if (OidIsValid(relid) && SearchSysCacheExists1(RELOID, ObjectIdGetDatum(relid)))
		LockRelationOid(relid, AccessShareLock);
	AcceptInvalidationMessages();

	if (OidIsValid(relid) && ok_generation == generation && ok_table == relid &&
		strcmp(NameStr(ok_key), key) == 0 && strcmp(NameStr(ok_score), score) == 0)
		PG_RETURN_NULL();

	before = generation;
	argtype = get_fn_expr_argtype(fcinfo->flinfo, 0);
	if (!OidIsValid(argtype))
		elog(ERROR, "d365._attachment_problem_cached: unknown argument type");
	SPI_connect();
	if (SPI_execute_with_args("SELECT d365._attachment_problem($1)", 1, &argtype,
							  &arg, NULL, true, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "d365._attachment_problem returned nothing");
	problem = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &problem_null);
	if (!problem_null)
	{
		MemoryContext old = MemoryContextSwitchTo(caller_cxt);

		problem = PointerGetDatum(DatumGetTextPCopy(problem));
		MemoryContextSwitchTo(old);
	}
	SPI_finish();

	if (!problem_null)
	{
		ok_generation = 0;
		PG_RETURN_DATUM(problem);
	}
	/* whole -- remembered unless something changed while it was checked */
	if (OidIsValid(relid) && generation == before)
	{
		ok_table = relid;
		namestrcpy(&ok_key, key);
		namestrcpy(&ok_score, score);
		ok_generation = before;
	}
	PG_RETURN_NULL();
}
