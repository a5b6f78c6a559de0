#!/usr/bin/python3
"""The simulator self-tests' harness: a keep-alive HTTP client, a simulator
started on free ports (HTTP, and HTTPS when openssl is there), and builders
of $batch bodies.  sim/selftest.py and sim/selftest_tables.py use it."""

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = os.path.join(HERE, "dataverse_sim.py")
SIMCTL = os.path.join(HERE, "simctl")
TENANT = "11111111-1111-1111-1111-111111111111"
CLIENT = "22222222-2222-2222-2222-222222222222"
SECRET = "sim-secret"
ACCOUNT = "acc00000-0000-4000-8000-000000000001"
ALEX = "5e5e0000-0000-4000-8000-000000000002"
TEAM = "7ea70000-0000-4000-8000-000000000001"
API = "/api/data/v9.2/"


class Client:
    """A keep-alive HTTP client for one origin."""

    def __init__(self, host, port, https=False, cafile=None):
        self.host, self.port, self.https, self.cafile = host, port, https, cafile
        self.conn = None

    def _connect(self):
        if self.https:
            ctx = ssl.create_default_context(cafile=self.cafile)
            self.conn = http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=60)
        else:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def req(self, method, path, body=None, headers=None, raw=False):
        h = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            h.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode("utf-8")
        for attempt in range(2):
            if self.conn is None:
                self._connect()
            try:
                self.conn.request(method, path, body=body, headers=h)
                r = self.conn.getresponse()
                data = r.read()
                hd = {k.lower(): v for k, v in r.getheaders()}
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return Resp(r.status, hd, data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest) as e:
                self.conn.close()
                self.conn = None
                if attempt == 1 or raw:
                    raise
        raise RuntimeError("unreachable")


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def code(self):
        try:
            return self.json()["error"]["code"]
        except Exception:
            return None

    def msg(self):
        try:
            return self.json()["error"]["message"]
        except Exception:
            return self.body.decode("utf-8", "replace")

    def __repr__(self):
        return "<%d %s>" % (self.status, self.body[:400])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Sim:
    def __init__(self, tmp):
        self.tmp = tmp
        self.cert = self.key = None
        args = ["/usr/bin/python3", SIM, "--port", "0", "--port-file",
                os.path.join(tmp, "ports")]
        if shutil.which("openssl"):
            self.cert, self.key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", self.key, "-out", self.cert, "-days", "2",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            args += ["--https-port", "0", "--cert", self.cert, "--key", self.key]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        pf = os.path.join(tmp, "ports")
        deadline = time.time() + 10
        while not os.path.exists(pf):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("simulator did not start")
            time.sleep(0.05)
        self.port, self.https_port = (int(x) for x in open(pf).read().split())
        self.url = "http://127.0.0.1:%d" % self.port
        self.c = Client("127.0.0.1", self.port)
        self.ctl = Client("127.0.0.1", self.port)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    # control helpers
    def control(self, method, path, body=None):
        r = self.ctl.req(method, "/_sim/" + path, body)
        return r.json() if r.body else None

    def token(self, scope=None, port=None, **over):
        form = {"client_id": CLIENT, "client_secret": SECRET,
                "grant_type": "client_credentials",
                "scope": scope or ("http://127.0.0.1:%d/.default" % (port or self.port))}
        form.update(over)
        body = "&".join("%s=%s" % (k, quote(v, safe="")) for k, v in form.items()
                        if v is not None)
        tenant = over.pop("_tenant", TENANT) if "_tenant" in over else TENANT
        return self.c.req("POST", "/%s/oauth2/v2.0/token" % tenant, body,
                          {"Content-Type": "application/x-www-form-urlencoded"})


def token_form(**kw):
    form = {"client_id": CLIENT, "client_secret": SECRET, "grant_type": "client_credentials"}
    form.update(kw)
    return "&".join("%s=%s" % (k, quote(v, safe="")) for k, v in form.items() if v is not None)


def batch_body(boundary, parts, nl="\r\n"):
    """parts: list of str (a request) or ('cs', csboundary, [requests])."""
    out = []
    for p in parts:
        out.append("--" + boundary)
        if isinstance(p, tuple):
            out.append("Content-Type: multipart/mixed; boundary=" + p[1])
            out.append("")
            for i, r in enumerate(p[2]):
                out.append("--" + p[1])
                out.append("Content-Type: application/http")
                out.append("Content-Transfer-Encoding: binary")
                out.append("Content-ID: %d" % (i + 1))
                out.append("")
                out.append(r)
            out.append("--" + p[1] + "--")
        else:
            out.append("Content-Type: application/http")
            out.append("Content-Transfer-Encoding: binary")
            out.append("")
            out.append(p)
    out.append("--" + boundary + "--")
    out.append("")
    return nl.join(out)


def op(method, url, body=None, headers=None, nl="\r\n"):
    lines = ["%s %s HTTP/1.1" % (method, url)]
    if body is not None:
        lines.append("Content-Type: application/json; type=entry")
    for k, v in (headers or {}).items():
        lines.append("%s: %s" % (k, v))
    lines.append("")
    lines.append(json.dumps(body) if body is not None else "")
    return nl.join(lines)


def parse_batch_response(r):
    ct = r.headers.get("content-type", "")
    b = ct.split("boundary=")[1]
    text = r.body.decode("utf-8")
    statuses = []
    for line in text.split("\r\n"):
        if line.startswith("HTTP/1.1 "):
            statuses.append(int(line.split()[1]))
    return statuses, text
