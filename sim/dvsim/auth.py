"""The Entra ID token endpoint (client credentials) and the bearer-token
check of the Web API."""

import datetime
import uuid
from urllib.parse import unquote_plus, urlsplit

from .common import jdump, Resp


class TokenMixin:
    """Handler methods: the token endpoint and the token check."""

    @staticmethod
    def token_client(body):
        for part in body.decode("utf-8", "replace").split("&"):
            k, _, v = part.partition("=")
            if unquote_plus(k) == "client_id":
                return unquote_plus(v).lower()
        return None

    def check_auth(self, S, hd):
        auth = hd.get("authorization", "")
        parts = auth.split(None, 1)
        tenant = S.config["tenant"]
        www = ('Bearer authorization_uri=https://login.microsoftonline.com/%s/oauth2/authorize, '
               'resource_id=%s/' % (tenant, self.origin()))
        if len(parts) != 2 or parts[0].lower() != "bearer":
            return Resp(401, [("WWW-Authenticate", www)], b"", code=None), None
        with S.lock:
            info = S.token_info(parts[1].strip())
        if info is None:
            return Resp(401, [("WWW-Authenticate",
                               'Bearer error=invalid_token, error_description=Error during '
                               'token validation!, ' + www[len("Bearer "):])], b""), None
        if S.config.get("check_audience", True):
            aud = info["scope"][:-len("/.default")].rstrip("/")
            if not same_origin(aud, self.origin()):
                return Resp(401, [("WWW-Authenticate",
                                   'Bearer error=invalid_token, error_description=The token '
                                   'audience is not this organization, ' +
                                   www[len("Bearer "):])], b""), info["client"]
        return None, info["client"]

    def token(self, S, tenant, body):
        cfg = S.config

        def err(status, error, code, desc):
            trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
            ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
            full = "AADSTS%d: %s\r\nTrace ID: %s\r\nCorrelation ID: %s\r\nTimestamp: %s" % (
                code, desc, trace, corr, ts)
            return Resp(status, [("Content-Type", "application/json; charset=utf-8"),
                                 ("Cache-Control", "no-store, no-cache")],
                        jdump({"error": error, "error_description": full,
                               "error_codes": [code], "timestamp": ts, "trace_id": trace,
                               "correlation_id": corr,
                               "error_uri": "https://login.microsoftonline.com/error?code=%d"
                               % code}), code="AADSTS%d" % code)

        if self.command != "POST":
            return err(405, "invalid_request", 900561,
                       "The endpoint only accepts POST requests. Received a %s request."
                       % self.command)
        if tenant.lower() != cfg["tenant"].lower():
            return err(400, "invalid_request", 90002,
                       "Tenant '%s' not found. Check to make sure you have the correct tenant "
                       "ID and are signing into the correct cloud. Check with your "
                       "subscription administrator, this may happen if there are no active "
                       "subscriptions for the tenant." % tenant)
        form = {}
        for part in body.decode("utf-8", "replace").split("&"):
            if part:
                k, _, v = part.partition("=")
                form[unquote_plus(k)] = unquote_plus(v)
        gt = form.get("grant_type")
        if not gt:
            return err(400, "invalid_request", 900144,
                       "The request body must contain the following parameter: 'grant_type'.")
        if gt != "client_credentials":
            return err(400, "unsupported_grant_type", 70003,
                       "The app requested an unsupported grant type '%s'." % gt)
        cid = form.get("client_id")
        if not cid:
            return err(400, "invalid_request", 900144,
                       "The request body must contain the following parameter: 'client_id'.")
        expected = S.secret_of(cid)
        if expected is None:
            return err(400, "unauthorized_client", 700016,
                       "Application with identifier '%s' was not found in the directory "
                       "'%s'. This can happen if the application has not been installed by the "
                       "administrator of the tenant or consented to by any user in the tenant. "
                       "You may have sent your authentication request to the wrong tenant."
                       % (cid, tenant))
        scope = form.get("scope")
        if not scope:
            return err(400, "invalid_request", 900144,
                       "The request body must contain the following parameter: 'scope'.")
        if not scope.endswith("/.default") or " " in scope.strip():
            return err(400, "invalid_scope", 1002012,
                       "The provided value for scope %s is not valid. Client credential flows "
                       "must have a scope value with /.default suffixed to the resource "
                       "identifier (application ID URI)." % scope)
        resource = scope[:-len("/.default")]
        if cfg.get("check_audience", True) and not self.our_resource(S, resource):
            return err(400, "invalid_resource", 500011,
                       "The resource principal named %s was not found in the tenant named %s. "
                       "This can happen if the application has not been installed by the "
                       "administrator of the tenant or consented to by any user in the tenant. "
                       "You might have sent your authentication request to the wrong tenant."
                       % (resource, tenant))
        secret = form.get("client_secret")
        if not secret:
            return err(401, "invalid_client", 7000216,
                       "'client_assertion', 'client_secret' or 'request' is required for the "
                       "'client_credentials' grant type.")
        if secret != expected:
            return err(401, "invalid_client", 7000215,
                       "Invalid client secret provided. Ensure the secret being sent in the "
                       "request is the client secret value, not the client secret ID, for a "
                       "secret added to app '%s'." % cid.lower())
        if cfg.get("secret_expired"):
            return err(401, "invalid_client", 7000222,
                       "The provided client secret keys for app '%s' are expired. Visit the "
                       "Azure portal to create new keys for your app." % cid.lower())
        tok, life = S.issue_token(scope, cid)
        return Resp(200, [("Content-Type", "application/json; charset=utf-8"),
                          ("Cache-Control", "no-store, no-cache")],
                    jdump({"token_type": "Bearer", "expires_in": life, "ext_expires_in": life,
                           "access_token": tok}))

    def our_resource(self, S, resource):
        try:
            sp = urlsplit(resource.rstrip("/"))
        except ValueError:
            return False
        if sp.scheme not in ("http", "https") or sp.path not in ("", "/"):
            return False
        if (sp.hostname or "").lower() not in ("127.0.0.1", "localhost", "::1"):
            return False
        try:
            port = sp.port or (443 if sp.scheme == "https" else 80)
        except ValueError:
            return False
        return port in S.ports


def same_origin(a, b):
    try:
        sa, sb = urlsplit(a), urlsplit(b)
        pa = sa.port or (443 if sa.scheme == "https" else 80)
        pb = sb.port or (443 if sb.scheme == "https" else 80)
    except ValueError:
        return False
    loop = ("127.0.0.1", "localhost", "::1")
    ha, hb = (sa.hostname or "").lower(), (sb.hostname or "").lower()
    if ha in loop and hb in loop:
        ha = hb
    return sa.scheme == sb.scheme and ha == hb and pa == pb
