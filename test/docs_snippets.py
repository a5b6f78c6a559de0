#!/usr/bin/python3
"""docs_snippets.py REPO: run the SQL snippets of README.md and docs/*.md.

Called by test/docs_snippets.sh (which see).  The conventions it enforces
are documented in docs/README.md ("Snippets run in CI"):

- a ```sql fence is run; ```text (printed output), ```sh, ```ini,
  ```psql (psql meta-commands) and a fence without a language are not; any
  other language is an error;
- each page runs in a fresh database "myapp" in one psql session; a page
  under docs/ first gets the README's blocks in a session of their own, as
  a reader who followed the checklist, unless it is marked
  <!-- docs-test: standalone -->;
- <!-- docs-test: error --> before a ```sql fence: the block must fail;
- ERROR/WARNING/DETAIL/HINT/NOTICE lines printed in the ```text block right
  after a ```sql block must be what that block printed;
- <!-- docs-test: output --> before a ```sql fence: the ```text block right
  after it must be exactly what the block printed (row counts, messages and
  empty lines aside);
- <!-- docs-test: skip REASON --> before a fence: not run;
- <!-- docs-test: postgresql.conf --> before an ```ini fence: the runner's
  clusters use it;
- 'https://contoso.crm4.dynamics.com' becomes the simulator's URL, and a
  SET of org_url also sets authority_url to it.

Prints "ok ..." / "not ok ..." lines and "# ..." diagnostics.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
PG_BIN = os.environ.get("PG_BIN") or os.environ.get("D365_PG_BIN") or "/usr/lib/postgresql/15/bin"

# The credentials the docs show (README step 2); the runner's simulator
# accepts exactly these.
DOC_TENANT = "8f3c2a51-6d0e-4b7a-9c1f-2e5d7a9b4c60"
DOC_CLIENT = "3b9e7c12-5a4f-4d8e-b6a1-0c2d9e8f7a53"
DOC_SECRET = "your-client-secret-value"
DOC_ORG = "https://contoso.crm4.dynamics.com"
# a second application user (docs/configuration.md, d365.app_users)
DOC_POOL_CLIENT = "6d1f0b7e-2c4a-4e9b-8f3d-5a7c9e1b2d40"
DOC_POOL_SECRET = "second-client-secret-value"

DB = "myapp"
RUN_FENCES = {"sql"}
QUIET_FENCES = {"text", "psql-output", "psql", "sh", "ini", ""}
MSG_RE = re.compile(r"^(ERROR|WARNING|DETAIL|HINT|NOTICE):\s")

# Debian 12's stock pg_hba.conf (pg_createcluster's defaults).
STOCK_HBA = """\
local   all             postgres                                peer
local   all             all                                     peer
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     peer
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""

out_lock = threading.Lock()


def say(line):
    with out_lock:
        print(line, flush=True)


def diag(text):
    with out_lock:
        for line in str(text).rstrip("\n").split("\n"):
            print("# " + line, flush=True)


class Block:
    def __init__(self, page, line, lang, text, directives):
        self.page, self.line, self.lang, self.text = page, line, lang, text
        self.directives = directives
        self.expected = []          # message lines of the following ```text block
        self.output = None          # the following ```text block, for "output"

    @property
    def expect_error(self):
        return "error" in self.directives

    @property
    def skipped(self):
        return any(d.startswith("skip") for d in self.directives)


