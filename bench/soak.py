#!/usr/bin/env python3
"""Soak test: the real server under mixed load and upstream faults for a while.

    python3 bench/soak.py --duration 600      # 10 minutes (the default)
    python3 bench/soak.py --duration 20       # the short run tests/integration/test_soak_short.py makes

Starts a fake upstream in this process (tests/fakes.py) that answers every request
with "echo <token of that request>", or with a fault drawn at random: a reset mid-answer,
a slow answer, garbage bytes, 429 or 500. Starts the server (iflow2api.py as a
subprocess on 127.0.0.1, temporary HOME, two iFlow accounts so that 429/500 fail over)
and runs a bounded-concurrency mix of OpenAI and Anthropic requests, streamed or not
(and the Responses API when the server's /openapi.json lists /v1/responses), some cut
off by the client. The admin config is saved through the admin API every 15 s.

Every --sample-s seconds it records the server's RSS, threads, open fds (/proc/<pid>)
and the in-flight counters (GET /health, the admin's account list). Exit 1 when:
a request was answered wrongly (another request's text, a 500, a truncated stream, an
error in the wrong shape, a dropped connection), a counter is not back at zero once
the load stops, threads or fds stay above the idle baseline, a figure grows without
bound (linear fit over the second half, or last > 2x the early plateau), or the
server logged a traceback. Everything binds and connects to 127.0.0.1 only.
"""
import argparse
import collections
import http.client
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

from fakes import FakeUpstream, Reply, completion, text_stream  # noqa: E402
from run import free_port, log, memory_mb  # noqa: E402

TOKEN_RE = re.compile(r"soak-\d+-[a-z]+")
GOOD = ("ok", "slow")  # upstream replies after which the client must get the exact answer


# == The fake upstream with faults ============================================================

class FaultyUpstream(FakeUpstream):
    """Answers "echo <token>" (the token found in the request), or a fault.

    outcomes[token] lists the kinds of reply given for that request, in order
    (more than one when the server failed over to the other account)."""

    FAULTS = (("slow", 3), ("reset", 2), ("garbage", 1), ("429", 2), ("500", 2))

    def __init__(self, rng: random.Random, fault_rate: float):
        super().__init__()
        self.rng, self.fault_rate = rng, fault_rate
        self.outcomes = collections.defaultdict(list)
        self.injected = collections.Counter()

    def pick(self) -> str:
        if self.rng.random() >= self.fault_rate:
            return "ok"
        kinds, weights = zip(*self.FAULTS)
        return self.rng.choices(kinds, weights)[0]

    def default_reply(self, request):
        found = TOKEN_RE.search(json.dumps(request))
        token = found.group(0) if found else "no-token"
        with self.lock:
            del self.requests[:]  # FakeUpstream records every request: not for hours
            kind = self.pick()
            self.outcomes[token].append(kind)
            self.injected[kind] += 1
        pieces = ("echo ", token[:7], token[7:])
        stream = bool(request.get("stream"))
        if kind == "429":
            return Reply(429, {"error": {"message": "rate limited", "type": "rate_limit_error"}},
                         headers={"retry-after": "1"})
        if kind == "500":
            return Reply(500, {"error": {"message": "upstream exploded", "type": "server_error"}})
        if kind == "garbage":
            if stream:
                return Reply(stream=[b"data: {not json\n\n", b"\xff\xfe\x00garbage\n\n", b"data: [DONE]\n\n"])
            return Reply(body=b"\x00\xff{not json at all")
        if kind == "reset":
            return Reply(stream=text_stream(pieces), drop_after=self.rng.randint(0, 4))
        delay = self.rng.uniform(0.3, 1.5) if kind == "slow" else 0.0
        if stream:
            return Reply(stream=text_stream(pieces), piece_delay_s=delay / 6)
        return Reply(body=completion("".join(pieces)), delay_s=delay)

    def outcome(self, token):
        with self.lock:
            return self.outcomes.pop(token, [])


