"""Providers and routing (issue 6) through the real server: iFlow (the default fake
upstream) plus two generic OpenAI-compatible fake upstreams with different quirks,
model routing between them, discovery, key failover, upstream proxies (an HTTP
CONNECT / absolute-form proxy and a SOCKS5 proxy from tests/fake_proxies.py), vision
routing, image inlining and the `providers` CLI. Server tests run on both adapters."""
import base64
import json
import re
import socket

import anthropic
import openai
import pytest

import iflow2api as I
from fake_proxies import HttpProxy, ImageServer, Socks5Proxy, TLSFront, client_tls_context, tiny_png
from fakes import FakeUpstream, Reply, chunk, completion
from helpers import FAKE_KEY, PROXY_VARS, free_port, http, run_cli, write_settings

P1_KEY = "sk-p1-1111111111111111111111"
P2_KEY = "sk-p2-2222222222222222222222"
PROXY_LOGIN = ("proxy-user", "p@ss:w/rd 1")
TOOL_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
PNG = tiny_png()
PNG_B64 = base64.b64encode(PNG).decode("ascii")


# -- helpers --------------------------------------------------------------------------------------

def chat(server, model, content="hi", **fields):
    """(status, parsed body) of a chat completion; a stream comes back as its list of chunks."""
    body = dict({"model": model, "messages": [{"role": "user", "content": content}]}, **fields)
    status, _h, raw = http(server, "POST", "/v1/chat/completions", body)
    if fields.get("stream") and status == 200:
        return status, sse_chunks(raw)
    return status, json.loads(raw)


def sse_chunks(raw):
    out = []
    for line in raw.decode("utf-8").splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_text(chunks):
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks
                   if isinstance(c, dict) and c.get("choices"))


def ok_text(server, model, **fields):
    status, body = chat(server, model, **fields)
    assert status == 200, body
    return streamed_text(body) if fields.get("stream") else body["choices"][0]["message"]["content"]


def image_message(url, text="what is this?"):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def model_ids(server):
    status, _h, raw = http(server, "GET", "/v1/models")
    assert status == 200
    return [m["id"] for m in json.loads(raw)["data"]]


def anthropic_create(server, **kw):
    """messages.create with the official SDK (a client per call, closed after it)."""
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=10) as client:
        return client.messages.create(**kw)


def openai_client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=10)


def model_gets(rec):
    return json.loads(rec.body)["model"]


def is_iflow_signed(rec):
    return "x-iflow-signature" in rec.headers and "session-id" in rec.headers


def models_calls(fake):
    return [r for r in fake.requests if r.method == "GET" and r.path.endswith("/models")]


def p1_entry(p1, **kw):
    """p1: a static model list, no discovery, and the request-shape quirks."""
    entry = {"base_url": p1.url, "api_keys": [P1_KEY], "models": ["alpha-1", "alpha-2"],
             "discover_models": False, "aliases": {"smart": "alpha-2"},
             "quirks": {"max_tokens_field": "max_completion_tokens", "strict_fields": True,
                        "no_stream_options": True, "safe_tool_ids": True}}
    entry.update(kw)
    return entry


def p2_entry(p2, **kw):
    """p2: models discovered from its /models, a single `api_key`, extra headers,
    reasoning in `reasoning`, thinking via enable_thinking."""
    entry = {"base_url": p2.url, "api_key": P2_KEY, "headers": {"X-Tenant": "team-7"},
             "quirks": {"reasoning_field": "reasoning", "thinking_style": "enable_thinking"}}
    entry.update(kw)
    return entry


@pytest.fixture
def p1():
    fake = FakeUpstream()
    fake.models = ["alpha-1", "alpha-2", "listed-but-discovery-off"]
    yield fake
    fake.close()


@pytest.fixture
def p2():
    fake = FakeUpstream()
    fake.models = ["beta-1", "beta-2"]
    yield fake
    fake.close()


@pytest.fixture
def routed(start_server, fake_upstream, home, p1, p2):
    """start(**config) -> a server with iFlow (fake_upstream, default) and providers p1, p2."""
    write_settings(str(home), fake_upstream.url)

    def start(providers=None, **overrides):
        if providers is None:
            providers = {"p1": p1_entry(p1), "p2": p2_entry(p2)}
        return start_server(providers=providers, **overrides)
    return start


@pytest.fixture
def closing(request):
    """closing(obj) -> obj, closed at the end of the test."""
    def register(obj):
        request.addfinalizer(obj.close)
        return obj
    return register


@pytest.fixture
def trust_test_ca(monkeypatch):
    """Make the server trust the test CA for https upstreams and https proxies."""
    monkeypatch.setattr(I, "make_tls_context", client_tls_context)


# -- routing between providers -------------------------------------------------------------------

def test_provider_prefix_routes_each_request_with_its_own_key(routed, fake_upstream, p1, p2):
    server = routed()
    assert ok_text(server, "p1/alpha-1") == "Hello world"
    assert ok_text(server, "p2/beta-1") == "Hello world"
    assert ok_text(server, "glm-5") == "Hello world"
    (r1,), (r2,) = p1.chat_requests(), p2.chat_requests()
    r0 = fake_upstream.chat_requests()[-1]
    assert (model_gets(r1), model_gets(r2), model_gets(r0)) == ("alpha-1", "beta-1", "glm-5")
    assert r1.headers["authorization"] == "Bearer " + P1_KEY
    assert r2.headers["authorization"] == "Bearer " + P2_KEY
    assert r0.headers["authorization"] == "Bearer " + FAKE_KEY and is_iflow_signed(r0)
    for rec in (r1, r2):
        assert not any(h.startswith("x-iflow") for h in rec.headers), rec.headers
        assert "session-id" not in rec.headers and "conversation-id" not in rec.headers
        assert rec.headers["user-agent"] != "iFlow-Cli"
        assert rec.headers["content-type"] == "application/json"


