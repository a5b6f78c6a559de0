/*-------------------------------------------------------------------------
 *
 * capture_guard.c
 *	  Where the capture trigger functions may run, who may put them on a
 *	  table, and the DELETE capture.
 *
 * Three of the capture functions are SECURITY DEFINER: the writers of the
 * application's table need no rights in d365, yet their writes must reach
 * d365.contact_change and d365.contact_state.  A trigger function called
 * anywhere else -- on a table of someone's own, without a transition table,
 * under another trigger's name -- would run there with the rights of d365's
 * owner.  So:
 *
 *	 - no role holds EXECUTE on a trigger function of d365
 *	   (sql/install/09_privileges.sql), so nobody but a superuser can name
 *	   one in CREATE TRIGGER;
 *	 - d365._contact_capture_install() creates the capture triggers as the
 *	   owner of schema d365, after checking that its caller owns the
 *	   attached table (the right CREATE TRIGGER itself asks for);
 *	 - each trigger function checks, before doing anything, that it fires
 *	   as d365sync's own trigger -- its name, its timing, level and event,
 *	   and its table: the attached contact table (or a partition of it) --
 *	   and raises otherwise;
 *	 - the DELETE capture reads the deleted keys from the trigger's own
 *	   transition table, handed to it by the executor, never from a name
 *	   that a temporary table or view could answer to.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/partition.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/proc.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/tuplestore.h"

#include "capture.h"
#include "spi_util.h"

PG_FUNCTION_INFO_V1(d365_capture_delete);
PG_FUNCTION_INFO_V1(d365_capture_install);
PG_FUNCTION_INFO_V1(d365_map_capture_install);

/* the attached table, looked up once per transaction */
static Oid	attached_relid = InvalidOid;
static LocalTransactionId attached_lxid = InvalidLocalTransactionId;

/*
 * d365_attached_relid
 *		The OID of the attached contact table, or InvalidOid.  Reads
 *		d365.contact_source: the caller runs with the rights of d365's owner
 *		(a SECURITY DEFINER trigger function).  Cached for the transaction.
 */
Oid
d365_attached_relid(void)
{
	bool		isnull;
	Oid			relid;

	if (attached_lxid == MyProc->lxid && attached_lxid != InvalidLocalTransactionId)
		return attached_relid;
	SPI_connect();
	relid = d365_sql_oid("SELECT s.contact_table::pg_catalog.oid FROM d365.contact_source s",
						 0, NULL, NULL, &isnull);
	SPI_finish();
	attached_relid = isnull ? InvalidOid : relid;
	attached_lxid = MyProc->lxid;
	return attached_relid;
}

/*
 * d365_is_attached_relation
 *		Whether relid is the attached table or one of its partitions.
 */
bool
d365_is_attached_relation(Oid relid, Oid attached)
{
	List	   *ancestors;
	bool		found;

	if (!OidIsValid(attached))
		return false;
	if (relid == attached)
		return true;
	if (!get_rel_relispartition(relid))
		return false;
	ancestors = get_partition_ancestors(relid);
	found = list_member_oid(ancestors, attached);
	list_free(ancestors);
	return found;
}

/*
 * fired_as_own
 *		Whether this trigger function was called by a trigger named tgname,
 *		AFTER, at the level and for the event given (TRIGGER_EVENT_* and row
 *		or not), calling the function being run.  Raises when it was not
 *		called as a trigger at all.
 */
static bool
fired_as_own(FunctionCallInfo fcinfo, const char *fn, const char *tgname,
			 uint32 event, bool row)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("%s must be called as a trigger", fn)));
	return tgname != NULL &&
		strcmp(td->tg_trigger->tgname, tgname) == 0 &&
		TRIGGER_FIRED_AFTER(td->tg_event) &&
		((TRIGGER_FIRED_FOR_ROW(td->tg_event) != 0) == row) &&
		(td->tg_event & TRIGGER_EVENT_OPMASK) == event &&
		td->tg_trigger->tgfoid == fcinfo->flinfo->fn_oid;
}

/*
 * d365_capture_refuse
 *		The error of a capture function run where d365sync did not put it:
 *		on the attached contact table, or on a mapped table (map).
 */
void
d365_capture_refuse(FunctionCallInfo fcinfo, const char *fn, bool map)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("%s cannot run in trigger \"%s\" on %s", fn, td->tg_trigger->tgname,
					RelationGetRelationName(td->tg_relation)),
			 map
			 ? errdetail("d365sync's capture functions run only in the capture triggers that d365sync puts on a mapped table.")
			 : errdetail("d365sync's capture functions run only in the capture triggers that d365sync puts on the attached contact table."),
			 map
			 ? errhint("Map the table with d365.d365_map_table(), which creates them.")
			 : errhint("Attach the table with d365.d365_attach_contacts(), which creates them.")));
}

