"""Saving and loading the simulator's data (--state-file), so that a
restart is not an empty tenant: the rows, the change-tracking log, the
version and row counters and the delta-token secret (delta links handed out
before a restart stay valid after it).  Not saved: access tokens (a restart
invalidates them; clients ask for a new one after the 401), the request
log, fault rules, statistics, throttling windows and the config (the flags
of the new process apply).

The file is JSON, written atomically: a temporary file in the same
directory, flushed to disk, then renamed over the old one."""

import json
import os
import tempfile

from .common import GUID_RE, jdump, LOOKUP_TYPES
from .entities import ENTITIES
from .store import Row

FORMAT = "d365sim-state"
FORMAT_VERSION = 1


class StateFileError(Exception):
    """The state file cannot be read or does not hold simulator data."""


def _dump_row(row):
    d = {"id": row.id, "seq": row.seq, "a": row.a}
    if row.parties is not None:
        d["parties"] = row.parties
    return d


def snapshot(S):
    """The data to save, as bytes (the caller holds the lock)."""
    return jdump({"format": FORMAT, "format_version": FORMAT_VERSION,
                  "version": S.version, "seq": S.seq,
                  "delta_gen": S.delta_gen, "delta_secret": S.delta_secret.hex(),
                  "rows": {name: [_dump_row(r) for r in S.ordered_rows(name).values()]
                           for name in S.rows},
                  "changelog": [list(e) for e in S.changelog]})


def save(S, path):
    """Write the data to path atomically; returns the number of rows."""
    with S.lock:
        data = snapshot(S)
        nrows = sum(len(t) for t in S.rows.values())
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return nrows


def _guid(v, what):
    if not isinstance(v, str) or not GUID_RE.match(v):
        raise StateFileError("%s is not a GUID: %r" % (what, v))
    return v.lower()


def _ref(v, what):
    """A saved lookup value [entity, id] -> (entity, id)."""
    if not (isinstance(v, list) and len(v) == 2 and v[0] in ENTITIES):
        raise StateFileError("%s is not a reference [entity, id]: %r" % (what, v))
    return (v[0], _guid(v[1], what))


def _load_row(ent, d):
    if not isinstance(d, dict) or not isinstance(d.get("a"), dict) or \
            not isinstance(d.get("seq"), int):
        raise StateFileError("a row of %s is not {id, seq, a}" % ent.name)
    rid = _guid(d.get("id"), "the id of a row of %s" % ent.name)
    a = {}
    for k, v in d["a"].items():
        at = ent.attrs.get(k)
        if at is None:
            raise StateFileError("row %s of %s has attribute '%s', which the simulator does "
                                 "not know" % (rid, ent.name, k))
        a[k] = _ref(v, "%s of %s %s" % (k, ent.name, rid)) if at.type in LOOKUP_TYPES \
            and v is not None else v
    parties = None
    if ent.is_activity:
        parties = []
        for p in d.get("parties") or []:
            if not isinstance(p, dict):
                raise StateFileError("an activity party of %s %s is not an object"
                                     % (ent.name, rid))
            p = dict(p)
            if p.get("party") is not None:
                p["party"] = _ref(p["party"], "a party of %s %s" % (ent.name, rid))
            parties.append(p)
    return Row(rid, a, d["seq"], parties)


def load(S, path):
    """Replace the data of S with what path holds.  Raises StateFileError
    (nothing changed) when the file is not simulator data."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise StateFileError(str(e))
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateFileError("not a simulator state file (no \"format\": \"%s\")" % FORMAT)
    if doc.get("format_version") != FORMAT_VERSION:
        raise StateFileError("format_version %r; this simulator reads %d"
                             % (doc.get("format_version"), FORMAT_VERSION))
    rows_in = doc.get("rows")
    if not isinstance(rows_in, dict):
        raise StateFileError("no \"rows\" object")
    rows = {name: {} for name in ENTITIES}
    for name, items in rows_in.items():
        ent = ENTITIES.get(name)
        if ent is None:
            raise StateFileError("rows of entity '%s', which the simulator does not know"
                                 % name)
        if not isinstance(items, list):
            raise StateFileError("the rows of %s are not a list" % name)
        for d in items:
            r = _load_row(ent, d)
            rows[name][r.id] = r
    changelog = []
    for e in doc.get("changelog") or []:
        if not (isinstance(e, list) and len(e) == 4 and isinstance(e[0], int) and
                e[1] in ENTITIES and e[3] in ("u", "d")):
            raise StateFileError("a change-log entry is not [version, entity, id, u|d]: %r"
                                 % (e,))
        changelog.append((e[0], e[1], _guid(e[2], "a change-log id"), e[3]))
    changelog.sort(key=lambda e: e[0])
    try:
        secret = bytes.fromhex(doc["delta_secret"])
        gen = int(doc["delta_gen"])
        version = int(doc["version"])
        seq = int(doc["seq"])
    except (KeyError, TypeError, ValueError) as e:
        raise StateFileError("bad counters: %s" % e)
    # counters never go back, whatever the file says
    version = max([version] + [e[0] for e in changelog] +
                  [r.a["versionnumber"] for t in rows.values() for r in t.values()
                   if isinstance(r.a.get("versionnumber"), int)])
    seq = max([seq] + [r.seq for t in rows.values() for r in t.values()])
    with S.lock:
        S.rows = rows
        S.order_dirty = set(ENTITIES)
        S.changelog = changelog
        S.version = version
        S.seq = seq
        S.delta_gen = gen
        S.delta_secret = secret
    return sum(len(t) for t in rows.values())