def test_generic_provider_gets_no_iflow_model_tweaks(routed, p2):
    server = routed()
    ok_text(server, "p2/glm-5")
    body = p2.last_json()
    assert body["model"] == "glm-5"
    for field in ("enable_thinking", "thinking", "chat_template_kwargs", "thinking_mode", "reasoning"):
        assert field not in body


def test_an_unconfigured_prefix_is_refused_when_the_default_provider_has_no_such_ids(routed, fake_upstream,
                                                                                     p1, p2):
    """iFlow's ids hold no slash, so "p9/x" is a typo, not a model: 400 naming the providers
    (a provider whose ids hold slashes gets such names whole: test_openai_api.py)."""
    server = routed()
    for model in ("anthropic/claude-sonnet-4", "p9/x"):
        status, body = chat(server, model)
        assert status == 400 and "unknown provider %r" % model.split("/")[0] in body["error"]["message"], body
        assert "providers: iflow, p1, p2" in body["error"]["message"]
    assert not fake_upstream.chat_requests() and not p1.chat_requests() and not p2.chat_requests()


def test_model_routes_send_models_to_a_provider(routed, fake_upstream, p1, p2):
    server = routed(model_routes={"fast": "p2/beta-9", "coder": "p1", "glm-4.6": "p2"})
    ok_text(server, "fast")
    ok_text(server, "coder")
    ok_text(server, "glm-4.6")
    ok_text(server, "glm-4.7")  # not routed: still iFlow
    assert [model_gets(r) for r in p2.chat_requests()] == ["beta-9", "glm-4.6"]
    assert [model_gets(r) for r in p1.chat_requests()] == ["coder"]
    assert [model_gets(r) for r in fake_upstream.chat_requests()] == ["glm-4.7"]


def test_aliases_resolve_with_and_without_prefix_and_are_listed(routed, fake_upstream, p1, p2):
    providers = {"p1": p1_entry(p1), "p2": p2_entry(p2), "iflow": {"aliases": {"best": "glm-5"}}}
    server = routed(providers=providers)
    ok_text(server, "smart")
    ok_text(server, "p1/smart")
    ok_text(server, "best")
    assert [model_gets(r) for r in p1.chat_requests()] == ["alpha-2", "alpha-2"]
    assert model_gets(fake_upstream.chat_requests()[-1]) == "glm-5"
    ids = model_ids(server)
    assert "p1/smart" in ids and "best" in ids


def test_model_a_provider_lists_statically_routes_there_without_prefix(routed, fake_upstream, p1):
    server = routed()
    ok_text(server, "alpha-1")
    assert [model_gets(r) for r in p1.chat_requests()] == ["alpha-1"]
    assert not fake_upstream.chat_requests()


def test_default_provider_switch(routed, fake_upstream, p1, p2):
    server = routed(default_provider="p2")
    ok_text(server, "some-unknown-model")
    ok_text(server, "iflow/glm-5")
    ok_text(server, "glm-4.7")  # known only to iFlow
    ok_text(server, "alpha-1")  # known only to p1
    assert [model_gets(r) for r in p2.chat_requests()] == ["some-unknown-model"]
    assert [model_gets(r) for r in fake_upstream.chat_requests()] == ["glm-5", "glm-4.7"]
    assert all(is_iflow_signed(r) for r in fake_upstream.chat_requests())
    assert [model_gets(r) for r in p1.chat_requests()] == ["alpha-1"]
    ids = model_ids(server)
    assert "beta-1" in ids and "p2/beta-1" not in ids
    assert "iflow/glm-5" in ids and "glm-5" not in ids
    assert "p1/alpha-1" in ids


def test_disabled_provider_is_not_a_route(routed, fake_upstream, p1, p2):
    server = routed(providers={"p1": p1_entry(p1), "p2": p2_entry(p2, enabled=False)})
    status, body = chat(server, "p2/beta-1")
    assert status == 400 and "provider 'p2' is disabled" in body["error"]["message"], body
    assert not p2.requests and not fake_upstream.chat_requests()
    assert not any(i.startswith("p2/") for i in model_ids(server))


# -- discovery --------------------------------------------------------------------------------------

def test_discovered_models_are_listed_with_prefix_and_cached(routed, fake_upstream, p1, p2):
    server = routed()
    ids = model_ids(server)
    assert "p2/beta-1" in ids and "p2/beta-2" in ids
    assert "p1/alpha-1" in ids and "p1/alpha-2" in ids
    assert "p1/listed-but-discovery-off" not in ids  # discover_models false: static list only
    assert "glm-5" in ids and "upstream-only-model" in ids  # the default provider: bare ids
    model_ids(server)
    assert len(models_calls(p2)) == 1  # cached
    assert not models_calls(p1)
    rec = models_calls(p2)[0]
    assert rec.headers["authorization"] == "Bearer " + P2_KEY and rec.headers["x-tenant"] == "team-7"
    with openai_client(server) as client:
        assert "p2/beta-2" in [m.id for m in client.models.list()]
    # once discovered, the bare name is routed to the provider that has it
    ok_text(server, "beta-2")
    assert [model_gets(r) for r in p2.chat_requests()] == ["beta-2"]


def test_prefixed_model_can_be_retrieved(routed, p2):
    server = routed()
    assert "p2/beta-2" in model_ids(server)
    with openai_client(server) as client:
        assert client.models.retrieve("p2/beta-2").id == "p2/beta-2"  # the SDK sends p2%2Fbeta-2
    status, _h, raw = http(server, "GET", "/v1/models/p2/beta-2")
    assert status == 200 and json.loads(raw)["id"] == "p2/beta-2"


# -- quirks ---------------------------------------------------------------------------------------------

def test_max_tokens_becomes_max_completion_tokens(routed, p1, p2):
    server = routed()
    ok_text(server, "p1/alpha-1", max_tokens=100)
    ok_text(server, "p2/beta-1", max_tokens=100)
    body1, body2 = p1.last_json(), p2.last_json()
    assert body1["max_completion_tokens"] == 100 and "max_tokens" not in body1
    assert body2["max_tokens"] == 100 and "max_completion_tokens" not in body2


