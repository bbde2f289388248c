#!/usr/bin/env python3
"""Side-by-side benchmark: our iflow2api.py vs the original iflow2api 1.6.10 vs
the fake upstream called directly (and, with --peers, vs LiteLLM's proxy and
claude-code-router).

    python3 bench/run.py            # 3 rounds, ~3-5 minutes
    python3 bench/run.py --quick    # 1 round, small streams, < 1 minute
    python3 bench/run.py --peers litellm,ccr   # peers too, ~10 minutes

Builds the Rust tools in bench/tools (std only, offline), creates
bench/.venv-original with `pip install iflow2api==1.6.10` if missing, starts
one fake upstream, then for every round starts each server fresh (order
rotated between rounds), measures it, stops it, and (--s1024) measures 1024
concurrent streams on a fresh instance of it. Peers are installed on first
use into bench/.venv-litellm (pip) and bench/.cache-ccr (npm). Prints a
markdown report and writes it to bench/results.md (raw numbers per round:
bench/results.json).
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
# Peers (--peers). LiteLLM: the newest litellm[proxy] whose exact pins resolve from the PyPI
# index this machine reaches (1.108.8 to 1.110.2 pin litellm-enterprise / litellm-proxy-extras /
# litellm-proxy releases that it does not have). claude-code-router: the 2.x release.
LITELLM_VERSION = "1.108.7"
CCR_PACKAGE = "@musistudio/claude-code-router"
CCR_VERSION = "2.0.0"
TARGETS = ("direct", "original", "ours")
PEERS = ("litellm", "ccr")
COLUMNS = ("ours", "original", "litellm", "ccr", "direct")  # report column order
LABELS = {"direct": "direct (fake upstream)", "original": f"original {ORIGINAL_VERSION}", "ours": "ours",
          "litellm": f"LiteLLM {LITELLM_VERSION}", "ccr": f"claude-code-router {CCR_VERSION}"}
# Subjects without the OpenAI face: their OpenAI and Responses phases are n/a, not failures.
ANTHROPIC_ONLY = {"ccr": "it serves only the Anthropic route (/v1/messages)"}
# LiteLLM's /health calls every configured model upstream; its liveness probe is the cheap one.
HEALTH_PATHS = {"litellm": "/health/liveliness"}


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


def ensure_litellm_venv(venv):
    """LiteLLM's proxy (litellm[proxy], pinned) in its own venv, installed on first use or when
    the venv holds another version. Returns its `litellm` command."""
    exe = venv / "bin" / "litellm"
    if exe.exists() and list(venv.glob(f"lib/python*/site-packages/litellm-{LITELLM_VERSION}.dist-info")):
        return exe
    log(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} (one time, a few minutes)...")
    if not (venv / "bin" / "pip").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    return exe


def ensure_ccr(prefix):
    """claude-code-router (pinned) from npm into `prefix`, installed on first use or when the
    cache holds another version. Returns its CLI entry file (a single bundled .js)."""
    package = prefix / "node_modules" / CCR_PACKAGE
    manifest = package / "package.json"
    if not manifest.exists() or json.loads(manifest.read_text()).get("version") != CCR_VERSION:
        if shutil.which("npm") is None or shutil.which("node") is None:
            raise OSError("node and npm are needed for claude-code-router")
        log(f"installing {CCR_PACKAGE}@{CCR_VERSION} into {prefix} (one time)...")
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error",
                        f"{CCR_PACKAGE}@{CCR_VERSION}"], check=True)
    return package / json.loads(manifest.read_text())["bin"]["ccr"]


def package_versions(python, names):
    """'name version, ...' of the named distributions installed for `python` ('?' if it fails)."""
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m, sys\n"
                          "for p in sys.argv[1:]:\n"
                          "    try: print(p, m.version(p))\n"
                          "    except m.PackageNotFoundError: pass", *names],
                         capture_output=True, text=True)
    return ", ".join(out.stdout.split("\n")[:-1]) or "?"


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

    def configure(self, chunks, pace_us=None):
        """Chunks per stream from now on; and the pause between chunks, if given (it stays)."""
        pace = f"&pace_us={pace_us}" if pace_us is not None else ""
        status, _ = http("POST", f"{self.url}/_bench/config?chunks={chunks}{pace}")
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


def threads_and_fds(pid):
    """(threads, open fds) summed over the process tree."""
    return threads_and_fds_of(process_tree(pid))


def threads_and_fds_of(pids):
    """(threads, open fds) summed over pids: `Threads:` of /proc/<pid>/status and the entries
    of /proc/<pid>/fd (a process that ended counts 0)."""
    threads = fds = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    threads += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return threads, fds


def listen_overflows():
    """The kernel's count of connections dropped because a listen queue was full (TcpExt
    ListenOverflows in /proc/net/netstat; machine-wide), None if unreadable. A client whose
    handshake was dropped retries after 1 s, then 3 s, ...: it waits, it does not fail."""
    try:
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
                 if line.startswith("TcpExt:")]
        return int(dict(zip(lines[0][1:], lines[1][1:]))["ListenOverflows"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


class PeakSampler:
    """Samples threads and fds of a process tree every `every` s on a thread of its own, keeping
    the highest counts (the tree is read once at the start: the proxies here serve from one
    process, or a fixed set of them)."""

    def __init__(self, pid, every=0.1):
        import threading
        self.pids, self.every = process_tree(pid), every
        self.threads = self.fds = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(self.every):
            threads, fds = threads_and_fds_of(self.pids)
            self.threads, self.fds = max(self.threads, threads), max(self.fds, fds)

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.threads, self.fds


def raise_fd_limit(want=8192):
    """The 1024-stream phase holds 1024 client sockets in the load generator and about twice that
    in a proxy (client side + upstream side): raise the soft RLIMIT_NOFILE (inherited by every
    process this script starts) to `want`, or to the hard limit if that is lower. Returns the
    soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


# ---------------------------------------------------------------- servers

def failure_note(error, server) -> str:
    """What a failed phase reports: the error, and the tail of the server's log when it started."""
    return str(error) + (f" (log: {server.log_tail()})" if server else "")


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


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def write_iflow_settings(home, fake):
    """The iFlow CLI's settings, which both iflow2api versions read their upstream from."""
    write_json(home / ".iflow" / "settings.json",
               {"apiKey": "sk-bench", "baseUrl": f"{fake.url}/v1", "selectedAuthType": "api-key"})