# == Dialects: what a request looks like and how its answer reads =============================
# A third dialect is one more class with path, body() and read(); it joins the load when the
# server's /openapi.json lists its path.

class Answer:
    """What the client made of a 200 answer: the text, and whether it ended properly or in an error."""

    def __init__(self, text="", finished=False, failed=False):
        self.text, self.finished, self.failed = text, finished, failed


def sse_events(raw: bytes):
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            yield b"\n".join(data).decode("utf-8", "replace")


def _json_events(raw: bytes):
    for data in sse_events(raw):
        if data == "[DONE]":
            yield "[DONE]"
            continue
        try:
            yield json.loads(data)
        except ValueError:
            yield None  # garbage the upstream sent (relayed as is on the OpenAI route)


class OpenAIChat:
    name, path = "openai", "/v1/chat/completions"

    def body(self, token, stream):
        return {"model": "glm-5", "stream": stream, "messages": [{"role": "user", "content": token}]}

    def read(self, raw, streamed):
        if not streamed:
            return Answer(json.loads(raw)["choices"][0]["message"]["content"], finished=True)
        answer = Answer()
        for event in _json_events(raw):
            if event == "[DONE]":
                answer.finished = True
            elif isinstance(event, dict) and "error" in event:
                answer.failed = True
            elif isinstance(event, dict):
                for choice in event.get("choices") or []:
                    answer.text += (choice.get("delta") or {}).get("content") or ""
        return answer

    def is_error_shape(self, data):
        return isinstance(data.get("error"), dict) and isinstance(data["error"].get("message"), str)


class AnthropicMessages:
    name, path = "anthropic", "/v1/messages"

    def body(self, token, stream):
        return {"model": "claude-sonnet-4-5", "max_tokens": 256, "stream": stream,
                "messages": [{"role": "user", "content": token}]}

    def read(self, raw, streamed):
        if not streamed:
            data = json.loads(raw)
            return Answer("".join(b.get("text", "") for b in data["content"] if b["type"] == "text"), True)
        answer = Answer()
        for event in _json_events(raw):
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "content_block_delta":
                answer.text += event["delta"].get("text", "")
            elif kind == "message_stop":
                answer.finished = True
            elif kind == "error":
                answer.failed = True
        return answer

    def is_error_shape(self, data):
        return data.get("type") == "error" and isinstance(data.get("error"), dict) \
            and isinstance(data["error"].get("message"), str)


class OpenAIResponses:
    name, path = "responses", "/v1/responses"

    def body(self, token, stream):
        return {"model": "glm-5", "stream": stream, "input": token}

    def read(self, raw, streamed):
        if not streamed:
            data = json.loads(raw)
            return Answer("".join(part.get("text", "") for item in data.get("output") or []
                                  for part in item.get("content") or [] if part.get("type") == "output_text"),
                          finished=data.get("status") == "completed", failed=data.get("status") == "failed")
        answer = Answer()
        for event in _json_events(raw):
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "response.output_text.delta":
                answer.text += event.get("delta", "")
            elif kind == "response.completed":
                answer.finished = True
            elif kind in ("error", "response.failed"):
                answer.failed = True
        return answer

    is_error_shape = OpenAIChat.is_error_shape


DIALECTS = (OpenAIChat(), AnthropicMessages(), OpenAIResponses())


# == The server =================================================================================