def test_strict_fields_drop_unknown_fields(routed, p1, p2):
    server = routed()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    extra = {"temperature": 0.2, "tools": tools, "tool_choice": "auto", "top_k": 5,
             "enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False},
             "repetition_penalty": 1.1}
    ok_text(server, "p1/alpha-1", **extra)
    ok_text(server, "p2/beta-1", **extra)
    body1, body2 = p1.last_json(), p2.last_json()
    assert set(body1) <= I.OPENAI_CHAT_FIELDS, set(body1) - I.OPENAI_CHAT_FIELDS
    assert body1["temperature"] == 0.2 and body1["tools"] == tools and body1["tool_choice"] == "auto"
    for field in ("top_k", "enable_thinking", "chat_template_kwargs", "repetition_penalty"):
        assert field not in body1 and field in body2


def test_no_stream_options(routed, p1, p2):
    server = routed()
    options = {"stream": True, "stream_options": {"include_usage": True}}
    assert ok_text(server, "p1/alpha-1", **options) == "Hello world"
    assert ok_text(server, "p2/beta-1", **options) == "Hello world"
    body1, body2 = p1.last_json(), p2.last_json()
    assert body1["stream"] is True and "stream_options" not in body1
    assert body2["stream_options"] == {"include_usage": True}


def _tool_history(ids):
    calls = [{"id": i, "type": "function", "function": {"name": "Bash", "arguments": "{\"command\":\"ls\"}"}}
             for i in ids]
    return ([{"role": "user", "content": "run it"},
             {"role": "assistant", "content": None, "tool_calls": calls}]
            + [{"role": "tool", "tool_call_id": i, "content": "ok %d" % n} for n, i in enumerate(reversed(ids))]
            + [{"role": "user", "content": "and now?"}])


def test_safe_tool_ids_map_calls_and_results_consistently(routed, p1, p2):
    server = routed()
    ids = ["functions.Bash:0", "call_" + "x" * 60, "toolu_01ABCdef/+=", "call_ok_1"]
    for model in ("p1/alpha-1", "p1/alpha-1", "p2/beta-1"):
        status, body = chat(server, model, messages=_tool_history(ids))
        assert status == 200, body
    first, second = [json.loads(r.body)["messages"] for r in p1.chat_requests()]
    assert first == second  # deterministic across requests
    sent_calls = [c["id"] for c in first[1]["tool_calls"]]
    assert all(TOOL_ID_RE.match(i) for i in sent_calls), sent_calls
    assert len(set(sent_calls)) == 4 and sent_calls[3] == "call_ok_1"
    mapping = dict(zip(ids, sent_calls))
    results = [m["tool_call_id"] for m in first if m["role"] == "tool"]
    assert results == [mapping[i] for i in reversed(ids)]
    # a provider without the quirk gets the ids as sent
    plain = p2.last_json()["messages"]
    assert [c["id"] for c in plain[1]["tool_calls"]] == ids


def _reasoning_completion(text, reasoning):
    body = completion(text)
    body["choices"][0]["message"]["reasoning"] = reasoning
    return body


def _reasoning_stream(reasoning_pieces, text_pieces):
    return ([chunk({"role": "assistant", "content": ""})] + [chunk({"reasoning": r}) for r in reasoning_pieces]
            + [chunk({"content": t}) for t in text_pieces] + [chunk({}, "stop"), chunk(usage=(5, 2)), "[DONE]"])


def test_reasoning_field_is_merged_into_content_by_default(routed, p2):
    server = routed()
    p2.push(Reply(body=_reasoning_completion("4", "2+2 is 4")))
    status, body = chat(server, "p2/beta-1")
    message = body["choices"][0]["message"]
    assert status == 200 and message["content"] == "2+2 is 4\n\n4"
    assert "reasoning" not in message and "reasoning_content" not in message
    p2.push(Reply(stream=_reasoning_stream(["2+2", " is 4"], ["4"])))
    status, chunks = chat(server, "p2/beta-1", stream=True)
    assert status == 200 and streamed_text(chunks) == "2+2 is 4\n\n4"
    deltas = [c["choices"][0]["delta"] for c in chunks if isinstance(c, dict) and c.get("choices")]
    assert not any("reasoning" in d or "reasoning_content" in d for d in deltas)