# How each subject is configured and started: setup(home, port, fake, exe, wide) writes its config
# into the temporary HOME and returns (command, extra environment). `wide`: the instance for the
# 1024-stream phase (only ours has settings for it; the others run as configured for every phase).

def setup_original(home, port, fake, exe, wide=False):
    write_iflow_settings(home, fake)
    # api_concurrency 10 is its maximum; no update check (it only runs from the GUI anyway).
    write_json(home / ".iflow2api" / "config.json", {"host": "127.0.0.1", "port": port, "api_concurrency": 10,
                                                     "check_update_on_startup": False})
    return [str(exe), "--host", "127.0.0.1", "--port", str(port)], {}


# Our config.json: every phase, and the 1024-stream phase, where 1024 upstream calls must be
# allowed at once and 1024 client connections (plus the bench's own probes) must be accepted.
OURS_CONFIG = {"concurrency": 512}
OURS_WIDE_CONFIG = {"concurrency": 1024, "max_connections": 1100}
OURS_EXTRA = {}  # --ours-config KEY=VALUE (e.g. usage_history=false, to measure what a feature costs)


def setup_ours(home, port, fake, exe, wide=False):
    write_iflow_settings(home, fake)
    write_json(home / ".iflow2api" / "config.json", dict(OURS_WIDE_CONFIG if wide else OURS_CONFIG, **OURS_EXTRA))
    # no update check: nothing a bench starts may reach beyond 127.0.0.1
    env = {"IFLOW2API_HOME": str(home / ".iflow2api"), "IFLOW2API_NO_UPDATE_CHECK": "1"}
    return [sys.executable, str(exe), "--host", "127.0.0.1", "--port", str(port)], env


# LiteLLM's own switches for a quiet, offline, auth-free proxy (read from its 1.108 source).
LITELLM_ENV = {
    "LITELLM_LOG": "ERROR",                       # log errors only
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",       # the bundled model price map, not a download at start
    "LITELLM_TELEMETRY_DISABLED": "true",         # its telemetry veto (it sends nothing without a destination)
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",     # no banner
    # Without a master key it refuses to start; with one every request needs it. The other
    # subjects run without client auth too.
    "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    "HF_HUB_OFFLINE": "1",                        # some model names count tokens with a tokenizer from the hub
    # The fake sends the same token in every chunk, which LiteLLM's loop guard (100 identical
    # chunks in a row) takes for a stuck model: it ends the stream with an error. The check
    # itself still runs on every chunk.
    "REPEATED_STREAMING_CHUNK_LIMIT": "1000000000",
}


def setup_litellm(home, port, fake, exe, wide=False):
    """Every model name goes to the fake as an OpenAI-compatible provider; no database."""
    config = {
        "model_list": [{"model_name": "*", "litellm_params": {
            "model": "openai/*", "api_base": f"{fake.url}/v1", "api_key": "sk-bench",
            # /v1/responses: bridge to the upstream's chat completions (default: its /v1/responses,
            # which the fake, like iFlow, does not have).
            "use_chat_completions_api": True}}],
        # /v1/messages: the same, for the Anthropic face (default for openai/ models: the Responses API).
        "litellm_settings": {"set_verbose": False, "drop_params": True,
                             "use_chat_completions_url_for_anthropic_messages": True},
    }
    write_json(home / "litellm.yaml", config)  # JSON is YAML
    return [str(exe), "--config", str(home / "litellm.yaml"), "--host", "127.0.0.1", "--port", str(port)], LITELLM_ENV


def setup_ccr(home, port, fake, exe, wide=False):
    """One OpenAI-compatible provider (the fake), every request routed to it. No APIKEY: then it
    listens on 127.0.0.1 only and checks no client key. Its update check runs only when its web
    UI asks (/api/update/check); it has no telemetry."""
    write_json(home / ".claude-code-router" / "config.json", {
        "HOST": "127.0.0.1", "PORT": port, "LOG": False,
        "Providers": [{"name": "fake", "api_base_url": f"{fake.url}/v1/chat/completions",
                       "api_key": "sk-bench", "models": ["glm-4.6"]}],
        "Router": {"default": "fake,glm-4.6"},
    })
    # `ccr start` runs the server in the foreground of this process (no daemon).
    return [shutil.which("node") or "node", str(exe), "start"], {}


SETUPS = {"original": setup_original, "ours": setup_ours, "litellm": setup_litellm, "ccr": setup_ccr}


class Server:
    """A proxy under test, started fresh with its own temporary HOME."""

    def __init__(self, name, fake, exe, wide=False):
        self.name = name
        self.home = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_url = self.url + HEALTH_PATHS.get(name, "/health")
        cmd, extra_env = SETUPS[name](self.home, self.port, fake, exe, wide)
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        # As on a user's machine, where Python caches a module's bytecode on its first import:
        # a sandbox that sets PYTHONDONTWRITEBYTECODE makes our one-file server compile itself
        # twice per start (script, then its re-exec as an import), while pip-installed subjects
        # have their caches from the install.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(HOME=str(self.home), NO_PROXY="*", **extra_env)
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
            if http("GET", self.health_url, timeout=1.0)[0] == 200:
                return time.perf_counter() - self.t0
            time.sleep(0.005)
        raise RuntimeError(f"{self.health_url} did not answer 200 within {timeout:.0f} s")

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

def stream_test(fake, url, pid, chunks, streams, concurrency, api="openai", timeout=120, tail=True, pace_us=None):
    """Runs `streams` streams of `chunks` upstream chunks (paced `pace_us` if given, and then
    from then on); returns loadgen JSON plus proxy CPU, fake CPU and the upstream chunk count
    actually sent."""
    fake.configure(chunks, pace_us)
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


