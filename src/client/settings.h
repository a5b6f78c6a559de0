/*-------------------------------------------------------------------------
 *
 * settings.h
 *	  The settings row (d365.settings) and the rules it must satisfy.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365_SETTINGS_H
#define D365_SETTINGS_H

/* The row of d365.settings, palloc'd in the caller's context. */
typedef struct D365Settings
{
	char	   *org_url;		/* no trailing slash */
	char	   *tenant_id;
	char	   *client_id;
	char	   *client_secret;
	char	   *authority_url;	/* no trailing slash */
	char	   *api_version;
	bool		contact_sync_enabled;
	int			min_score;
	bool		activity_sync_enabled;
	char	   *default_owner;	/* NULL when unset */
	char	   *instance_id;
} D365Settings;

/* A row of d365.app_users, palloc'd in the caller's context. */
typedef struct D365AppUser
{
	char	   *client_id;
	char	   *client_secret;
	bool		enabled;
} D365AppUser;

extern D365Settings *d365_settings_load(void);
extern D365AppUser *d365_app_users_load(bool all, int *n);
extern void d365_settings_require_connection(const D365Settings *s);

#endif							/* D365_SETTINGS_H */