def test_reasoning_field_exposed_as_reasoning_content_in_preserve_mode(routed, p2):
    server = routed(preserve_reasoning_content=True)
    p2.push(Reply(body=_reasoning_completion("4", "2+2 is 4")),
            Reply(body=_reasoning_completion(None, "only thought")))
    message = chat(server, "p2/beta-1")[1]["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("4", "2+2 is 4")
    assert "reasoning" not in message
    message = chat(server, "p2/beta-1")[1]["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("only thought", "only thought")


def test_reasoning_field_exposed_as_reasoning_content_in_preserve_mode_stream(routed, p2):
    server = routed(preserve_reasoning_content=True)
    p2.push(Reply(stream=_reasoning_stream(["2+2", " is 4"], ["4"])))
    status, chunks = chat(server, "p2/beta-1", stream=True)
    deltas = [c["choices"][0]["delta"] for c in chunks if isinstance(c, dict) and c.get("choices")]
    assert status == 200 and streamed_text(chunks) == "4"
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "2+2 is 4"


def test_extra_headers_are_sent(routed, p1, p2):
    server = routed()
    ok_text(server, "p2/beta-1")
    ok_text(server, "p2/beta-1", stream=True)
    for rec in p2.chat_requests():
        assert rec.headers["x-tenant"] == "team-7"
    ok_text(server, "p1/alpha-1")
    assert "x-tenant" not in p1.chat_requests()[-1].headers


def test_keyless_providers_send_no_authorization(routed, p1, p2):
    providers = {"local": {"base_url": p1.url, "models": ["m"], "discover_models": False},
                 "myollama": {"preset": "ollama", "base_url": p2.url, "discover_models": False}}
    server = routed(providers=providers)
    ok_text(server, "local/m")
    ok_text(server, "myollama/llama3")
    assert "authorization" not in p1.chat_requests()[-1].headers
    assert "authorization" not in p2.chat_requests()[-1].headers


def test_preset_without_its_key_is_a_clean_401(routed, p1, monkeypatch):
    monkeypatch.delenv("MOONSHOT_API_KEY", raising=False)
    server = routed(providers={"moonshot": {"base_url": p1.url, "discover_models": False}})
    status, body = chat(server, "moonshot/kimi-k2")
    assert status == 401 and "moonshot" in body["error"]["message"]
    assert not p1.requests


def test_preset_key_from_its_environment_variable(home, fake_upstream, p1):
    write_settings(str(home), fake_upstream.url)
    env = {"HOME": str(home), "IFLOW2API_HOME": str(home / ".iflow2api"),
           "DEEPSEEK_API_KEY": "sk-from-env-333333333333", "MOONSHOT_API_KEY": "sk-env-moon-44444444444"}
    providers = {"deepseek": {"base_url": p1.url, "models": ["deepseek-chat"], "discover_models": False},
                 "moonshot": {"base_url": p1.url, "api_keys": ["sk-config-wins-5555555555"],
                              "discover_models": False}}
    service = I.Service(I.Config(env=env, cli={"host": "127.0.0.1", "port": 0, "providers": providers}))
    try:
        server = service.start()
        ok_text(server, "deepseek/deepseek-chat")
        ok_text(server, "moonshot/kimi-k2")
        listed = {p["name"]: p for p in service.providers()}
    finally:
        service.stop()
    deepseek, moonshot = p1.chat_requests()
    assert deepseek.headers["authorization"] == "Bearer sk-from-env-333333333333"
    assert moonshot.headers["authorization"] == "Bearer sk-config-wins-5555555555"
    assert listed["deepseek"]["keys"] == [I.mask_secret("sk-from-env-333333333333")]
    assert listed["deepseek"]["key_env"] == "DEEPSEEK_API_KEY"


# -- Anthropic route to generic providers ------------------------------------------------------------

def test_anthropic_sonnet_mapped_to_a_generic_provider(routed, fake_upstream, p2):
    server = routed(model_map={"sonnet": "p2/some-model", "opus": "glm-5", "haiku": "glm-5"})
    p2.push(Reply(stream=_reasoning_stream(["plan it"], ["do", "ne"])))
    msg = anthropic_create(server, 
        model="claude-sonnet-4-6", max_tokens=1024, thinking={"type": "enabled", "budget_tokens": 2048},
        messages=[{"role": "user", "content": "hi"}])
    assert msg.model == "claude-sonnet-4-6"
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "plan it" and msg.content[1].text == "done"
    rec = p2.chat_requests()[-1]
    body = json.loads(rec.body)
    assert body["model"] == "some-model" and body["stream"] is True
    assert body["enable_thinking"] is True and body["thinking_budget"] == 2048  # thinking_style quirk
    assert "reasoning_effort" not in body and "thinking" not in body
    assert rec.headers["authorization"] == "Bearer " + P2_KEY and rec.headers["x-tenant"] == "team-7"
    assert not is_iflow_signed(rec)
    assert not fake_upstream.chat_requests()


def test_anthropic_stream_to_a_strict_provider(routed, p1):
    server = routed(model_map={"sonnet": "glm-5", "opus": "glm-5", "haiku": "p1/alpha-1"})
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=10) as client, \
            client.messages.stream(model="claude-haiku-4-5", max_tokens=500, metadata={"user_id": "u1"},
                                   messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "Hello world" and final.model == "claude-haiku-4-5"
    body = p1.last_json()
    assert body["model"] == "alpha-1"
    assert body["max_completion_tokens"] == 500 and "max_tokens" not in body
    assert "stream_options" not in body
    assert set(body) <= I.OPENAI_CHAT_FIELDS


# -- key failover --------------------------------------------------------------------------------------

def test_second_key_is_used_when_the_first_gets_429(routed, p1):
    keys = ["sk-first-aaaaaaaaaaaaaaaa", "sk-second-bbbbbbbbbbbbbbb"]
    server = routed(providers={"multi": {"base_url": p1.url, "api_keys": keys, "discover_models": False}})
    p1.push(Reply(429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                  headers={"retry-after": "60"}))
    assert ok_text(server, "multi/m") == "Hello world"
    assert ok_text(server, "multi/m") == "Hello world"  # the first key is cooling down
    assert [r.headers["authorization"] for r in p1.chat_requests()] == [
        "Bearer " + keys[0], "Bearer " + keys[1], "Bearer " + keys[1]]


def test_every_key_limited_is_a_429(routed, p1):
    keys = ["sk-first-aaaaaaaaaaaaaaaa", "sk-second-bbbbbbbbbbbbbbb"]
    server = routed(providers={"multi": {"base_url": p1.url, "api_keys": keys, "discover_models": False}})
    limited = Reply(429, {"error": {"message": "Rate limit reached"}}, headers={"retry-after": "60"})
    p1.push(limited, limited)
    status, body = chat(server, "multi/m")
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert len(p1.chat_requests()) == 2


def test_api_key_and_api_keys_are_both_used(routed, p1):
    entry = {"base_url": p1.url, "api_key": "sk-single-cccccccccccccc", "api_keys": ["sk-listed-ddddddddddddd"],
             "discover_models": False}
    server = routed(providers={"both": entry})
    p1.push(Reply(429, {"error": {"message": "Rate limit reached"}}))
    ok_text(server, "both/m")
    assert sorted(r.headers["authorization"] for r in p1.chat_requests()) == [
        "Bearer sk-listed-ddddddddddddd", "Bearer sk-single-cccccccccccccc"]


# -- upstream proxies ---------------------------------------------------------------------------------

def _secure_provider(front, **kw):
    entry = {"base_url": front.url(), "api_keys": [P1_KEY], "models": ["s-1"], "discover_models": False}
    entry.update(kw)
    return entry


def test_http_proxy_forwards_plain_http_in_absolute_form(routed, closing, fake_upstream, p1, p2):
    proxy = closing(HttpProxy())
    server = routed(upstream_proxy_enabled=True, upstream_proxy=proxy.url())
    assert ok_text(server, "glm-5") == "Hello world"
    assert ok_text(server, "p2/beta-1", stream=True) == "Hello world"
    assert "p2/beta-1" in model_ids(server)  # discovery goes the same way
    iflow_target, p2_target = "127.0.0.1:%d" % fake_upstream.port, "127.0.0.1:%d" % p2.port
    assert proxy.entries(kind="forward", target=iflow_target, method="POST", path="/v1/chat/completions")
    assert proxy.entries(kind="forward", target=p2_target, method="POST", path="/v1/chat/completions")
    assert proxy.entries(kind="forward", target=p2_target, method="GET", path="/v1/models")
    assert not proxy.entries(kind="CONNECT")
    assert fake_upstream.chat_requests() and p2.chat_requests()
    assert "proxy-authorization" not in p2.chat_requests()[-1].headers


def test_http_proxy_tunnels_https_with_connect(routed, closing, trust_test_ca, p1):
    front = closing(TLSFront(p1.port))
    proxy = closing(HttpProxy())
    server = routed(providers={"secure": _secure_provider(front)}, upstream_proxy_enabled=True,
                    upstream_proxy=proxy.url())
    assert ok_text(server, "secure/s-1") == "Hello world"
    assert ok_text(server, "secure/s-1", stream=True) == "Hello world"
    assert proxy.entries(kind="CONNECT", target="localhost:%d" % front.port, ok=True)
    assert not proxy.entries(kind="forward")
    assert front.log  # the TLS front was reached (through the tunnel)
    assert [r.headers["authorization"] for r in p1.chat_requests()] == ["Bearer " + P1_KEY] * 2


def test_https_proxy_url(routed, closing, trust_test_ca, fake_upstream):
    proxy = closing(HttpProxy(tls=True))
    server = routed(upstream_proxy_enabled=True, upstream_proxy=proxy.url(host="localhost"))
    assert ok_text(server, "glm-5") == "Hello world"
    assert proxy.entries(kind="forward", target="127.0.0.1:%d" % fake_upstream.port, ok=True)


def test_https_proxy_to_https_upstream_is_a_clean_502(routed, closing, trust_test_ca, p1):
    front = closing(TLSFront(p1.port))
    proxy = closing(HttpProxy(tls=True))
    server = routed(providers={"secure": _secure_provider(front)}, upstream_proxy_enabled=True,
                    upstream_proxy=proxy.url(host="localhost"))
    status, body = chat(server, "secure/s-1")
    assert status == 502 and "proxy" in body["error"]["message"]
    assert not p1.requests


@pytest.mark.parametrize("scheme,atyp,host", [("socks5", "ipv4", "127.0.0.1"), ("socks5h", "domain", "localhost")])
def test_socks5_proxy_carries_the_traffic(routed, closing, fake_upstream, p1, p2, scheme, atyp, host):
    proxy = closing(Socks5Proxy())
    providers = {"p1": p1_entry(p1, base_url="http://localhost:%d/v1" % p1.port), "p2": p2_entry(p2)}
    server = routed(providers=providers, upstream_proxy_enabled=True, upstream_proxy=proxy.url(scheme=scheme))
    assert ok_text(server, "p1/alpha-1") == "Hello world"
    assert ok_text(server, "p1/alpha-1", stream=True) == "Hello world"
    assert ok_text(server, "glm-5") == "Hello world"
    assert "p2/beta-1" in model_ids(server)
    assert proxy.entries(atyp=atyp, host=host, port=p1.port, ok=True)
    assert proxy.entries(host="127.0.0.1", port=fake_upstream.port, ok=True)  # iFlow (an IP address)
    assert proxy.entries(port=p2.port, ok=True)  # discovery too
    assert len(p1.chat_requests()) == 2
    if scheme == "socks5":  # resolved here: the proxy never sees a name
        assert not proxy.entries(atyp="domain")


def test_socks5h_tunnels_https(routed, closing, trust_test_ca, p1):
    front = closing(TLSFront(p1.port))
    proxy = closing(Socks5Proxy())
    server = routed(providers={"secure": _secure_provider(front)}, upstream_proxy_enabled=True,
                    upstream_proxy=proxy.url(scheme="socks5h"))
    assert ok_text(server, "secure/s-1") == "Hello world"
    assert proxy.entries(atyp="domain", host="localhost", port=front.port, ok=True)
    assert p1.chat_requests()[-1].headers["authorization"] == "Bearer " + P1_KEY


@pytest.mark.parametrize("kind", ["http-forward", "http-connect", "socks5"])
def test_proxy_login(routed, closing, trust_test_ca, fake_upstream, p1, kind):
    front = closing(TLSFront(p1.port))
    proxy = closing(Socks5Proxy(auth=PROXY_LOGIN) if kind == "socks5" else HttpProxy(auth=PROXY_LOGIN))
    server = routed(providers={"secure": _secure_provider(front)}, upstream_proxy_enabled=True,
                    upstream_proxy=proxy.url(PROXY_LOGIN))
    model = "glm-5" if kind == "http-forward" else "secure/s-1"
    assert ok_text(server, model) == "Hello world"
    assert proxy.entries(ok=True) and all(e["user"] == PROXY_LOGIN[0] for e in proxy.entries(ok=True))
    assert not proxy.entries(kind="rejected")
    for rec in fake_upstream.requests + p1.requests:
        assert "proxy-authorization" not in rec.headers


def _wrong_login_case(kind):
    return kind


@pytest.mark.parametrize("kind", [_wrong_login_case(k) for k in ("http-forward", "http-connect", "socks5")])
def test_wrong_proxy_login_is_a_clean_502(routed, closing, trust_test_ca, fake_upstream, p1, kind):
    front = closing(TLSFront(p1.port))
    proxy = closing(Socks5Proxy(auth=PROXY_LOGIN) if kind == "socks5" else HttpProxy(auth=PROXY_LOGIN))
    wrong = (PROXY_LOGIN[0], "not-the-password")
    server = routed(providers={"secure": _secure_provider(front)}, upstream_proxy_enabled=True,
                    upstream_proxy=proxy.url(wrong))
    model = "glm-5" if kind == "http-forward" else "secure/s-1"
    status, _h, raw = http(server, "POST", "/v1/chat/completions",
                           {"model": model, "messages": [{"role": "user", "content": "hi"}]})
    text = raw.decode("utf-8")
    assert status == 502, text
    error = json.loads(raw)["error"]
    assert error["message"] and "Traceback" not in text and "not-the-password" not in text
    assert proxy.entries(kind="rejected") and not proxy.entries(ok=True)
    assert not fake_upstream.chat_requests() and not p1.requests
    status, _h, raw = http(server, "GET", "/health")
    assert status == 200


@pytest.mark.parametrize("enabled,configured", [(False, True), (True, False)])
def test_no_proxy_unless_configured_even_with_system_variables(routed, closing, trust_test_ca, monkeypatch,
                                                               fake_upstream, p1, p2, enabled, configured):
    proxy = closing(HttpProxy())
    socks = closing(Socks5Proxy())
    for name in PROXY_VARS:
        monkeypatch.setenv(name, socks.url() if "all" in name.lower() else proxy.url())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    front = closing(TLSFront(p1.port))
    providers = {"p2": p2_entry(p2), "secure": _secure_provider(front)}
    server = routed(providers=providers, upstream_proxy_enabled=enabled,
                    upstream_proxy=proxy.url() if configured else "")
    assert ok_text(server, "glm-5") == "Hello world"
    assert ok_text(server, "p2/beta-1", stream=True) == "Hello world"
    assert ok_text(server, "secure/s-1") == "Hello world"
    assert "p2/beta-1" in model_ids(server)
    assert proxy.log == [] and socks.log == []
    assert fake_upstream.chat_requests() and p2.chat_requests() and p1.chat_requests()


# -- vision -------------------------------------------------------------------------------------------

def test_image_to_text_only_iflow_model_goes_to_the_vision_model(routed, fake_upstream):
    server = routed()
    data_url = "data:image/png;base64," + PNG_B64
    status, body = chat(server, "glm-5", messages=image_message(data_url))
    assert status == 200, body
    sent = fake_upstream.last_json()
    assert sent["model"] == "qwen-vl-max"
    assert sent["messages"][0]["content"][1]["image_url"]["url"] == data_url  # byte-identical
    ok_text(server, "glm-5")  # no image: no rerouting
    assert fake_upstream.last_json()["model"] == "glm-5"


def test_vision_model_keeps_its_name(routed, fake_upstream):
    server = routed()
    assert chat(server, "qwen-vl-max", messages=image_message("https://example.invalid/cat.png"))[0] == 200
    sent = fake_upstream.last_json()
    assert sent["model"] == "qwen-vl-max"
    assert sent["messages"][0]["content"][1]["image_url"]["url"] == "https://example.invalid/cat.png"


def test_vision_fallback_reject_is_a_400_naming_the_model(routed, fake_upstream):
    server = routed(vision_fallback="reject")
    status, body = chat(server, "glm-5", messages=image_message("data:image/png;base64," + PNG_B64))
    assert status == 400 and "glm-5" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as err:
        anthropic_create(server, 
            model="claude-sonnet-4-6", max_tokens=100, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                {"type": "text", "text": "what is it?"}]}])
    assert "glm-5" in str(err.value)
    assert not fake_upstream.chat_requests()