def measure(name, fake, args, exe):
    """All metrics for one target in one round. Returns (metrics, note)."""
    m = {}
    server = None
    if name == "direct":
        base, pid = fake.url, None
    else:
        server = Server(name, fake, exe)
        pid = server.pid
        base = server.url
    fake_errors = len(fake.error_lines())
    try:
        if server:
            m["healthy_s"] = server.wait_healthy()
            time.sleep(0.5)
            m["idle_rss_mb"] = memory_mb(pid, "VmRSS")
        if name in ANTHROPIC_ONLY:
            m["openai_note"] = f"n/a: {ANTHROPIC_ONLY[name]}"
        else:
            measure_openai(fake, args, m, f"{base}/v1/chat/completions", pid, smoke=server is not None)

        # Anthropic /v1/messages and OpenAI Responses /v1/responses (proxies only).
        if server:
            for prefix in ROUTES:
                if name in ANTHROPIC_ONLY and prefix != "a":
                    m[f"{prefix}_note"] = f"n/a: {ANTHROPIC_ONLY[name]}"
                    continue
                measure_route(server, fake, args, m, prefix)
            if name in ANTHROPIC_ONLY and m.get("a_note"):
                raise RuntimeError(f"smoke test: {m['a_note']}")  # nothing else to measure

        if pid:
            m["peak_rss_mb"] = memory_mb(pid, "VmHWM")
        errors = fake.error_lines()[fake_errors:]
        if errors:
            m["fake_conn_errors"] = len(errors)
            m["fake_error_samples"] = errors[:3]
        return m, None
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        return m, failure_note(e, server)
    finally:
        if server:
            server.stop()


