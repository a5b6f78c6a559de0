/*-------------------------------------------------------------------------
 *
 * auth.h
 *	  OAuth 2.0 client-credentials tokens, and opening an authenticated
 *	  Dataverse Web API client.
 *
 * Dependency direction: auth.c uses the OData client (odata.h) to send its
 * token request as an anonymous operation; the OData client knows nothing
 * of auth.c and reaches it only through the client's token source, which
 * it never calls for an anonymous operation (see D365TokenSource).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_AUTH_H
#define D365_AUTH_H

#include "odata.h"

extern D365Client *d365_client_open(void);
extern const char *d365_auth_token(D365Client *client, D365Lane *lane,
								   bool refresh, bool missing_ok);
extern void d365_auth_forget(void);

#endif							/* D365_AUTH_H */