def test_anthropic_image_is_routed_to_the_vision_model(routed, fake_upstream):
    server = routed()
    msg = anthropic_create(server, 
        model="claude-sonnet-4-6", max_tokens=100, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
            {"type": "text", "text": "what is it?"}]}])
    assert msg.content[0].text == "Hello world" and msg.model == "claude-sonnet-4-6"
    sent = fake_upstream.last_json()
    assert sent["model"] == "qwen-vl-max"
    parts = sent["messages"][-1]["content"]
    assert {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}} in parts


def test_generic_text_only_models_go_to_the_configured_vision_model(routed, fake_upstream, p1, p2):
    providers = {"p1": p1_entry(p1, text_only_models=["alpha-1"]),
                 "p3": {"base_url": p1.url, "api_keys": [P1_KEY], "discover_models": False,
                        "vision_models": ["eye"], "quirks": {"text_only_default": True}},
                 "p2": p2_entry(p2)}
    server = routed(providers=providers, vision_model="p2/beta-vision")
    image = image_message("data:image/png;base64," + PNG_B64)
    for model in ("p1/alpha-1", "p3/anything", "glm-5"):
        assert chat(server, model, messages=image)[0] == 200
    assert [model_gets(r) for r in p2.chat_requests()] == ["beta-vision"] * 3
    assert chat(server, "p1/alpha-2", messages=image)[0] == 200  # not listed as text-only
    assert chat(server, "p3/eye", messages=image)[0] == 200  # listed as vision
    assert [model_gets(r) for r in p1.chat_requests()] == ["alpha-2", "eye"]
    assert not fake_upstream.chat_requests()