def measure_openai(fake, args, m, chat, pid, smoke):
    """The OpenAI chat completions phases; pid None for direct (no proxy CPU)."""
    if smoke:
        status, body = http("POST", chat, {"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]},
                            timeout=30)
        if status != 200:
            raise RuntimeError(f"smoke test: non-stream chat completion answered {status}: {body[:200]!r}")

    # Non-streaming requests/s and latency.
    loadgen("nonstream", "--url", chat, "--concurrency", 32, "--duration", 0.3)  # warm-up
    for c in (1, 32):
        cpu0 = cpu_seconds(pid) if pid else 0.0
        r = loadgen("nonstream", "--url", chat, "--concurrency", c, "--duration", args.duration)
        if pid:  # proxy CPU (whole process tree) per completed request, ms
            m[f"cpu_per_req_c{c}_ms"] = 1000 * (cpu_seconds(pid) - cpu0) / max(r["ok"], 1)
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


# The other client faces over the same upstream call, streamed 32 at a time;
# metric keys start with the prefix. prefix: (path, loadgen --api, non-streaming probe body)
ROUTES = {
    "a": ("/v1/messages", "anthropic", {"model": "claude-sonnet-4-5", "max_tokens": 64,
                                        "messages": [{"role": "user", "content": "hi"}]}),
    "r": ("/v1/responses", "responses", {"model": "glm-4.6", "input": "hi"}),
}


def measure_route(server, fake, args, m, prefix):
    """Time to first event and 32 streams through one of ROUTES; n/a with the
    reason (`<prefix>_note`) when its non-streaming probe does not answer 200."""
    path, api, probe = ROUTES[prefix]
    url = f"{server.url}{path}"
    status, body = http("POST", url, probe, timeout=30)  # a peer's first request may load a lot
    if status != 200:
        m[f"{prefix}_note"] = f"n/a: POST {path} answered {status}" + (f": {body[:120]!r}" if status != 404 else "")
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


S1024 = 1024  # streams, all at once: one connection each
# The fake paces these streams (a chunk every 20 ms, 50 tokens/s like a real model), so that all
# 1024 are open at the same time: unpaced, a 50-chunk stream ends within a millisecond or two and
# the proxy never holds more than a few dozen at once.
S1024_SETTLE_S = 2.0  # wait after the phase before threads and fds are counted again


def measure_s1024(name, fake, args, exe):
    """The 1024-stream phase for one subject, on a fresh instance of its own (ours with
    OURS_WIDE_CONFIG): 1024 streams of args.chunks1024 chunks over 1024 connections at once.
    Threads and fds of the proxy are counted idle before (after a one-stream warm-up, so that
    threads a server starts on its first request are in the baseline), sampled during, and
    again S1024_SETTLE_S after the last stream ended; peak RSS is VmHWM at the end. Metric keys
    start with s1024_. Returns (metrics, note)."""
    m, server = {}, None
    route = "anthropic" if name in ANTHROPIC_ONLY else "openai"
    path = "/v1/messages" if route == "anthropic" else "/v1/chat/completions"
    try:
        if name == "direct":
            url, pid = f"{fake.url}{path}", None
        else:
            server = Server(name, fake, exe, wide=True)
            server.wait_healthy()
            url, pid = f"{server.url}{path}", server.pid
            fake.configure(20)
            r = loadgen("stream", "--url", url, "--api", route, "--concurrency", 1, "--streams", 1,
                        "--expect", 20, "--show-tail", timeout=120)
            if r["errors"]:
                raise RuntimeError(f"warm-up stream failed: {r['error_samples']}")
            time.sleep(1.0)
            m["s1024_threads_idle"], m["s1024_fds_idle"] = threads_and_fds(pid)
            m["s1024_idle_rss_mb"] = memory_mb(pid, "VmRSS")
        sampler = PeakSampler(pid) if pid else None
        overflows = listen_overflows()
        r = stream_test(fake, url, pid, args.chunks1024, S1024, S1024, api=route, timeout=120,
                        pace_us=args.pace1024_us)
        if overflows is not None:
            m["s1024_listen_overflows"] = listen_overflows() - overflows
        if sampler:
            m["s1024_threads_peak"], m["s1024_fds_peak"] = sampler.stop()
        m["s1024_errors"] = r["errors"]
        m["s1024_time_s"] = r["elapsed_s"]
        m["s1024_ttfc_ms"] = r["first_event_p50_ms"]
        m["s1024_ttfc_p99_ms"] = r["first_event_p99_ms"]
        if r["errors"]:
            m["s1024_error_samples"] = r["error_samples"]
        if pid:
            m["s1024_cpu_per_1k"] = 1000 * r["proxy_cpu_s"] / max(r["upstream_chunks"], 1)
            time.sleep(S1024_SETTLE_S)
            m["s1024_threads_after"], m["s1024_fds_after"] = threads_and_fds(pid)
            m["s1024_threads_left"] = m["s1024_threads_after"] - m["s1024_threads_idle"]
            m["s1024_fds_left"] = m["s1024_fds_after"] - m["s1024_fds_idle"]
            m["s1024_peak_rss_mb"] = memory_mb(pid, "VmHWM")
        return m, None
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        return m, failure_note(e, server)
    finally:
        fake.configure(args.chunks, args.pace_us)  # the other phases' pacing
        if server:
            server.stop()


# ---------------------------------------------------------------- report

# Worst round instead of the median: error counts, and what the 1024-stream phase left behind.
ERROR_KEYS = ("s256_errors", "stream32_errors", "a_errors", "r_errors", "s1024_errors", "s1024_threads_left",
              "s1024_fds_left")
RESPONSES_CPU_TARGET = 1.2  # Responses CPU per 1000 upstream chunks / Anthropic's, ours
# Targets for ratios of ours to another subject in the same run, by metric key.
OPENAI_TARGETS = {"rps_c32": 8.0, "ttfc_overhead_ms": 1 / 3, "chunks_per_s": 5.0, "cpu_per_1k": 0.2,
                  "idle_rss_mb": 0.5, "healthy_ms": 0.5}  # ours/original (rps_c32: issue 16, else issue 3)
DIRECT_TARGETS = {"chunks_per_s": 0.4}  # ours/direct (issue 16: the floor)
ANTHROPIC_TARGETS = {"cpu_per_1k": 0.3}  # ours/original
CCR_TARGETS = {"events_per_s": 1.3, "cpu_per_1k": 0.6}  # ours/claude-code-router (issue 16)
# Absolute targets for ours, by metric key: (limit, text); met when the value is <= limit.
OPENAI_ABS = {"cpu_per_req_c32_ms": (0.25, "≤ 0.25 ms"), "ttfc_overhead_ms": (0.4, "≤ 0.4 ms"),
              "s256_errors": (0, "0")}
ROUTE_ABS = {"ttfe_overhead_ms": (0.6, "≤ 0.6 ms")}  # Anthropic and Responses routes (issue 16)
FDS_LEFT_LIMIT = 64  # the upstream pool keeps up to 64 idle connections per host
S1024_ABS = {"errors": (0, "0"), "peak_rss_mb": (120, "≤ 120 MB"),  # keys without "s1024_"
             "threads_left": (0, "+0 (back to idle)"),
             "fds_left": (FDS_LEFT_LIMIT, f"≤ +{FDS_LEFT_LIMIT} (pooled upstream connections)")}
# Rows about the process, not a route: shown for every proxy, whichever routes it serves.
PROCESS_KEYS = {"idle_rss_mb", "peak_rss_mb", "healthy_ms"}
S1024_KEYS = ["s1024_errors", "s1024_time_s", "s1024_ttfc_ms", "s1024_ttfc_p99_ms", "s1024_listen_overflows", "s1024_cpu_per_1k", "s1024_idle_rss_mb", "s1024_peak_rss_mb",
              "s1024_threads_idle", "s1024_threads_peak", "s1024_threads_after", "s1024_threads_left",
              "s1024_fds_idle", "s1024_fds_peak", "s1024_fds_after", "s1024_fds_left"]
METRIC_KEYS = ["rps_c1", "p50_c1_ms", "p99_c1_ms", "rps_c32", "p50_c32_ms", "p99_c32_ms", "cpu_per_req_c1_ms",
               "cpu_per_req_c32_ms", "ttfc_ms", "chunks_per_s", "cpu_per_1k", "idle_rss_mb", "peak_rss_mb",
               "healthy_s", "s256_errors", "s256_time_s", "stream32_errors", "fake_cpu_per_1k",
               "loadgen_cpu_per_1k", "events_per_s", *S1024_KEYS]


def note_key(prefix):
    """Where a route's n/a reason is kept: '' is the OpenAI route, 'a_' / 'r_' the ROUTES,
    's1024_' the 1024-stream phase."""
    return f"{prefix}note" if prefix else "openai_note"


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


def medians(rounds, t):
    """One subject's report numbers: medians over its rounds, first-chunk overheads against
    direct, and the first n/a reason of each route."""
    med = {k: median(rounds.get(t, []), k) for k in METRIC_KEYS}
    for p in ROUTES:
        for k in ("ttfe_ms", "events_per_s", "chunks_per_s", "cpu_per_1k", "errors"):
            med[f"{p}_{k}"] = median(rounds.get(t, []), f"{p}_{k}")
    for k, src in [("ttfc_overhead_ms", "ttfc_ms")] + [(f"{p}_ttfe_overhead_ms", f"{p}_ttfe_ms") for p in ROUTES]:
        med[k] = overhead(rounds, t, src) if t != "direct" else None
    med["healthy_ms"] = med["healthy_s"] * 1000 if med["healthy_s"] is not None else None
    for prefix in ["", *(f"{p}_" for p in ROUTES), "s1024_"]:
        reasons = [m[note_key(prefix)] for m in rounds.get(t, []) if m.get(note_key(prefix))]
        med[note_key(prefix)] = reasons[0] if reasons else None
    return med


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


def passes(value, limit, higher_is_better=False):
    """'PASS' / 'FAIL' for value against limit, '—' without a value."""
    if value is None:
        return "—"
    return "PASS" if (value >= limit if higher_is_better else value <= limit) else "FAIL"


def ratio_cell(ours, orig, target, higher_is_better):
    if ours is None or orig is None or orig == 0:
        return "—", "—"
    r = ours / orig
    if target is None:
        return f"{r:.2f}x", ""
    return f"{r:.2f}x", passes(r, target, higher_is_better)


def target_text(target, higher):
    if target is None:
        return ""
    return ("≥ " if higher else "≤ ") + ("1/3" if target == 1 / 3 else f"{target:.2f}x")


def table(rows, cols, ratios, absolute=None):
    """A markdown table. rows: (label, metric key, higher is better); cols: (header, medians, key
    prefix), one value column each ("n/a" where that subject lacks the route); ratios: (header,
    numerator col, denominator col, targets by metric key[, True: only the rows with a target]),
    one ratio column each, followed by target and verdict columns when it has targets; absolute: (header, col, {key: (limit, text)})
    adds a target and a verdict column for one column's own values (met when value <= limit)."""
    head = ["Metric"] + [header for header, _, _ in cols]
    for header, _, _, targets, *_ in ratios:
        head += [header] + (["target", ""] if targets else [])
    if absolute:
        head += [absolute[0], ""]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, higher in rows:
        cells = [label] + ["n/a" if med.get(note_key(prefix)) and key not in PROCESS_KEYS
                           else fmt(med.get(prefix + key)) for _, med, prefix in cols]
        for _, (_, num, num_prefix), (_, den, den_prefix), targets, *only_targeted in ratios:
            if only_targeted and only_targeted[0] and key not in targets:
                cells += ["", "", ""] if targets else [""]
                continue
            ratio, verdict = ratio_cell(num.get(num_prefix + key), den.get(den_prefix + key), targets.get(key), higher)
            cells += [ratio] + ([target_text(targets.get(key), higher), verdict] if targets else [])
        if absolute:
            _, (_, med, prefix), limits = absolute
            if key in limits:
                limit, text = limits[key]
                cells += [text, passes(med.get(prefix + key), limit)]
            else:
                cells += ["", ""]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def route_notes(med, subjects, prefix):
    """Why a subject's cells are n/a on a route, as list items."""
    items = [f"- {LABELS[t]}: {med[t][note_key(prefix)]}" for t in subjects if med[t][note_key(prefix)]]
    return [""] + items if items else []


def round_notes(rounds, subjects):
    """Errors and their samples, per subject and round."""
    notes = []
    for t in subjects:
        for i, m in enumerate(rounds.get(t, []), 1):
            for key, what in (("nonstream_errors_c1", "non-stream c=1 errors"),
                              ("nonstream_errors_c32", "non-stream c=32 errors"),
                              ("stream32_errors", "32-stream errors"), ("s256_errors", "256-stream errors"),
                              ("a_errors", "Anthropic 32-stream errors"),
                              ("r_errors", "Responses 32-stream errors"),
                              ("s1024_errors", "1024-stream errors"),
                              ("fake_conn_errors", "upstream connections that ended in an error (fake's log)")):
                if m.get(key):
                    notes.append(f"{LABELS[t]} round {i}: {m[key]} {what}")
            for key in ("stream32_error_samples", "s256_error_samples", "a_error_samples", "r_error_samples",
                        "s1024_error_samples", "fake_error_samples"):
                if m.get(key):
                    samples = (str(x).replace("\n", "\\n").replace("`", "'") for x in m[key][:3])
                    notes.append(f"{LABELS[t]} round {i} samples: " + "; ".join(f"`{x}`" for x in samples))
            if (m.get("s1024_note") or "").startswith("failed"):
                notes.append(f"{LABELS[t]} round {i}: 1024-stream phase: {m['s1024_note']}")
    return notes


def issue16_summary(med, shown, args):
    """Issue 16's targets for ours, one row each: (target, ours, against, verdict)."""
    o = med["ours"]
    rows = []

    def ratio_row(what, key, other, limit, higher, text):
        mine, theirs = o.get(key), med[other].get(key) if other in shown else None
        r = mine / theirs if mine is not None and theirs else None
        rows.append((what, fmt(mine), f"{LABELS[other]}: {fmt(theirs)}" if other in shown else f"{LABELS[other]}: not run",
                     f"{r:.2f}x" if r is not None else "—", text, passes(r, limit, higher)))

    def abs_row(what, key, limit, text, unit=""):
        v = o.get(key)
        rows.append((what, fmt(v) + (f" {unit}" if unit and v is not None else ""), "", "", text, passes(v, limit)))

    ratio_row("Non-stream c=32: requests/s", "rps_c32", "original", 8.0, True, "≥ 8x the original")
    abs_row("Non-stream c=32: proxy CPU per request", "cpu_per_req_c32_ms", 0.25, "≤ 0.25 ms", "ms")
    abs_row("First-chunk overhead vs direct, OpenAI route (c=1, p50)", "ttfc_overhead_ms", 0.4, "≤ 0.4 ms", "ms")
    abs_row("First-event overhead vs direct, Anthropic route (c=1, p50)", "a_ttfe_overhead_ms", 0.6, "≤ 0.6 ms", "ms")
    abs_row("First-event overhead vs direct, Responses route (c=1, p50)", "r_ttfe_overhead_ms", 0.6, "≤ 0.6 ms", "ms")
    ratio_row("32 streams: chunks/s", "chunks_per_s", "direct", 0.4, True, "≥ 0.40x direct")
    rows.append(("32 streams: proxy CPU s per 1000 chunks", fmt(o.get("cpu_per_1k")), "", "",
                 "unchanged or better", "compare with an earlier run"))
    ratio_row("Anthropic route, 32 streams: events/s", "a_events_per_s", "ccr", 1.3, True, "≥ 1.3x claude-code-router")
    ratio_row("Anthropic route, 32 streams: CPU s per 1000 upstream chunks", "a_cpu_per_1k", "ccr", 0.6, False,
              "≤ 0.6x claude-code-router")
    ratio_row("Idle RSS (MB)", "idle_rss_mb", "original", 0.5, False, "≤ 0.5x the original")
    if o.get(note_key("s1024_")):
        rows.append((f"{S1024} streams", o[note_key("s1024_")], "", "", "", "—"))
    else:
        abs_row(f"{S1024} streams x {args.chunks1024} chunks: errors (worst round)", "s1024_errors", 0, "0")
        abs_row(f"{S1024} streams: peak RSS", "s1024_peak_rss_mb", 120, "≤ 120 MB", "MB")
        rows.append((f"{S1024} streams: threads {S1024_SETTLE_S:.0f} s after / idle before (worst round)",
                     f"{fmt(o.get('s1024_threads_after'))} / {fmt(o.get('s1024_threads_idle'))}", "",
                     f"{o['s1024_threads_left']:+d}" if o.get("s1024_threads_left") is not None else "—",
                     "+0 (back to idle)", passes(o.get("s1024_threads_left"), 0)))
        rows.append((f"{S1024} streams: fds {S1024_SETTLE_S:.0f} s after / idle before (worst round)",
                     f"{fmt(o.get('s1024_fds_after'))} / {fmt(o.get('s1024_fds_idle'))}", "",
                     f"{o['s1024_fds_left']:+d}" if o.get("s1024_fds_left") is not None else "—",
                     f"≤ +{FDS_LEFT_LIMIT} (pooled upstream connections)", passes(o.get("s1024_fds_left"), FDS_LEFT_LIMIT)))
    out = ["| Target | ours | against | ratio / change | target | |", "|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def build_report(rounds, notes, args, meta):
    shown = [t for t in COLUMNS if t in rounds]  # ours, original, the peers asked for, direct
    proxies = [t for t in shown if t != "direct"]
    med = {t: medians(rounds, t) for t in COLUMNS}
    col = {t: (LABELS[t], med[t], "") for t in COLUMNS}  # the OpenAI route's columns

    # (label, key, higher is better)
    rows = [
        ("Non-stream c=1: requests/s", "rps_c1", True),
        ("Non-stream c=1: p50 latency (ms)", "p50_c1_ms", False),
        ("Non-stream c=1: p99 latency (ms)", "p99_c1_ms", False),
        ("Non-stream c=32: requests/s", "rps_c32", True),
        ("Non-stream c=32: p50 latency (ms)", "p50_c32_ms", False),
        ("Non-stream c=32: p99 latency (ms)", "p99_c32_ms", False),
        ("Non-stream c=1: proxy CPU ms per request", "cpu_per_req_c1_ms", False),
        ("Non-stream c=32: proxy CPU ms per request", "cpu_per_req_c32_ms", False),
        ("Stream: time to first chunk (ms)", "ttfc_ms", False),
        ("Stream: first-chunk overhead vs direct (ms)", "ttfc_overhead_ms", False),
        ("32 streams: chunks/s at client", "chunks_per_s", True),
        ("32 streams: SSE events/s at client", "events_per_s", True),
        ("32 streams: proxy CPU s per 1000 chunks", "cpu_per_1k", False),
        ("Idle RSS (MB)", "idle_rss_mb", False),
        ("Peak RSS (MB)", "peak_rss_mb", False),
        ("Time to healthy (ms)", "healthy_ms", False),
        (f"256 streams x {args.chunks256} chunks: errors (worst round)", "s256_errors", False),
        (f"256 streams x {args.chunks256} chunks: total time (s)", "s256_time_s", False),
    ]
    # Rows of a client face's table; keys without the route prefix.
    route_rows = [
        ("32 streams: events/s at client", "events_per_s", True),
        ("32 streams: content chunks/s at client", "chunks_per_s", True),
        ("32 streams: proxy CPU s per 1000 upstream chunks", "cpu_per_1k", False),
        ("Time to first event (ms)", "ttfe_ms", False),
        ("First-event overhead vs direct first chunk (ms)", "ttfe_overhead_ms", False),
        ("32 streams: errors (worst round)", "errors", False),
    ]
    lines = [
        "## Results",
        "",
        f"Run: {meta['date']}, {meta['rounds']} round(s), medians; {args.chunks} chunks per stream"
        f"{', paced ' + str(args.pace_us) + ' µs' if args.pace_us else ', unpaced'}; "
        f"machine: {meta['machine']}; 1-min load average {meta['load']}.",
        f"Original: iflow2api {ORIGINAL_VERSION} ({meta['original_stack']}), api_concurrency=10. "
        f"Ours: {meta['ours']}, config {json.dumps(OURS_CONFIG)} "
        f"(1024-stream phase: {json.dumps(OURS_WIDE_CONFIG)}).",
    ]
    if meta.get("peers"):
        lines.append(f"Peers: {meta['peers']}.")
    lines += [
        "",
        "### Issue 16 targets (ours)",
        "",
        issue16_summary(med, shown, args),
        "",
        "### OpenAI path: POST /v1/chat/completions",
        "",
        table(rows, [col[t] for t in shown],
              [("ours/original", col["ours"], col["original"], OPENAI_TARGETS),
               ("ours/direct", col["ours"], col["direct"], DIRECT_TARGETS, True)],
              ("target (ours)", col["ours"], OPENAI_ABS)),
    ]
    lines += route_notes(med, proxies, "")
    a_col = {t: (LABELS[t], med[t], "a_") for t in COLUMNS}
    a_ratios = [("ours/original", a_col["ours"], a_col["original"], ANTHROPIC_TARGETS)]
    if "ccr" in shown:
        a_ratios.append(("ours/ccr", a_col["ours"], a_col["ccr"], CCR_TARGETS))
    lines += [
        "",
        "### Anthropic path: POST /v1/messages (streaming)",
        "",
        "The fake upstream speaks only OpenAI chat completions, so there is no direct column; the "
        "first-event overhead is against direct's first chunk on /v1/chat/completions."
        + (" ours/ccr: issue 16's targets against claude-code-router." if "ccr" in shown else ""),
        "",
        table(route_rows, [a_col[t] for t in proxies], a_ratios, ("target (ours)", a_col["ours"], ROUTE_ABS)),
    ]
    lines += route_notes(med, proxies, "a_")
    ours_a, ours_r = ("ours /v1/messages", med["ours"], "a_"), ("ours /v1/responses", med["ours"], "r_")
    r_cols = [ours_a, ours_r] + [(f"{LABELS[t]} /v1/responses", med[t], "r_") for t in proxies
                                 if t not in ("ours", "original", "ccr")]
    ra = ratio_cell(med["ours"]["r_cpu_per_1k"], med["ours"]["a_cpu_per_1k"], RESPONSES_CPU_TARGET, False)
    lines += [
        "",
        "### Responses path: POST /v1/responses (streaming), side by side with the Anthropic path",
        "",
        "The original" + (" and claude-code-router have" if "ccr" in shown else " has") + " no /v1/responses. "
        "Events are `response.output_text.delta` events, the first event is the first delta, a stream "
        "succeeds when `response.completed` arrives.",
        "",
        table(route_rows, r_cols, [("Responses/Anthropic", ours_r, ours_a, {"cpu_per_1k": RESPONSES_CPU_TARGET})],
              ("target (ours /v1/responses)", ours_r, ROUTE_ABS)),
        "",
        f"Responses CPU per 1000 chunks / Anthropic: {ra[0]} (target ≤ {RESPONSES_CPU_TARGET:.1f}x)"
        + (f": {ra[1]}" if ra[1] else ""),
    ]
    lines += route_notes(med, [t for t in proxies if t not in ("original", "ccr")], "r_")
    s_col = {t: (LABELS[t], med[t], "s1024_") for t in COLUMNS}
    s_rows = [
        ("Errors (worst round)", "errors", False),
        ("Total time (s)", "time_s", False),
        ("Time to first chunk, p50 (ms)", "ttfc_ms", False),
        ("Time to first chunk, p99 (ms)", "ttfc_p99_ms", False),
        ("Listen queue overflows (kernel, machine-wide)", "listen_overflows", False),
        ("Proxy CPU s per 1000 upstream chunks", "cpu_per_1k", False),
        ("Idle RSS before (MB)", "idle_rss_mb", False),
        ("Peak RSS (MB, VmHWM at the end)", "peak_rss_mb", False),
        ("Threads: idle before", "threads_idle", False),
        ("Threads: peak (sampled every 0.1 s)", "threads_peak", False),
        (f"Threads: {S1024_SETTLE_S:.0f} s after", "threads_after", False),
        ("Threads: after − idle (worst round)", "threads_left", False),
        ("Open fds: idle before", "fds_idle", False),
        ("Open fds: peak (sampled every 0.1 s)", "fds_peak", False),
        (f"Open fds: {S1024_SETTLE_S:.0f} s after", "fds_after", False),
        ("Open fds: after − idle (worst round)", "fds_left", False),
    ]
    s_shown = [t for t in shown if t in args.s1024]
    s_skipped = [t for t in shown if t not in args.s1024 and rounds.get(t)]
    lines += [
        "",
        f"### {S1024} concurrent streams: POST /v1/chat/completions",
        "",
        f"{S1024} streams of {args.chunks1024} chunks, paced {args.pace1024_us / 1000:g} ms apart by the fake, "
        f"{S1024} connections at once, on a fresh instance of each subject (ours with "
        f"{json.dumps(OURS_WIDE_CONFIG)}). Threads and open fds of the proxy's process tree are counted idle "
        f"(after one warm-up stream) and {S1024_SETTLE_S:.0f} s after the last stream ended; the upstream "
        "pool may keep idle connections (ours: up to 64)."
        + (" claude-code-router: POST /v1/messages, the only route it serves." if "ccr" in s_shown else ""),
        "",
        table(s_rows, [s_col[t] for t in s_shown], [], ("target (ours)", s_col["ours"], S1024_ABS))
        if "ours" in s_shown else table(s_rows, [s_col[t] for t in s_shown], []),
    ]
    lines += route_notes(med, s_shown, "s1024_")
    if s_skipped:
        lines += ["", f"Not run for {', '.join(LABELS[t] for t in s_skipped)}: `--s1024` chooses the subjects "
                      "(default ours, direct and claude-code-router; the original would need about 100 s a round, "
                      "its upstream calls being capped at 10, LiteLLM about 50 s)."]
    d = med["direct"]
    lines += [
        "",
        "### Tool headroom",
        "",
        f"Direct (load generator ↔ fake upstream, no proxy): {fmt(d['chunks_per_s'])} chunks/s at 32 streams. "
        f"Fake upstream CPU: {fmt(d['fake_cpu_per_1k'], 4)} s per 1000 chunks; load generator CPU: "
        f"{fmt(d['loadgen_cpu_per_1k'], 4)} s per 1000 events (medians, direct runs).",
    ]
    for t in proxies:
        if med[t]["fake_cpu_per_1k"] is not None:
            lines.append(f"During {LABELS[t]} runs: fake {fmt(med[t]['fake_cpu_per_1k'], 4)} s per 1000 chunks, "
                         f"load generator {fmt(med[t]['loadgen_cpu_per_1k'], 4)} s per 1000 events.")
    notes = notes + round_notes(rounds, shown)
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

def install_subjects(targets, args, notes):
    """What each subject runs: installs the original and the peers on first use, snapshots ours.
    A subject that cannot be set up is dropped from `targets` with a note. Returns
    ({subject: its executable or entry file}, sha256 prefix of ours or None)."""
    installs = {
        "original": lambda: ensure_original_venv(Path(args.original_venv)),
        "litellm": lambda: ensure_litellm_venv(Path(args.litellm_venv)),
        "ccr": lambda: ensure_ccr(Path(args.ccr_dir)),
    }
    exes, ours_digest = {}, None
    for name in [t for t in targets if t in installs]:
        try:
            exes[name] = installs[name]()
        except (subprocess.CalledProcessError, OSError) as e:
            notes.append(f"{LABELS[name]} skipped: could not install it ({e})")
            targets.remove(name)
    if "ours" in targets:
        if not args.ours_path.exists():
            notes.append(f"ours skipped: {args.ours_path} does not exist")
            targets.remove("ours")
        else:
            exes["ours"], ours_digest = snapshot(args.ours_path)
    return exes, ours_digest


def peers_meta(exes):
    """Versions and settings of the peers that ran, for the report's header."""
    parts = []
    if "litellm" in exes:
        stack = package_versions(exes["litellm"].parent / "python", ("uvicorn", "fastapi", "aiohttp", "httpx", "uvloop"))
        parts.append(f"LiteLLM {LITELLM_VERSION} (`litellm[proxy]`: {stack}), 1 worker, no database, "
                     "every model to the fake as `openai/*`")
    if "ccr" in exes:
        node = subprocess.run([shutil.which("node") or "node", "--version"], capture_output=True, text=True)
        parts.append(f"claude-code-router {CCR_VERSION} (Node {node.stdout.strip() or '?'}), one provider = the fake")
    return "; ".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round, short streams and durations (< 1 minute)")
    p.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    p.add_argument("--chunks", type=int, help="chunks per stream in the 32-stream tests (default 2000, quick 300)")
    p.add_argument("--chunks256", type=int, help="chunks per stream in the 256-stream test (default 50, quick 20)")
    p.add_argument("--duration", type=float, help="seconds per non-stream test (default 2, quick 1)")
    p.add_argument("--chunks1024", type=int, help="chunks per stream in the 1024-stream test (default 50, quick 20)")
    p.add_argument("--pace1024-us", type=int, default=20000,
                   help="fake upstream pause between chunks in the 1024-stream test, µs (default 20000)")
    p.add_argument("--s1024", default="ours,direct,ccr",
                   help="comma list of the subjects that run the 1024-stream phase, if they run at all "
                        "(default ours,direct,ccr; '' = none; the original takes ~100 s a round, its "
                        "upstream calls capped at 10, LiteLLM ~50 s)")
    p.add_argument("--ttfc-samples", type=int, help="sequential streams for first-chunk time (default 50, quick 20)")
    p.add_argument("--pace-us", type=int, default=0, help="fake upstream pause between chunks, µs (default 0)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list of direct,original,ours (and peers)")
    p.add_argument("--peers", default="", help="comma list of peers to add: litellm (LiteLLM proxy), ccr "
                                               "(claude-code-router, Anthropic route only); installed on first use")
    p.add_argument("--ours", default="build",
                   help="path of our server, or 'build' (default): build dist-style iflow2api.pyz from "
                        "this checkout with build.py and measure that, the file users download")
    p.add_argument("--ours-config", action="append", default=[], metavar="KEY=VALUE",
                   help="one more key of our config.json (VALUE read as JSON, else text); repeatable")
    p.add_argument("--original-venv", default=str(BENCH / ".venv-original"),
                   help="venv with iflow2api 1.6.10 (created if missing)")
    p.add_argument("--litellm-venv", default=str(BENCH / ".venv-litellm"),
                   help=f"venv with litellm[proxy]=={LITELLM_VERSION} (created if missing)")
    p.add_argument("--ccr-dir", default=str(BENCH / ".cache-ccr"),
                   help=f"npm prefix with {CCR_PACKAGE}@{CCR_VERSION} (installed if missing)")
    p.add_argument("--out", default=str(BENCH / "results.md"), help="markdown output ('' = don't write)")
    p.add_argument("--update-readme", action="store_true", help="also replace the Results section of bench/README.md")
    args = p.parse_args()
    for item in args.ours_config:
        key, _, value = item.partition("=")
        try:
            OURS_EXTRA[key] = json.loads(value)
        except ValueError:
            OURS_EXTRA[key] = value
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.chunks = args.chunks or (300 if q else 2000)
    args.chunks256 = args.chunks256 or (20 if q else 50)
    args.chunks1024 = args.chunks1024 or (20 if q else 50)
    args.s1024 = [t.strip() for t in args.s1024.split(",") if t.strip()]
    args.duration = args.duration or (1.0 if q else 2.0)
    args.ttfc_samples = args.ttfc_samples or (20 if q else 50)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    targets += [t.strip() for t in args.peers.split(",") if t.strip() and t.strip() not in targets]
    unknown = [t for t in targets if t not in TARGETS + PEERS]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}: choose from {', '.join(TARGETS + PEERS)}")
    ours_name = "not run"
    if "ours" in targets:
        args.ours_path = build_pyz() if args.ours == "build" else Path(args.ours).resolve()
        ours = args.ours_path
        ours_name = os.path.relpath(ours, REPO) if ours.is_relative_to(REPO) else str(ours)
    asked = list(targets)  # report columns, also for a subject that could not be set up
    notes = []

    build_tools()
    exes, ours_digest = install_subjects(targets, args, notes)
    fd_limit = raise_fd_limit()
    if args.s1024 and fd_limit < 3 * S1024:
        notes.append(f"open-file limit {fd_limit} (hard limit): the {S1024}-stream phase may fail for want of fds")

    load_start = os.getloadavg()[0]
    if load_start > 1.0:
        log(f"warning: load average {load_start:.1f} before the run; other work on this machine skews results")
    fake = Fake(args.pace_us)
    results = {t: [] for t in [*TARGETS, *asked]}
    failed = set()
    round_loads = []  # 1-min load average as each round starts
    started = time.time()
    try:
        for rnd in range(args.rounds):
            round_loads.append(os.getloadavg()[0])
            shift = rnd % max(len(targets), 1)
            order = targets[shift:] + targets[:shift]
            for name in order:
                if name in failed:
                    continue
                log(f"round {rnd + 1}/{args.rounds}: {name}...")
                t0 = time.time()
                m, note = measure(name, fake, args, exes.get(name))
                log(f"  done in {time.time() - t0:.1f} s" + (f" -- FAILED: {note}" if note else ""))
                if note:
                    notes.append(f"{LABELS[name]} (round {rnd + 1}): {note}; skipped from then on")
                    failed.add(name)
                    continue
                if name in args.s1024:
                    log(f"round {rnd + 1}/{args.rounds}: {name}, {S1024} streams...")
                    t0 = time.time()
                    wide, s_note = measure_s1024(name, fake, args, exes.get(name))
                    log(f"  done in {time.time() - t0:.1f} s" + (f" -- FAILED: {s_note}" if s_note else ""))
                    m.update(wide)
                    if s_note:
                        m["s1024_note"] = f"failed: {s_note}"
                else:
                    m["s1024_note"] = "not run (see --s1024)"
                results[name].append(m)
    finally:
        fake.stop()
    log(f"total {time.time() - started:.0f} s")

    stack = "not run"
    if "original" in exes:
        stack = package_versions(exes["original"].parent / "python",
                                 ("uvicorn", "fastapi", "httpx", "uvloop", "httptools"))
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rounds": args.rounds,
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
                   f"Linux {platform.release()}, Python {platform.python_version()}",
        "original_stack": stack,
        "load": f"{load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
                + (f" (at each round's start: {', '.join(f'{x:.2f}' for x in round_loads)})" if len(round_loads) > 1 else ""),
        "ours": f"`{ours_name}`" + (f" (sha256 {ours_digest}, copied at start)" if ours_digest else ""),
        "fd_limit": fd_limit,
        "peers": peers_meta(exes),
    }
    report = build_report(results, notes, args, meta)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "args": vars(args), "rounds": results, "notes": notes}, indent=1, default=str))
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