/*
 * d365_capture_check
 *		Raise unless this trigger function was called by d365sync's own
 *		trigger: called as a trigger, named tgname, AFTER, at the level and
 *		for the event given (TRIGGER_EVENT_* and row or not), calling the
 *		function being run, on the attached table when check_table.
 *		fn names the function in the message.
 */
void
d365_capture_check(FunctionCallInfo fcinfo, const char *fn, const char *tgname,
				   uint32 event, bool row, bool check_table)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	if (!fired_as_own(fcinfo, fn, tgname, event, row) ||
		(check_table &&
		 !d365_is_attached_relation(RelationGetRelid(td->tg_relation), d365_attached_relid())))
		d365_capture_refuse(fcinfo, fn, false);
}

/*
 * d365_map_capture_check
 *		The same for a mapped table's capture function (src/capture/map_capture.c);
 *		the caller checks the table where it runs with d365's rights.
 */
void
d365_map_capture_check(FunctionCallInfo fcinfo, const char *fn, const char *tgname,
					   uint32 event, bool row)
{
	if (!fired_as_own(fcinfo, fn, tgname, event, row))
		d365_capture_refuse(fcinfo, fn, true);
}

/*
 * d365._contact_capture_delete() -> trigger
 *		AFTER DELETE FOR EACH STATEMENT with a transition table, SECURITY
 *		DEFINER: every deleted key becomes a tombstone, after the records
 *		of on_local_delete deactivate/delete were queued
 *		(d365._contact_deleted).  tgargs are the key column's attribute
 *		number and name (d365_capture_key_attnum); a key column gone or of a
 *		type d365sync does not take is
 *		ignored (d365_status() reports the attachment broken).  Reads only
 *		the key of each deleted row, through its built-in output function.
 */
Datum
d365_capture_delete(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	Form_pg_attribute att;
	TupleTableSlot *slot;
	int			attnum;
	Datum	   *keys;
	int			nkeys = 0;
	int			maxkeys = 256;
	bool		key_type_ok;

	d365_capture_check(fcinfo, "d365._contact_capture_delete()", "d365_capture_delete",
					   TRIGGER_EVENT_DELETE, false, true);
	if (td->tg_oldtable == NULL || td->tg_trigger->tgnargs < 1 || td->tg_trigger->tgnargs > 2)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("d365._contact_capture_delete() needs a transition table of the deleted rows and the key column"),
				 errhint("Attach the table again with d365.d365_attach_contacts().")));

	desc = RelationGetDescr(td->tg_relation);
	attnum = d365_capture_key_attnum(td->tg_trigger, desc);
	if (attnum < 1)
		return PointerGetDatum(NULL);
	att = TupleDescAttr(desc, attnum - 1);

	SPI_connect();
	key_type_ok = d365_sql_bool("SELECT $1::pg_catalog.regtype OPERATOR(pg_catalog.=) ANY (d365._key_types())",
								1, (Oid[]) {OIDOID}, (Datum[]) {ObjectIdGetDatum(att->atttypid)}, NULL);
	if (!key_type_ok)
	{
		SPI_finish();
		return PointerGetDatum(NULL);
	}

	keys = palloc(sizeof(Datum) * maxkeys);
	slot = MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
	tuplestore_rescan(td->tg_oldtable);
	while (tuplestore_gettupleslot(td->tg_oldtable, true, false, slot))
	{
		bool		isnull;
		Datum		value = slot_getattr(slot, attnum, &isnull);

		if (isnull)
			continue;
		if (nkeys == maxkeys)
		{
			maxkeys *= 2;
			keys = repalloc_huge(keys, sizeof(Datum) * maxkeys);
		}
		keys[nkeys++] = PointerGetDatum(d365_key_text(value, att->atttypid));
	}
	ExecDropSingleTupleTableSlot(slot);

	if (nkeys > 0)
	{
		ArrayType  *arr = construct_array(keys, nkeys, TEXTOID, -1, false, TYPALIGN_INT);
		int			rc;

		/*
		 * d365._contact_deleted: the records of on_local_delete deactivate
		 * or delete wait, then the tombstones; an installation not yet
		 * updated to a version with it makes the tombstones only
		 */
		rc = SPI_execute("SELECT to_regprocedure('d365._contact_deleted(text[])') IS NOT NULL",
						 true, 1);
		if (rc != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "SPI_execute failed for to_regprocedure: %s", SPI_result_code_string(rc));
		rc = SPI_execute_with_args(strcmp(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1), "t") == 0
								   ? "SELECT d365._contact_deleted($1)"
								   : "SELECT d365._contact_tombstone($1)", 1,
								   (Oid[]) {TEXTARRAYOID}, (Datum[]) {PointerGetDatum(arr)},
								   NULL, false, 0);
		if (rc != SPI_OK_SELECT)
			elog(ERROR, "SPI_execute failed for d365._contact_deleted: %s",
				 SPI_result_code_string(rc));
	}
	SPI_finish();
	return PointerGetDatum(NULL);
}

