"""Plain helpers every test module shares (fixtures stay in conftest.py): paths, the fake
credentials, ports, an HTTP call that never goes through a proxy, a bounded wait, and the
iflow2api command line run as a subprocess with a temp HOME. Import with `from helpers import ...`."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "iflow2api.py")
FAKE_KEY = "sk-fake-0123456789abcdef0123456789"
PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")

# Test clients talk to 127.0.0.1 directly, whatever proxy variables the machine has.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    """A port nothing listens on right now (for servers a test starts itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def write_settings(home, base_url, api_key=FAKE_KEY, **extra):
    """~/.iflow/settings.json as the iFlow CLI writes it."""
    os.makedirs(os.path.join(str(home), ".iflow"), exist_ok=True)
    data = {"selectedAuthType": "api-key", "apiKey": api_key, "baseUrl": base_url,
            "modelName": "glm-5", "theme": "Default"}
    data.update(extra)
    with open(os.path.join(str(home), ".iflow", "settings.json"), "w") as f:
        json.dump(data, f)


def http(target, method="GET", path="", body=None, headers=None, timeout=10, opener=DIRECT):
    """(status, headers, body bytes) of one request with plain urllib: no client-side retries,
    no proxy (unless `opener` says otherwise), an HTTP error status returned, not raised.

    target is a server (its .url is used) or a URL; path is appended to it. A bytes body is
    sent as it is; any other body (dict, list, ...) as JSON with Content-Type application/json.
    Errors below HTTP (nothing listening, a timeout) raise OSError."""
    url = (target if isinstance(target, str) else target.url) + path
    sent = {}
    if body is not None and not isinstance(body, bytes):
        body, sent = json.dumps(body).encode(), {"Content-Type": "application/json"}
    sent.update(headers or {})
    req = urllib.request.Request(url, data=body, method=method, headers=sent)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def healthy(target) -> bool:
    """/health answers 200 with status "ok" (False too while nothing listens yet)."""
    try:
        status, _h, body = http(target, "GET", "/health", timeout=2)
    except OSError:
        return False
    return status == 200 and json.loads(body)["status"] == "ok"


def wait_until(predicate, timeout_s=10.0, step_s=0.02):
    """Call predicate until it returns something true or timeout_s passes; its last value
    (so `assert wait_until(...), "what did not happen"` reads as the check it is)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    return predicate()


def cli_env(home, **extra):
    """The environment for iflow2api.py as a subprocess: HOME (and USERPROFILE) is home,
    IFLOW2API_HOME is home/.iflow2api, and none of this machine's IFLOW2API_*, proxy or
    *_API_KEY variables leak in; extra adds or overrides variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("IFLOW2API_") and k not in PROXY_VARS and not k.endswith("_API_KEY")}
    env.update(HOME=str(home), USERPROFILE=str(home), IFLOW2API_HOME=os.path.join(str(home), ".iflow2api"),
               PYTHONUNBUFFERED="1", NO_PROXY="*", no_proxy="*")
    env.update(extra)
    return env


def run_cli(home, *args, stdin=None, env=None, timeout=30):
    """`python iflow2api.py ARGS` with cli_env(home, **env); the CompletedProcess (text)."""
    return subprocess.run([sys.executable, SOURCE] + list(args), env=cli_env(home, **(env or {})), input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def stop_process(proc, timeout_s=5.0) -> None:
    """SIGTERM, then SIGKILL when it has not exited within timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
