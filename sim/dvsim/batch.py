"""$batch: multipart parsing, change sets (atomic, with Content-ID
references) and the multipart response."""

import http
import re
import time
import uuid
from urllib.parse import urlsplit

from .api import Req
from .body import Ctx
from .common import ApiError, DropConnection, error_resp, parse_media, parse_prefer, Resp


class StreamError(Exception):
    pass


def split_multipart(body, boundary):
    """Split a multipart body (CRLF line ends required) into part bytes."""
    delim = b"\r\n--" + boundary.encode("latin-1")
    pieces = (b"\r\n" + body).split(delim)
    if len(pieces) < 2:
        raise StreamError()
    parts = []
    closed = False
    for p in pieces[1:]:
        if p.startswith(b"--"):
            closed = True
            break
        i = p.find(b"\r\n")
        if i < 0 or p[:i].strip(b" \t"):
            raise StreamError()
        parts.append(p[i + 2:])
    if not closed:
        raise StreamError()
    return parts


def split_headers(block):
    """b'Name: v\\r\\nName2: v2' -> list of (name, value)."""
    out = []
    if not block:
        return out
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if b"\n" in line or b":" not in line:
            raise StreamError()
        k, v = line.split(b":", 1)
        out.append((k.decode("latin-1").strip(), v.decode("utf-8", "replace").strip()))
    return out


class InnerOp:
    __slots__ = ("method", "url", "headers", "body", "content_id", "changeset")


