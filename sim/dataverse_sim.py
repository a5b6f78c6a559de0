#!/usr/bin/python3
"""Dataverse (Dynamics 365 Web API) simulator for the d365sync tests, demo
and benchmark.

Python 3 standard library only.  Serves, on 127.0.0.1 only:

  * the Microsoft Entra ID v2 client-credentials token endpoint
    (POST /{tenant}/oauth2/v2.0/token) with Entra-shaped errors;
  * the Web API subset d365sync uses under /api/data/v9.x/: entity CRUD with
    OData semantics and Dataverse error bodies, metadata (EntityDefinitions),
    WhoAmI, $batch with change sets, the bulk messages
    (Create/Update/UpsertMultiple), change tracking (delta links), service
    protection throttling (429 + Retry-After) and fault injection;
  * a control API under /_sim/ (no auth) for tests: reset, request log,
    faults, config, token expiry, direct row edits "as a Dynamics user",
    statistics.

Design notes
  * All shared state lives in one State object guarded by one RLock.  Rows
    are dicts keyed by lowercase GUID; the change-tracking log is an
    append-only list of (version, entity, id, kind) tuples, so a delta read
    is a bisect plus a scan of what changed.
  * Atomic units (a $batch change set, a bulk message) run under the lock
    with an undo journal; a failure restores the previous Row objects and
    truncates the change log.  Rows are immutable once stored (an update
    stores a new Row), so the journal only keeps references.
  * Inner $batch operations go through exactly the same code as standalone
    requests (fault rules, validation, logging), only the token check and
    throttling are done once for the envelope.
  * Cost model: each outer request answers latency_ms + server time after
    it arrived, where server time is per_record_ms per record operation (a
    $batch runs its operations one after another; a bulk message costs
    bulk_target_ms per target).  The wait happens outside the lock, so
    requests of one user run in parallel as on a real server.
  * Service protection per application user (each client id has its own
    budgets): the execution-time budget (exec_budget_s of server time per
    window_s, 429 0x80072321), the request count (requests_per_window, 429
    0x80072322) and the concurrency limit (max_concurrent, 429 0x80072326),
    each 429 with an honest Retry-After.

The code lives in the package sim/dvsim/, one module per concern (the
module map is in sim/README.md); this file is the entry point that
scripts/lib.sh, the tests, the demo and the benchmarks run.

See sim/README.md for the flags, the control API and the seed GUIDs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dvsim.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