def parse(path):
    """(blocks, page directives, problems) of one markdown file."""
    name = os.path.relpath(path, REPO)
    lines = open(path, encoding="utf-8").read().split("\n")
    blocks, page_dirs, problems, pending = [], [], [], []
    i = 0
    last_sql = None
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$", line)
        if m:
            d = m.group(1)
            if d.startswith("after ") or d == "standalone":
                page_dirs.append(d)
            else:
                pending.append(d)
            i += 1
            continue
        m = re.match(r"^(\s*)```(.*)$", line)
        if m:
            indent, lang = m.group(1), m.group(2).strip()
            start = i + 1
            j = start
            while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
                j += 1
            body = "\n".join(l[len(indent):] if l.startswith(indent) else l
                             for l in lines[start:j])
            if lang not in RUN_FENCES | QUIET_FENCES:
                problems.append("%s:%d: fence language %r is not one of %s (or none)"
                                % (name, i + 1, lang, ", ".join(sorted((RUN_FENCES | QUIET_FENCES) - {""}))))
            b = Block(name, i + 1, lang, body, pending)
            pending = []
            if lang in RUN_FENCES:
                blocks.append(b)
                last_sql = b
            elif lang in ("text", "psql-output") and last_sql is not None:
                last_sql.expected = [l.strip() for l in body.split("\n") if MSG_RE.match(l.strip())]
                last_sql.output = body
                last_sql = None
            else:
                last_sql = None
            i = j + 1
            continue
        if line.strip() and not line.startswith("<!--"):
            # prose between a sql block and a text block ends the pairing
            last_sql = None
        i += 1
    return blocks, page_dirs, problems


def slug(heading):
    """GitHub's anchor for a heading."""
    h = heading.strip().lower().replace("`", "")
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def anchors(path):
    found, seen, fence = set(), {}, False
    for line in open(path, encoding="utf-8").read().split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m and not fence:
            a = slug(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            found.add(a if n == 0 else "%s-%d" % (a, n))
    return found


def check_links(pages):
    """Relative links between the docs: the file exists, and so does the anchor."""
    problems = []
    for p in pages:
        base = os.path.dirname(os.path.join(REPO, p))
        text = open(os.path.join(REPO, p), encoding="utf-8").read()
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(REPO, p)
            if not os.path.exists(full):
                problems.append("%s: link to %s: no such file" % (p, target))
            elif anchor and full.endswith(".md") and anchor not in anchors(full):
                problems.append("%s: link to %s: no such heading" % (p, target))
    return problems


def conf_from_docs():
    """The ```ini blocks marked postgresql.conf (README.md, docs/operations.md):
    (the one in docs/operations.md, problems)."""
    found = {}
    for page in ("README.md", os.path.join("docs", "operations.md")):
        lines = open(os.path.join(REPO, page), encoding="utf-8").read().split("\n")
        for k, line in enumerate(lines):
            if re.match(r"^\s*<!--\s*docs-test:\s*postgresql\.conf\s*-->", line):
                j = k + 1
                while j < len(lines) and not lines[j].startswith("```"):
                    j += 1
                e = j + 1
                while e < len(lines) and not lines[e].startswith("```"):
                    e += 1
                found[page] = "\n".join(lines[j + 1:e]) + "\n"
    problems = []
    conf = found.get(os.path.join("docs", "operations.md"))
    if conf is None:
        problems.append("docs/operations.md has no ```ini block marked <!-- docs-test: postgresql.conf -->")
    elif found.get("README.md") != conf:
        problems.append("README.md's ```ini block marked <!-- docs-test: postgresql.conf --> is missing"
                        " or differs from docs/operations.md's")
    return conf, problems


def rewrite(sql, sim_url):
    """The documented substitution: the Dynamics URLs become the simulator's."""
    sql = sql.replace("'" + DOC_ORG + "'", "'" + sim_url + "'")
    sql = re.sub(r"\borg_url(\s*)=(\s*)'",
                 lambda m: "authority_url = '%s', org_url%s=%s'" % (sim_url, m.group(1), m.group(2)),
                 sql)
    return sql


class Cluster:
    def __init__(self, work, name, conf):
        self.dir = os.path.join(work, name)
        self.sock = os.path.join(self.dir, "sock")
        self.data = os.path.join(self.dir, "data")
        os.makedirs(self.sock)
        for d in (self.dir, self.sock):
            os.chmod(d, 0o755)
            shutil.chown(d, "postgres", "postgres")
        r = subprocess.run(["runuser", "-u", "postgres", "--", os.path.join(PG_BIN, "initdb"),
                            "-D", self.data, "-U", "postgres", "--no-sync"],
                           cwd=self.dir, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("initdb failed: " + r.stderr)
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
            f.write(STOCK_HBA)
        # in the documented order: the database first, then the server
        # set up for pg_cron and restarted
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\n# the test's own\nlisten_addresses = ''\nunix_socket_directories = '%s'\n"
                    "fsync = off\nlog_min_messages = warning\n" % self.sock)
        self.pg_ctl("start")
        rc, out, err = self.psql("postgres", "CREATE DATABASE %s" % DB)
        if rc != 0:
            raise RuntimeError("CREATE DATABASE failed: " + err)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\n# from docs/operations.md\n" + conf)
        self.pg_ctl("restart")
        # pg_cron's launcher connects at once; a missing database shows as
        # a FATAL within its one-second retry
        time.sleep(2)
        log = open(os.path.join(self.dir, "postgres.log")).read()
        self.order_problems = [l for l in log.split("\n") if "FATAL" in l and "does not exist" in l]
        self.fresh = True

    def pg_ctl(self, action):
        r = subprocess.run(["runuser", "-u", "postgres", "--", os.path.join(PG_BIN, "pg_ctl"),
                            "-D", self.data, "-w", "-l", os.path.join(self.dir, "postgres.log"),
                            action], cwd=self.dir, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("the cluster did not %s: %s" % (action, self.log_tail()))

    def log_tail(self, n=20):
        try:
            return "\n".join(open(os.path.join(self.dir, "postgres.log")).read().split("\n")[-n:])
        except OSError:
            return ""

    def psql(self, db, script=None, file=None, timeout=90, tuples=False):
        """Run psql as the postgres OS user (peer authentication)."""
        cmd = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
               "-P", "pager=off", "-h", self.sock, "-d", db]
        if tuples:
            cmd += ["-A", "-t"]
        if file:
            cmd += ["-f", file]
        else:
            cmd += ["-c", script]
        try:
            r = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout)
            return r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired:
            return 124, "", "timed out after %d s" % timeout

    def stop(self):
        subprocess.run(["runuser", "-u", "postgres", "--", os.path.join(PG_BIN, "pg_ctl"),
                        "-D", self.data, "-m", "immediate", "stop"],
                       cwd=self.dir, capture_output=True)


