#!/usr/bin/env python3
"""Prints the backup and restore figures for a store of 1 M tasks (issue 17's closing note).

Usage: scripts/backup-figures.py [target/release/sitegate] [TASKS]

Makes a one-site federation with `sitegate init`, lets `sitegate serve` create its store,
writes TASKS tasks (default 1,000,000; 90 % finished) straight into it with SQLite, starts the
site again and times `sitegate backup` of the running site, then `sitegate restore` into an
empty directory, and starts a site on the restored store to count its tasks.
"""
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/sitegate")
TASKS = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(config, port, env=None):
    proc = subprocess.Popen([BIN, "serve", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc
        except Exception:
            time.sleep(0.1)
    raise SystemExit("the site did not start")


def stop(proc):
    proc.terminate()
    proc.wait(60)


def main():
    work = tempfile.mkdtemp(prefix="sitegate-backup-")
    base = free_port()
    subprocess.run([BIN, "init", "--dir", f"{work}/fed", "--sites", "site1",
                    "--base-port", str(base), "--dev-password", "figures-pw"],
                   check=True, stdout=subprocess.DEVNULL)
    config = f"{work}/fed/site1.toml"
    stop(serve(config, base))
    db = f"{work}/fed/data/site1/sitegate.db"
    started = time.monotonic()
    # Recent times: `init` writes a 30-day retention, which would start removing older ones.
    t0 = int(time.time() * 1000) - TASKS - 60_000
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"""
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {TASKS})
        INSERT INTO tasks (id, user, site, state, progress, start_time, last_updated, end_time,
                           wf_type, resource_type, resource_id, resource_name, result_type,
                           result, error, warnings)
        SELECT lower(printf('%08x-%04x-4%03x-8%03x-%012x', i, i % 65536, i % 4096, i % 4096, i)),
               'svc', 'site1',
               CASE WHEN i % 10 = 0 THEN 'RUNNING' ELSE 'SUCCEEDED' END,
               CASE WHEN i % 10 = 0 THEN 40 ELSE 100 END,
               {t0} + i, {t0} + i + 5,
               CASE WHEN i % 10 = 0 THEN -1 ELSE {t0} + i + 5 END,
               'sync', 'vm', 'vm-' || i, 'machine ' || i,
               CASE WHEN i % 10 = 0 THEN NULL ELSE 'string' END,
               CASE WHEN i % 10 = 0 THEN NULL ELSE '"ok"' END,
               NULL, '[]'
        FROM n""")
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = os.path.getsize(db)
    print(f"store: {TASKS:,} tasks, {size / 2**20:.0f} MiB (written in {time.monotonic() - started:.0f} s)")

    site = serve(config, base)
    out = f"{work}/site1.backup"
    started = time.monotonic()
    r = subprocess.run([BIN, "backup", "--config", config, "--out", out],
                       check=True, capture_output=True, text=True)
    took = time.monotonic() - started
    print(f"`sitegate backup` of the running site: {took:.1f} s wall -> {r.stdout.strip()}")
    stop(site)

    restored = f"{work}/restored"
    started = time.monotonic()
    r = subprocess.run([BIN, "restore", "--config", config, "--from", out],
                       check=True, capture_output=True, text=True,
                       env={**os.environ, "SITEGATE_STORE__PATH": restored})
    took = time.monotonic() - started
    print(f"`sitegate restore` into an empty directory: {took:.1f} s wall -> {r.stdout.strip()}")
    started = time.monotonic()
    site = serve(config, base, {"SITEGATE_STORE__PATH": restored})
    print(f"a site on the restored store answered /healthz after {time.monotonic() - started:.1f} s")
    stop(site)
    subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
