"""The OpenAI-compatible API through the real server, with the official openai SDK
as client and the fake upstream recording what reached it. Runs on both adapters."""
import json
import logging
import socket
import threading
import time

import openai
import pytest

import iflow2api as I
from fakes import Reply, completion, sse, text_stream
from helpers import FAKE_KEY, healthy, http, wait_until, write_settings


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0, **kw)


def ask(server, **kw):
    kw.setdefault("model", "glm-5")
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return client(server).chat.completions.create(**kw)






# -- happy paths ----------------------------------------------------------------------

def test_non_stream_completion_with_usage(server, fake_upstream):
    resp = ask(server)
    assert resp.choices[0].message.content == "Hello world"
    assert resp.usage.prompt_tokens == 12 and resp.usage.completion_tokens == 3


def test_stream_completion_arrives_in_pieces(server, fake_upstream):
    stream = ask(server, stream=True, stream_options={"include_usage": True})
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == ["Hel", "lo", " world"]


def test_models_list_merges_catalogue_and_upstream(server, fake_upstream):
    ids = [m.id for m in client(server).models.list()]
    assert ids[:3] == ["glm-4.6", "glm-4.7", "glm-5"]
    assert "qwen-vl-max" in ids and "upstream-only-model" in ids and ids.count("glm-5") == 1
    assert client(server).models.retrieve("glm-5").id == "glm-5"
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("nope")


def test_models_list_is_cached(server, fake_upstream):
    client(server).models.list()
    client(server).models.list()
    assert len([r for r in fake_upstream.requests if r.path.endswith("/models")]) == 1


def test_vision_models_and_root(server):
    status, _h, body = http(server, "GET", "/v1/vision-models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["qwen-vl-max"]
    status, _h, body = http(server, "GET", "/")
    assert status == 200 and json.loads(body)["version"] == I.__version__


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions/",
                                  "/api/v1/chat/completions", "/v1/chat/completions?x=1"])
