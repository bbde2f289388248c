"""The real Claude Code CLI (npm @anthropic-ai/claude-code) in print mode against
the server, with the fake upstream playing the model: plain text, and a whole
tool loop where Claude Code runs Bash and the answer comes after the tool result."""
import json
import os
import subprocess
import sys

import pytest

from fakes import Reply, text_stream, tool_call_stream
from helpers import ROOT, free_port, in_ci, port_open, write_settings
from run import CLAUDE_CODE_VERSION, install_claude_code

FAKE_CLIENT_KEY = "sk-ant-e2e-0000000000000000000000000000"


@pytest.fixture(scope="module")
def claude():
    path = install_claude_code()
    if path is None:
        if in_ci():
            pytest.fail("Claude Code could not be installed with npm")
        pytest.skip("npm or @anthropic-ai/claude-code not available")
    return path


def run_claude(claude, server, home, workdir, prompt, *extra):
    """claude -p PROMPT against the server, offline except 127.0.0.1."""
    with open(os.path.join(home, ".claude.json"), "w") as f:
        json.dump({"hasCompletedOnboarding": True, "lastOnboardingVersion": CLAUDE_CODE_VERSION,
                   "numStartups": 5,
                   "customApiKeyResponses": {"approved": [FAKE_CLIENT_KEY[-20:]], "rejected": []},
                   "projects": {workdir: {"hasTrustDialogAccepted": True, "allowedTools": []}}}, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE"))}
    env.update(ANTHROPIC_BASE_URL=server.url, ANTHROPIC_API_KEY=FAKE_CLIENT_KEY, HOME=home,
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1",
               DISABLE_TELEMETRY="1", DISABLE_ERROR_REPORTING="1", CI="1", NO_COLOR="1")
    return subprocess.run([claude, "-p", prompt] + list(extra), cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=180)


def messages_to_model(fake):
    return [json.loads(r.body) for r in fake.chat_requests()]


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "project"
    path.mkdir()
    return str(path)


@pytest.mark.parametrize("adapter", ["h11"], indirect=True)
def test_claude_code_prints_the_upstream_answer(claude, server, fake_upstream, home, workdir):
    fake_upstream.default_reply = lambda request: Reply(stream=text_stream(
        ["Hello from ", "the fake upstream."]))
    result = run_claude(claude, server, str(home), workdir, "Say hello.")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Hello from the fake upstream." in result.stdout
    bodies = messages_to_model(fake_upstream)
    assert bodies and all(b["model"] == "glm-5" for b in bodies)
    assert all(b["stream"] is True for b in bodies)


def _tool_loop_reply(request):
    """Ask for Bash once; after the tool result, answer with what the tool printed."""
    messages = request.get("messages") or []
    tool_names = [t["function"]["name"] for t in request.get("tools") or []]
    results = [m for m in messages if m.get("role") == "tool"]
    if results:
        return Reply(stream=text_stream(["The tool said: ", results[-1]["content"].strip()]))
    if "Bash" in tool_names:
        return Reply(stream=tool_call_stream(
            "Bash", {"command": "echo iflow2api-e2e-$((6*7))", "description": "Print a marker"},
            call_id="call_bash_1", text="Running it."))
    return Reply(stream=text_stream(["ok"]))  # side requests (titles, summaries)


@pytest.mark.parametrize("adapter", ["h11", "stdlib"], indirect=True)
def test_claude_code_runs_a_tool_and_answers_after_the_result(claude, server, fake_upstream, home,
                                                               workdir):
    fake_upstream.default_reply = _tool_loop_reply
    result = run_claude(claude, server, str(home), workdir, "Run the marker command with Bash.",
                        "--allowedTools", "Bash")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "The tool said: iflow2api-e2e-42" in result.stdout
    bodies = messages_to_model(fake_upstream)
    with_result = [b for b in bodies if any(m.get("role") == "tool" for m in b["messages"])]
    assert with_result, "no request carried the tool result"
    messages = with_result[-1]["messages"]
    calls = [m for m in messages if m.get("role") == "assistant" and m.get("tool_calls")]
    assert calls[-1]["tool_calls"][0]["id"] == "call_bash_1"
    assert calls[-1]["tool_calls"][0]["function"]["name"] == "Bash"
    tool_message = messages[messages.index(calls[-1]) + 1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "call_bash_1"
    assert "iflow2api-e2e-42" in tool_message["content"]


# -- `iflow2api claude` -------------------------------------------------------------------

def run_launcher(claude, home, workdir, port, *args):
    """`iflow2api claude ARGS` with claude on PATH and HOME set up like run_claude's."""
    with open(os.path.join(home, ".claude.json"), "w") as f:
        json.dump({"hasCompletedOnboarding": True, "lastOnboardingVersion": CLAUDE_CODE_VERSION,
                   "numStartups": 5, "customApiKeyResponses": {"approved": ["iflow2api"], "rejected": []},
                   "projects": {workdir: {"hasTrustDialogAccepted": True, "allowedTools": []}}}, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE", "IFLOW2API_"))}
    env.update(HOME=home, IFLOW2API_HOME=os.path.join(home, ".iflow2api"), IFLOW2API_PORT=str(port),
               PATH=os.path.dirname(claude) + os.pathsep + env.get("PATH", ""), DISABLE_AUTOUPDATER="1",
               DISABLE_TELEMETRY="1", DISABLE_ERROR_REPORTING="1", CI="1", NO_COLOR="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "iflow2api.py"), "claude"] + list(args),
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=180)


def test_iflow2api_claude_starts_a_server_runs_claude_and_passes_the_exit_code(claude, fake_upstream, home,
                                                                               workdir):
    write_settings(str(home), fake_upstream.url)
    fake_upstream.default_reply = lambda request: Reply(stream=text_stream(["Launched ", "fine."]))
    port = free_port()  # nothing listens there: the launcher starts its own server
    result = run_launcher(claude, str(home), workdir, port, "--model", "upstream-only-model", "-p", "Say hello.")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Launched fine." in result.stdout
    assert {json.loads(r.body)["model"] for r in fake_upstream.chat_requests()} == {"upstream-only-model"}
    assert not port_open(port)
    bad = run_launcher(claude, str(home), workdir, port, "--no-such-option")
    assert bad.returncode != 0  # claude's own exit code


@pytest.mark.parametrize("adapter", ["h11"], indirect=True)
def test_iflow2api_claude_uses_the_server_already_running(claude, server, fake_upstream, home, workdir):
    fake_upstream.default_reply = lambda request: Reply(stream=text_stream(["From the running server."]))
    result = run_launcher(claude, str(home), workdir, server.port, "-p", "Say hello.")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "From the running server." in result.stdout
    assert server.stats.snapshot()["requests"] >= 1


def test_a_missing_client_is_one_line_and_exit_127(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable), HOME=str(tmp_path))
    for client, install in (("claude", "@anthropic-ai/claude-code"), ("codex", "@openai/codex")):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "iflow2api.py"), client, "-p", "x"],
                                env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 127 and install in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# -- scenario routes (issue 17) -------------------------------------------------------------

