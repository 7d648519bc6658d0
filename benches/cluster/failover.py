#!/usr/bin/env python3
"""Failover of a polled stream's lease holder, measured as subscribers and Redis see it.

Starts the simulator (`patchwire simulate`) and three nodes (a, b, c) of failover.toml on free
ports against the Redis on --redis-port (started by run.sh), subscribes to /streams/fleet on
every node (reconnecting with Last-Event-ID when a node goes away), then --kills times: waits
until the lease is steady, SIGKILLs its holder, watches the lease key in Redis until another
node holds it, restarts the killed node; then --terms times the same with SIGTERM (the node
hands its leases over as it shuts down).

For each kill it reports, from the subscribers' events (each change's first arrival on any
node, by the sequence number in its SSE id):
  gap        last change before the signal -> first change after it (what a subscriber sees;
             the stream changes every poll, so in steady state this is one poll interval)
  to change  signal -> first change after it
  to lease   signal -> the lease key naming another node (polled every 5 ms)
Each signal is sent at a random moment of the holder's renewal period, after the lease has
stayed with one node for 3 s.
and checks that every subscriber that stayed connected saw every change once, in order, in one
epoch. Prints a markdown table on stdout; progress on stderr; raw events under --out.

    failover.py --patchwire BIN --config failover.toml --redis-port PORT --kills 10 --terms 5 --out DIR
"""
import argparse
import json
import os
import pathlib
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

STREAM = "fleet"
LEASE_KEY = "patchwire:{%s}:lease" % STREAM
NODES = ("a", "b", "c")


