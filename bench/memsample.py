#!/usr/bin/python3
"""memsample.py: peak anonymous memory growth of one PostgreSQL backend.

Usage: memsample.py PIDFILE READYFILE STOPFILE OUTFILE [INTERVAL_MS]

Waits (at most 60 s) until PIDFILE holds a process id, reads that process's
RssAnon from /proc/<pid>/status as the baseline, creates READYFILE, then
samples RssAnon every INTERVAL_MS (default 20) until STOPFILE exists or the
process is gone (at most 2 hours).  Writes "baseline_kb max_kb samples
median_kb" to OUTFILE (the median of the samples: where memory stays
between the peaks).  bench/run.sh starts it next to the psql session that runs a sync.
"""

import os
import sys
import time


def rss_anon_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def main():
    if len(sys.argv) < 5:
        sys.stderr.write(__doc__)
        return 2
    pidfile, readyfile, stopfile, outfile = sys.argv[1:5]
    interval = (float(sys.argv[5]) if len(sys.argv) > 5 else 20.0) / 1000.0

    pid = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with open(pidfile) as f:
                text = f.read().strip()
            if text:
                pid = int(text.split()[0])
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    if pid is None:
        with open(outfile, "w") as f:
            f.write("0 0 0 0\n")
        open(readyfile, "w").close()
        return 1

    base = rss_anon_kb(pid) or 0
    peak = base
    samples = 1
    values = [base]
    open(readyfile, "w").close()
    deadline = time.monotonic() + 7200
    while not os.path.exists(stopfile) and time.monotonic() < deadline:
        v = rss_anon_kb(pid)
        if v is None:
            break
        samples += 1
        values.append(v)
        if v > peak:
            peak = v
        time.sleep(interval)
    v = rss_anon_kb(pid)
    if v is not None and v > peak:
        peak = v
    with open(outfile, "w") as f:
        f.write("%d %d %d %d\n" % (base, peak, samples, sorted(values)[len(values) // 2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