def fresh_db(cl):
    if cl.fresh:
        # made by the cluster's set-up, with pg_cron's launcher connected:
        # dropping it would end the launcher for good (a clean exit)
        cl.fresh = False
        return
    cl.psql("postgres", "DROP DATABASE IF EXISTS %s WITH (FORCE)" % DB)
    # roles are per cluster: drop the ones the previous page made
    rc, out, err = cl.psql("postgres", "SELECT rolname FROM pg_roles"
                                       " WHERE rolname !~ '^pg_' AND rolname <> 'postgres'", tuples=True)
    for r in [x.strip() for x in out.split("\n") if x.strip()]:
        cl.psql("postgres", 'DROP ROLE IF EXISTS "%s"' % r.replace('"', '""'))
    rc, out, err = cl.psql("postgres", "CREATE DATABASE %s" % DB)
    if rc != 0:
        raise RuntimeError("CREATE DATABASE failed: " + err)


def script_for(blocks, sim_url, work, tag):
    """A psql script running the blocks, with markers on standard error."""
    parts = ["\\set ON_ERROR_STOP 1"]
    for n, b in enumerate(blocks):
        if b.skipped:
            continue
        parts.append("\\warn '@@block %d'" % n)
        parts.append("\\echo '@@block %d (line %d)'" % (n, b.line))
        if b.expect_error:
            parts.append("\\set ON_ERROR_STOP 0")
        parts.append(rewrite(b.text, sim_url))
        if b.expect_error:
            parts.append("\\set ON_ERROR_STOP 1")
    parts.append("\\warn '@@end'")
    path = os.path.join(work, tag + ".sql")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    os.chmod(path, 0o644)
    return path