def parse_inner_request(part, changeset):
    """Parse one application/http part into an InnerOp."""
    sep = part.find(b"\r\n\r\n")
    if sep < 0:
        raise StreamError()
    part_headers = split_headers(part[:sep])
    msg = part[sep + 4:]
    ph = {k.lower(): v for k, v in part_headers}
    mt, _ = parse_media(ph.get("content-type"))
    if mt != "application/http":
        raise ApiError(400, "0x0", "Each $batch part must have Content-Type application/http "
                       "or multipart/mixed (got '%s')." % ph.get("content-type"))
    # request line
    i = msg.find(b"\r\n")
    if i < 0:
        line, rest = msg, b""
    else:
        line, rest = msg[:i], msg[i + 2:]
    m = re.match(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$", line.strip())
    if not m:
        raise ApiError(400, "0x0", "Invalid request line in $batch part: '%s'."
                       % line.decode("utf-8", "replace")[:200])
    op = InnerOp()
    op.method = m.group(1).decode("ascii")
    op.url = m.group(2).decode("utf-8", "replace")
    j = rest.find(b"\r\n\r\n")
    if j >= 0:
        hblock, body = rest[:j], rest[j + 4:]
    elif rest.startswith(b"\r\n"):
        hblock, body = b"", rest[2:]
    else:
        hblock, body = rest, b""
    op.headers = split_headers(hblock)
    op.body = body.strip(b"\r\n \t")
    op.content_id = ph.get("content-id")
    if op.content_id is None:
        for k, v in op.headers:
            if k.lower() == "content-id":
                op.content_id = v
    op.changeset = changeset
    return op


def render_part(resp, content_id):
    head = [b"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"]
    if content_id is not None:
        head.append(("Content-ID: %s\r\n" % content_id).encode())
    head.append(b"\r\n")
    try:
        phrase = http.HTTPStatus(resp.status).phrase
    except ValueError:
        phrase = "Status"
    head.append(("HTTP/1.1 %d %s\r\n" % (resp.status, phrase)).encode())
    for k, v in resp.headers:
        head.append(("%s: %s\r\n" % (k, v)).encode("utf-8"))
    head.append(b"\r\n")
    head.append(resp.body)
    head.append(b"\r\n")
    return b"".join(head)


class BatchMixin:
    """Handler methods: a $batch envelope and its inner operations."""

    def batch(self, S, path, query, hd, body, entry):
        api = self.server.api
        if self.command != "POST":
            return error_resp(ApiError(405, "0x0", "$batch requires POST."))
        mt, params = parse_media(hd.get("content-type"))
        boundary = params.get("boundary")
        if mt != "multipart/mixed" or not boundary:
            return error_resp(ApiError(400, "0x0", "The $batch request must have Content-Type "
                                       "multipart/mixed with a boundary parameter."))
        base_path = path[:path.rindex("/$batch")] if "/$batch" in path else "/api/data/v9.2"
        try:
            parts = split_multipart(body, boundary)
            items = []
            nops = 0
            for part in parts:
                sep = part.find(b"\r\n\r\n")
                if sep < 0:
                    raise StreamError()
                ph = {k.lower(): v for k, v in split_headers(part[:sep])}
                pmt, pparams = parse_media(ph.get("content-type"))
                if pmt == "multipart/mixed":
                    cb = pparams.get("boundary")
                    if not cb:
                        raise ApiError(400, "0x0", "Change set without boundary.")
                    ops = [parse_inner_request(cp, cb) for cp in
                           split_multipart(part[sep + 4:], cb)]
                    for op in ops:
                        if op.method == "GET":
                            raise ApiError(400, "0x0", "A change set must not contain a GET "
                                           "request (%s)." % op.url)
                    nops += len(ops)
                    items.append(("cs", cb, ops))
                else:
                    items.append(("op", None, parse_inner_request(part, None)))
                    nops += 1
        except StreamError:
            return error_resp(ApiError(400, "0x0", "Stream was not readable."))
        except ApiError as e:
            return error_resp(e)
        maxops = int(S.config.get("max_batch") or 1000)
        if nops > maxops:
            return error_resp(ApiError(400, "0x0",
                                       "The number of requests in the batch (%d) exceeds the "
                                       "maximum of %d." % (nops, maxops)))
        prefer = parse_prefer(hd.get("prefer", ""))
        coe = bool(prefer.get("odata.continue-on-error"))
        rb = "batchresponse_" + str(uuid.uuid4())
        out = []
        nrec = 0
        stop = False
        # The whole batch runs under the state lock: operations are serialised
        # by the GIL anyway, and taking the lock once avoids lock convoys when
        # several batches arrive in parallel.
        S.lock.acquire()
        try:
            nrec, stop = self.run_batch_items(S, api, items, base_path, entry, coe, rb, out)
        finally:
            S.lock.release()
        out.append(b"--" + rb.encode() + b"--\r\n")
        h = [("Content-Type", "multipart/mixed; boundary=" + rb), ("OData-Version", "4.0")]
        if coe:
            h.append(("Preference-Applied", "odata.continue-on-error"))
        r = Resp(200, h, b"".join(out), nrec=nrec)
        return r

    def run_batch_items(self, S, api, items, base_path, entry, coe, rb, out):
        nrec = 0
        stop = False
        for kind, cb, x in items:
            if stop:
                break
            if kind == "op":
                resp = self.inner(S, api, x, base_path, entry, None)
                nrec += 1
                out.append(b"--" + rb.encode() + b"\r\n" + render_part(resp, x.content_id))
                if resp.status >= 400 and not coe:
                    stop = True
            else:
                csr = "changesetresponse_" + str(uuid.uuid4())
                content_ids = {}
                results = []
                failed = None
                logged = []
                with S.lock:
                    marker = S.begin()
                    try:
                        for op in x:
                            resp = self.inner(S, api, op, base_path, entry, content_ids,
                                              logged)
                            nrec += 1
                            results.append((op, resp))
                            if resp.status >= 400:
                                failed = (op, resp)
                                break
                            if op.content_id and resp.entity_path:
                                content_ids[op.content_id] = resp.entity_path
                    except BaseException:
                        S.rollback(marker)
                        raise
                    if failed:
                        S.rollback(marker)
                        for e in logged:
                            if e is not logged[-1]:
                                e.rolled_back = True
                    else:
                        S.commit(marker)
                if failed:
                    out.append(b"--" + rb.encode() + b"\r\n" +
                               render_part(failed[1], failed[0].content_id))
                    if not coe:
                        stop = True
                else:
                    buf = [b"--" + rb.encode() + b"\r\n",
                           ("Content-Type: multipart/mixed; boundary=%s\r\n\r\n" % csr).encode()]
                    for op, resp in results:
                        buf.append(b"--" + csr.encode() + b"\r\n")
                        buf.append(render_part(resp, op.content_id))
                    buf.append(b"--" + csr.encode() + b"--\r\n")
                    out.append(b"".join(buf))
        return nrec, stop

    def inner(self, S, api, op, base_path, entry, content_ids, logged=None):
        url = op.url
        if url.startswith("$") and content_ids is not None:
            m = re.match(r"^\$([^/?]+)(.*)$", url)
            if m and m.group(1) in content_ids:
                url = content_ids[m.group(1)] + m.group(2)
        if url.startswith("http://") or url.startswith("https://"):
            sp = urlsplit(url)
            url = sp.path + ("?" + sp.query if sp.query else "")
        elif not url.startswith("/"):
            url = base_path + "/" + url
        path, _, query = url.partition("?")
        hd = {}
        for k, v in op.headers:
            hd[k.lower()] = v
        ct = hd.get("content-type", "").lower()
        e = S.log_start("api", op.method, url, self.server.scheme, S.redact_headers(op.headers),
                        op.body, "json" if ("json" in ct or (op.body[:1] in (b"{", b"[")))
                        else "text", batch=entry.seq, changeset=op.changeset,
                        content_id=op.content_id, conn=entry.conn)
        e.client = entry.client
        if logged is not None:
            logged.append(e)
        fault = S.match_fault(op.method, url, op.body, True)
        resp = None
        if fault is not None:
            if fault.delay_ms:
                time.sleep(fault.delay_ms / 1000.0)
            if fault.drop:
                e.status = 0
                e.error_code = "dropped"
                raise DropConnection()
            if fault.status is not None:
                resp = fault.response()
        if resp is None:
            rq = Req()
            rq.method = op.method
            rq.path = path
            rq.query = query
            rq.headers = op.headers
            rq.hdict = hd
            rq.body = op.body
            rq.scheme = self.server.scheme
            rq.origin = self.origin()
            rq.inner = True
            rq.log = e
            rq.ctx = Ctx(base_path, content_ids)
            rq.content_id = op.content_id
            rq.changeset = op.changeset
            rq.batch_seq = entry.seq
            resp = api.handle(rq)
        e.status = resp.status
        e.error_code = resp.code
        return resp