/* the statements that create the capture triggers, run as d365's owner */
typedef struct InstallCall
{
	Datum		statements;		/* text[] */
} InstallCall;

static void
run_install(void *arg)
{
	InstallCall *call = (InstallCall *) arg;
	Datum	   *stmts;
	bool	   *nulls;
	int			n;
	int			i;

	deconstruct_array(DatumGetArrayTypeP(call->statements), TEXTOID, -1, false,
					  TYPALIGN_INT, &stmts, &nulls, &n);
	for (i = 0; i < n; i++)
	{
		int			rc;

		if (nulls[i])
			continue;
		rc = SPI_execute(TextDatumGetCString(stmts[i]), false, 0);
		if (rc < 0)
			elog(ERROR, "could not create a capture trigger: %s", SPI_result_code_string(rc));
	}
}

/*
 * install_as_d365_owner
 *		Run the CREATE TRIGGER statements (a text[]) on relid as the owner
 *		of schema d365, the only role that may use the trigger functions,
 *		in a security-restricted operation with a safe search_path, once
 *		the caller is found to own relid (or to be a member of its owning
 *		role), as CREATE TRIGGER itself asks.  The statements are d365's
 *		own, never the caller's.  Needs an open SPI connection.
 */
static void
install_as_d365_owner(Oid relid, Datum statements)
{
	InstallCall call;
	HeapTuple	tup;
	Oid			d365_owner;

	if (!pg_class_ownercheck(relid, GetUserId()))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to change the capture triggers of %s",
						DatumGetCString(DirectFunctionCall1(regclassout, ObjectIdGetDatum(relid)))),
				 errdetail("The capture triggers watch the mapped columns, so attaching or mapping the table and changing its map re-create them."),
				 errhint("Do this as the owner of the table, or as a member of its owning role.")));

	tup = SearchSysCache1(NAMESPACEOID, ObjectIdGetDatum(get_namespace_oid("d365", false)));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for schema d365");
	d365_owner = ((Form_pg_namespace) GETSTRUCT(tup))->nspowner;
	ReleaseSysCache(tup);

	call.statements = statements;
	d365_as_owner_restricted(d365_owner, run_install, &call);
}

/*
 * d365._contact_capture_install() -> void
 *		(Re)creates the capture triggers on the attached table.  The
 *		statements come from d365._contact_capture_sql() (d365's own SQL on
 *		the attached table and its field map, never the caller's); they run
 *		as d365's owner (install_as_d365_owner).  Nothing attached, or a
 *		broken attachment: nothing to do.
 */
Datum
d365_capture_install(PG_FUNCTION_ARGS)
{
	Oid			relid;
	bool		isnull;
	Datum		stmts;
	int			rc;

	SPI_connect();
	rc = SPI_execute("SELECT tbl::pg_catalog.oid, statements FROM d365._contact_capture_sql()", true, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "d365._contact_capture_sql() returned no row");
	relid = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (!isnull)
	{
		stmts = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
		if (!isnull)
			install_as_d365_owner(relid, stmts);
	}
	SPI_finish();
	PG_RETURN_VOID();
}

/*
 * d365._map_capture_install(tbl regclass) -> void
 *		(Re)creates the capture triggers of a mapped table: the statements
 *		of d365._map_capture_sql(tbl), run as d365's owner
 *		(install_as_d365_owner).  tbl must be the local table of a map in
 *		d365.table_map.
 */
Datum
d365_map_capture_install(PG_FUNCTION_ARGS)
{
	Oid			relid;
	bool		isnull;
	Datum		stmts;
	Datum		args[1];

	if (PG_ARGISNULL(0))
		PG_RETURN_VOID();
	relid = PG_GETARG_OID(0);
	args[0] = ObjectIdGetDatum(relid);
	SPI_connect();
	if (!d365_sql_bool("SELECT EXISTS (SELECT FROM d365.table_map t"
					   " WHERE t.local_table OPERATOR(pg_catalog.=) $1"
					   " AND t.name OPERATOR(pg_catalog.<>) 'contact')",
					   1, (Oid[]) {REGCLASSOID}, args, NULL))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is not the table of a map",
						DatumGetCString(DirectFunctionCall1(regclassout, ObjectIdGetDatum(relid)))),
				 errhint("d365_map_table() maps a table and creates its capture triggers.")));
	stmts = d365_sql_datum("SELECT d365._map_capture_sql($1)", 1, (Oid[]) {REGCLASSOID}, args,
						   TEXTARRAYOID, &isnull);
	if (!isnull)
		install_as_d365_owner(relid, stmts);
	SPI_finish();
	PG_RETURN_VOID();
}