def table_lines(text):
    """Printed results, compared line by line: messages, row counts and empty
    lines left out, trailing blanks dropped."""
    out = []
    for line in text.split("\n"):
        line = line.rstrip()
        if not line or re.match(r"^\(\d+ rows?\)$", line) or MSG_RE.match(line.strip()):
            continue
        if re.match(r"^(CONTEXT|LINE \d+):", line.strip()):
            continue
        out.append(line)
    return out


def judge(blocks, rc, stderr, stdout=""):
    """Problems found in one session's output, as text lines."""
    printed, cur = {}, None
    for line in stdout.split("\n"):
        m = re.match(r"^@@block (\d+) \(line \d+\)$", line)
        if m:
            cur = int(m.group(1))
            printed[cur] = []
            continue
        if cur is not None:
            printed[cur].append(line)
    sections, cur = {}, None
    for line in stderr.split("\n"):
        m = re.match(r"^@@block (\d+)$", line)
        if m:
            cur = int(m.group(1))
            sections[cur] = []
            continue
        if line == "@@end":
            cur = "end"
            continue
        if cur is not None and cur != "end":
            sections[cur].append(re.sub(r"^psql:[^:]*:\d+: ", "", line))
    problems = []
    for n, b in enumerate(blocks):
        if b.skipped:
            continue
        if n not in sections:
            problems.append("%s:%d: not run (an earlier block stopped the session)" % (b.page, b.line))
            break
        got = sections[n]
        errors = [l for l in got if l.startswith("ERROR:")]
        if b.expect_error and not errors:
            problems.append("%s:%d: marked docs-test: error, but ran without error" % (b.page, b.line))
        if not b.expect_error and errors:
            problems.append("%s:%d: %s" % (b.page, b.line, " | ".join(got[:4])))
            break
        if "output" in b.directives:
            if b.output is None:
                problems.append("%s:%d: marked docs-test: output, but no ```text block follows"
                                % (b.page, b.line))
            else:
                want, have = table_lines(b.output), table_lines("\n".join(printed.get(n, [])))
                if want != have:
                    k = next((i for i in range(max(len(want), len(have)))
                              if i >= len(want) or i >= len(have) or want[i] != have[i]), 0)
                    problems.append("%s:%d: printed output differs at its line %d: %r, the block printed %r"
                                    % (b.page, b.line, k + 1, want[k] if k < len(want) else None,
                                       have[k] if k < len(have) else None))
        stripped = [l.strip() for l in got]
        for want in b.expected:
            if want not in stripped:
                problems.append("%s:%d: printed %r, but the block said: %s"
                                % (b.page, b.line, want, " | ".join(got[:4]) or "nothing"))
    if rc not in (0,) and not problems:
        problems.append("psql exited with status %d: %s" % (rc, stderr.strip()[-300:]))
    return problems


def run_page(cl, page, blocks, readme_blocks, needs_readme, sim_url, simctl, work):
    fresh_db(cl)
    subprocess.run([simctl, "reset"], capture_output=True, env=dict(os.environ, D365_SIM_URL=sim_url))
    problems = []
    if needs_readme:
        path = script_for(readme_blocks, sim_url, work, "readme-for-" + page.replace("/", "_"))
        rc, out, err = cl.psql(DB, file=path)
        p = judge(readme_blocks, rc, err, out)
        if p:
            return ["README.md (run first): " + x for x in p]
    path = script_for(blocks, sim_url, work, page.replace("/", "_"))
    rc, out, err = cl.psql(DB, file=path)
    if os.environ.get("D365_DOCS_SHOW") == page:
        diag(out + err)         # for writing the printed outputs
    problems += judge(blocks, rc, err, out)
    return problems


