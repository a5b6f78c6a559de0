"""The request log the control API serves (/_sim/requests)."""

import json
from urllib.parse import unquote_plus


class LogEntry:
    __slots__ = ("seq", "time", "method", "path", "scheme", "headers", "raw",
                 "btype", "status", "error_code", "batch", "changeset", "kind",
                 "content_id", "rolled_back", "conn", "client")

    def to_json(self):
        body = None
        if self.raw:
            if self.btype == "json":
                try:
                    body = json.loads(self.raw.decode("utf-8"))
                except Exception:
                    body = self.raw.decode("utf-8", "replace")
            elif self.btype == "form":
                body = {}
                for part in self.raw.decode("utf-8", "replace").split("&"):
                    if not part:
                        continue
                    k, _, v = part.partition("=")
                    k, v = unquote_plus(k), unquote_plus(v)
                    body[k] = "***" if k == "client_secret" else v
            else:
                body = self.raw.decode("utf-8", "replace")
        d = {"seq": self.seq, "time": self.time, "kind": self.kind,
             "method": self.method, "path": self.path, "scheme": self.scheme,
             "headers": self.headers, "body": body, "status": self.status,
             "error_code": self.error_code, "batch": self.batch,
             "changeset": self.changeset, "conn": self.conn, "client": self.client}
        if self.content_id is not None:
            d["content_id"] = self.content_id
        if self.rolled_back:
            d["rolled_back"] = True
        return d
