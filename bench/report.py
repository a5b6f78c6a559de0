#!/usr/bin/python3
"""report.py: bench/run.sh's result table and the issue's target checks.

Usage: report.py RESULTS.tsv LATENCY_MS PER_RECORD_MS

RESULTS.tsv has one line per measured run:
  kind size label seconds processed created updated failed requests
  simulator_requests rss_base_kb rss_peak_kb samples
(kind: initial, nochange, changed, perrecord), or "kind size label FAILED".
"""

import sys

TARGET_SIZE = 100000


def fnum(x, digits):
    return ("%%.%df" % digits) % x


def main():
    path, latency, per_record = sys.argv[1], sys.argv[2], sys.argv[3]
    runs = []
    with open(path) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 4:
                continue
            r = {"kind": p[0], "size": int(p[1]), "label": p[2]}
            if p[3] == "FAILED":
                r["failed_run"] = True
            else:
                r.update(failed_run=False, secs=float(p[3]), processed=int(p[4]),
                         created=int(p[5]), updated=int(p[6]), failed=int(p[7]),
                         requests=int(p[8]), simreq=int(p[9]),
                         mem_mb=max(0, int(p[11]) - int(p[10])) / 1024.0)
                # contacts: what the run had to consider.  A no-change
                # re-sync sends nothing; it is measured against the table.
                r["contacts"] = r["size"] if r["kind"] == "nochange" else r["processed"]
                r["cps"] = r["contacts"] / r["secs"] if r["secs"] > 0 else float("inf")
                r["rpc"] = r["requests"] / r["contacts"] if r["contacts"] else 0.0
            runs.append(r)

    names = {"initial": "initial sync", "nochange": "no-change re-sync",
             "changed": "1%-changed re-sync", "perrecord": "per-record initial sync"}
    print("Latency model: %s ms per HTTP request + %s ms per record operation "
          "(simulator on 127.0.0.1)." % (latency, per_record))
    print()
    print("| scenario | contacts | seconds | contacts/s | requests | requests/contact | backend memory growth (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        scen = "%s, %s" % (names.get(r["kind"], r["kind"]), "{:,}".format(r["size"]))
        if r["failed_run"]:
            print("| %s | – | failed | – | – | – | – |" % scen)
            continue
        contacts = "{:,}".format(r["contacts"])
        if r["kind"] == "nochange":
            contacts += " (checked)"
        print("| %s | %s | %s | %s | %s | %s | %s |" % (
            scen, contacts, fnum(r["secs"], 2), "{:,.0f}".format(r["cps"]),
            "{:,}".format(r["requests"]), fnum(r["rpc"], 4), fnum(r["mem_mb"], 1)))
    print()
    notes = [r for r in runs if not r["failed_run"] and r["requests"] != r["simreq"]]
    for r in notes:
        print("Note: %s: the function reported %d requests, the simulator counted %d "
              "(api + token)." % (r["label"], r["requests"], r["simreq"]))
    bad = [r for r in runs if not r["failed_run"] and r["failed"] > 0]
    for r in bad:
        print("Note: %s: %d contacts failed." % (r["label"], r["failed"]))
    if notes or bad:
        print()

    ok = [r for r in runs if not r["failed_run"]]

    def mark(met):
        return "met" if met else "not met"

    print("Targets:")
    # 1. initial sync <= 0.02 requests/contact
    init = [r for r in ok if r["kind"] == "initial"]
    if init:
        worst = max(r["rpc"] for r in init)
        print("- initial sync <= 0.02 requests/contact: %s (%s)" % (
            mark(worst <= 0.02),
            ", ".join("%s at %s" % (fnum(r["rpc"], 4), "{:,}".format(r["size"])) for r in init)))
    else:
        print("- initial sync <= 0.02 requests/contact: not measured")
    # 2. >= 10x per-record contacts/s
    pr = [r for r in ok if r["kind"] == "perrecord"]
    if init and pr:
        big = max(init, key=lambda r: r["size"])
        ratio = big["cps"] / pr[0]["cps"] if pr[0]["cps"] > 0 else float("inf")
        print("- batched >= 10x per-record contacts/s: %s (%s x: %s contacts/s at %s "
              "vs %s contacts/s per-record at %s)" % (
                  mark(ratio >= 10), fnum(ratio, 1), "{:,.0f}".format(big["cps"]),
                  "{:,}".format(big["size"]), "{:,.1f}".format(pr[0]["cps"]),
                  "{:,}".format(pr[0]["size"])))
    else:
        print("- batched >= 10x per-record contacts/s: not measured")
    # 3. no-change re-sync of 100k: 0 requests and < 2 s
    nc = [r for r in ok if r["kind"] == "nochange" and r["size"] == TARGET_SIZE]
    if nc:
        r = nc[0]
        print("- no-change re-sync of 100k: 0 requests and < 2 s: %s (%d requests, %s s)" % (
            mark(r["requests"] == 0 and r["secs"] < 2), r["requests"], fnum(r["secs"], 2)))
    else:
        other = [r for r in ok if r["kind"] == "nochange"]
        hint = ""
        if other:
            r = max(other, key=lambda r: r["size"])
            hint = "; at %s: %d requests, %s s" % ("{:,}".format(r["size"]), r["requests"],
                                                   fnum(r["secs"], 2))
        print("- no-change re-sync of 100k: 0 requests and < 2 s: not measured "
              "(no 100k run%s)" % hint)
    # 4. memory growth < 64 MB at 100k
    mem = [r for r in ok if r["size"] == TARGET_SIZE]
    if mem:
        worst = max(mem, key=lambda r: r["mem_mb"])
        print("- backend memory growth < 64 MB at 100k: %s (largest: %s MB, %s)" % (
            mark(worst["mem_mb"] < 64), fnum(worst["mem_mb"], 1), worst["label"]))
    else:
        hint = ""
        if ok:
            worst = max(ok, key=lambda r: r["mem_mb"])
            hint = "; largest measured: %s MB, %s" % (fnum(worst["mem_mb"], 1), worst["label"])
        print("- backend memory growth < 64 MB at 100k: not measured (no 100k run%s)" % hint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
