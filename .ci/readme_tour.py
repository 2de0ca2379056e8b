#!/usr/bin/env python3
"""Turns the README's tour into a bash script that runs its commands as written.

Used by .ci/readme. Every indented code line of the README sections from "A short tour with
curl" up to "Dashboard" is a command (backslash continuations joined, comments on their own
line dropped). The script runs them in order in one shell, so `TOKEN=$(...)` carries on as
it does for a reader, and fails on the first command that does not work:

- an assignment must leave its variable non-empty;
- a `curl` must print something, and not an error envelope unless the README shows one as the
  next line (`# {"code":...}`): then the output must be exactly that line (when it has no
  "...");
- a `sitegate` client command must exit 0 (`tasks watch`: 0 or 2, a task may FAIL);
- placeholders take real values: `<task-id>` is a task of the logged-in user at the site the
  command names (the writer's own new task after `POST /tasks`), `<id1>`/`<id2>` two of
  them, `<ms>` that task's lastUpdated.

Only the substitutions above and `--password-stdin` (which the README names for scripts) are
added; the commands are otherwise the README's text.
"""
import re
import shlex
import sys

FIRST, LAST = "## A short tour with curl", "## Dashboard"


def commands(readme):
    out, in_range, pending = [], False, ""
    lines = readme.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(FIRST):
            in_range = True
        elif line.startswith(LAST):
            break
        if not in_range or not line.startswith("    "):
            continue
        text = line[4:]
        if pending:
            pending += "\n" + text
        elif text.lstrip().startswith("#"):
            stripped = text.strip()
            if out and stripped.startswith("# {") and out[-1][1] is None:
                out[-1] = (out[-1][0], stripped[2:])
            continue
        else:
            pending = text
        if pending.endswith("\\"):
            continue
        # A trailing "# comment" after a command is for the reader.
        command = re.sub(r"\s+#[^'\"]*$", "", pending)
        out.append((command, None))
        pending = ""
    return out


def site_of(command):
    m = re.search(r"site=(site\d)|--site (site\d)", command)
    return (m.group(1) or m.group(2)) if m else "site1"


def main():
    readme = open(sys.argv[1], encoding="utf-8").read()
    steps = commands(readme)
    if len(steps) < 10:
        sys.exit(f"readme_tour: found only {len(steps)} commands in the tour; did the README move?")
    print("set -uo pipefail")
    for n, (command, expected) in enumerate(steps, 1):
        run = command
        # Placeholders are filled in at run time by bash's ${cmd//...} (values are UUIDs and
        # numbers), so they work inside the README's quotes too.
        fill = []
        if "<task-id>" in run or "<ms>" in run:
            if "$SVC" in run:
                fill.append(("<task-id>", "$CREATED_ID"))
            else:
                site = site_of(run)
                print(f"PICKED=$(pick_task {site} 0)")
                print(f'PICKED_MS=$(last_updated {site} "$PICKED")')
                fill += [("<task-id>", "$PICKED"), ("<ms>", "$PICKED_MS")]
        if "<id1>" in run:
            print("ID1=$(pick_task site1 0); ID2=$(pick_task site1 1)")
            fill += [("<id1>", "$ID1"), ("<id2>", "$ID2")]
        if re.match(r"sitegate login\b", run):
            run += ' --password-stdin <<<"$DEMO_PASSWORD"'
        print(f"echo {shlex.quote('$ ' + command)}")
        print(f"cmd={shlex.quote(run)}")
        for placeholder, value in fill:
            print(f"cmd=${{cmd//{shlex.quote(placeholder)}/{value}}}")
        assign = re.match(r"([A-Z_]+)=\$\(", run)
        if assign:
            var = assign.group(1)
            print('eval "$cmd"')
            print(f'[ -n "${{{var}:-}}" ] || fail {n} "{var} is empty"')
            print(f'echo "  {var}=${{{var}:0:8}}..."')
            continue
        print('out=$(eval "$cmd")')
        print("rc=$?")
        print('printf "%s\\n" "$out" | head -c 600 | sed "s/^/  /"; echo')
        if run.startswith("sitegate tasks watch"):
            print(f'[ $rc = 0 ] || [ $rc = 2 ] || fail {n} "exit $rc"')
        else:
            print(f'[ $rc = 0 ] || fail {n} "exit $rc"')
        if not run.startswith(("sitegate extend", "sitegate logout")):
            print(f'[ -n "$out" ] || fail {n} "no output"')
        if expected and "..." not in expected:
            print(f'[ "$out" = {shlex.quote(expected)} ] || fail {n} "not what the README shows"')
        elif not expected:
            print(f'is_envelope "$out" && fail {n} "an error envelope"')
        if re.search(r"-X POST \S*/tasks\b(?!/)", run):
            print('CREATED_ID=$(printf "%s" "$out" | json_field id)')
            print(f'[ -n "$CREATED_ID" ] || fail {n} "no task id in the answer"')
    print('echo "tour: all commands worked"')


if __name__ == "__main__":
    main()