def log(message):
    print(time.strftime("%H:%M:%S ", time.gmtime()) + message, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """The few commands needed, over RESP."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")

    def call(self, *args):
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = a.encode() if isinstance(a, str) else a
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        self.sock.sendall(out)
        return self._read()

    def _read(self):
        line = self.file.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b":"):
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)[:-2]
            return data.decode()
        if kind == b"*":
            return [self._read() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")

    def holder(self):
        value = self.call("GET", LEASE_KEY)
        return value.rsplit(" ", 1)[0] if value else None


class Subscriber(threading.Thread):
    """One SSE subscriber on one node; reconnects (with Last-Event-ID) until stopped."""

    def __init__(self, node, port, events):
        super().__init__(daemon=True)
        self.node, self.port, self.events = node, port, events
        self.last_id = None
        self.stop = threading.Event()
        # (epoch, seq) per connection, in arrival order: each list is one connection's view.
        self.connections = []

    def run(self):
        while not self.stop.is_set():
            try:
                self.follow()
            except OSError:
                pass
            time.sleep(0.05)

    def follow(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            request = f"GET /streams/{STREAM} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            if self.last_id:
                request += f"Last-Event-ID: {self.last_id}\r\n"
            sock.sendall((request + "\r\n").encode())
            sock.settimeout(0.5)
            seen = []
            self.connections.append(seen)
            buffer = b""
            while not self.stop.is_set():
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                now = time.time()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.startswith(b"id: " + STREAM.encode() + b":"):
                        event_id = line[4:].decode().strip()
                        _, epoch, seq = event_id.split(":")
                        self.last_id = event_id
                        seen.append((int(epoch), int(seq), "?"))
                        self.events.append((now, self.node, int(epoch), int(seq)))
                    elif line.startswith(b"event: ") and seen and seen[-1][2] == "?":
                        seen[-1] = (*seen[-1][:2], line[7:].decode().strip())


class Cluster:
    def __init__(self, args):
        self.args = args
        self.procs = {}
        self.ports = {}
        self.sim_port = free_port()
        self.logs = pathlib.Path(args.out)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sim = subprocess.Popen(
            [args.patchwire, "simulate", "--config", args.config],
            env={**os.environ, "PATCHWIRE__SIMULATOR__LISTEN": f"127.0.0.1:{self.sim_port}"},
            stdout=open(self.logs / "simulator.log", "wb"),
            stderr=subprocess.STDOUT,
        )

    def start(self, node):
        port = self.ports.setdefault(node, free_port())
        env = {
            **os.environ,
            "PATCHWIRE__SERVER__LISTEN": f"127.0.0.1:{port}",
            "PATCHWIRE__SIMULATOR__ENABLED": "false",
            "PATCHWIRE__STREAMS__0__URL": f"http://127.0.0.1:{self.sim_port}/feeds/{STREAM}",
            "PATCHWIRE__CLUSTER__REDIS": f"redis://127.0.0.1:{self.args.redis_port}",
            "PATCHWIRE__CLUSTER__NODE_ID": node,
        }
        self.procs[node] = subprocess.Popen(
            [self.args.patchwire, "run", "--config", self.args.config],
            env=env,
            stdout=open(self.logs / f"node-{node}.log", "ab"),
            stderr=subprocess.STDOUT,
        )

    def ready(self, node, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.procs[node].poll() is not None:
                raise RuntimeError(f"node {node} exited (see {self.logs}/node-{node}.log)")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[node]}/readyz", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"node {node} not ready after {timeout} s")

    def stop(self):
        for proc in [*self.procs.values(), self.sim]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def steady(redis, seconds, limit=60):
    """Waits until one node has held the lease for `seconds`; returns it."""
    deadline = time.time() + limit
    holder, since = None, time.time()
    while time.time() < deadline:
        current = redis.holder()
        if current != holder:
            holder, since = current, time.time()
        elif holder is not None and time.time() - since >= seconds:
            return holder
        time.sleep(0.05)
    raise RuntimeError(f"the lease did not settle within {limit} s")


def summary(values):
    if not values:
        return "—", "—", "—"
    return f"{min(values):.0f}", f"{statistics.median(values):.0f}", f"{max(values):.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patchwire", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--terms", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    cluster = Cluster(args)
    events = []  # (time, node, epoch, seq), appended by the subscribers (list.append is atomic)
    subscribers = {}
    trials = []
    try:
        for node in NODES:
            cluster.start(node)
        for node in NODES:
            cluster.ready(node)
        redis = Redis(args.redis_port)
        for node in NODES:
            subscribers[node] = Subscriber(node, cluster.ports[node], events)
            subscribers[node].start()
        plan = [signal.SIGKILL] * args.kills + [signal.SIGTERM] * args.terms
        for i, sig in enumerate(plan):
            holder = steady(redis, 3.0)
            # At a random phase of the holder's renewals (every third of the lease's TTL, 1 s
            # here): right after a renewal the lease has its whole TTL left.
            time.sleep(random.uniform(0, 1.0))
            proc = cluster.procs[holder]
            t_signal = time.time()
            proc.send_signal(sig)
            t_lease = None
            while time.time() - t_signal < 30:
                current = redis.holder()
                if current is not None and current != holder:
                    t_lease = time.time()
                    break
                time.sleep(0.005)
            proc.wait()
            t_exit = time.time()
            # Let changes flow on the new holder, then bring the node back.
            time.sleep(1.5)
            trials.append({
                "signal": sig.name, "node": holder, "t_signal": t_signal,
                "t_lease": t_lease, "t_exit": t_exit, "to": redis.holder(),
            })
            log(f"{i + 1}/{len(plan)} {sig.name} {holder}: lease to {trials[-1]['to']} after "
                f"{(t_lease - t_signal) * 1000 if t_lease else float('nan'):.0f} ms")
            cluster.start(holder)
            cluster.ready(holder)
        time.sleep(1)
    finally:
        for s in subscribers.values():
            s.stop.set()
        for s in subscribers.values():
            s.join(timeout=2)
        cluster.stop()

    # Each change's first arrival on any node.
    first = {}
    for t, _, epoch, seq in events:
        key = (epoch, seq)
        if key not in first or t < first[key]:
            first[key] = t
    arrivals = sorted((t, key) for key, t in first.items())
    epochs = sorted({key[0] for key in first})
    (pathlib.Path(args.out) / "events.json").write_text(json.dumps({"events": events, "trials": trials}))

    # Every subscriber's view, across its reconnections (each resumed with Last-Event-ID):
    # each change once, in order, in one epoch. A change may come as a snapshot when its patch
    # would be larger (several polls' worth of changes after a failover); a snapshot that
    # skips changes is a resume that failed (not wrong, but what resuming should avoid); a
    # patch that skips changes, or any change twice or out of order, is wrong.
    problems, failed_resumes = [], []
    for node, s in subscribers.items():
        seen = [(c, change) for c, changes in enumerate(s.connections) for change in changes]
        for (c0, prev), (c1, nxt) in zip(seen, seen[1:]):
            if nxt[0] == prev[0] and nxt[1] == prev[1] + 1:
                continue
            where = f"connection {c1}" if c0 == c1 else f"resuming in connection {c1}"
            what = f"node {node}, {where}: {prev[1]} then {nxt[1]} ({nxt[2]}), epochs {prev[0]}, {nxt[0]}"
            if nxt[2] == "snapshot" and (nxt[0] != prev[0] or nxt[1] > prev[1]):
                failed_resumes.append(what)
            else:
                problems.append(what)

    rows = []
    results = {}
    for trial in trials:
        before = [t for t, _ in arrivals if t < trial["t_signal"]]
        after = [t for t, _ in arrivals if t >= trial["t_signal"]]
        if not before or not after:
            continue
        gap = (after[0] - before[-1]) * 1000
        to_change = (after[0] - trial["t_signal"]) * 1000
        to_lease = (trial["t_lease"] - trial["t_signal"]) * 1000 if trial["t_lease"] else None
        results.setdefault(trial["signal"], []).append((gap, to_change, to_lease))
        rows.append(f"| {trial['signal']} | {trial['node']} → {trial['to']} | {gap:.0f} | "
                    f"{to_change:.0f} | {to_lease:.0f} |" if to_lease is not None else
                    f"| {trial['signal']} | {trial['node']} → {trial['to']} | {gap:.0f} | {to_change:.0f} | — |")

    # The steady-state gap between changes, for comparison: outside the trials' windows.
    quiet = []
    for (t0, _), (t1, _) in zip(arrivals, arrivals[1:]):
        if all(not (tr["t_signal"] - 1 <= t1 <= tr["t_exit"] + 12) for tr in trials):
            quiet.append((t1 - t0) * 1000)

    print("| signal | kills | gap min / median / max ms | signal → first change min / median / max ms | signal → lease elsewhere min / median / max ms |")
    print("|---|---|---|---|---|")
    for sig, values in results.items():
        gaps, changes, leases = zip(*values)
        leases = [v for v in leases if v is not None]
        print(f"| {sig} | {len(values)} | {' / '.join(summary(gaps))} | "
              f"{' / '.join(summary(changes))} | {' / '.join(summary(leases))} |")
    print()
    if quiet:
        print(f"Steady state between the trials: {len(quiet)} gaps between changes, median "
              f"{statistics.median(quiet):.0f} ms, max {max(quiet):.0f} ms.")
    print(f"Changes seen: {len(first)} in epoch(s) {epochs}; connections: "
          f"{sum(len(s.connections) for s in subscribers.values())}; "
          f"wrong (a gap in patches, a duplicate, out of order): {len(problems)}; "
          f"resumes answered with a snapshot instead of the missed changes: {len(failed_resumes)}")
    for p in (problems + failed_resumes)[:20]:
        print(f"- {p}")
    print()
    print("| signal | holder → next | gap ms | signal → first change ms | signal → lease elsewhere ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row)
    return 1 if problems or len(epochs) != 1 else 0


if __name__ == "__main__":
    sys.exit(main())