def _agent_reply(request):
    """The main loop asks for a sub-agent on the haiku tier (Claude Code's Agent tool); the
    sub-agent (no Agent tool of its own) answers; then the main loop answers with its result."""
    tool_names = [t["function"]["name"] for t in request.get("tools") or []]
    results = [m for m in request.get("messages") or [] if m.get("role") == "tool"]
    if results:
        return Reply(stream=text_stream(["The agent said: ", "agent-done-42"]))
    if "Agent" in tool_names:
        return Reply(stream=tool_call_stream(
            "Agent", {"description": "Say done", "prompt": "Reply with the word done.",
                      "subagent_type": "general-purpose", "model": "haiku"},
            call_id="call_agent_1", text="Asking an agent."))
    return Reply(stream=text_stream(["agent-done-42"]))


@pytest.mark.parametrize("adapter", ["h11"], indirect=True)
def test_claude_codes_haiku_class_calls_take_the_background_route(claude, start_server, fake_upstream, home,
                                                                 workdir):
    """A sub-agent on the haiku tier is Claude Code's haiku-class call: with a background
    route it goes to that model, while the main model's calls stay where they were."""
    write_settings(str(home), fake_upstream.url)
    server = start_server(scenario_routes={"background": "bg-model"})
    fake_upstream.default_reply = _agent_reply
    result = run_claude(claude, server, str(home), workdir, "Ask an agent to say done.",
                        "--allowedTools", "Agent")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agent-done-42" in result.stdout
    models = [json.loads(r.body)["model"] for r in fake_upstream.chat_requests()]
    assert "bg-model" in models and "glm-5" in models, models
    assert set(models) == {"bg-model", "glm-5"}