def cron_check(cl, readme_blocks, sim_url, result, functions):
    """d365_schedule() with the documented set-up: a job must run and succeed.
    Also lists the extension's d365_* functions and procedures (functions)."""
    try:
        fresh_db(cl)
        path = script_for(readme_blocks, sim_url, cl.dir, "readme-cron")
        rc, out, err = cl.psql(DB, file=path)
        p = judge(readme_blocks, rc, err, out)
        if p:
            result.append("the README's blocks failed: " + "; ".join(p))
            return
        rc, out, err = cl.psql(DB, "SELECT DISTINCT proname FROM pg_proc"
                                   " WHERE pronamespace = 'd365'::regnamespace"
                                   "   AND proname LIKE 'd365\\_%' ORDER BY 1", tuples=True)
        functions += [l.strip() for l in out.split("\n") if l.strip()]
        rc, out, err = cl.psql(DB, "UPDATE crm_person SET email = 'tom@okafor.example' WHERE id = 2;"
                                   "SELECT * FROM d365.d365_schedule(contacts => '* * * * *');"
                                   "SELECT now()", tuples=True)
        if rc != 0:
            result.append("d365_schedule failed: " + err)
            return
        t0 = out.strip().split("\n")[-1]
        deadline = time.time() + 80
        while time.time() < deadline:
            rc, out, err = cl.psql(DB, "SELECT d.status || '|' || coalesce(d.return_message, '')"
                                       "  FROM cron.job_run_details d JOIN cron.job j USING (jobid)"
                                       " WHERE j.jobname = 'd365-contact-sync' AND d.status IN ('succeeded', 'failed')"
                                       "   AND d.start_time >= '%s' ORDER BY d.runid DESC LIMIT 1" % t0,
                                   tuples=True)
            line = out.strip()
            if line:
                status, _, msg = line.partition("|")
                if status != "succeeded":
                    result.append("the job's run is %s: %s" % (status, msg))
                    return
                rc, out, err = cl.psql(DB, "SELECT updated || '|' || coalesce(message, '') || '|' || created || '|' || unchanged || '|' || failed"
                                           "  FROM d365.sync_run WHERE kind = 'contacts'"
                                           " AND started_at >= '%s' ORDER BY id DESC LIMIT 1" % t0,
                                       tuples=True)
                if not out.strip().startswith("1||"):
                    result.append("the job succeeded, but its d365.sync_run row says"
                                  " (updated|message) %r" % out.strip())
                    rc, out, err = cl.psql(DB, "SELECT * FROM d365.sync_run; SELECT * FROM d365.contact_state;"
                                               " SELECT * FROM cron.job_run_details; SELECT now()")
                    result.append(out + err)
                    return
                result.append("ok")
                return
            time.sleep(1)
        rc, out, err = cl.psql(DB, "SELECT status, return_message FROM cron.job_run_details")
        result.append("no run of d365-contact-sync finished within 80 s: " + out + err + cl.log_tail(5))
    except Exception as e:          # reported as a "not ok" line
        result.append("%s" % e)


def start_sim(work, name):
    """A simulator on a free loopback port accepting the docs' credentials."""
    portfile = os.path.join(work, name + ".ports")
    log = open(os.path.join(work, name + ".log"), "w")
    proc = subprocess.Popen(["/usr/bin/python3", os.path.join(REPO, "sim", "dataverse_sim.py"),
                             "--port", "0", "--port-file", portfile,
                             "--tenant", DOC_TENANT, "--client-id", DOC_CLIENT,
                             "--client-secret", DOC_SECRET,
                             "--app-user", DOC_POOL_CLIENT + ":" + DOC_POOL_SECRET],
                            stdout=log, stderr=subprocess.STDOUT)
    for _ in range(100):
        if os.path.exists(portfile) and os.path.getsize(portfile) > 0:
            break
        time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("the simulator did not start")
    return proc, "http://127.0.0.1:%s" % open(portfile).read().split()[0]


