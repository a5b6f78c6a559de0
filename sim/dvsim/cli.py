"""Command line: flags, the servers, the port file."""

import argparse
import os
import signal
import ssl
import sys
import threading

from .api import Api
from .common import DEFAULT_CLIENT_ID, DEFAULT_SECRET, DEFAULT_TENANT
from .persist import load, save, StateFileError
from .server import Handler, Server
from .store import State


def main(argv=None):
    ap = argparse.ArgumentParser(description="Dataverse Web API simulator (127.0.0.1 only)")
    ap.add_argument("--port", type=int, default=0, help="HTTP port (0 = pick a free one)")
    ap.add_argument("--https-port", type=int, default=None,
                    help="also serve HTTPS on this port (0 = free port); needs --cert/--key")
    ap.add_argument("--cert", help="PEM certificate for HTTPS")
    ap.add_argument("--key", help="PEM private key for HTTPS")
    ap.add_argument("--port-file", help="write 'http_port https_port' here after binding")
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--per-record-ms", type=float, default=0.0)
    ap.add_argument("--tenant", default=DEFAULT_TENANT)
    ap.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    ap.add_argument("--client-secret", default=DEFAULT_SECRET)
    ap.add_argument("--token-lifetime", type=int, default=3599)
    ap.add_argument("--dop-hint", type=int, default=4)
    ap.add_argument("--exec-budget-s", type=float, default=1200.0,
                    help="server execution time per user per window (0 = no budget)")
    ap.add_argument("--window-s", type=float, default=300.0,
                    help="service-protection window (execution time and request count)")
    ap.add_argument("--requests-per-window", type=int, default=None)
    ap.add_argument("--max-concurrent", type=int, default=None)
    ap.add_argument("--bulk-target-ms", type=float, default=None,
                    help="server time per target of a bulk message (default per-record-ms)")
    ap.add_argument("--no-ratelimit-headers", action="store_true",
                    help="leave x-ms-ratelimit-*-remaining-xrm-requests out of answers")
    ap.add_argument("--app-user", action="append", default=[], metavar="CLIENT_ID:SECRET",
                    help="another application user (repeatable)")
    ap.add_argument("--no-check-audience", action="store_true",
                    help="accept any scope/resource and any token audience")
    ap.add_argument("--state-file", metavar="PATH",
                    help="load the data from PATH at start when it exists; save it there on "
                         "SIGTERM/SIGINT and on POST /_sim/save (atomic write)")
    ap.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = ap.parse_args(argv)

    defaults = {"tenant": args.tenant.lower(), "client_id": args.client_id.lower(),
                "client_secret": args.client_secret, "token_lifetime": args.token_lifetime,
                "latency_ms": args.latency_ms, "per_record_ms": args.per_record_ms,
                "dop_hint": args.dop_hint, "max_concurrent": args.max_concurrent,
                "requests_per_window": args.requests_per_window, "window_s": args.window_s,
                "exec_budget_s": args.exec_budget_s or None,
                "bulk_target_ms": args.bulk_target_ms, "max_page_size": 5000,
                "app_users": dict(u.split(":", 1) for u in args.app_user if ":" in u),
                "check_audience": not args.no_check_audience,
                "ratelimit_headers": not args.no_ratelimit_headers, "secret_expired": False,
                "log_bodies": True, "log_limit": 300000, "max_batch": 1000, "max_bulk": 1000}
    state = State(defaults)
    if args.state_file:
        state.state_file = os.path.abspath(args.state_file)
        if os.path.exists(state.state_file):
            try:
                n = load(state, state.state_file)
            except StateFileError as e:
                sys.stderr.write("dataverse_sim: cannot load the state file %s: %s\n"
                                 % (state.state_file, e))
                sys.exit(2)
            sys.stdout.write("dataverse_sim: loaded %d rows from %s\n" % (n, state.state_file))
    api = Api(state)

    httpd = Server(("127.0.0.1", args.port), Handler, state, api, "http", args.verbose)
    http_port = httpd.server_address[1]
    state.ports.add(http_port)
    httpsd = None
    https_port = 0
    if args.https_port is not None:
        if not args.cert or not args.key:
            ap.error("--https-port needs --cert and --key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        httpsd = Server(("127.0.0.1", args.https_port), Handler, state, api, "https",
                        args.verbose)
        httpsd.socket = ctx.wrap_socket(httpsd.socket, server_side=True,
                                        do_handshake_on_connect=False)
        https_port = httpsd.server_address[1]
        state.ports.add(https_port)

    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d %d\n" % (http_port, https_port))
        os.replace(tmp, args.port_file)
    sys.stdout.write("dataverse_sim listening on http://127.0.0.1:%d%s\n" % (
        http_port, (" and https://127.0.0.1:%d" % https_port) if https_port else ""))
    sys.stdout.flush()
    if httpsd is not None:
        t = threading.Thread(target=httpsd.serve_forever, daemon=True)
        t.start()
    if state.state_file:
        # a clean shutdown saves the data: SIGTERM ends serve_forever like ^C
        signal.signal(signal.SIGTERM, _stop)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if state.state_file:
            # keep the lock until the process ends: a write still in flight
            # either finished before (and is saved) or never answers
            state.lock.acquire()
            n = save(state, state.state_file)
            sys.stdout.write("dataverse_sim: saved %d rows to %s\n" % (n, state.state_file))
            sys.stdout.flush()


def _stop(signum, frame):
    raise KeyboardInterrupt()