class Server:
    """iflow2api.py as a subprocess with a temporary HOME: the iFlow CLI's account plus a second one."""

    def __init__(self, fake_url: str, adapter: str, concurrency: int):
        self.home = Path(tempfile.mkdtemp(prefix="soak-"))
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        (self.home / ".iflow").mkdir()
        (self.home / ".iflow2api").mkdir()
        (self.home / ".iflow" / "settings.json").write_text(json.dumps(
            {"selectedAuthType": "api-key", "apiKey": "sk-soak-first-0123456789", "baseUrl": fake_url}))
        config = {"concurrency": concurrency, "account_cooldown_s": 2.0, "log_level": "INFO",
                  "accounts": [{"id": "second", "api_key": "sk-soak-second-0123456789", "base_url": fake_url}]}
        (self.home / ".iflow2api" / "config.json").write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("IFLOW2API_")}
        env.update(HOME=str(self.home), IFLOW2API_HOME=str(self.home / ".iflow2api"), NO_PROXY="*",
                   IFLOW2API_NO_UPDATE_CHECK="1")  # nothing the soak starts may reach beyond 127.0.0.1
        if adapter:
            env["IFLOW2API_HTTP"] = adapter
        self.log_path = self.home / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "iflow2api.py"), "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=self.home, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def call(self, method, path, body=None, headers=None, timeout=10.0):
        """(status, headers, body bytes); status 0 when the connection failed."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            sent = {"Content-Type": "application/json"} if body is not None else {}
            sent.update(headers or {})
            conn.request(method, path, None if body is None else json.dumps(body).encode(), sent)
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        except (OSError, http.client.HTTPException):
            return 0, {}, b""
        finally:
            conn.close()

    def wait_healthy(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited (%s): %s" % (self.proc.returncode, self.log_tail()))
            if self.call("GET", "/health", timeout=1.0)[0] == 200:
                return
            time.sleep(0.05)
        raise RuntimeError("/health did not answer within %.0f s" % timeout)

    def proc_figures(self) -> dict:
        status = Path("/proc/%d/status" % self.pid).read_text()
        threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
        return {"rss_mb": memory_mb(self.pid, "VmRSS"), "threads": threads,
                "fds": len(os.listdir("/proc/%d/fd" % self.pid))}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n=15) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self, keep_home=False):
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        if not keep_home:
            shutil.rmtree(self.home, ignore_errors=True)


class Admin:
    """The admin API as the web page uses it: first-run setup, then config saves with CSRF."""

    PASSWORD = "soak-admin-password"

    def __init__(self, server: Server):
        self.server, self.cookie, self.csrf = server, "", ""
        self.saves, self.failures = 0, []

    def setup(self) -> bool:
        status, headers, body = self.server.call("POST", "/admin/api/setup", {"password": self.PASSWORD})
        if status != 200:
            self.failures.append("setup answered %d: %r" % (status, body[:200]))
            return False
        self.cookie = (headers.get("set-cookie") or "").split(";")[0]
        self.csrf = json.loads(body)["csrf"]
        return True

    def call(self, method, path, body=None):
        return self.server.call(method, path, body, {"Cookie": self.cookie, "X-CSRF-Token": self.csrf})

    def save_config(self, rng: random.Random) -> None:
        changes = {"models_cache_s": rng.choice([300.0, 600.0, 900.0])}
        status, _h, body = self.call("PUT", "/admin/api/config", {"changes": changes})
        if status == 200:
            self.saves += 1
        else:
            self.failures.append("config save answered %d: %r" % (status, body[:200]))

    def accounts_in_flight(self):
        """The sum of the accounts' in-flight counters, or None when the admin list is unavailable."""
        status, _h, body = self.call("GET", "/admin/api/accounts")
        if status != 200:
            return None
        data = json.loads(body)
        accounts = data.get("accounts", data) if isinstance(data, dict) else data
        return sum(int(a.get("in_flight") or 0) for a in accounts if isinstance(a, dict))


# == The load ===================================================================================

