"""Fault injection: rules set through the control API that answer, delay
or drop matching requests."""

import re

from .common import jdump, Resp


class Fault:
    def __init__(self, spec, fid):
        if not isinstance(spec, dict):
            raise ValueError("a fault rule must be a JSON object")
        known = {"method", "path_regex", "body_regex", "status", "body", "json",
                 "headers", "content_type", "delay_ms", "drop", "times", "skip",
                 "scope", "comment", "body_size"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError("unknown fault rule keys: %s" % ", ".join(sorted(unknown)))
        self.id = fid
        self.spec = spec
        self.method = (spec.get("method") or None)
        if self.method:
            self.method = self.method.upper()
        self.path_re = re.compile(spec["path_regex"]) if spec.get("path_regex") else None
        self.body_re = re.compile(spec["body_regex"]) if spec.get("body_regex") else None
        self.status = spec.get("status")
        self.body = spec.get("body")
        if spec.get("body_size") is not None:
            # a valid JSON document of (at least) body_size bytes
            n = int(spec["body_size"])
            self.body = '{"padding":"' + "x" * max(0, n - 14) + '"}'
        self.json = spec.get("json")
        self.headers = spec.get("headers") or {}
        self.content_type = spec.get("content_type")
        self.delay_ms = spec.get("delay_ms") or 0
        self.drop = bool(spec.get("drop"))
        self.times = spec.get("times", 1)
        self.skip = spec.get("skip") or 0
        self.scope = spec.get("scope") or "any"
        if self.scope not in ("any", "outer", "inner"):
            raise ValueError("scope must be any, outer or inner")
        if self.status is None and not self.drop and not self.delay_ms:
            raise ValueError("a fault rule needs status, drop or delay_ms")
        self.matched = 0
        self.fired = 0

    def exhausted(self):
        return self.times is not None and self.fired >= self.times

    def describe(self):
        d = dict(self.spec)
        d["id"] = self.id
        d["matched"] = self.matched
        d["fired"] = self.fired
        return d

    def response(self):
        """The Resp this rule produces (status set)."""
        headers = []
        if self.json is not None:
            body = jdump(self.json)
            ct = self.content_type or "application/json; odata.metadata=minimal"
        elif self.body is not None:
            body = self.body.encode("utf-8") if isinstance(self.body, str) else jdump(self.body)
            ct = self.content_type or "text/plain; charset=utf-8"
        elif self.status >= 400:
            body = jdump({"error": {"code": "0x80040216",
                                    "message": "Simulated fault (HTTP %d)." % self.status}})
            ct = self.content_type or "application/json; odata.metadata=minimal"
        else:
            body = b""
            ct = self.content_type
        if ct:
            headers.append(("Content-Type", ct))
        for k, v in self.headers.items():
            headers.append((k, str(v)))
        code = None
        if self.json is not None and isinstance(self.json, dict):
            err = self.json.get("error")
            if isinstance(err, dict):
                code = err.get("code")
        elif self.status >= 400 and self.body is None:
            code = "0x80040216"
        return Resp(self.status, headers, body, code=code)
