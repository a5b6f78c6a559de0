#!/usr/bin/env python3
"""Generate d365sync's upgrade scripts; check that the committed ones are current.

Every function and procedure is defined in one place: the install script of
the version that has it.  For the version in the making that is the parts in
sql/install/ (the Makefile concatenates them into sql/d365sync--X.Y.sql);
for a released version it is the frozen sql/d365sync--X.Y.sql.

An upgrade script sql/d365sync--A--B.sql is generated from

  * sql/upgrade/A--B.sql: the hand-written steps, which cannot be
    re-created (tables, columns, indexes, constraints, triggers, views,
    types, data moves, drops).  A line "-- @functions" divides it: what
    stands above runs before the functions, what stands below runs after
    them.  It defines no function.
  * the install script of B: every CREATE FUNCTION / CREATE PROCEDURE
    (written as CREATE OR REPLACE), with the ALTER, COMMENT ON, GRANT and
    REVOKE statements on functions and procedures, in the install script's
    order, each with the comment lines directly above it.

Usage (the Makefile's "make regen" and test/generated.sh call it):
  scripts/gen-sql.py upgrade A B   print the upgrade script from A to B
  scripts/gen-sql.py regen         write every sql/d365sync--A--B.sql that
                                   has a sql/upgrade/A--B.sql
  scripts/gen-sql.py check         compare them with what would be written;
                                   prints "ok ..." / "not ok ..." lines and
                                   exits 1 when one is out of date
  scripts/gen-sql.py functions V   list the functions of V's install script
Exit status 2 and a message on stderr for a source it refuses.
"""
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT = "d365sync"
MARKER = "-- @functions"
REGEN = "make regen"


class SourceError(Exception):
    pass


def rel(path):
    return os.path.relpath(path, REPO)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def current_version():
    m = re.search(r"^default_version\s*=\s*'([^']+)'", read(os.path.join(REPO, EXT + ".control")), re.M)
    if not m:
        raise SourceError("d365sync.control names no default_version")
    return m.group(1)


def install_parts():
    d = os.path.join(REPO, "sql", "install")
    # byte order, as the Makefile's $(sort $(wildcard ...)) concatenates them
    return [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".sql")]


def install_script(version):
    """The install script of version: the frozen file of a released
    version, the parts of sql/install/ for the version being made."""
    if version == current_version():
        return "".join(read(p) for p in install_parts()), "sql/install/*.sql"
    path = os.path.join(REPO, "sql", "%s--%s.sql" % (EXT, version))
    if not os.path.exists(path):
        raise SourceError("no install script for %s: %s is missing" % (version, rel(path)))
    return read(path), rel(path)


