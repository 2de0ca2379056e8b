#!/usr/bin/env python3
"""Figures for the boundaries findings (ARCHITECTURE.md, "Nothing waits without bound"): each
scenario of the boundaries review run at its full size against fresh `sitegate init`
federations on this machine (default limits unless the finding names its own), printing JSON.
The same findings are asserted, at test size, by crates/sitegate/tests/boundaries.rs and
security.rs; this is for the numbers. Needs only Python 3.11's standard library.

    cargo build --release -p sitegate && python3 scripts/boundary-figures.py target/release/sitegate
"""
import asyncio, json, os, random, string, subprocess, sys, tempfile, time, signal

BIN = sys.argv[1]
PW = "figures-Pw-1"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


async def http(port, method, path, token=None, body=None, headers=None, timeout=60):
    h = {"Host": "x", "Connection": "close"}
    if token:
        h["X-VCAV-Auth"] = token
    b = b""
    if body is not None:
        b = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
        h["Content-Length"] = str(len(b))
    h.update(headers or {})
    req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(req.encode() + b)
    await w.drain()
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await r.read(65536):
                data += chunk
    except TimeoutError:
        w.close()
        return None, {}, b""
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    hdrs = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, body


class Fed:
    def __init__(self, sites, env=None):
        self.dir = tempfile.mkdtemp()
        self.base = random.randint(20000, 40000) // 2 * 2
        subprocess.run([BIN, "init", "--dir", f"{self.dir}/fed", "--sites", ",".join(sites),
                        "--base-port", str(self.base), "--dev-password", PW], check=True,
                       capture_output=True)
        self.procs = {}
        for k, s in enumerate(sites):
            e = dict(os.environ)
            e.update((env or {}).get(s, {}))
            log = open(f"{self.dir}/{s}.log", "w")
            self.procs[s] = subprocess.Popen([BIN, "serve", "--config", f"{self.dir}/fed/{s}.toml"],
                                             cwd=self.dir, env=e, stdout=log, stderr=log)
        self.sites = sites

    def port(self, s):
        return self.base + 2 * self.sites.index(s)

    async def ready(self):
        for s in self.sites:
            for _ in range(200):
                try:
                    st, _, _ = await http(self.port(s), "GET", "/healthz", timeout=2)
                    if st == 200:
                        break
                except OSError:
                    pass
                await asyncio.sleep(0.05)

    async def login(self, s, user, pw=PW):
        st, h, b = await http(self.port(s), "POST", "/sessions",
                              body={"type": "localUser", "localUser": user, "localPassword": pw})
        return h.get("x-vcav-auth")

    def stop(self):
        for p in self.procs.values():
            p.kill()
            p.wait()


async def timed(coro):
    t = time.monotonic()
    r = await coro
    return r, (time.monotonic() - t) * 1000