def test_remote_image_urls_are_inlined_for_providers_that_need_it(routed, closing, p1, p2):
    images = closing(ImageServer({"/cat.png": ("image/png", PNG)}))
    providers = {"p1": p1_entry(p1, quirks={"inline_image_urls": True, "allow_local_image_urls": True}), "p2": p2_entry(p2)}
    server = routed(providers=providers)
    messages = image_message(images.url("/cat.png"))
    messages[0]["content"].append({"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lG"}})
    assert chat(server, "p1/alpha-1", messages=messages)[0] == 200
    parts = p1.last_json()["messages"][0]["content"]
    assert parts[1]["image_url"]["url"] == "data:image/png;base64," + PNG_B64
    assert parts[2]["image_url"]["url"] == "data:image/gif;base64,R0lG"
    assert images.requests == ["/cat.png"]
    # a provider without the quirk gets the URL
    assert chat(server, "p2/beta-1", messages=messages)[0] == 200
    assert p2.last_json()["messages"][0]["content"][1]["image_url"]["url"] == images.url("/cat.png")
    assert images.requests == ["/cat.png"]
    # Anthropic URL image sources too
    anthropic_create(server, 
        model="p1/alpha-1", max_tokens=100, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": images.url("/cat.png")}},
            {"type": "text", "text": "what is it?"}]}])
    parts = p1.last_json()["messages"][-1]["content"]
    assert {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}} in parts


