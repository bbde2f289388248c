"""The real Codex CLI (npm @openai/codex, pinned in codex_setup.py) in `codex exec` mode
against the server's Responses API (issue 13), with the fake upstream playing the model:
plain text; a whole tool loop where Codex runs its `exec_command` tool and the answer comes
after the tool output; reasoning shown and replayed; and an upstream error Codex gives up on.

Offline: HOME is a temp dir whose .codex/config.toml points a `local` provider at the
server (wire_api = "responses") and turns off what Codex 0.171 otherwise reaches out for:
the update check (github.com), analytics (ab.chatgpt.com), feedback, and the curated plugin
sync (github.com, api.github.com, chatgpt.com). Every proxy variable points at a loopback
trap that refuses and records anything it would still try, so nothing leaves 127.0.0.1."""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from codex_setup import CODEX_VERSION, install_codex
from fakes import Reply, multi_tool_stream, text_stream, tool_call_stream
from helpers import ROOT, free_port, in_ci, port_open, write_settings

FAKE_CLIENT_KEY = "sk-codex-e2e-00000000000000000000"
MARKER_COMMAND = "echo hello-from-codex-$((6*7))"
MARKER_OUTPUT = "hello-from-codex-42"  # only a shell that ran the command prints this

CONFIG_TOML = """\
model = "glm-5"
model_provider = "local"
check_for_update_on_startup = false

[analytics]
enabled = false

[feedback]
enabled = false

[features]
plugins = false
remote_plugin = false
apps = false

[model_providers.local]
name = "iflow2api"
base_url = "{base_url}"
env_key = "IFLOW2API_E2E_KEY"
wire_api = "responses"
request_max_retries = 1
stream_max_retries = 1
"""


@pytest.fixture(scope="module")
def codex():
    path = install_codex()
    if path is None:
        if in_ci():
            pytest.fail("Codex CLI %s could not be installed with npm" % CODEX_VERSION)
        pytest.skip("npm or @openai/codex not available")
    return path


class ProxyTrap:
    """A loopback "proxy" that refuses every request and records where it was meant to go."""

    def __init__(self):
        self.attempts = []
        trap = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def refuse(self):
                trap.attempts.append("%s %s" % (self.command, self.path))
                self.send_response(403)
                self.send_header("content-length", "0")
                self.end_headers()

            do_CONNECT = do_GET = do_POST = do_PUT = do_HEAD = refuse

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy_trap():
    trap = ProxyTrap()
    yield trap
    trap.close()


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "project"
    path.mkdir()
    return str(path)