def statements(text, origin):
    """Split SQL text into (start, end) spans of whole statements, each
    ending at its semicolon.  Understands -- and nested /* */ comments,
    '...' and E'...' strings, "..." identifiers, $tag$...$tag$ bodies and
    psql backslash lines (a span of their own)."""
    spans = []
    i, n = 0, len(text)
    start = None
    while i < n:
        c = text[i]
        if start is None:
            if c.isspace():
                i += 1
                continue
            if text.startswith("--", i):
                j = text.find("\n", i)
                i = n if j < 0 else j + 1
                continue
            if text.startswith("/*", i):
                i = skip_block_comment(text, i, origin)
                continue
            if c == "\\":
                j = text.find("\n", i)
                j = n if j < 0 else j
                spans.append((i, j))
                i = j
                continue
            start = i
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif text.startswith("/*", i):
            i = skip_block_comment(text, i, origin)
        elif c == "'":
            backslash = i > 0 and text[i - 1] in "eE" and (i < 2 or not (text[i - 2].isalnum() or text[i - 2] == "_"))
            i += 1
            while True:
                if i >= n:
                    raise SourceError("%s: a string never ends (line %d)" % (origin, line_of(text, start)))
                if backslash and text[i] == "\\":
                    i += 2
                    continue
                if text[i] == "'":
                    if text.startswith("''", i):
                        i += 2
                        continue
                    i += 1
                    break
                i += 1
        elif c == '"':
            j = text.find('"', i + 1)
            if j < 0:
                raise SourceError("%s: a quoted name never ends (line %d)" % (origin, line_of(text, start)))
            i = j + 1
        elif c == "$" and not (i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", text[i:])
            if m:
                tag = m.group(0)
                j = text.find(tag, i + len(tag))
                if j < 0:
                    raise SourceError("%s: a %s body never ends (line %d)" % (origin, tag, line_of(text, i)))
                i = j + len(tag)
            else:
                i += 1
        elif c == ";":
            spans.append((start, i + 1))
            start = None
            i += 1
        else:
            i += 1
    if start is not None and text[start:].strip():
        raise SourceError("%s: the last statement has no semicolon (line %d)" % (origin, line_of(text, start)))
    return spans


def skip_block_comment(text, i, origin):
    depth, j = 0, i
    while j < len(text):
        if text.startswith("/*", j):
            depth += 1
            j += 2
        elif text.startswith("*/", j):
            depth -= 1
            j += 2
            if depth == 0:
                return j
        else:
            j += 1
    raise SourceError("%s: a comment never ends (line %d)" % (origin, line_of(text, i)))


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def words(stmt):
    """The statement's text without comments, quoted bodies and strings,
    upper-cased and with white space folded: for telling its kind."""
    out = re.sub(r"\$((?:[A-Za-z_][A-Za-z0-9_]*)?)\$.*?\$\1\$", " $$ ", stmt, flags=re.S)
    out = re.sub(r"'(?:[^']|'')*'", " '' ", out)
    out = re.sub(r"--[^\n]*", " ", out)
    out = re.sub(r"/\*.*?\*/", " ", out, flags=re.S)
    return " ".join(out.split()).upper()


CREATE_ROUTINE = re.compile(r"^CREATE (OR REPLACE )?(FUNCTION|PROCEDURE) ")
ROUTINE_KIND = r"(FUNCTION|PROCEDURE|ROUTINE|ALL (FUNCTIONS|PROCEDURES|ROUTINES) IN SCHEMA)"
ACCOMPANIES = [
    re.compile(r"^ALTER (FUNCTION|PROCEDURE|ROUTINE) "),
    re.compile(r"^COMMENT ON (FUNCTION|PROCEDURE|ROUTINE) "),
    re.compile(r"^(GRANT|REVOKE) .* ON " + ROUTINE_KIND + " "),
]
ROUTINE_NAME = re.compile(r"^CREATE (?:OR REPLACE )?(?:FUNCTION|PROCEDURE) ([A-Z0-9_.\"]+)\s*\(")


def leading_comment(text, start):
    """Start of the comment lines (-- lines or one /* */ block) that stand
    directly above position start, with no blank line between."""
    line_start = text.rfind("\n", 0, start) + 1
    if text[line_start:start].strip():
        return start            # something else on the statement's line
    begin = line_start
    while begin > 0:
        prev_start = text.rfind("\n", 0, begin - 1) + 1
        prev = text[prev_start:begin - 1].strip()
        if prev.startswith("--"):
            begin = prev_start
        elif prev.endswith("*/"):
            opening = text.rfind("/*", 0, begin - 1)
            opening_line = text.rfind("\n", 0, opening) + 1
            if opening >= 0 and not text[opening_line:opening].strip():
                begin = opening_line
            break
        else:
            break
    return begin


def routines(text, origin):
    """The function part of an install script: the CREATE FUNCTION and
    CREATE PROCEDURE statements as CREATE OR REPLACE and the statements
    that accompany them, in order, each with its comment."""
    out, names = [], []
    for start, end in statements(text, origin):
        stmt = text[start:end]
        if stmt.startswith("\\"):
            continue
        w = words(stmt)
        m = CREATE_ROUTINE.match(w)
        if m:
            name = ROUTINE_NAME.match(w)
            if not name:
                raise SourceError("%s: cannot read the name of the routine at line %d" % (origin, line_of(text, start)))
            names.append(name.group(1).lower())
            if not m.group(1):
                stmt = re.sub(r"^CREATE\s+", "CREATE OR REPLACE ", stmt, count=1, flags=re.I)
        elif not any(p.match(w) for p in ACCOMPANIES):
            continue
        out.append(text[leading_comment(text, start):start] + stmt)
    return out, names


def drops(text):
    """Names of the routines a hand-written script drops."""
    return {m.lower() for m in re.findall(r"DROP (?:FUNCTION|PROCEDURE|ROUTINE) (?:IF EXISTS )?([A-Z0-9_.\"]+)",
                                          words_keep_all(text))}


def words_keep_all(text):
    return " ".join(re.sub(r"--[^\n]*", " ", text).split()).upper()


def hand_written(a, b):
    path = os.path.join(REPO, "sql", "upgrade", "%s--%s.sql" % (a, b))
    if not os.path.exists(path):
        raise SourceError("%s is missing: the hand-written steps of the upgrade from %s to %s" % (rel(path), a, b))
    text = read(path)
    lines = text.splitlines(keepends=True)
    marks = [k for k, l in enumerate(lines) if l.rstrip() == MARKER]
    if len(marks) != 1:
        raise SourceError('%s: needs exactly one line "%s" (before it: the steps that run before the '
                          'functions; after it: the steps that run after them), found %d'
                          % (rel(path), MARKER, len(marks)))
    before, after = "".join(lines[:marks[0]]), "".join(lines[marks[0] + 1:])
    for part in (before, after):
        for start, end in statements(part, rel(path)):
            w = words(part[start:end])
            if CREATE_ROUTINE.match(w):
                raise SourceError("%s: line %d defines a function; functions are defined only in sql/install/ "
                                  "(the generator copies them into the upgrade script)"
                                  % (rel(path), line_of(part, start) + (0 if part is before else marks[0] + 1)))
    return before, after, rel(path)


def upgrade(a, b):
    before, after, hw = hand_written(a, b)
    text, origin = install_script(b)
    body, names = routines(text, origin)
    old_text, old_origin = install_script(a)
    _, old_names = routines(old_text, old_origin)
    dropped = drops(before + after)
    gone = sorted(set(old_names) - set(names) - dropped)
    if gone:
        raise SourceError("%s: %s of %s %s no longer in %s's install script: drop %s in %s (DROP FUNCTION name(argument types);)"
                          % (hw, ", ".join(gone), a, "is" if len(gone) == 1 else "are", b,
                             "it" if len(gone) == 1 else "them", hw))
    head = """-- Code generated by scripts/gen-sql.py; DO NOT EDIT.
/*
 * d365sync upgrade from {a} to {b}: ALTER EXTENSION d365sync UPDATE.
 *
 * GENERATED FILE, do not edit.  scripts/gen-sql.py writes it ({regen})
 * from two sources:
 *   - {hw}: the hand-written steps (tables, columns,
 *     data, drops), before and after the functions;
 *   - the {b} install script: every function and procedure ({n}), as
 *     CREATE OR REPLACE, with the ALTER, COMMENT, GRANT and REVOKE
 *     statements on them.  While {b} is being made that is the parts in
 *     sql/install/; once {b} is released, the frozen sql/d365sync--{b}.sql.
 * docs/development.md says how to add or change a function, a table or a
 * column.
 */
\\echo Use "ALTER EXTENSION d365sync UPDATE TO '{b}'" to load this file. \\quit
""".format(a=a, b=b, hw=hw, n=len(names), regen=REGEN)
    rule = "-- " + "=" * 74 + "\n"
    out = [head, "\n", rule, "-- Before the functions (%s)\n" % hw, rule, before.rstrip("\n") + "\n", "\n",
           rule, "-- The functions of %s\n" % b, rule]
    for r in body:
        out.append("\n" + r.rstrip() + "\n")
    out += ["\n", rule, "-- After the functions (%s)\n" % hw, rule, after.rstrip("\n") + "\n"]
    return "".join(out)


def pairs():
    d = os.path.join(REPO, "sql", "upgrade")
    found = []
    for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        m = re.fullmatch(r"(\d+\.\d+)--(\d+\.\d+)\.sql", n)
        if m:
            found.append((m.group(1), m.group(2)))
    return found


def target(a, b):
    return os.path.join(REPO, "sql", "%s--%s--%s.sql" % (EXT, a, b))


def main(argv):
    if len(argv) == 4 and argv[1] == "upgrade":
        sys.stdout.write(upgrade(argv[2], argv[3]))
        return 0
    if len(argv) == 3 and argv[1] == "functions":
        text, origin = install_script(argv[2])
        print("\n".join(routines(text, origin)[1]))
        return 0
    if len(argv) == 2 and argv[1] == "regen":
        for a, b in pairs():
            path = target(a, b)
            new = upgrade(a, b)
            if not os.path.exists(path) or read(path) != new:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
                print("wrote %s" % rel(path))
            else:
                print("%s is up to date" % rel(path))
        return 0
    if len(argv) == 2 and argv[1] == "check":
        bad = 0
        for a, b in pairs():
            path = target(a, b)
            try:
                new = upgrade(a, b)
            except SourceError as e:
                print("not ok - %s cannot be generated: %s" % (rel(path), e))
                bad += 1
                continue
            if os.path.exists(path) and read(path) == new:
                print("ok - %s is generated from its sources and up to date" % rel(path))
            else:
                print("not ok - %s is %s: run '%s' (or python3 scripts/gen-sql.py regen) and commit the result"
                      % (rel(path), "out of date" if os.path.exists(path) else "missing", REGEN))
                bad += 1
        if not pairs():
            print("not ok - no sql/upgrade/A--B.sql: nothing to check")
            bad += 1
        return 1 if bad else 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except SourceError as e:
        sys.stderr.write("gen-sql.py: %s\n" % e)
        sys.exit(2)