def test_unfetchable_image_is_a_clean_400(routed, closing, p1):
    images = closing(ImageServer({}))
    server = routed(providers={"p1": p1_entry(p1, quirks={"inline_image_urls": True, "allow_local_image_urls": True})})
    status, body = chat(server, "p1/alpha-1", messages=image_message(images.url("/missing.png")))
    assert status == 400 and "missing.png" in body["error"]["message"]
    assert not p1.chat_requests()


class FakeResolver:
    """getaddrinfo for tests: names map to the addresses given; nothing is looked up."""

    def __init__(self, names):
        self.names, self.asked = names, []

    def __call__(self, host, port, family=0, kind=0):
        self.asked.append(host)
        if host not in self.names:
            raise OSError("unknown host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in self.names[host]]


@pytest.mark.parametrize("url", ["http://2130706433:{port}/cat.png", "http://127.0.0.1:{port}/cat.png",
                                 "http://[::1]:{port}/cat.png", "http://0x7f.1:{port}/cat.png",
                                 "http://internal.test:{port}/cat.png", "http://mixed.test:{port}/cat.png"])
def test_remote_images_on_local_or_private_addresses_are_refused(routed, closing, p1, url):
    images = closing(ImageServer({"/cat.png": ("image/png", PNG)}))
    server = routed(providers={"p1": p1_entry(p1, quirks={"inline_image_urls": True})})
    server.api.image_resolver = FakeResolver({"internal.test": ["10.1.2.3"],
                                              "mixed.test": ["93.184.216.34", "192.168.0.1"],
                                              "2130706433": ["127.0.0.1"], "0x7f.1": ["127.0.0.1"],
                                              "127.0.0.1": ["127.0.0.1"], "::1": ["127.0.0.1"]})
    status, body = chat(server, "p1/alpha-1", messages=image_message(url.format(port=images.port)))
    assert status == 400 and "local or private address" in body["error"]["message"]
    assert images.requests == [] and not p1.chat_requests()


def test_failed_image_fetches_all_read_the_same(routed, closing, p1):
    images = closing(ImageServer({"/text.txt": ("text/plain", b"hello")}))
    server = routed(providers={"p1": p1_entry(p1, quirks={"inline_image_urls": True,
                                                          "allow_local_image_urls": True})})
    closed_port = free_port()
    answers = [chat(server, "p1/alpha-1", messages=image_message(u))[1]["error"]["message"]
               for u in (images.url("/missing.png"), images.url("/text.txt"),
                         "http://127.0.0.1:%d/x.png" % closed_port)]
    assert [a.split(" (")[1] for a in answers] == ["not reachable, or not an image)"] * 3


def test_remote_images_are_capped_in_count_and_size(routed, closing, p1):
    big = b"\x89PNG" + b"0" * (I.ImageFetcher.MAX_BYTES + 10)
    images = closing(ImageServer({"/cat.png": ("image/png", PNG), "/big.png": ("image/png", big)}))
    server = routed(providers={"p1": p1_entry(p1, quirks={"inline_image_urls": True,
                                                          "allow_local_image_urls": True})})
    many = image_message(images.url("/cat.png"))
    many[0]["content"] += [{"type": "image_url", "image_url": {"url": images.url("/cat.png")}}] * 10
    status, body = chat(server, "p1/alpha-1", messages=many)
    assert status == 400 and "too many remote images" in body["error"]["message"]
    assert len(images.requests) == I.ImageFetcher.MAX_IMAGES
    status, body = chat(server, "p1/alpha-1", messages=image_message(images.url("/big.png")))
    assert status == 400 and "larger than" in body["error"]["message"]


def test_image_redirects_are_checked_again(closing):
    """127.0.0.2 stands in for a public address (the only one the policy allows); its redirect
    to 127.0.0.1 must be refused on its own check."""
    images = closing(ImageServer({"/cat.png": ("image/png", PNG)}))
    redirect = closing(ImageServer({}, redirects={"/go": images.url("/cat.png")}, host="127.0.0.2"))
    fetcher = I.ImageFetcher(address_allowed=lambda address: address == "127.0.0.2")
    with pytest.raises(I.InvalidRequestError, match="local or private"):
        fetcher.fetch(redirect.url("/go"))
    assert redirect.requests == ["/go"] and images.requests == []
    allowed = I.ImageFetcher(address_allowed=lambda address: address in ("127.0.0.1", "127.0.0.2"))
    assert allowed.fetch(redirect.url("/go")) == ("image/png", PNG)


@pytest.mark.parametrize("address, public", [("93.184.216.34", True), ("2606:4700::1111", True),
                                             ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.0.1", False),
                                             ("192.168.1.1", False), ("169.254.169.254", False),
                                             ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
                                             ("::1", False), ("fe80::1", False), ("fc00::1", False),
                                             ("::ffff:127.0.0.1", False), ("not an ip", False)])
def test_which_addresses_count_as_public(address, public):
    assert I.is_public_address(address) is public


# -- the providers CLI --------------------------------------------------------------------------------

SECRET = "sk-deepseek-secret-0123456789abcdef"


def saved_config(home):
    with open(home / ".iflow2api" / "config.json", encoding="utf-8") as f:
        return f.read()


def test_cli_lists_presets(home):
    res = run_cli(home, "providers")
    assert res.returncode == 0, res.stderr
    for name in ("iflow", "deepseek", "zhipu", "moonshot", "qwen", "openrouter", "ollama", "vllm", "lmstudio"):
        assert re.search(r"(?m)^%s\s" % name, res.stdout), (name, res.stdout)
    assert "api.deepseek.com" in res.stdout and "DEEPSEEK_API_KEY" in res.stdout


def test_cli_add_preset_keys_are_masked_and_sealed(home):
    res = run_cli(home, "providers", "add", "deepseek", "--api-key", SECRET)
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr and I.mask_secret(SECRET) in res.stdout
    res = run_cli(home, "providers", "add", "deepseek", "--api-key", SECRET + "-second")
    assert res.returncode == 0, res.stderr
    text = saved_config(home)
    assert SECRET not in text
    keys = json.loads(text)["providers"]["deepseek"]["api_keys"]
    assert len(keys) == 2 and all(k.startswith("enc:v1:") for k in keys)
    res = run_cli(home, "providers", "--json")
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout
    listed = {p["name"]: p for p in json.loads(res.stdout)}
    deepseek = listed["deepseek"]
    assert deepseek["configured"] and deepseek["enabled"] and not deepseek["default"]
    assert deepseek["base_url"] == "https://api.deepseek.com/v1"
    assert deepseek["keys"] == [I.mask_secret(SECRET), I.mask_secret(SECRET + "-second")]
    assert listed["iflow"]["default"] and not listed["openrouter"]["configured"]


def test_cli_add_custom_default_and_remove(home):
    res = run_cli(home, "providers", "add", "custom", "--base-url", "http://127.0.0.1:9/v1/",
                  "--model", "m1", "--model", "m2", "--default")
    assert res.returncode == 0, res.stderr
    config = json.loads(saved_config(home))
    assert config["default_provider"] == "custom"
    assert config["providers"]["custom"] == {"base_url": "http://127.0.0.1:9/v1", "models": ["m1", "m2"]}
    listed = {p["name"]: p for p in json.loads(run_cli(home, "providers", "--json").stdout)}
    assert listed["custom"]["default"] and not listed["iflow"]["default"]
    assert listed["custom"]["keys"] == [] and listed["custom"]["keyless"] is True
    res = run_cli(home, "providers", "remove", "custom")
    assert res.returncode == 0, res.stderr
    config = json.loads(saved_config(home))
    assert "custom" not in config["providers"] and config["default_provider"] == "iflow"
    res = run_cli(home, "providers", "remove", "custom")
    assert res.returncode != 0 and "custom" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args,message", [
    (["nosuch"], "not a preset"),
    (["x", "--preset", "bogus", "--base-url", "http://127.0.0.1:9/v1"], "unknown preset"),
    (["bad name!", "--base-url", "http://127.0.0.1:9/v1"], "provider names"),
    (["iflow", "--base-url", "http://127.0.0.1:9/v1"], "provider names"),
])
def test_cli_add_errors_are_clean(home, args, message):
    res = run_cli(home, "providers", "add", *args)
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr + res.stdout
    path = home / ".iflow2api" / "config.json"
    assert not path.exists() or not json.loads(path.read_text()).get("providers")