async def main():
    out = {}
    # 1. Pipelined made-up methods.
    f = Fed(["site1"])
    await f.ready()
    pid = f.procs["site1"].pid
    before = rss_kib(pid)
    t0 = time.monotonic()
    n = 0
    async def burst():
        nonlocal n
        reqs = b"".join(f"{''.join(random.choices(string.ascii_uppercase, k=12))} /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode() for _ in range(1000))
        r, w = await asyncio.open_connection("127.0.0.1", f.port("site1"))
        w.write(reqs)
        await w.drain()
        got = 0
        data = b""
        async with asyncio.timeout(30):
            while got < 1000:
                c = await r.read(1 << 20)
                if not c:
                    break
                data += c
                got = data.count(b"HTTP/1.1 ")
        n += got
        w.close()
    while time.monotonic() - t0 < 4:
        await asyncio.gather(*(burst() for _ in range(4)))
    peak = rss_kib(pid)
    (st, _, body), ms = await timed(http(f.port("site1"), "GET", "/metrics"))
    out["1 made-up methods"] = {"requests": n, "rss_kib_before": before, "rss_kib_after": peak,
                                "metrics_bytes": len(body), "scrape_ms": round(ms, 1),
                                "request_series": body.count(b"sitegate_requests_total{")}
    f.stop()

    # 2. 1,100 long polls by alice; bob's Get One and /healthz meanwhile.
    f = Fed(["site1"])
    await f.ready()
    p = f.port("site1")
    alice, bob, svc = await f.login("site1", "alice"), await f.login("site1", "bob"), await f.login("site1", "svc")
    _, _, ta = await http(p, "POST", "/tasks", svc, {"user": "alice", "workflowInfo": {"type": "x"}})
    _, _, tb = await http(p, "POST", "/tasks", svc, {"user": "bob", "workflowInfo": {"type": "x"}})
    ta, tb = json.loads(ta), json.loads(tb)
    polls = [asyncio.create_task(http(p, "GET", f"/tasks/{ta['id']}?waitForChange=true&timeout=30s&lastUpdated={ta['lastUpdated']}", alice, timeout=40)) for _ in range(1100)]
    await asyncio.sleep(2)
    (st_b, _, _), ms_b = await timed(http(p, "GET", f"/tasks/{tb['id']}", bob, timeout=45))
    (st_h, _, _), ms_h = await timed(http(p, "GET", "/healthz", timeout=45))
    done = [t for t in polls if t.done()]
    codes = {}
    for t in done:
        s = t.result()[0]
        codes[s] = codes.get(s, 0) + 1
    out["2 long polls"] = {"alice_polls": 1100, "answered_at_once": codes, "bob_get_one": [st_b, round(ms_b, 1)],
                           "healthz": [st_h, round(ms_h, 1)], "rss_kib": rss_kib(f.procs["site1"].pid)}
    for t in polls:
        t.cancel()
    f.stop()

    # 3. 4,200 event streams by alice.
    f = Fed(["site1"])
    await f.ready()
    p = f.port("site1")
    alice, bob, svc = await f.login("site1", "alice"), await f.login("site1", "bob"), await f.login("site1", "svc")
    _, _, ta = await http(p, "POST", "/tasks", svc, {"user": "alice", "workflowInfo": {"type": "x"}})
    _, _, tb = await http(p, "POST", "/tasks", svc, {"user": "bob", "workflowInfo": {"type": "x"}})
    ta, tb = json.loads(ta), json.loads(tb)
    before = rss_kib(f.procs["site1"].pid)
    streams = [asyncio.create_task(http(p, "GET", f"/tasks/{ta['id']}/events", alice, timeout=20)) for _ in range(4200)]
    await asyncio.sleep(4)
    (st_b, _, _), ms_b = await timed(http(p, "GET", f"/tasks/{tb['id']}", bob, timeout=45))
    (st_w, _, _), ms_w = await timed(http(p, "PATCH", f"/tasks/{tb['id']}", svc, {"progress": 5}, timeout=45))
    (st_h, _, _), ms_h = await timed(http(p, "GET", "/healthz", timeout=45))
    codes = {}
    for t in streams:
        if t.done():
            s = t.result()[0]
            codes[s] = codes.get(s, 0) + 1
    out["3 event streams"] = {"alice_streams": 4200, "refused_at_once": codes, "rss_kib": [before, rss_kib(f.procs["site1"].pid)],
                              "bob_get_one": [st_b, round(ms_b, 1)], "writer_patch": [st_w, round(ms_w, 1)], "healthz": [st_h, round(ms_h, 1)]}
    for t in streams:
        t.cancel()
    f.stop()

    # 4. Queue wait within the request timeout: 4 slots held by slow bodies, timeout 2 s.
    f = Fed(["site1"], {"site1": {"SITEGATE_LIMITS__MAX_CONCURRENT_REQUESTS": "4", "SITEGATE_LIMITS__REQUEST_TIMEOUT_SECS": "2"}})
    await f.ready()
    p = f.port("site1")
    bob, svc = await f.login("site1", "bob"), await f.login("site1", "svc")
    slow = []
    for _ in range(12):
        r, w = await asyncio.open_connection("127.0.0.1", p)
        w.write(f"POST /tasks HTTP/1.1\r\nHost: x\r\nX-VCAV-Auth: {svc}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{".encode())
        await w.drain()
        slow.append(w)
    await asyncio.sleep(0.3)
    (st_b, h_b, _), ms_b = await timed(http(p, "GET", "/tasks", bob, timeout=60))
    out["4 queue wait"] = {"bob_get": [st_b, round(ms_b, 1), h_b.get("retry-after")]}
    for w in slow:
        w.close()
    f.stop()

    # 7. 2,000 re-extends: sessions left at site2.
    f = Fed(["site1", "site2"])
    await f.ready()
    alice = await f.login("site1", "alice")
    async def sessions2():
        _, _, b = await http(f.port("site2"), "GET", "/metrics")
        for l in b.decode().splitlines():
            if l.startswith("sitegate_sessions_active "):
                return float(l.split()[1])
    s0 = await sessions2()
    for _ in range(2000):
        await http(f.port("site1"), "POST", "/sessions/extend", alice, {"type": "multisite", "site": "site2"})
    await asyncio.sleep(3)
    out["7 re-extends"] = {"extends": 2000, "sessions_at_site2": [s0, await sessions2()]}

    # 8. Guesses through site1 with site1 locked out at site2.
    codes = {}
    admin = await f.login("site1", "admin")
    for i in range(200):
        who = [alice, admin][i % 2]
        st, _, _ = await http(f.port("site1"), "POST", "/sessions/extend", who,
                              {"type": "credentials", "site": "site2", "vcdUsername": f"guess{i}", "vcdPassword": "x"})
        codes[st] = codes.get(st, 0) + 1
    out["8 relayed guesses"] = {"guesses": 200, "answers": codes}
    f.stop()

    # 11. Concurrent patches, 30 rounds.
    f = Fed(["site1"])
    await f.ready()
    p = f.port("site1")
    svc = await f.login("site1", "svc")
    _, _, t = await http(p, "POST", "/tasks", svc, {"user": "alice", "workflowInfo": {"type": "x"}})
    t = json.loads(t)
    same = 0
    for i in range(30):
        a, b = await asyncio.gather(http(p, "PATCH", f"/tasks/{t['id']}", svc, {"progress": i}),
                                    http(p, "PATCH", f"/tasks/{t['id']}", svc, {"warnings": [{"code": "W", "msg": str(i), "args": [], "stacktrace": ""}]}))
        if json.loads(a[2])["lastUpdated"] == json.loads(b[2])["lastUpdated"]:
            same += 1
    out["11 concurrent patches"] = {"rounds": 30, "same_lastUpdated": same}
    # 12. Task size.
    big = {"warnings": [{"code": "W", "msg": "m" * 9000, "args": [], "stacktrace": ""} for _ in range(100)]}
    st, _, body = await http(p, "PATCH", f"/tasks/{t['id']}", svc, big)
    out["12 task size"] = {"patch_900kb_of_warnings": [st, body[:90].decode()]}
    f.stop()
    print(json.dumps(out, indent=1))


asyncio.run(main())
