"""Which model a request goes to (issue 17): the precedence of the routing rules, table
driven, through the real server on every route, with the fake upstream recording the model
it was asked for; and pick_scenario() on its own."""
import base64
import json

import anthropic
import openai
import pytest

import iflow2api as I
from helpers import http, wait_until, write_settings

SCENARIOS = {"background": "bg-model", "think": "think-model", "long_context": "long-model",
             "image": "qwen-vl-max", "default": "default-model"}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()


@pytest.fixture
def routed(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    return start_server(scenario_routes=SCENARIOS, long_context_tokens=2000,
                        model_routes={"coder": "iflow/routed-coder", "claude-routed": "iflow/routed-claude"})


def asked(fake_upstream):
    return json.loads(fake_upstream.chat_requests()[-1].body)["model"]


@pytest.fixture(autouse=True)
def access_lines(caplog):
    caplog.set_level("INFO", logger="iflow2api")  # for the whole test: lines come after the answer


def last_rule(caplog, count=1):
    """The rule of the latest access-log line (written when the answer closed: wait for it)."""
    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "iflow2api.access" and " rule=" in r.getMessage()]
    assert wait_until(lambda: len(lines()) >= count, 5), caplog.text
    return lines()[-1].split(" rule=")[1].split()[0]


# (model sent, Anthropic request extras, upstream model, rule)
ANTHROPIC_CASES = [
    ("iflow/glm-4.6", {}, "glm-4.6", "provider"),                              # explicit provider/model
    ("iflow/glm-4.6", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "glm-4.6", "provider"),
    ("claude-routed", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "routed-claude", "model_routes"),
    ("claude-haiku-4-5-20251001", {}, "bg-model", "scenario:background"),
    ("claude-sonnet-4-5", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "think-model", "scenario:think"),
    ("claude-sonnet-4-5", {"long": True}, "long-model", "scenario:long_context"),
    ("claude-haiku-4-5", {"image": True}, "qwen-vl-max", "scenario:image"),
    ("claude-opus-4-1", {}, "default-model", "scenario:default"),
    ("sonnet", {}, "default-model", "scenario:default"),                         # a model_map key
    ("glm-4.6", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "glm-4.6", "model"),  # named by the client
]


@pytest.mark.parametrize("model,extra,upstream,rule", ANTHROPIC_CASES)
def test_anthropic_route_precedence(routed, fake_upstream, caplog, model, extra, upstream, rule):
    extra = dict(extra)
    content = "hi"
    if extra.pop("long", False):
        content = "word " * 20000
    if extra.pop("image", False):
        content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                   {"type": "text", "text": "what is it?"}]
    if "thinking" in extra:
        extra["max_tokens"] = 2048
    client = anthropic.Anthropic(base_url=routed.url, api_key="x", max_retries=0)
    client.messages.create(model=model, max_tokens=extra.pop("max_tokens", 20),
                           messages=[{"role": "user", "content": content}], **extra)
    assert asked(fake_upstream) == upstream
    assert last_rule(caplog) == rule


@pytest.mark.parametrize("model,extra,upstream,rule", [
    ("coder", {}, "routed-coder", "model_routes"),
    ("glm-5", {"reasoning_effort": "high"}, "glm-5", "model"),             # a named model is never rerouted
    ("claude-3-5-haiku-latest", {}, "bg-model", "scenario:background"),
    ("opus", {"reasoning_effort": "high"}, "think-model", "scenario:think"),
])
def test_openai_route_precedence(routed, fake_upstream, caplog, model, extra, upstream, rule):
    client = openai.OpenAI(base_url=routed.url + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **extra)
    assert asked(fake_upstream) == upstream and last_rule(caplog) == rule


def test_responses_route_takes_scenarios_too(routed, fake_upstream, caplog):
    client = openai.OpenAI(base_url=routed.url + "/v1", api_key="x", max_retries=0)
    client.responses.create(model="claude-sonnet-4-5", input="hi", reasoning={"effort": "high"})
    assert asked(fake_upstream) == "think-model" and last_rule(caplog) == "scenario:think"


def test_health_lists_the_scenario_routes(routed):
    assert json.loads(http(routed, "GET", "/health")[2])["routing"]["scenarios"] == SCENARIOS


def test_scenario_routes_are_validated(start_server, home):
    with pytest.raises(I.ConfigError) as refused:
        I.validate_config_value("scenario_routes", {"web_search": "x/y"})
    assert refused.value.param == "scenario_routes" and "background, think" in str(refused.value)


@pytest.mark.parametrize("routes,model,signals,expected", [
    ({}, "claude-sonnet-4-5", {}, None),
    ({"background": "b"}, "claude-haiku-4-5", {}, ("background", "b")),
    ({"background": "b"}, "claude-sonnet-4-5", {}, None),
    ({"background": "b", "image": "v"}, "claude-haiku-4-5", {"has_images": True}, ("image", "v")),
    ({"think": "t", "long_context": "l"}, "claude-opus-4", {"thinking": True, "tokens": 10 ** 6},
     ("long_context", "l")),
    ({"think": "t"}, "claude-opus-4", {"thinking": True}, ("think", "t")),
    ({"default": "d"}, "", {}, ("default", "d")),           # no model: Claude Code's kind of request
    ({"default": "d"}, "deepseek-chat", {}, None),           # a model the client named
    ({"default": "d"}, "opus", {}, ("default", "d")),        # a model_map key
])
def test_pick_scenario(routes, model, signals, expected):
    estimated = []

    def estimate():
        estimated.append(1)
        return signals.get("tokens", 10)
    got = I.pick_scenario(routes, model, {"opus": "glm-5"}, signals.get("has_images", False),
                          signals.get("thinking", False), estimate, 1000)
    assert got == expected
    assert estimated == ([1] if "long_context" in routes and got != ("image", routes.get("image")) and
                         (model.startswith("claude") or model in ("opus", "")) else [])