def test_chat_aliases_of_the_original(server, fake_upstream, path):
    status, _h, body = http(server, "POST", path, {"model": "glm-5",
                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello world"


# -- what reaches the upstream --------------------------------------------------------------

def test_upstream_gets_signed_iflow_headers(server, fake_upstream):
    ask(server, model="glm-5")
    ask(server, model="glm-5", stream=True).close()
    plain, streamed = fake_upstream.chat_requests()[-2:]
    for rec in (plain, streamed):
        h = rec.headers
        assert h["authorization"] == "Bearer " + FAKE_KEY
        assert h["user-agent"] == "iFlow-Cli"
        assert h["content-type"] == "application/json"
        assert I.iflow_signature(FAKE_KEY, h["session-id"], int(h["x-iflow-timestamp"])) == \
            h["x-iflow-signature"]
        assert abs(int(h["x-iflow-timestamp"]) - time.time() * 1000) < 60000
    assert plain.headers["session-id"] == streamed.headers["session-id"]
    assert plain.headers["conversation-id"] != streamed.headers["conversation-id"]
    assert plain.headers["accept"] == "application/json" and "accept" not in streamed.headers
    body = json.loads(plain.body)
    assert body["enable_thinking"] is True and body["thinking"] == {"type": "enabled"}
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_client_headers_are_not_forwarded(server, fake_upstream):
    http(server, "POST", "/v1/chat/completions",
         {"model": "glm-4.6", "messages": [{"role": "user", "content": "x"}]},
         {"x-secret-client-header": "nope", "authorization": "Bearer client-key-1234"})
    h = fake_upstream.chat_requests()[-1].headers
    assert "x-secret-client-header" not in h and h["authorization"] == "Bearer " + FAKE_KEY


def test_missing_model_uses_the_settings_model(server, fake_upstream):
    http(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert fake_upstream.last_json()["model"] == "glm-5"


# -- reasoning -------------------------------------------------------------------------------

def test_reasoning_default_mode_non_stream(server, fake_upstream):
    fake_upstream.push(Reply(body=completion("4", reasoning="2+2 is 4")))
    message = ask(server).choices[0].message
    assert message.content == "2+2 is 4\n\n4"
    assert getattr(message, "reasoning_content", None) is None


def test_reasoning_default_mode_stream(server, fake_upstream):
    fake_upstream.push(Reply(stream=text_stream(["4"], reasoning=["2+2", " is 4"])))
    stream = ask(server, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(d.content or "" for d in deltas) == "2+2 is 4\n\n4"
    assert all(getattr(d, "reasoning_content", None) is None for d in deltas)


def test_reasoning_preserve_mode(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(preserve_reasoning_content=True)
    fake_upstream.push(Reply(body=completion("4", reasoning="thought")),
                       Reply(body=completion(None, reasoning="only thought")),
                       Reply(stream=text_stream(["4"], reasoning=["thought"])))
    m = ask(server).choices[0].message
    assert (m.content, m.reasoning_content) == ("4", "thought")
    m = ask(server).choices[0].message
    assert (m.content, m.reasoning_content) == ("only thought", "only thought")
    deltas = [c.choices[0].delta for c in ask(server, stream=True) if c.choices]
    assert "".join(d.content or "" for d in deltas) == "4"
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "thought"


def test_an_answer_with_nothing_to_change_arrives_as_the_upstream_sent_it(server, fake_upstream):
    as_sent = json.dumps(completion("grüße"), indent=2).encode("utf-8")  # spaced, non-ASCII
    fake_upstream.push(Reply(body=as_sent))
    status, headers, body = http(server, "POST", "/v1/chat/completions",
                                 {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]})
    assert (status, headers["content-type"], body) == (200, "application/json", as_sent)


def test_an_answer_in_utf16_or_to_change_is_sent_again_as_compact_utf8(server, fake_upstream):
    fake_upstream.push(Reply(body=json.dumps(completion("grüße")).encode("utf-16-le")),
                       Reply(body=json.dumps(completion("4", reasoning="2+2")).encode("utf-8")))
    for content in ("grüße", "2+2\n\n4"):
        status, _, body = http(server, "POST", "/v1/chat/completions",
                               {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == content
        assert body == I.compact_json(json.loads(body)).encode("utf-8")


def test_stream_request_answered_with_json_is_replayed_as_sse(server, fake_upstream):
    fake_upstream.push(Reply(body=completion("whole answer")))
    text = "".join(c.choices[0].delta.content or "" for c in ask(server, stream=True) if c.choices)
    assert text == "whole answer"


# -- bad input -----------------------------------------------------------------------------

def test_invalid_json_is_a_400_in_openai_shape(server):
    status, headers, body = http(server, "POST", "/v1/chat/completions", b"{not json",
                                 {"content-type": "application/json"})
    error = json.loads(body)["error"]
    assert status == 400 and error["type"] == "invalid_request_error"
    assert "not valid JSON" in error["message"]
    assert headers["content-type"] == "application/json"


def test_wrong_types_are_400_via_sdk(server):
    with pytest.raises(openai.BadRequestError) as info:
        ask(server, messages="hello")
    assert "messages" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        ask(server, temperature="hot")


def test_unknown_route_and_method_are_json(server):
    status, _h, body = http(server, "GET", "/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, _h, body = http(server, "DELETE", "/v1/chat/completions")
    assert status == 405 and "not allowed" in json.loads(body)["error"]["message"]


def test_huge_body_is_413_and_server_keeps_serving(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(max_body_bytes=1024 * 1024)
    big = {"model": "glm-5", "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    with pytest.raises(openai.APIStatusError) as info:
        ask(server, **big)
    assert info.value.status_code == 413
    assert ask(server).choices[0].message.content == "Hello world"


# -- upstream failures --------------------------------------------------------------------

def test_upstream_429_passes_retry_after(server, fake_upstream):
    fake_upstream.push(Reply(429, {"error": {"message": "slow down"}}, {"retry-after": "7"}))
    with pytest.raises(openai.RateLimitError) as info:
        ask(server)
    assert info.value.response.headers["retry-after"] == "7"
    assert "slow down" in str(info.value)
    assert healthy(server)


def test_upstream_500_is_500_and_503_is_503(server, fake_upstream):
    fake_upstream.push(Reply(500, {"error": {"message": "kaput"}}), Reply(503, "busy"))
    with pytest.raises(openai.InternalServerError) as info:
        ask(server)
    assert info.value.status_code == 500 and "upstream 500: kaput" in str(info.value)
    with pytest.raises(openai.APIStatusError) as info:
        ask(server, stream=True)
    assert info.value.status_code == 503


def test_upstream_unreachable_is_502(start_server, home):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    write_settings(str(home), "http://127.0.0.1:%d/v1" % port)
    server = start_server()
    with pytest.raises(openai.APIStatusError) as info:
        ask(server)
    assert info.value.status_code == 502 and "cannot reach upstream" in str(info.value)


def test_iflow_error_in_200_body_is_401(server, fake_upstream):
    fake_upstream.push(Reply(body={"status": "434", "msg": "Invalid apiKey"}),
                       Reply(stream=sse([{"status": "434", "msg": "Invalid apiKey"}])))
    with pytest.raises(openai.AuthenticationError) as info:
        ask(server)
    assert "Invalid apiKey" in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        ask(server, stream=True)


def test_upstream_drop_mid_stream_gives_error_event(server, fake_upstream):
    fake_upstream.push(Reply(stream=text_stream(["a", "b", "c", "d"]), drop_after=3))
    got = []
    with pytest.raises(openai.APIError) as info:
        for c in ask(server, stream=True):
            if c.choices:
                got.append(c.choices[0].delta.content)
    assert "closed the stream before it was complete" in str(info.value)
    assert "IncompleteRead" not in str(info.value)
    assert "a" in got
    assert healthy(server)


def test_upstream_timeout_is_504(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(upstream_read_timeout_s=0.5)
    fake_upstream.push(Reply(body=completion(), delay_s=2))
    with pytest.raises(openai.APIStatusError) as info:
        ask(server)
    assert info.value.status_code == 504


# -- client behaviour ---------------------------------------------------------------------

def test_client_disconnect_mid_stream_closes_upstream_and_frees_slot(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(concurrency=1, queue_timeout_s=2)
    # A stream that goes quiet after its first piece: the proxy is blocked reading upstream.
    fake_upstream.push(Reply(stream=sse(text_stream(["first"] + ["x"] * 50)), piece_delay_s=0.2))
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"model": "glm-5", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    sock.sendall(("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  "Content-Length: %d\r\n\r\n%s" % (len(body), body)).encode())
    assert b"first" in _recv_until(sock, b"first")
    sock.close()
    wait_until(lambda: not (fake_upstream.active_streams or server.limiter.in_flight), 3)
    assert fake_upstream.active_streams == 0, "upstream stream still open after client left"
    assert server.limiter.in_flight == 0
    assert ask(server).choices[0].message.content == "Hello world"  # the one slot is free again


def _recv_until(sock, marker, timeout=5):
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def test_concurrency_limit_queues_then_429(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(concurrency=1, queue_timeout_s=0.3)
    fake_upstream.push(Reply(body=completion(), delay_s=1.5))
    first = threading.Thread(target=ask, args=(server,))
    first.start()
    time.sleep(0.3)
    with pytest.raises(openai.RateLimitError) as info:
        ask(server)
    assert info.value.response.headers["retry-after"] == "1"
    first.join()
    assert ask(server).choices[0].message.content == "Hello world"


def test_no_credentials_health_says_so_and_api_is_401(start_server, home):
    server = start_server()
    status, _h, body = http(server, "GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "no_credentials"
    assert "iflow2api login" in health["message"] and "iflow` and choose" not in health["message"]
    with pytest.raises(openai.AuthenticationError) as info:
        ask(server)
    assert "iflow2api login" in str(info.value) and "/admin" in str(info.value)


def test_client_api_keys_enforced_when_configured(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(api_keys=["client-key-abcdef123"])
    with pytest.raises(openai.AuthenticationError):
        ask(server)
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key="client-key-abcdef123", max_retries=0)
    assert ok.chat.completions.create(model="glm-5", messages=[{"role": "user", "content": "x"}])
    status, _h, _b = http(server, "GET", "/v1/models", headers={"x-api-key": "client-key-abcdef123"})
    assert status == 200


def test_cors_is_off_by_default(server):
    status, headers, _b = http(server, "OPTIONS", "/v1/chat/completions", headers={
        "origin": "http://localhost:3000", "access-control-request-method": "POST"})
    assert status == 204 and "access-control-allow-origin" not in headers
    status, headers, _b = http(server, "GET", "/v1/models", headers={"origin": "http://x"})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_preflight_and_headers_when_enabled(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(cors_allow_origins=["*"])
    status, headers, _b = http(server, "OPTIONS", "/v1/chat/completions", headers={
        "origin": "http://localhost:3000", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert status == 204
    assert headers["access-control-allow-origin"] == "*"
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"]
    status, headers, _b = http(server, "GET", "/v1/models", headers={"origin": "http://x"})
    assert headers["access-control-allow-origin"] == "*"


def test_one_log_line_per_request_with_tokens_and_no_secrets(server, fake_upstream, caplog):
    with caplog.at_level(logging.INFO, logger="iflow2api"):
        ask(server)
        list(ask(server, stream=True))
        time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "iflow2api.access"]
    assert len(lines) == 2
    assert all("POST /v1/chat/completions model=glm-5 status=200" in line for line in lines)
    assert all("tokens=12+3" in line for line in lines)
    assert FAKE_KEY not in caplog.text


# -- model names on the OpenAI route (issue 14) ---------------------------------------------

@pytest.mark.parametrize("sent,upstream", [("sonnet", "glm-5"), ("claude-sonnet-4-5-20250929", "glm-5"),
                                           ("haiku", "glm-5"), ("local/tiny-1", "tiny-1")])
def test_listed_names_are_accepted_and_the_answer_names_what_the_client_sent(start_server, fake_upstream, home,
                                                                            sent, upstream):
    write_settings(str(home), fake_upstream.url)
    server = start_server(providers={"local": {"base_url": fake_upstream.url, "models": ["tiny-1"]}})
    assert sent in [m.id for m in client(server).models.list()] or sent.startswith("claude-")
    resp = ask(server, model=sent)
    assert resp.model == sent and fake_upstream.last_json()["model"] == upstream
    stream = ask(server, model=sent, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks and {c.model for c in chunks} == {sent}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert fake_upstream.last_json()["model"] == upstream


def test_an_answer_whose_name_routing_kept_is_passed_through(server, fake_upstream):
    """Routing kept the name: the bytes pass untouched (no per-chunk work on the fast path)."""
    fake_upstream.push(Reply(stream=[{"model": "glm-5-0414", "choices": [{"index": 0, "delta": {"content": "x"}}]},
                                     "[DONE]"]))
    assert [c.model for c in ask(server, model="glm-5", stream=True)] == ["glm-5-0414"]  # the upstream's own
    fake_upstream.push(Reply(body=dict(completion(), model="glm-5-0414")))
    assert ask(server, model="glm-5").model == "glm-5-0414"


def test_an_unknown_provider_prefix_is_a_400_naming_the_providers(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(providers={"local": {"base_url": fake_upstream.url, "models": ["tiny-1"]}})
    with pytest.raises(openai.BadRequestError) as refused:
        ask(server, model="nope/glm-5")
    error = refused.value.body
    assert error["param"] == "model" and "unknown provider 'nope'" in error["message"]
    assert "providers: iflow, local" in error["message"]
    status, _h, body = http(server, "POST", "/v1/messages", json.dumps(
        {"model": "nope/glm-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        {"content-type": "application/json"})
    assert status == 400 and "unknown provider 'nope'" in json.loads(body)["error"]["message"]
    status, _h, body = http(server, "POST", "/v1/responses", json.dumps({"model": "nope/glm-5", "input": "hi"}).encode(),
                            {"content-type": "application/json"})
    assert status == 400 and "unknown provider 'nope'" in json.loads(body)["error"]["message"]
    assert fake_upstream.chat_requests() == []
    assert ask(server, model="local/tiny-1").model == "local/tiny-1"  # a configured prefix routes


def test_slash_ids_reach_a_provider_whose_models_hold_slashes(start_server, fake_upstream, home):
    fake_upstream.models = ["anthropic/claude-sonnet-4", "openai/gpt-4o"]  # an OpenRouter-like list
    server = start_server(providers={"router": {"base_url": fake_upstream.url, "discover_models": True,
                                                "api_keys": ["sk-router-0123456789abcdef"]}},
                          default_provider="router")
    assert ask(server, model="anthropic/claude-sonnet-4").choices[0].message.content == "Hello world"
    assert ask(server, model="meta/llama-not-listed-yet").choices[0].message.content == "Hello world"
    assert [json.loads(r.body)["model"] for r in fake_upstream.chat_requests()] == [
        "anthropic/claude-sonnet-4", "meta/llama-not-listed-yet"]


def test_root_lists_every_public_endpoint_and_models_ids_work_without_v1(server):
    endpoints = json.loads(http(server, "GET", "/")[2])["endpoints"]
    assert {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "responses": "/v1/responses",
            "models": "/v1/models", "health": "/health", "admin": "/admin", "docs": "/docs"}.items() <= endpoints.items()
    for path in endpoints.values():
        assert http(server, "GET", path)[0] in (200, 405), path  # every one exists (POST-only ones: 405)
    assert json.loads(http(server, "GET", "/models/glm-5")[2])["id"] == "glm-5"
    assert http(server, "GET", "/models/nope")[0] == 404