class Load:
    """Worker threads sending the request mix until stopped; every result is judged."""

    def __init__(self, server, fake, dialects, rng_seed, concurrency, disconnect_rate):
        self.server, self.fake, self.dialects = server, fake, dialects
        self.concurrency, self.disconnect_rate = concurrency, disconnect_rate
        self.seed = rng_seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = collections.Counter()  # (dialect, mode, result)
        self.wrong = []  # descriptions of wrong answers (first ones kept)
        self.failovers = 0
        self.sequence = 0
        self.threads = []

    def start(self):
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._worker, args=(random.Random(self.seed * 1000 + i),),
                                      name="soak-worker-%d" % i, daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self, timeout=60.0):
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def totals(self):
        with self.lock:
            out = collections.Counter()
            for (_d, _m, result), n in self.counts.items():
                out[result] += n
            return out

    def _token(self, rng):
        with self.lock:
            self.sequence += 1
            return "soak-%d-%s" % (self.sequence, "".join(rng.choice("abcdefghij") for _ in range(6)))

    def _worker(self, rng):
        while not self.stop.is_set():
            dialect = rng.choice(self.dialects)
            stream = rng.random() < 0.5
            cut = rng.random() < self.disconnect_rate
            token = self._token(rng)
            try:
                result, problem = self._one(rng, dialect, stream, cut, token)
            except Exception as exc:  # noqa: BLE001 - a bug in the judging is a wrong answer too
                result, problem = "wrong", "client-side %r" % exc
            with self.lock:
                self.counts[(dialect.name, "stream" if stream else "json", result)] += 1
                if problem and len(self.wrong) < 20:
                    self.wrong.append("%s %s %s: %s" % (dialect.name, "stream" if stream else "json", token, problem))

    def _one(self, rng, dialect, stream, cut, token):
        """(result, problem): result is ok | error | cut | wrong; problem says what was wrong."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
        try:
            conn.request("POST", dialect.path, json.dumps(dialect.body(token, stream)).encode(),
                         {"Content-Type": "application/json"})
            if cut and not stream:
                time.sleep(rng.uniform(0, 0.05))
                return "cut", None
            try:
                resp = conn.getresponse()
                if cut:
                    resp.read(rng.randint(1, 300))
                    return "cut", None
                raw = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                return "wrong", "connection dropped without a (complete) answer: %r" % exc
            return self._judge(dialect, stream, token, resp.status, raw)
        finally:
            conn.close()
            if cut:
                self.fake.outcome(token)  # forget it (it may still arrive later: harmless)

    def _judge(self, dialect, stream, token, status, raw):
        replies = self.fake.outcome(token)
        if len(replies) > 1:
            with self.lock:
                self.failovers += 1
        last = replies[-1] if replies else None
        expected = "echo " + token
        if status >= 400:
            try:
                data = json.loads(raw)
            except ValueError:
                return "wrong", "%d answer is not JSON: %r" % (status, raw[:200])
            if not dialect.is_error_shape(data):
                return "wrong", "%d answer not in the %s error shape: %r" % (status, dialect.name, raw[:200])
            if status == 500 and last != "500":  # the upstream's own 500 is passed on; any other is ours
                return "wrong", "500 after upstream %s: %r" % (replies, raw[:200])
            if last in GOOD:
                return "wrong", "%d although the upstream answered well (%s): %r" % (status, replies, raw[:200])
            return "error", None
        if status != 200:
            return "wrong", "status %d" % status
        if last == "garbage":
            return "error", None  # garbage in, garbage out; only a 500 or a drop is wrong
        try:
            answer = dialect.read(raw, stream)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return "wrong", "unreadable 200 answer (%r) after upstream %s: %r" % (exc, replies, raw[:300])
        if TOKEN_RE.search(answer.text) and token not in answer.text:
            return "wrong", "another request's answer: %r" % answer.text[:200]
        if answer.failed:
            if last in GOOD:
                return "wrong", "stream failed although the upstream answered well: %r" % raw[-300:]
            if not expected.startswith(answer.text):
                return "wrong", "failed stream with foreign text %r" % answer.text[:200]
            return "error", None
        if not answer.finished:
            return "wrong", "stream ended without its end marker or an error (upstream %s): %r" % (replies, raw[-300:])
        if answer.text != expected:
            return "wrong", "text %r, expected %r (upstream %s)" % (answer.text[:200], expected, replies)
        return "ok", None


# == Sampling and verdicts ======================================================================

def sample(server, admin, load, started):
    figures = server.proc_figures()
    status, _h, body = server.call("GET", "/health", timeout=10)
    health = json.loads(body) if status == 200 else {}
    concurrency = health.get("concurrency", {})
    totals = load.totals()
    figures.update(t=round(time.monotonic() - started), health=status, in_flight=concurrency.get("in_flight"),
                   waiting=concurrency.get("waiting"), accounts_in_flight=admin.accounts_in_flight(),
                   requests=sum(totals.values()), ok=totals["ok"], errors=totals["error"], cut=totals["cut"],
                   wrong=totals["wrong"])
    return figures


COLUMNS = (("t", "t(s)", "%d"), ("rss_mb", "rss MB", "%.1f"), ("threads", "threads", "%d"), ("fds", "fds", "%d"),
           ("in_flight", "in-flight", "%s"), ("waiting", "waiting", "%s"), ("accounts_in_flight", "acct in-flight", "%s"),
           ("requests", "requests", "%d"), ("ok", "ok", "%d"), ("errors", "errors", "%d"), ("cut", "cut", "%d"),
           ("wrong", "wrong", "%d"))


def table(rows, labels) -> str:
    cells = [[title for _k, title, _f in COLUMNS] + [""]]
    for row, label in zip(rows, labels):
        cells.append([(fmt % row[key]) if row.get(key) is not None else "-" for key, _t, fmt in COLUMNS] + [label])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


# How much a figure may rise over the second half of the run: (fraction, absolute).
GROWTH_TOLERANCE = {"rss_mb": (0.10, 8.0), "threads": (0.20, 6), "fds": (0.20, 12)}


def slope(points):
    """Least-squares slope of (x, y) points."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def growth_problems(load_rows) -> list:
    """Figures that keep growing under steady load (needs 6+ samples under load)."""
    problems = []
    if len(load_rows) < 6:
        return problems
    early = load_rows[1:max(2, len(load_rows) // 4 + 1)]  # the first sample is still warming up
    second = load_rows[len(load_rows) // 2:]
    for key, (fraction, absolute) in GROWTH_TOLERANCE.items():
        plateau = statistics.median(r[key] for r in early)
        last = load_rows[-1][key]
        rise = slope([(r["t"], r[key]) for r in second]) * (second[-1]["t"] - second[0]["t"])
        allowed = max(absolute, fraction * second[0][key])
        if rise > allowed:
            problems.append("%s rises by %.1f over the second half (allowed %.1f)" % (key, rise, allowed))
        if last > 2 * plateau and last - plateau > absolute:
            problems.append("%s at the end (%.1f) is more than twice the early plateau (%.1f)" % (key, last, plateau))
    return problems


def idle_problems(baseline, idle, concurrency) -> list:
    problems = []
    for key in ("in_flight", "waiting", "accounts_in_flight"):
        if idle.get(key):
            problems.append("%s is %s once the load stopped (expected 0)" % (key, idle[key]))
    if idle["threads"] > baseline["threads"] + 4:
        problems.append("threads: %d once idle, %d before the load" % (idle["threads"], baseline["threads"]))
    allowed_fds = baseline["fds"] + 2 * concurrency + 8  # the upstream pool keeps idle connections
    if idle["fds"] > allowed_fds:
        problems.append("fds: %d once idle, %d before the load (allowed %d)" % (idle["fds"], baseline["fds"],
                                                                               allowed_fds))
    return problems


def wait_idle(server, admin, timeout=20.0):
    """Wait until the in-flight counters are back at zero and the server's threads settle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _h, body = server.call("GET", "/health", timeout=5)
        busy = status != 200 or json.loads(body)["concurrency"]["in_flight"] or admin.accounts_in_flight()
        if not busy:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # connection threads end just after their last byte


# == Main =======================================================================================

def listed_paths(server) -> set:
    status, _h, body = server.call("GET", "/openapi.json")
    return set(json.loads(body).get("paths", {})) if status == 200 else set()


def run(args) -> int:
    rng = random.Random(args.seed)
    fake = FaultyUpstream(random.Random(args.seed + 1), args.fault_rate)
    server = Server(fake.url, args.adapter, args.server_concurrency)
    problems = []
    try:
        server.wait_healthy()
        admin = Admin(server)
        admin.setup()
        paths = listed_paths(server)
        dialects = [d for d in DIALECTS if d.path in paths] or list(DIALECTS[:2])
        log("soak: %s (pid %d, adapter %s), dialects %s, %d clients, %d s, faults %.0f%%, seed %d"
            % (server.url, server.pid, args.adapter or "default", ", ".join(d.name for d in dialects),
               args.concurrency, args.duration, args.fault_rate * 100, args.seed))
        load = Load(server, fake, dialects, args.seed, args.concurrency, args.disconnect_rate)
        started = time.monotonic()
        baseline = sample(server, admin, load, started)
        rows, labels = [baseline], ["before load"]
        load.start()
        next_sample, next_save = started + args.sample_s, started + 15.0
        end = started + args.duration
        while time.monotonic() < end:
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
            now = time.monotonic()
            if now >= next_save:
                admin.save_config(rng)
                next_save += 15.0
            if now >= next_sample:
                rows.append(sample(server, admin, load, started))
                labels.append("load")
                if args.verbose:
                    log(table(rows[-1:], labels[-1:]))
                next_sample += args.sample_s
            if server.proc.poll() is not None:
                problems.append("the server exited with code %s" % server.proc.returncode)
                break
        load.finish()
        wait_idle(server, admin)
        idle = sample(server, admin, load, started)
        rows.append(idle)
        labels.append("idle after load")
        print(table(rows, labels))

        load_rows = [r for r, label in zip(rows, labels) if label == "load"]
        problems += growth_problems(load_rows) + idle_problems(baseline, idle, args.concurrency)
        totals = load.totals()
        if totals["wrong"]:
            problems.append("%d wrong answers, first ones:\n    %s" % (totals["wrong"], "\n    ".join(load.wrong)))
        tracebacks = server.log_text().count("Traceback")
        if tracebacks:
            problems.append("the server logged %d tracebacks; log: %s" % (tracebacks, server.log_path))
        problems += ["admin: " + f for f in admin.failures[:5]]
        if not totals["ok"]:
            problems.append("no request was answered correctly at all")

        print("\nrequests by dialect and mode:")
        with load.lock:
            for key in sorted({(d, m) for d, m, _r in load.counts}):
                print("  %-10s %-6s %s" % (key[0], key[1], ", ".join(
                    "%s %d" % (r, load.counts[key + (r,)]) for r in ("ok", "error", "cut", "wrong")
                    if load.counts[key + (r,)])))
        print("upstream replies: %s" % ", ".join("%s %d" % kv for kv in sorted(fake.injected.items())))
        print("failovers (a request answered by a second upstream call): %d; admin config saves: %d"
              % (load.failovers, admin.saves))
    finally:
        server.stop(keep_home=bool(problems))  # its log and config, to look at
        fake.close()
    if problems:
        print("\nSOAK FAILED (server HOME with its log kept: %s):\n- " % server.home + "\n- ".join(problems))
        return 1
    print("\nsoak passed")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--server-concurrency", type=int, default=64, help="the server's `concurrency` config")
    parser.add_argument("--fault-rate", type=float, default=0.3, help="share of upstream replies that are faults")
    parser.add_argument("--disconnect-rate", type=float, default=0.05, help="share of requests the client cuts")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--adapter", choices=("h11", "stdlib"), default=None, help="IFLOW2API_HTTP for the server")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--verbose", action="store_true", help="print each sample as it is taken")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