def run_codex(codex, server, home, workdir, trap, prompt, *extra):
    """codex exec PROMPT against the server, offline except 127.0.0.1."""
    os.makedirs(os.path.join(home, ".codex"), exist_ok=True)
    with open(os.path.join(home, ".codex", "config.toml"), "w") as f:
        f.write(CONFIG_TOML.format(base_url=server.url + "/v1"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "CODEX_")) and k.lower() not in ("http_proxy", "https_proxy",
                                                                             "all_proxy", "no_proxy")}
    env.update(HOME=home, IFLOW2API_E2E_KEY=FAKE_CLIENT_KEY, NO_COLOR="1",
               HTTP_PROXY=trap.url, HTTPS_PROXY=trap.url, ALL_PROXY=trap.url,
               http_proxy=trap.url, https_proxy=trap.url, all_proxy=trap.url,
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return subprocess.run([codex, "exec", "--skip-git-repo-check"] + list(extra) + [prompt],
                          cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=180)


def bodies_to_model(fake):
    return [json.loads(r.body) for r in fake.chat_requests()]


def describe(result, fake, trap):
    """Everything needed to see why a run failed."""
    return "exit %s\n--- stdout\n%s\n--- stderr\n%s\n--- upstream requests: %d; trapped: %s" % (
        result.returncode, result.stdout, result.stderr[-4000:], len(fake.chat_requests()), trap.attempts)


@pytest.mark.parametrize("adapter", ["h11"], indirect=True)
def test_codex_exec_prints_the_upstream_answer(codex, server, fake_upstream, home, workdir, proxy_trap):
    fake_upstream.default_reply = lambda request: Reply(stream=text_stream(
        ["Hello from ", "the fake upstream."]))
    result = run_codex(codex, server, str(home), workdir, proxy_trap, "say hi")
    assert result.returncode == 0, describe(result, fake_upstream, proxy_trap)
    assert proxy_trap.attempts == [], "Codex tried to reach beyond 127.0.0.1"
    assert result.stdout.strip().endswith("Hello from the fake upstream."), \
        describe(result, fake_upstream, proxy_trap)
    bodies = bodies_to_model(fake_upstream)
    assert bodies and all(b["model"] == "glm-5" and b["stream"] is True for b in bodies)
    body = bodies[0]
    # Codex's developer messages and the prompt arrive; its tools arrive as functions:
    # exec_command as is, the multi_agent_v1 namespace flattened, web_search dropped.
    assert body["messages"][0]["role"] == "system"
    last = body["messages"][-1]  # Codex's environment context and the prompt, in one user turn
    assert last["role"] == "user" and last["content"].endswith("say hi")
    names = [t["function"]["name"] for t in body["tools"]]
    assert "exec_command" in names and "multi_agent_v1__spawn_agent" in names
    assert all(t["type"] == "function" for t in body["tools"])
    assert "web_search" not in json.dumps(body["tools"])


def _tool_loop_reply(request):
    """Ask for exec_command once; after its output, answer with what the command printed."""
    messages = request.get("messages") or []
    results = [m for m in messages if m.get("role") == "tool"]
    if results:
        said = MARKER_OUTPUT if MARKER_OUTPUT in results[-1]["content"] else "nothing useful"
        return Reply(stream=text_stream(["The tool said: ", said]))
    if "exec_command" in [t["function"]["name"] for t in request.get("tools") or []]:
        return Reply(stream=tool_call_stream("exec_command", {"cmd": MARKER_COMMAND},
                                             call_id="call_exec_1", text="Running it."))
    return Reply(stream=text_stream(["ok"]))


@pytest.mark.parametrize("adapter", ["h11", "stdlib"], indirect=True)
def test_codex_runs_exec_command_and_answers_after_the_output(codex, server, fake_upstream, home,
                                                              workdir, proxy_trap):
    fake_upstream.default_reply = _tool_loop_reply
    result = run_codex(codex, server, str(home), workdir, proxy_trap,
                       "Run the marker command.", "--dangerously-bypass-approvals-and-sandbox")
    assert result.returncode == 0, describe(result, fake_upstream, proxy_trap)
    assert proxy_trap.attempts == [], "Codex tried to reach beyond 127.0.0.1"
    assert result.stdout.strip().endswith("The tool said: " + MARKER_OUTPUT), \
        describe(result, fake_upstream, proxy_trap)
    bodies = bodies_to_model(fake_upstream)
    with_result = [b for b in bodies if any(m.get("role") == "tool" for m in b["messages"])]
    assert with_result, "no request carried the tool output"
    messages = with_result[-1]["messages"]
    calls = [m for m in messages if m.get("role") == "assistant" and m.get("tool_calls")]
    [call] = calls[-1]["tool_calls"]
    assert call["id"] == "call_exec_1" and call["function"]["name"] == "exec_command"
    assert json.loads(call["function"]["arguments"]) == {"cmd": MARKER_COMMAND}
    tool_message = messages[messages.index(calls[-1]) + 1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "call_exec_1"
    assert MARKER_OUTPUT in tool_message["content"]


def _reasoning_tool_reply(request):
    """Think, then call exec_command; after its output, think again and answer."""
    if any(m.get("role") == "tool" for m in request.get("messages") or []):
        return Reply(stream=text_stream(["All done."], reasoning=["The command ", "worked."]))
    return Reply(stream=multi_tool_stream([("call_think_1", "exec_command", json.dumps({"cmd": "true"}))],
                                          reasoning=["I should ", "run a command first."]))


@pytest.mark.parametrize("adapter", ["h11"], indirect=True)
def test_codex_shows_reasoning_and_replays_it(codex, server, fake_upstream, home, workdir, proxy_trap):
    """reasoning_content deltas reach Codex as reasoning items with a summary (it prints them),
    and the reasoning items it sends back in the next turn are accepted."""
    fake_upstream.default_reply = _reasoning_tool_reply
    result = run_codex(codex, server, str(home), workdir, proxy_trap, "Think, then act.",
                       "--dangerously-bypass-approvals-and-sandbox")
    assert result.returncode == 0, describe(result, fake_upstream, proxy_trap)
    assert result.stdout.strip().endswith("All done."), describe(result, fake_upstream, proxy_trap)
    assert "I should run a command first." in result.stderr and "The command worked." in result.stderr
    bodies = bodies_to_model(fake_upstream)
    assert len(bodies) == 2 and any(m.get("role") == "tool" for m in bodies[1]["messages"])


@pytest.mark.parametrize("adapter", ["stdlib"], indirect=True)
def test_codex_gives_up_cleanly_on_upstream_errors(codex, server, fake_upstream, home, workdir,
                                                   proxy_trap):
    """An upstream 500 before the first byte is an HTTP error Codex understands: it retries
    (request_max_retries = 1, stream_max_retries = 1 here) and exits 1, it does not hang."""
    fake_upstream.default_reply = lambda request: Reply(500, {"error": {"message": "boom"}})
    result = run_codex(codex, server, str(home), workdir, proxy_trap, "say hi")
    assert result.returncode == 1, describe(result, fake_upstream, proxy_trap)
    assert 1 <= len(fake_upstream.chat_requests()) <= 4


# -- `iflow2api codex` ----------------------------------------------------------------------

def test_iflow2api_codex_runs_codex_through_its_own_server_and_stays_local(codex, fake_upstream, home, workdir,
                                                                           proxy_trap):
    """No config.toml at all: the launcher's -c overrides carry the provider and switch off
    Codex's own traffic; the launcher's server is gone when Codex exits."""
    write_settings(str(home), fake_upstream.url)
    fake_upstream.default_reply = lambda request: Reply(stream=text_stream(["Launched through ", "iflow2api."]))
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "CODEX_", "IFLOW2API_")) and k.lower() not in (
               "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update(HOME=str(home), IFLOW2API_HOME=os.path.join(str(home), ".iflow2api"), IFLOW2API_PORT=str(port),
               PATH=os.path.dirname(codex) + os.pathsep + env.get("PATH", ""), NO_COLOR="1",
               HTTP_PROXY=proxy_trap.url, HTTPS_PROXY=proxy_trap.url, ALL_PROXY=proxy_trap.url,
               http_proxy=proxy_trap.url, https_proxy=proxy_trap.url, all_proxy=proxy_trap.url,
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "iflow2api.py"), "codex", "--model", "glm-5",
                             "exec", "--skip-git-repo-check", "say hi"], cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, describe(result, fake_upstream, proxy_trap)
    assert "Launched through iflow2api." in result.stdout
    assert proxy_trap.attempts == [], proxy_trap.attempts
    assert not os.path.exists(os.path.join(str(home), ".codex", "config.toml"))
    assert not port_open(port)
