"""The HTTP(S) servers and the request handler: plumbing, fault rules,
latency and the dispatch to the token endpoint, the Web API, $batch and
the control API."""

import itertools
import re
import socket
import ssl
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from .api import Req
from .auth import TokenMixin
from .batch import BatchMixin
from .body import Ctx
from .common import DropConnection, jdump, Resp, TOKEN_PATH_RE
from .control import Control
from .governor import ServiceProtection


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, addr, handler, state, api, scheme, verbose):
        self.state = state
        self.api = api
        self.scheme = scheme
        self.verbose = verbose
        ThreadingHTTPServer.__init__(self, addr, handler)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, ssl.SSLError, socket.timeout, TimeoutError)):
            return
        if self.verbose:
            ThreadingHTTPServer.handle_error(self, request, client_address)


class Handler(TokenMixin, BatchMixin, ServiceProtection, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "DataverseSim/1.0"
    sys_version = ""
    timeout = 300

    def version_string(self):
        return self.server_version

    _conn_ids = itertools.count(1)

    def setup(self):
        # every TCP connection gets a number, logged with its requests, so
        # tests can see connections being reused
        self.conn_id = next(Handler._conn_ids)
        BaseHTTPRequestHandler.setup(self)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.settimeout(30)
            self.connection.do_handshake()
            self.connection.settimeout(self.timeout)

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    def do_GET(self):
        self.handle_any()

    do_POST = do_PATCH = do_DELETE = do_PUT = do_HEAD = do_OPTIONS = do_GET

    # -- plumbing ----------------------------------------------------------------
    def read_body(self):
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    break
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def send(self, resp):
        self.send_response(resp.status)
        has_ct = False
        for k, v in resp.headers:
            if k.lower() == "content-type":
                has_ct = True
            self.send_header(k, v)
        if not has_ct and resp.body:
            self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if resp.body and self.command != "HEAD":
            self.wfile.write(resp.body)

    def origin(self):
        host = self.headers.get("Host") or "127.0.0.1:%d" % self.server.server_address[1]
        return "%s://%s" % (self.server.scheme, host)

    def handle_any(self):
        S = self.server.state
        try:
            body = self.read_body()
        except (ValueError, ConnectionError):
            self.close_connection = True
            return
        raw_path = self.path
        if raw_path.startswith("http://") or raw_path.startswith("https://"):
            sp = urlsplit(raw_path)
            raw_path = sp.path + ("?" + sp.query if sp.query else "")
        path, _, query = raw_path.partition("?")
        if path.startswith("/_sim/") or path == "/_sim":
            try:
                resp = Control(self.server.state, self.server.api).handle(
                    self.command, path, query, body)
            except Exception as e:
                traceback.print_exc()
                resp = Resp(500, [("Content-Type", "application/json")],
                            jdump({"error": "%s: %s" % (type(e).__name__, e)}))
            self.send(resp)
            return
        try:
            self.handle_service(S, path, query, raw_path, body)
        except DropConnection:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_service(self, S, path, query, raw_path, body):
        tm = TOKEN_PATH_RE.match(path)
        kind = "token" if tm else "api"
        hdrs = list(self.headers.items())
        ct = (self.headers.get("Content-Type") or "").lower()
        btype = "json" if "json" in ct else ("form" if "x-www-form-urlencoded" in ct else "text")
        if kind == "api" and path.rstrip("/").endswith("/$batch"):
            btype = "text"
        arrived = time.time()
        entry = S.log_start(kind, self.command, raw_path, self.server.scheme,
                            S.redact_headers(hdrs), body, btype,
                            conn=getattr(self, "conn_id", None))
        nrec = 0
        server_s = 0.0
        user = None
        api_client = False          # a Web API answer (client id or None)
        protection = None           # the ApiError of service protection's 429
        try:
            fault = S.match_fault(self.command, raw_path, body, False)
            resp = None
            if fault is not None:
                if fault.delay_ms:
                    time.sleep(fault.delay_ms / 1000.0)
                if fault.drop:
                    entry.status = 0
                    entry.error_code = "dropped"
                    raise DropConnection()
                if fault.status is not None:
                    resp = fault.response()
            if resp is None:
                if kind == "token":
                    resp = self.token(S, tm.group(1), body)
                elif not path.startswith("/api/data/"):
                    resp = Resp(404, [("Content-Type", "text/plain")], b"Not Found")
                else:
                    hd = {k.lower(): v for k, v in hdrs}
                    resp, client = self.check_auth(S, hd)
                    entry.client = client
                    if resp is None:
                        resp, protection = self.throttle(S, client)
                        if resp is None:
                            with S.lock:
                                user = S.user(client)
                            if path.rstrip("/").endswith("/$batch") and \
                                    re.match(r"^/api/data/v9\.\d+/\$batch/?$", path):
                                resp = self.batch(S, path, query, hd, body, entry)
                            else:
                                rq = self.make_req(S, self.command, path, query, hdrs, hd, body)
                                rq.log = entry
                                resp = self.server.api.handle(rq)
                            nrec = resp.nrec
                            server_s = self.server_time(S, resp)
                            if server_s > 0:
                                # the server works on it from its arrival
                                with S.lock:
                                    user.exec.append((arrived, arrived + server_s))
                    api_client = client
            elif kind == "token":
                entry.client = self.token_client(body)
            entry.status = resp.status
            entry.error_code = resp.code
            # the response leaves latency + server time after the request
            # arrived, whatever the simulator's own processing took
            due = arrived + float(S.config.get("latency_ms") or 0) / 1000.0 + server_s
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            if api_client is not False:
                # what the user has left as the answer leaves
                resp.headers.extend(self.api_headers(S, api_client))
            self.send(resp)
            if protection is not None:
                # throttled from now on, the moment the client can know it
                with S.lock:
                    S.user(api_client).throttle_sent(protection, time.time())
        finally:
            if user is not None:
                with S.lock:
                    S.inflight -= 1
                    user.inflight -= 1
                    user.ops += nrec
                    user.exec_total += server_s

    def make_req(self, S, method, path, query, hdrs, hd, body):
        rq = Req()
        rq.method = method
        rq.path = path
        rq.query = query
        rq.headers = hdrs
        rq.hdict = hd
        rq.body = body
        rq.scheme = self.server.scheme
        rq.origin = self.origin()
        rq.inner = False
        rq.log = None
        rq.ctx = Ctx("/api/data/v9.2")
        rq.content_id = None
        rq.changeset = None
        rq.batch_seq = None
        return rq
