#!/usr/bin/env python3
"""Side-by-side benchmark: our iflow2api.py vs the original iflow2api 1.6.10 vs
the fake upstream called directly.

    python3 bench/run.py            # 3 rounds, ~3-5 minutes
    python3 bench/run.py --quick    # 1 round, small streams, < 1 minute

Builds the Rust tools in bench/tools (std only, offline), creates
bench/.venv-original with `pip install iflow2api==1.6.10` if missing, starts
one fake upstream, then for every round starts each server fresh (order
rotated between rounds), measures it, stops it. Prints a markdown report and
writes it to bench/results.md (raw numbers per round: bench/results.json).
See bench/README.md for what each metric means.
"""

import argparse
import atexit
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TOOLS = BENCH / "tools"
BIN = TOOLS / "target" / "release"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ORIGINAL_VERSION = "1.6.10"
TARGETS = ("direct", "original", "ours")
LABELS = {"direct": "direct (fake upstream)", "original": f"original {ORIGINAL_VERSION}", "ours": "ours"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tools

def build_tools():
    if shutil.which("cargo") is None:
        sys.exit("cargo not found: the fake upstream and load generator are Rust (std only)")
    log("building bench tools (cargo build --release --offline)...")
    subprocess.run(["cargo", "build", "--release", "--offline", "--quiet"], cwd=TOOLS, check=True)


def ensure_original_venv(venv):
    exe = venv / "bin" / "iflow2api"
    if exe.exists():
        return exe
    log(f"creating {venv} with iflow2api=={ORIGINAL_VERSION} (one time)...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"iflow2api=={ORIGINAL_VERSION}"], check=True)
    return exe


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=5.0):
    """Returns (status, body bytes); status 0 if the connection failed."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


class Fake:
    """The fake upstream process (one for the whole run)."""

    def __init__(self, pace_us):
        # Its stderr gets one line per connection that ended in an error.
        self.errors = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([str(BIN / "fake_upstream"), "--pace-us", str(pace_us)],
                                     stdout=subprocess.PIPE, stderr=self.errors, text=True)
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def configure(self, chunks):
        status, _ = http("POST", f"{self.url}/_bench/config?chunks={chunks}")
        assert status == 200, "fake upstream config failed"

    def stats(self):
        return json.loads(http("GET", f"{self.url}/_bench/stats")[1])

    def error_lines(self):
        self.errors.seek(0)
        return self.errors.read().splitlines()

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        self.errors.close()


def loadgen(*args, timeout=600):
    """Runs the load generator; returns its JSON plus its own CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([str(BIN / "loadgen"), *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr.strip()}")
    result = json.loads(out.stdout)
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


# ---------------------------------------------------------------- /proc

def process_tree(pid):
    """pid plus all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pid):
    """utime + stime of the process tree, in seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def memory_mb(pid, key):
    """Sum of VmRSS or VmHWM over the process tree, in MB."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


# ---------------------------------------------------------------- servers

def snapshot(path):
    """Copies our server into a temp dir (its siblings symlinked), so edits made
    during the run don't mix versions; compiles it once so round 1's start-up is
    not a cold compile. Returns (copy path, sha256 prefix)."""
    snap = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    atexit.register(shutil.rmtree, snap, True)
    for entry in path.parent.iterdir():
        if entry.name != path.name and not entry.name.startswith("."):
            (snap / entry.name).symlink_to(entry)
    copy = snap / path.name
    shutil.copy2(path, copy)
    subprocess.run([sys.executable, "-m", "py_compile", str(copy)], capture_output=True)
    return copy, hashlib.sha256(copy.read_bytes()).hexdigest()[:12]


def build_pyz():
    """Our single-file build (what users download and run), made by build.py into a temp dir.

    Measuring it rather than iflow2api.py matters for memory: a script's compiled
    form stays alive while it runs, a module imported from the zip frees it."""
    out = Path(tempfile.mkdtemp(prefix="bench-pyz-")) / "iflow2api.pyz"
    atexit.register(shutil.rmtree, out.parent, True)
    subprocess.run([sys.executable, str(REPO / "build.py"), "--output", str(out)], check=True,
                   capture_output=True)
    return out


def stop_group(proc):
    """Stops a process started with start_new_session: SIGTERM to its group, SIGKILL after 5 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Server:
    """A proxy under test, started fresh with its own temporary HOME."""

    def __init__(self, name, fake, original_exe):
        self.name = name
        self.home = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (self.home / ".iflow").mkdir()
        (self.home / ".iflow2api").mkdir()
        (self.home / ".iflow" / "settings.json").write_text(json.dumps(
            {"apiKey": "sk-bench", "baseUrl": f"{fake.url}/v1", "selectedAuthType": "api-key"}))
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(HOME=str(self.home), NO_PROXY="*")
        if name == "original":
            # api_concurrency 10 is its maximum; no update check (it only runs from the GUI anyway).
            config = {"host": "127.0.0.1", "port": self.port, "api_concurrency": 10,
                      "check_update_on_startup": False}
            cmd = [str(original_exe), "--host", "127.0.0.1", "--port", str(self.port)]
        else:
            config = {"concurrency": 512}
            # no update check: nothing a bench starts may reach beyond 127.0.0.1
            env.update(IFLOW2API_HOME=str(self.home / ".iflow2api"), IFLOW2API_NO_UPDATE_CHECK="1")
            cmd = [sys.executable, str(OURS), "--host", "127.0.0.1", "--port", str(self.port)]
        (self.home / ".iflow2api" / "config.json").write_text(json.dumps(config))
        self.log_path = self.home / "server.log"
        self.log_file = open(self.log_path, "wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=self.home, env=env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def wait_healthy(self, timeout=60.0):
        """Seconds from process start until GET /health answers 200."""
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with code {self.proc.returncode} before /health answered")
            if http("GET", f"{self.url}/health", timeout=1.0)[0] == 200:
                return time.perf_counter() - self.t0
            time.sleep(0.005)
        raise RuntimeError(f"/health did not answer 200 within {timeout:.0f} s")

    def log_tail(self, n=8):
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-n:])

    def stop(self):
        stop_group(self.proc)
        self.log_file.close()
        shutil.rmtree(self.home, ignore_errors=True)


# ---------------------------------------------------------------- measurements

def stream_test(fake, url, pid, chunks, streams, concurrency, api="openai", timeout=120, tail=True):
    """Runs `streams` streams of `chunks` upstream chunks; returns loadgen JSON
    plus proxy CPU, fake CPU and the upstream chunk count actually sent."""
    fake.configure(chunks)
    before = fake.stats()["chunks_sent"]
    cpu0 = cpu_seconds(pid) if pid else 0.0
    fake_cpu0 = cpu_seconds(fake.proc.pid)
    r = loadgen("stream", "--url", url, "--api", api, "--concurrency", concurrency,
                "--streams", streams, "--expect", chunks, "--timeout", timeout,
                *(["--show-tail"] if tail else []))
    r["proxy_cpu_s"] = (cpu_seconds(pid) - cpu0) if pid else None
    r["fake_cpu_s"] = cpu_seconds(fake.proc.pid) - fake_cpu0
    r["upstream_chunks"] = fake.stats()["chunks_sent"] - before
    return r


def measure(name, fake, args, original_exe):
    """All metrics for one target in one round. Returns (metrics, note)."""
    m = {}
    server = None
    if name == "direct":
        base, pid = fake.url, None
    else:
        server = Server(name, fake, original_exe)
        pid = server.pid
        base = server.url
    chat = f"{base}/v1/chat/completions"
    fake_errors = len(fake.error_lines())
    try:
        if server:
            m["healthy_s"] = server.wait_healthy()
            time.sleep(0.5)
            m["idle_rss_mb"] = memory_mb(pid, "VmRSS")
            status, body = http("POST", chat, {"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
            if status != 200:
                raise RuntimeError(f"smoke test: non-stream chat completion answered {status}: {body[:200]!r}")

        # Non-streaming requests/s and latency.
        loadgen("nonstream", "--url", chat, "--concurrency", 32, "--duration", 0.3)  # warm-up
        for c in (1, 32):
            r = loadgen("nonstream", "--url", chat, "--concurrency", c, "--duration", args.duration)
            m[f"rps_c{c}"] = r["requests_per_s"]
            m[f"p50_c{c}_ms"] = r["latency_p50_ms"]
            m[f"p99_c{c}_ms"] = r["latency_p99_ms"]
            m[f"nonstream_errors_c{c}"] = r["errors"]

        # Time to first chunk: sequential short streams.
        fake.configure(20)
        r = loadgen("stream", "--url", chat, "--concurrency", 1, "--streams", args.ttfc_samples, "--expect", 20,
                    "--show-tail")
        if r["errors"]:
            raise RuntimeError(f"smoke test: streaming failed: {r['error_samples']}")
        m["ttfc_ms"] = r["first_event_p50_ms"]

        # Streamed chunks/s through 32 concurrent streams, and CPU per 1000 chunks.
        r = stream_test(fake, chat, pid, args.chunks, 32, 32, tail=False)
        m["chunks_per_s"] = r["chunks_per_s"]
        m["events_per_s"] = r["events_per_s"]
        m["stream32_errors"] = r["errors"]
        if r["errors"]:
            m["stream32_error_samples"] = r["error_samples"]
        m["fake_cpu_per_1k"] = 1000 * r["fake_cpu_s"] / max(r["upstream_chunks"], 1)
        m["loadgen_cpu_per_1k"] = 1000 * r["cpu_s"] / max(r["events"], 1)
        if pid:
            m["cpu_per_1k"] = 1000 * r["proxy_cpu_s"] / max(r["upstream_chunks"], 1)

        # 256 concurrent streams.
        r = stream_test(fake, chat, pid, args.chunks256, 256, 256)
        m["s256_errors"] = r["errors"]
        m["s256_time_s"] = r["elapsed_s"]
        if r["errors"]:
            m["s256_error_samples"] = r["error_samples"]

        # Anthropic /v1/messages and OpenAI Responses /v1/responses (proxies only).
        if server:
            for prefix in ROUTES:
                measure_route(server, fake, args, m, prefix)

        if pid:
            m["peak_rss_mb"] = memory_mb(pid, "VmHWM")
        errors = fake.error_lines()[fake_errors:]
        if errors:
            m["fake_conn_errors"] = len(errors)
            m["fake_error_samples"] = errors[:3]
        return m, None
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        note = str(e)
        if server:
            note += f" (log: {server.log_tail()})"
        return m, note
    finally:
        if server:
            server.stop()


# The other client faces over the same upstream call, streamed 32 at a time;
# metric keys start with the prefix. prefix: (path, loadgen --api, non-streaming probe body)
ROUTES = {
    "a": ("/v1/messages", "anthropic", {"model": "claude-sonnet-4-5", "max_tokens": 64,
                                        "messages": [{"role": "user", "content": "hi"}]}),
    "r": ("/v1/responses", "responses", {"model": "glm-4.6", "input": "hi"}),
}


def measure_route(server, fake, args, m, prefix):
    """Time to first event and 32 streams through one of ROUTES; skipped with a
    note (`<prefix>_note`) when its non-streaming probe does not answer 200."""
    path, api, probe = ROUTES[prefix]
    url = f"{server.url}{path}"
    status, body = http("POST", url, probe)
    if status != 200:
        m[f"{prefix}_note"] = f"skipped: POST {path} answered {status}" + (f": {body[:120]!r}" if status != 404 else "")
        return
    fake.configure(20)
    r = loadgen("stream", "--url", url, "--api", api, "--concurrency", 1,
                "--streams", args.ttfc_samples, "--expect", 20)
    m[f"{prefix}_ttfe_ms"] = r["first_event_p50_ms"]
    if r["errors"]:
        m[f"{prefix}_error_samples"] = r["error_samples"]
    r = stream_test(fake, url, server.pid, args.chunks, 32, 32, api=api, tail=False)
    m[f"{prefix}_events_per_s"] = r["events_per_s"]
    m[f"{prefix}_chunks_per_s"] = r["chunks_per_s"]
    m[f"{prefix}_errors"] = r["errors"]
    m[f"{prefix}_cpu_per_1k"] = 1000 * r["proxy_cpu_s"] / max(r["upstream_chunks"], 1)
    if r["errors"]:
        m[f"{prefix}_error_samples"] = r["error_samples"]


# ---------------------------------------------------------------- report

ERROR_KEYS = ("s256_errors", "stream32_errors", "a_errors", "r_errors")
RESPONSES_CPU_TARGET = 1.2  # Responses CPU per 1000 upstream chunks / Anthropic's, ours


def median(rounds, key):
    """Median over rounds; for error counts the worst round, so one bad round shows."""
    vals = [r[key] for r in rounds if r.get(key) is not None]
    if not vals:
        return None
    return max(vals) if key in ERROR_KEYS else statistics.median(vals)


def overhead(rounds_by_target, name, key):
    """Per round: target's first-chunk time minus direct's, then the median."""
    diffs = []
    for mine, direct in zip(rounds_by_target.get(name, []), rounds_by_target.get("direct", [])):
        if mine.get(key) is not None and direct.get("ttfc_ms") is not None:
            diffs.append(mine[key] - direct["ttfc_ms"])
    return statistics.median(diffs) if diffs else None


def fmt(v, digits=None):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if float(v).is_integer() and abs(v) >= 1 or v == 0:
        return f"{int(v):,}"
    if digits is None:
        digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2 if abs(v) >= 1 else 3
    return f"{v:,.{digits}f}"


def ratio_cell(ours, orig, target, higher_is_better):
    if ours is None or orig is None or orig == 0:
        return "—", "—"
    r = ours / orig
    if target is None:
        return f"{r:.2f}x", ""
    ok = r >= target if higher_is_better else r <= target
    return f"{r:.2f}x", ("PASS" if ok else "FAIL")


def build_report(results, notes, args, meta):
    rounds = {t: [m for m in results[t]] for t in results}
    med = {t: {} for t in TARGETS}
    keys = ["rps_c1", "p50_c1_ms", "p99_c1_ms", "rps_c32", "p50_c32_ms", "p99_c32_ms", "ttfc_ms",
            "chunks_per_s", "cpu_per_1k", "idle_rss_mb", "peak_rss_mb", "healthy_s", "s256_errors",
            "s256_time_s", "stream32_errors", "fake_cpu_per_1k", "loadgen_cpu_per_1k", "events_per_s"]
    keys += [f"{p}_{k}" for p in ROUTES for k in ("ttfe_ms", "events_per_s", "chunks_per_s", "cpu_per_1k", "errors")]
    for t in TARGETS:
        for k in keys:
            med[t][k] = median(rounds.get(t, []), k)
        for k, src in [("ttfc_overhead_ms", "ttfc_ms")] + [(f"{p}_ttfe_overhead_ms", f"{p}_ttfe_ms") for p in ROUTES]:
            med[t][k] = overhead(rounds, t, src) if t != "direct" else None
        if med[t]["healthy_s"] is not None:
            med[t]["healthy_ms"] = med[t]["healthy_s"] * 1000
        else:
            med[t]["healthy_ms"] = None

    # (label, key, target ratio ours/original, higher is better)
    rows = [
        ("Non-stream c=1: requests/s", "rps_c1", None, True),
        ("Non-stream c=1: p50 latency (ms)", "p50_c1_ms", None, False),
        ("Non-stream c=1: p99 latency (ms)", "p99_c1_ms", None, False),
        ("Non-stream c=32: requests/s", "rps_c32", None, True),
        ("Non-stream c=32: p50 latency (ms)", "p50_c32_ms", None, False),
        ("Non-stream c=32: p99 latency (ms)", "p99_c32_ms", None, False),
        ("Stream: time to first chunk (ms)", "ttfc_ms", None, False),
        ("Stream: first-chunk overhead vs direct (ms)", "ttfc_overhead_ms", 1 / 3, False),
        ("32 streams: chunks/s at client", "chunks_per_s", 5.0, True),
        ("32 streams: SSE events/s at client", "events_per_s", None, True),
        ("32 streams: proxy CPU s per 1000 chunks", "cpu_per_1k", 0.2, False),
        ("Idle RSS (MB)", "idle_rss_mb", 0.5, False),
        ("Peak RSS (MB)", "peak_rss_mb", None, False),
        ("Time to healthy (ms)", "healthy_ms", 0.5, False),
        (f"256 streams x {args.chunks256} chunks: errors (worst round)", "s256_errors", None, False),
        (f"256 streams x {args.chunks256} chunks: total time (s)", "s256_time_s", None, False),
    ]

    def route_rows(cpu_target):
        """Rows of a client face's table; keys without the route prefix."""
        return [
            ("32 streams: events/s at client", "events_per_s", None, True),
            ("32 streams: content chunks/s at client", "chunks_per_s", None, True),
            ("32 streams: proxy CPU s per 1000 upstream chunks", "cpu_per_1k", cpu_target, False),
            ("Time to first event (ms)", "ttfe_ms", None, False),
            ("First-event overhead vs direct first chunk (ms)", "ttfe_overhead_ms", None, False),
            ("32 streams: errors (worst round)", "errors", None, False),
        ]

    def table(rows, cols, ratio_head="ours/original"):
        """cols: (header, metrics, key prefix); the ratio column is the last column over the one before."""
        head = ["Metric"] + [c[0] for c in cols] + [ratio_head, "target", ""]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, key, target, higher in rows:
            vals = [metrics.get(prefix + key) for _, metrics, prefix in cols]
            o, u = vals[-2], vals[-1]
            ratio, verdict = ratio_cell(u, o, target, higher)
            if key == "s256_errors":
                ratio, verdict = "", ("PASS" if u == 0 else "FAIL") if u is not None else "—"
                tgt = "0"
            elif target is None:
                tgt = ""
            else:
                tgt = ("≥ " if higher else "≤ ") + (f"{target:.2f}x" if target != 1 / 3 else "1/3")
            cells = [label] + [fmt(v) for v in vals] + [ratio, tgt, verdict]
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out)

    lines = [
        "## Results",
        "",
        f"Run: {meta['date']}, {meta['rounds']} round(s), medians; {args.chunks} chunks per stream"
        f"{', paced ' + str(args.pace_us) + ' µs' if args.pace_us else ', unpaced'}; "
        f"machine: {meta['machine']}; 1-min load average {meta['load']}.",
        f"Original: iflow2api {ORIGINAL_VERSION} ({meta['original_stack']}), api_concurrency=10. "
        f"Ours: {meta['ours']}, concurrency=512.",
        "",
        "### OpenAI path: POST /v1/chat/completions",
        "",
        table(rows, [(LABELS[t], med[t], "") for t in TARGETS]),
        "",
        "### Anthropic path: POST /v1/messages (streaming)",
        "",
        "The fake upstream speaks only OpenAI chat completions, so there is no direct column; the "
        "first-event overhead is against direct's first chunk on /v1/chat/completions.",
        "",
    ]
    def route_notes(prefix):
        """The first skip note of each proxy for this route, as list items."""
        items = []
        for t in ("original", "ours"):
            skipped = [m[f"{prefix}_note"] for m in rounds.get(t, []) if m.get(f"{prefix}_note")]
            items += [f"- {LABELS[t]}: {skipped[0]}"] if skipped else []
        return [""] + items if items else []

    lines.append(table(route_rows(0.3), [(LABELS[t], med[t], "a_") for t in ("original", "ours")]))
    lines += route_notes("a")
    ra = ratio_cell(med["ours"]["r_cpu_per_1k"], med["ours"]["a_cpu_per_1k"], RESPONSES_CPU_TARGET, False)
    lines += [
        "",
        "### Responses path: POST /v1/responses (streaming), side by side with the Anthropic path",
        "",
        "Ours only (the original has no /v1/responses). Events are `response.output_text.delta` events, "
        "the first event is the first delta, a stream succeeds when `response.completed` arrives.",
        "",
        table(route_rows(RESPONSES_CPU_TARGET),
              [(f"ours {ROUTES[p][0]}", med["ours"], f"{p}_") for p in ("a", "r")], "Responses/Anthropic"),
        "",
        f"Responses CPU per 1000 chunks / Anthropic: {ra[0]} (target ≤ {RESPONSES_CPU_TARGET:.1f}x)"
        + (f": {ra[1]}" if ra[1] else ""),
    ]
    lines += route_notes("r")
    d = med["direct"]
    lines += [
        "",
        "### Tool headroom",
        "",
        f"Direct (load generator ↔ fake upstream, no proxy): {fmt(d['chunks_per_s'])} chunks/s at 32 streams. "
        f"Fake upstream CPU: {fmt(d['fake_cpu_per_1k'], 4)} s per 1000 chunks; load generator CPU: "
        f"{fmt(d['loadgen_cpu_per_1k'], 4)} s per 1000 events (medians, direct runs).",
    ]
    for t in ("original", "ours"):
        if med[t]["fake_cpu_per_1k"] is not None:
            lines.append(f"During {LABELS[t]} runs: fake {fmt(med[t]['fake_cpu_per_1k'], 4)} s per 1000 chunks, "
                         f"load generator {fmt(med[t]['loadgen_cpu_per_1k'], 4)} s per 1000 events.")
    for t in TARGETS:
        for i, m in enumerate(rounds.get(t, []), 1):
            for key, what in (("nonstream_errors_c1", "non-stream c=1 errors"),
                              ("nonstream_errors_c32", "non-stream c=32 errors"),
                              ("stream32_errors", "32-stream errors"), ("s256_errors", "256-stream errors"),
                              ("a_errors", "Anthropic 32-stream errors"),
                              ("r_errors", "Responses 32-stream errors"),
                              ("fake_conn_errors", "upstream connections that ended in an error (fake's log)")):
                if m.get(key):
                    notes.append(f"{LABELS[t]} round {i}: {m[key]} {what}")
            for key in ("stream32_error_samples", "s256_error_samples", "a_error_samples", "r_error_samples",
                        "fake_error_samples"):
                if m.get(key):
                    samples = (str(x).replace("\n", "\\n").replace("`", "'") for x in m[key][:3])
                    notes.append(f"{LABELS[t]} round {i} samples: " + "; ".join(f"`{x}`" for x in samples))
    if float(meta["load"].split()[0]) > 1.0:
        notes.insert(0, f"the machine was busy before the run (load average {meta['load']}): "
                        "numbers are depressed and noisy, ratios too when the load changed between targets; "
                        "rerun on an idle machine")
    lines += ["", "### Notes", ""]
    if notes:
        lines += [f"- {n}" for n in notes]
    else:
        lines.append("- none")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def main():
    global OURS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round, short streams and durations (< 1 minute)")
    p.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    p.add_argument("--chunks", type=int, help="chunks per stream in the 32-stream tests (default 2000, quick 300)")
    p.add_argument("--chunks256", type=int, help="chunks per stream in the 256-stream test (default 50, quick 20)")
    p.add_argument("--duration", type=float, help="seconds per non-stream test (default 2, quick 1)")
    p.add_argument("--ttfc-samples", type=int, help="sequential streams for first-chunk time (default 50, quick 20)")
    p.add_argument("--pace-us", type=int, default=0, help="fake upstream pause between chunks, µs (default 0)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list of direct,original,ours")
    p.add_argument("--ours", default="build",
                   help="path of our server, or 'build' (default): build dist-style iflow2api.pyz from "
                        "this checkout with build.py and measure that, the file users download")
    p.add_argument("--original-venv", default=str(BENCH / ".venv-original"),
                   help="venv with iflow2api 1.6.10 (created if missing)")
    p.add_argument("--out", default=str(BENCH / "results.md"), help="markdown output ('' = don't write)")
    p.add_argument("--update-readme", action="store_true", help="also replace the Results section of bench/README.md")
    args = p.parse_args()
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.chunks = args.chunks or (300 if q else 2000)
    args.chunks256 = args.chunks256 or (20 if q else 50)
    args.duration = args.duration or (1.0 if q else 2.0)
    args.ttfc_samples = args.ttfc_samples or (20 if q else 50)
    OURS = build_pyz() if args.ours == "build" else Path(args.ours).resolve()
    ours_name, ours_digest = os.path.relpath(OURS, REPO) if OURS.is_relative_to(REPO) else str(OURS), None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    notes = []

    build_tools()
    original_exe = None
    if "original" in targets:
        try:
            original_exe = ensure_original_venv(Path(args.original_venv))
        except (subprocess.CalledProcessError, OSError) as e:
            notes.append(f"original skipped: could not create its venv ({e})")
            targets.remove("original")
    if "ours" in targets:
        if not OURS.exists():
            notes.append(f"ours skipped: {OURS} does not exist")
            targets.remove("ours")
        else:
            OURS, ours_digest = snapshot(OURS)

    load_start = os.getloadavg()[0]
    if load_start > 1.0:
        log(f"warning: load average {load_start:.1f} before the run; other work on this machine skews results")
    fake = Fake(args.pace_us)
    results = {t: [] for t in TARGETS}
    failed = set()
    started = time.time()
    try:
        for rnd in range(args.rounds):
            shift = rnd % max(len(targets), 1)
            order = targets[shift:] + targets[:shift]
            for name in order:
                if name in failed:
                    continue
                log(f"round {rnd + 1}/{args.rounds}: {name}...")
                t0 = time.time()
                m, note = measure(name, fake, args, original_exe)
                log(f"  done in {time.time() - t0:.1f} s" + (f" -- FAILED: {note}" if note else ""))
                if note:
                    notes.append(f"{LABELS[name]} (round {rnd + 1}): {note}; skipped from then on")
                    failed.add(name)
                else:
                    results[name].append(m)
    finally:
        fake.stop()
    log(f"total {time.time() - started:.0f} s")

    stack = "not run"
    if original_exe:
        py = Path(original_exe).parent / "python"
        out = subprocess.run([str(py), "-c", "import importlib.metadata as m;print(', '.join("
                              "f'{p} {m.version(p)}' for p in ('uvicorn','fastapi','httpx','uvloop','httptools')"
                              " if __import__('importlib.util').util.find_spec(p)))"],
                             capture_output=True, text=True)
        stack = out.stdout.strip() or "?"
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rounds": args.rounds,
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
                   f"Linux {platform.release()}, Python {platform.python_version()}",
        "original_stack": stack,
        "load": f"{load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end",
        "ours": f"`{ours_name}`" + (f" (sha256 {ours_digest}, copied at start)" if ours_digest else ""),
    }
    report = build_report(results, notes, args, meta)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "args": vars(args), "rounds": results, "notes": notes}, indent=1))
        log(f"wrote {args.out}")
    if args.update_readme:
        readme = BENCH / "README.md"
        text = readme.read_text()
        start, end = "<!-- results:start -->", "<!-- results:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            tail = rest.split(end, 1)[1]
            body = report.split("\n", 1)[1]  # drop the "## Results" heading, README has its own
            readme.write_text(f"{head}{start}\n{body}\n{end}{tail}")
            log("updated bench/README.md")


if __name__ == "__main__":
    main()