def main():
    pages = ["README.md"] + sorted("docs/" + f for f in os.listdir(os.path.join(REPO, "docs"))
                                   if f.endswith(".md"))
    parsed = {}
    fence_problems = []
    for p in pages:
        blocks, dirs, probs = parse(os.path.join(REPO, p))
        parsed[p] = (blocks, dirs)
        fence_problems += probs
    if fence_problems:
        say("not ok docs fences - every fence names a language the runner knows")
        diag("\n".join(fence_problems))
    else:
        say("ok docs fences - every fence names a language the runner knows")

    link_problems = check_links(pages)
    if link_problems:
        say("not ok docs links - every link between the pages reaches a file and a heading")
        diag("\n".join(link_problems))
    else:
        say("ok docs links - every link between the pages reaches a file and a heading")

    conf, conf_problems = conf_from_docs()
    if conf_problems:
        say("not ok docs postgresql.conf - the README and docs/operations.md show the same pg_cron set-up")
        diag("\n".join(conf_problems))
    else:
        say("ok docs postgresql.conf - the README and docs/operations.md show the same pg_cron set-up")
    if conf is None:
        return

    work = tempfile.mkdtemp(prefix="d365docs.")
    os.chmod(work, 0o755)
    sims = []
    clusters = []
    try:
        sims.append(start_sim(work, "sim"))
        sim_url = sims[-1][1]
        # the pg_cron check has a simulator of its own: the pages reset theirs
        sims.append(start_sim(work, "cron-sim"))
        cron_sim_url = sims[-1][1]
        simctl = os.path.join(REPO, "sim", "simctl")

        readme_blocks = parsed["README.md"][0]
        # the pg_cron check waits for a minute boundary: start it first,
        # on a cluster of its own, and run the pages meanwhile
        cron_cl = Cluster(work, "cron", conf)
        clusters.append(cron_cl)
        cron_result = []
        functions = []
        t = threading.Thread(target=cron_check,
                             args=(cron_cl, readme_blocks, cron_sim_url, cron_result, functions))
        t.start()

        cl = Cluster(work, "pages", conf)
        clusters.append(cl)
        if cl.order_problems:
            say("not ok docs install order - the database exists before pg_cron is pointed at it")
            diag("\n".join(cl.order_problems))
        else:
            say("ok docs install order - the database exists before pg_cron is pointed at it:"
                " no FATAL in the server log")
        for p in pages:
            blocks, dirs = parsed[p]
            needs_readme = p != "README.md" and "standalone" not in dirs
            n = sum(1 for b in blocks if not b.skipped)
            try:
                problems = run_page(cl, p, blocks, readme_blocks, needs_readme, sim_url, simctl, work)
            except Exception as e:
                problems = ["%s" % e]
            if problems:
                say("not ok docs %s - %d SQL blocks run as printed" % (p, n))
                diag("\n".join(problems))
            else:
                say("ok docs %s - %d SQL blocks run as printed" % (p, n))

        t.join(120)
        documented = anchors(os.path.join(REPO, "docs", "sql-api.md"))
        missing = [f for f in functions if f not in documented]
        if functions and not missing:
            say("ok docs sql-api - every d365_* function of the extension has its entry in docs/sql-api.md")
        else:
            say("not ok docs sql-api - every d365_* function of the extension has its entry in docs/sql-api.md")
            diag("missing: " + (", ".join(missing) if functions else "(the functions could not be listed)"))
        if cron_result == ["ok"]:
            say("ok docs pg_cron - with the documented set-up a d365_schedule() job ran and succeeded")
        else:
            say("not ok docs pg_cron - with the documented set-up a d365_schedule() job ran and succeeded")
            diag("\n".join(cron_result) or "the check did not finish")
    except Exception as e:
        say("not ok docs snippets - set-up: %s" % e)
    finally:
        for c in clusters:
            c.stop()
        for proc, _ in sims:
            proc.kill()
            proc.wait()
        if not os.environ.get("D365_KEEP_WORK"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
