#!/usr/bin/env python3
"""Instructions per request of our server, counted by valgrind: a figure that does not move
with the machine's load, for comparing two versions of the code.

    python3 bench/instructions.py                        # ./iflow2api.py, every route
    python3 bench/instructions.py --ours A/iflow2api.py --ours B/iflow2api.py
    python3 bench/instructions.py --route responses-stream --requests 500

Timings on a shared machine move by 20% between runs (bench/README.md, Results), so a change
worth 3% needs many alternating runs to show. Counted instructions of the same code move by
about 0.1% (the server's own background threads, such as the usage history's writer, count too).

Our server runs under `valgrind --tool=callgrind` against the fake upstream, which sends
streams of one chunk: a stream's figure is then mostly what comes before its first event.
For each route, requests go one after another on one kept-alive connection. After a warm-up
callgrind dumps its counters (which starts them again from zero), --requests requests are
made, and a second dump is read. The figure
is the user-space instructions of every thread of the server divided by the requests; the
kernel's work for our system calls is not in it, nor is time spent waiting, so pair it with
bench/run.py's CPU figures.

The server is imported and run (`iflow2api.main()`), not started as a script: as a script it
restarts itself as an import (exec), which valgrind would have to follow. The request code is
the same either way. Needs valgrind (Debian: apt install valgrind).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from http.client import HTTPConnection
from pathlib import Path

from run import BENCH, Fake, build_tools, free_port, http, log, write_iflow_settings

HI = [{"role": "user", "content": "hi"}]
ROUTES = {  # name: (path, request body)
    "chat": ("/v1/chat/completions", {"model": "glm-5", "messages": HI}),
    "chat-stream": ("/v1/chat/completions", {"model": "glm-5", "messages": HI, "stream": True}),
    "messages-stream": ("/v1/messages", {"model": "glm-5", "max_tokens": 100, "messages": HI, "stream": True}),
    "responses-stream": ("/v1/responses", {"model": "glm-5", "input": "hi", "stream": True}),
}
WARM_UP = 20


class ServerUnderValgrind:
    """Our server from the directory of `ours`, under callgrind, with its own HOME."""

    def __init__(self, ours: Path, upstream_url: str):
        self.home = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
        write_iflow_settings(self.home, types.SimpleNamespace(url=upstream_url))
        self.port = free_port()
        self.out = self.home / "callgrind.out"
        run = ("import sys; sys.path.insert(0, %r); sys.argv = ['iflow2api', '--host', '127.0.0.1', "
               "'--port', '%d']; import iflow2api; raise SystemExit(iflow2api.main())" % (str(ours.parent), self.port))
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(HOME=str(self.home), IFLOW2API_HOME=str(self.home / ".iflow2api"),
                   IFLOW2API_NO_UPDATE_CHECK="1", NO_PROXY="*")
        self.log = open(self.home / "server.log", "wb")
        self.conn = None
        try:
            self.proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=%s" % self.out,
                                          sys.executable, "-c", run], env=env, stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError:
            self.log.close()
            shutil.rmtree(self.home, ignore_errors=True)
            raise

    def wait_healthy(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server ended before answering: see %s" % self.log.name)
            if http("GET", "http://127.0.0.1:%d/health" % self.port, timeout=30)[0] == 200:
                self.conn = HTTPConnection("127.0.0.1", self.port, timeout=60)
                return
            time.sleep(0.2)
        raise RuntimeError("the server did not answer /health within %.0f s" % timeout_s)

    def requests(self, path: str, body: bytes, count: int) -> None:
        for _ in range(count):
            self.conn.request("POST", path, body, {"Content-Type": "application/json"})
            answer = self.conn.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError("%s answered %d" % (path, answer.status))

    def dump(self, number: int) -> int:
        """Instructions since the last dump (or the start), from callgrind's dump `number`.
        A dump starts the counters again from zero; callgrind_control reports success even
        when it did not reach the process, so the dump's file is what proves it happened."""
        subprocess.run(["callgrind_control", "--dump", str(self.proc.pid)], check=True, capture_output=True)
        path = Path("%s.%d" % (self.out, number))
        for _ in range(100):  # written at the server's next scheduling point
            found = re.search(r"^totals: (\d+)$", path.read_text() if path.exists() else "", re.M)
            if found:
                return int(found.group(1))
            time.sleep(0.1)
        raise RuntimeError("callgrind wrote no dump %d (%s)" % (number, path))

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)


def instructions_per_request(ours: Path, upstream_url: str, route: str, count: int) -> float:
    path, body = ROUTES[route]
    data = json.dumps(body).encode()
    server = ServerUnderValgrind(ours, upstream_url)
    try:
        server.wait_healthy()
        server.requests(path, data, WARM_UP)  # the connection's thread, caches and lazy imports
        server.dump(1)  # start-up and warm-up: not counted
        server.requests(path, data, count)
        return server.dump(2) / count
    finally:
        server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", action="append", type=Path,
                        help="an iflow2api.py to measure (repeat to compare; default: this checkout's)")
    parser.add_argument("--route", action="append", choices=sorted(ROUTES),
                        help="a route to measure (repeat; default: all)")
    parser.add_argument("--requests", type=int, default=200, help="requests counted per route (default 200)")
    parser.add_argument("--upstream", help="an upstream already running (base URL without /v1), "
                                           "instead of bench/tools' fake upstream")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind not found (Debian: apt install valgrind)")
    subjects = [p.resolve() for p in args.ours or [BENCH.parent / "iflow2api.py"]]
    routes = args.route or list(ROUTES)
    fake = None
    if args.upstream is None:
        build_tools()
        fake = Fake(0)
        fake.configure(1)
    try:
        upstream = args.upstream or fake.url
        results = {}
        for route in routes:
            for subject in subjects:
                log("%s, %s: %d requests under valgrind..." % (subject, route, args.requests))
                results.setdefault(route, {})[str(subject)] = instructions_per_request(
                    subject, upstream, route, args.requests)
    finally:
        if fake is not None:
            fake.stop()
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    width = max(len(str(s)) for s in subjects)
    for route in routes:
        print(route)
        for subject in subjects:
            print("  %-*s  %8.1f k instructions per request" % (width, subject, results[route][str(subject)] / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