def test_cli_added_provider_serves_requests(start_server, home, p1):
    res = run_cli(home, "providers", "add", "mine", "--base-url", p1.url, "--api-key", SECRET, "--model", "m-1")
    assert res.returncode == 0, res.stderr
    server = start_server()
    assert ok_text(server, "mine/m-1") == "Hello world"
    assert p1.chat_requests()[-1].headers["authorization"] == "Bearer " + SECRET
    assert "mine/m-1" in model_ids(server)


def test_a_proxy_set_while_running_applies_to_the_next_request(start_service, fake_upstream, home, closing):
    """A running server follows its config (issue 14): no restart for a proxy change."""
    write_settings(str(home), fake_upstream.url)
    service = start_service()
    server = service.instances["default"]
    assert ok_text(server, "glm-5") == "Hello world"  # directly; the connection stays in the pool
    proxy = closing(HttpProxy())
    service.config_set({"upstream_proxy_enabled": True, "upstream_proxy": proxy.url()})
    assert ok_text(server, "glm-5") == "Hello world"
    assert proxy.entries(kind="forward", method="POST", path="/v1/chat/completions")
    service.config_set({"upstream_proxy_enabled": False})
    through_proxy = len(proxy.entries())
    assert ok_text(server, "glm-5") == "Hello world"
    assert len(proxy.entries()) == through_proxy  # directly again


def test_every_translation_flag_can_be_set_in_a_providers_quirks(routed, p1):
    """One list: the documented defaults are what quirks may set (send_user was unreachable)."""
    assert set(I._TRANSLATION_FLAGS) == set(I._PROFILE_DEFAULTS)
    server = routed(providers={"p1": p1_entry(p1, quirks={"send_user": True})})
    anthropic_create(server, model="p1/alpha-1", max_tokens=50, metadata={"user_id": "user-123"},
                     messages=[{"role": "user", "content": "hi"}])
    sent = p1.last_json()["user"]
    assert len(sent) == 16 and "user-123" not in sent


def test_a_proxy_that_cannot_be_reached_is_named_in_the_error(routed, fake_upstream):
    from helpers import free_port
    dead = free_port()  # nothing listens there
    server = routed(upstream_proxy_enabled=True, upstream_proxy="http://127.0.0.1:%d" % dead)
    status, body = chat(server, "glm-5")
    message = body["error"]["message"]
    assert status == 502 and "through the proxy http://127.0.0.1:%d:" % dead in message, message
    assert not fake_upstream.chat_requests()
