/*-------------------------------------------------------------------------
 *
 * spi_util.h
 *	  Typed single-value queries over SPI, and running code as the owner of
 *	  d365sync's tables.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_SPI_UTIL_H
#define D365_SPI_UTIL_H

/*
 * Single-value queries: the first column of the first row.  Each requires
 * an open SPI connection and checks the column's type (an ERROR names the
 * query when it differs).  *isnull is set when the query returned no row or
 * a NULL; passing isnull = NULL makes either an ERROR.
 */
extern Datum d365_sql_datum(const char *query, int nargs, Oid *argtypes,
							Datum *args, Oid type, bool *isnull);
extern char *d365_sql_text(const char *query, int nargs, Oid *argtypes,
						   Datum *args);
extern bool d365_sql_bool(const char *query, int nargs, Oid *argtypes,
						  Datum *args, bool *isnull);
extern Oid	d365_sql_oid(const char *query, int nargs, Oid *argtypes,
						 Datum *args, bool *isnull);
extern int32 d365_sql_int32(const char *query, int nargs, Oid *argtypes,
							Datum *args, bool *isnull);
extern int64 d365_sql_int64(const char *query, int nargs, Oid *argtypes,
							Datum *args, bool *isnull);

/* Running as the owner of d365's tables */
typedef void (*D365OwnerBody) (void *arg);

extern Oid	d365_table_owner(const char *relname);
extern void d365_as_table_owner(Oid owner, D365OwnerBody body, void *arg);
/* the same in a security-restricted operation, with a new GUC nest level and
 * a safe search_path (the way REFRESH MATERIALIZED VIEW runs a view owner's
 * code) */
extern void d365_as_owner_restricted(Oid owner, D365OwnerBody body, void *arg);

#endif							/* D365_SPI_UTIL_H */
