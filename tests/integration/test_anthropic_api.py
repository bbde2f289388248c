"""The Anthropic Messages API through the real server, with the official `anthropic` SDK
as client and the fake OpenAI-style upstream recording what reached it (translation.md
sections 3.4, 3.8, 3.9, 4, 6; the (I)/(E) cases of section 8). Runs on both adapters."""
import base64
import functools
import inspect
import json
import socket
import struct
import time
import weakref
import zlib
from http.client import HTTPConnection

import anthropic
import openai
import pytest

import iflow2api as I
from fakes import Reply, chunk, completion, multi_tool_stream, sse, text_stream, tool_delta
from helpers import FAKE_KEY, healthy, http, wait_until, write_settings

MODEL = "claude-sonnet-4-6"
BASH_TOOL = {"name": "Bash", "description": "Run a shell command",
             "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                              "required": ["command"]}}
CLIENT_HEADER_PREFIXES = ("anthropic-", "x-stainless-", "x-api-key", "x-app")


# -- helpers ------------------------------------------------------------------------------

_CLIENTS = weakref.WeakKeyDictionary()  # server -> {api_key: client}; an SDK client costs ~40 ms


def client(server, api_key="x", **kw):
    if kw:
        return anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0, timeout=10, **kw)
    per_server = _CLIENTS.setdefault(server, {})
    if api_key not in per_server:
        per_server[api_key] = anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0,
                                                  timeout=10)
    return per_server[api_key]


def params(**kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("max_tokens", 1024)
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return kw


def create(server, **kw):
    return client(server).messages.create(**params(**kw))


def streamed(server, **kw):
    """The final message of an SDK stream, plus the raw stream events seen on the way."""
    with client(server).messages.stream(**params(**kw)) as stream:
        events = list(stream)
        return stream.get_final_message(), events


def final(server, stream, **kw):
    return streamed(server, **kw)[0] if stream else create(server, **kw)


def both_modes(test):
    """Run a test body for a non-streaming, then a streaming client (argument `stream`) on
    the same server: a server costs ~0.2 s to start and stop and the file must stay fast."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        for stream in (False, True):
            test(*args, stream=stream, **kwargs)
    signature = inspect.signature(test)
    run.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "stream"])
    return run






def raw_stream(server, body, headers=None, path="/v1/messages", timeout=10):
    """POST a streaming request with http.client: (status, headers, [(event, data, t_s)])
    where t_s is the arrival time of the event since the request was sent."""
    conn = HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        started = time.monotonic()
        conn.request("POST", path, json.dumps(params(stream=True, **body)),
                     dict({"content-type": "application/json"}, **(headers or {})))
        resp = conn.getresponse()
        if "text/event-stream" not in (resp.getheader("content-type") or ""):
            return resp.status, resp.headers, json.loads(resp.read())
        events, name, data = [], None, []
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.rstrip(b"\r\n")
            if line:
                if line.startswith(b"event:"):
                    name = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    data.append(line[5:].strip())
                continue
            if name or data:
                events.append((name, json.loads(b"\n".join(data)), time.monotonic() - started))
            name, data = None, []
        return resp.status, resp.headers, events
    finally:
        conn.close()


def check_grammar(events):
    """Case 58: the event sequence a client accepts (3.2)."""
    names = [e[0] for e in events]
    assert names[0] == "message_start" and names.count("message_start") == 1
    for name, data, *_ in events:
        assert data["type"] == name
    ended_with_error = names[-1] == "error"
    if not ended_with_error:
        assert names[-2:] == ["message_delta", "message_stop"] and names.count("message_delta") == 1
    started, stopped, kinds = [], set(), {}
    for name, data, *_ in events:
        if name == "content_block_start":
            assert data["index"] == len(started), "blocks must start in index order"
            assert not started or started[-1] in stopped, "a block started while another is open"
            started.append(data["index"])
            kinds[data["index"]] = data["content_block"]["type"]
        elif name == "content_block_delta":
            i = data["index"]
            assert i in kinds and i not in stopped
            allowed = {"text": {"text_delta"}, "thinking": {"thinking_delta", "signature_delta"},
                       "tool_use": {"input_json_delta"}}[kinds[i]]
            assert data["delta"]["type"] in allowed
        elif name == "content_block_stop":
            assert data["index"] in kinds and data["index"] not in stopped
            stopped.add(data["index"])
        elif name == "message_delta":
            assert set(started) == stopped, "message_delta while a block is open"
    return names


def upstream_headers(fake_upstream):
    return fake_upstream.chat_requests()[-1].headers


def png_base64(width, height):
    """A real (tiny, compressed) grayscale PNG of the given size."""
    def part(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\x00" * width for _ in range(height))
    png = (b"\x89PNG\r\n\x1a\n" + part(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
           + part(b"IDAT", zlib.compress(rows, 9)) + part(b"IEND", b""))
    return base64.b64encode(png).decode()


# -- plain text ----------------------------------------------------------------------------

def test_text_non_stream(server, fake_upstream):
    msg = create(server)
    assert [(b.type, b.text) for b in msg.content] == [("text", "Hello world")]
    assert msg.role == "assistant" and msg.type == "message" and msg.id.startswith("msg_")
    assert msg.model == MODEL and msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (12, 3)
    assert msg._request_id.startswith("req_")
    body = fake_upstream.last_json()  # non-stream clients are served from an upstream stream
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "glm-5" and body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["max_tokens"] == 1024


def test_text_stream(server, fake_upstream):
    msg, events = streamed(server)
    assert [e.delta.text for e in events if e.type == "content_block_delta"] == ["Hel", "lo", " world"]
    assert [(b.type, b.text) for b in msg.content] == [("text", "Hello world")]
    assert msg.model == MODEL and msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (12, 3)
    assert fake_upstream.last_json()["stream"] is True


def test_raw_text_stream_event_sequence(server, fake_upstream):
    """Case 41 over the wire: exact event order, headers, request id."""
    status, headers, events = raw_stream(server, {})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["request-id"].startswith("req_")
    assert check_grammar(events) == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == 3 and delta["usage"]["input_tokens"] == 12
    assert events[0][1]["message"]["model"] == MODEL


# -- system prompt ---------------------------------------------------------------------------

def test_system_as_string(server, fake_upstream):
    create(server, system="You are X")
    assert fake_upstream.last_json()["messages"] == [{"role": "system", "content": "You are X"},
                                                     {"role": "user", "content": "hi"}]


@both_modes
def test_system_blocks_billing_header_and_cache_control(server, fake_upstream, stream):
    """Case 4 end to end: one system message, billing header dropped, no cache_control."""
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0.14; cch=abc123;"},
              {"type": "text", "text": "You are X", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Rules"}]
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]
    tools = [dict(BASH_TOOL, cache_control={"type": "ephemeral"})]
    final(server, stream, system=system, messages=messages, tools=tools)
    raw = fake_upstream.chat_requests()[-1].body
    body = json.loads(raw)
    systems = [m for m in body["messages"] if m["role"] == "system"]
    assert systems == [{"role": "system", "content": "You are X\n\nRules"}]
    assert body["messages"][0]["role"] == "system"
    assert b"cache_control" not in raw and b"billing-header" not in raw
    assert body["messages"][1] == {"role": "user", "content": "hi"}
    assert body["tools"][0]["function"]["name"] == "Bash"


# -- tools -------------------------------------------------------------------------------------

@both_modes
def test_tool_use(server, fake_upstream, stream):
    fake_upstream.push(Reply(stream=multi_tool_stream(
        [("call_1", "Bash", '{"command": "ls -la /tmp"}')], text=["Let me ", "look."])))
    msg = final(server, stream, tools=[BASH_TOOL], messages=[{"role": "user", "content": "list /tmp"}])
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[0].text == "Let me look."
    tool = msg.content[1]
    assert (tool.id, tool.name, tool.input) == ("call_1", "Bash", {"command": "ls -la /tmp"})
    assert msg.stop_reason == "tool_use"
    body = fake_upstream.last_json()
    assert body["tools"] == [{"type": "function", "function": {
        "name": "Bash", "description": "Run a shell command",
        "parameters": BASH_TOOL["input_schema"]}}]


def test_tool_calls_with_finish_stop_still_tool_use(server, fake_upstream):
    """2.3 override: several upstreams say `stop` after tool calls."""
    fake_upstream.push(Reply(stream=multi_tool_stream([("call_9", "Bash", '{"command":"pwd"}')],
                                                      finish_reason="stop")))
    msg = create(server, tools=[BASH_TOOL])
    assert msg.stop_reason == "tool_use" and msg.content[0].input == {"command": "pwd"}


@both_modes
def test_tool_result_round_trip(server, fake_upstream, stream):
    fake_upstream.push(Reply(stream=multi_tool_stream([("call_abc", "Bash", '{"command":"ls"}')])),
                       Reply(stream=text_stream(["two files"])))
    first_messages = [{"role": "user", "content": "list files"}]
    first = final(server, stream, tools=[BASH_TOOL], messages=first_messages)
    tool = first.content[-1]
    assert tool.type == "tool_use" and first.stop_reason == "tool_use"
    history = first_messages + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id,
                                      "content": [{"type": "text", "text": "a.txt"},
                                                  {"type": "text", "text": "b.txt"}]}]}]
    second = final(server, stream, tools=[BASH_TOOL], messages=history)
    assert second.content[0].text == "two files" and second.stop_reason == "end_turn"
    sent = fake_upstream.last_json()["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    call = sent[1]["tool_calls"][0]
    assert call["id"] == "call_abc" and call["function"]["name"] == "Bash"
    assert json.loads(call["function"]["arguments"]) == {"command": "ls"}
    assert sent[2] == {"role": "tool", "tool_call_id": "call_abc", "content": "a.txt\nb.txt"}


def _interleaved_parallel_chunks():
    """Case 47: two calls whose fragments interleave by index."""
    return [chunk({"role": "assistant", "content": ""}),
            chunk(tool_delta(0, id="call_a", name="Read", arguments="")),
            chunk(tool_delta(1, id="call_b", name="Grep", arguments="")),
            chunk(tool_delta(0, arguments='{"a"')),
            chunk(tool_delta(1, arguments='{"b":2}')),
            chunk(tool_delta(0, arguments=':1}')),
            chunk({}, "tool_calls"), chunk(usage=(30, 9)), "[DONE]"]


def test_parallel_tool_calls_interleaved_stream(server, fake_upstream):
    fake_upstream.push(Reply(stream=_interleaved_parallel_chunks()))
    tools = [{"name": "Read", "input_schema": {"type": "object"}},
             {"name": "Grep", "input_schema": {"type": "object"}}]
    msg, events = streamed(server, tools=tools)
    raw = [e for e in events if e.type in ("content_block_start", "content_block_delta",
                                           "content_block_stop")]
    assert [(e.type, e.index) for e in raw] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1)]
    assert [raw[1].delta.partial_json, raw[4].delta.partial_json] == ['{"a":1}', '{"b":2}']
    assert [(b.id, b.name, b.input) for b in msg.content] == [
        ("call_a", "Read", {"a": 1}), ("call_b", "Grep", {"b": 2})]
    assert msg.stop_reason == "tool_use" and msg.usage.output_tokens == 9


# -- thinking -------------------------------------------------------------------------------

@both_modes
def test_thinking_requested_gives_signed_thinking_block_first(server, fake_upstream, stream):
    fake_upstream.push(Reply(stream=text_stream(["4"], reasoning=["2+2", " is 4"])))
    msg = final(server, stream, thinking={"type": "enabled", "budget_tokens": 2048})
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "2+2 is 4" and msg.content[0].signature
    assert msg.content[1].text == "4"
    body = fake_upstream.last_json()  # glm-5 profile: the provider's own switch, no A fields
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert "budget_tokens" not in json.dumps(body)


@both_modes
def test_thinking_not_requested_gives_no_thinking_block(server, fake_upstream, stream):
    fake_upstream.push(Reply(stream=text_stream(["4"], reasoning=["2+2", " is 4"])))
    msg = final(server, stream)
    assert [(b.type, b.text) for b in msg.content] == [("text", "4")]


def test_reasoning_only_answer_falls_back_to_text(server, fake_upstream):
    """Case 57: GLM via iFlow sometimes answers only in reasoning_content."""
    fake_upstream.push(Reply(stream=text_stream([], reasoning=["The answer ", "is 4."])))
    msg = create(server)
    assert [(b.type, b.text) for b in msg.content] == [("text", "The answer is 4.")]
    assert msg.stop_reason == "end_turn"


# -- stop reasons ---------------------------------------------------------------------------

def _finish_stream(finish_reason, **choice_fields):
    finish = chunk({}, finish_reason)
    finish["choices"][0].update(choice_fields)
    return [chunk({"content": "partial answer"}), finish, chunk(usage=(5, 7)), "[DONE]"]


@both_modes
def test_stop_reason_max_tokens(server, fake_upstream, stream):
    fake_upstream.push(Reply(stream=_finish_stream("length")))
    msg = final(server, stream, max_tokens=7)
    assert msg.stop_reason == "max_tokens" and msg.content[0].text == "partial answer"


@both_modes
def test_stop_reason_stop_sequence(server, fake_upstream, stream):
    fake_upstream.push(Reply(stream=_finish_stream("stop", stop_reason="END")),
                       Reply(stream=_finish_stream("stop")))
    msg = final(server, stream, stop_sequences=["END", "HALT"])
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "END")
    assert fake_upstream.last_json()["stop"] == ["END", "HALT"]
    msg = final(server, stream, stop_sequences=["END"])
    assert (msg.stop_reason, msg.stop_sequence) == ("end_turn", None)


# -- errors: upstream status before the stream starts ---------------------------------------------

@both_modes
def test_upstream_400_is_bad_request(server, fake_upstream, stream):
    fake_upstream.push(Reply(400, {"error": {"message": "bad tool schema",
                                             "type": "invalid_request_error"}}))
    with pytest.raises(anthropic.BadRequestError) as info:
        final(server, stream)
    body = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("upstream 400: bad tool schema")
    assert body["request_id"].startswith("req_")


def test_upstream_401_is_authentication_error(server, fake_upstream):
    fake_upstream.push(Reply(401, {"error": {"message": "token expired"}}))
    with pytest.raises(anthropic.AuthenticationError) as info:
        create(server)
    assert info.value.body["error"]["type"] == "authentication_error"
    assert "upstream 401" in str(info.value)


@both_modes
def test_upstream_429_passes_retry_after(server, fake_upstream, stream):
    """Case 62 (also for stream=True: an HTTP error, not SSE)."""
    fake_upstream.push(Reply(429, {"error": {"message": "slow down"}}, {"retry-after": "7"}))
    with pytest.raises(anthropic.RateLimitError) as info:
        final(server, stream)
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert "slow down" in info.value.body["error"]["message"]
    assert healthy(server)


def test_upstream_429_on_raw_stream_request_is_json_not_sse(server, fake_upstream):
    fake_upstream.push(Reply(429, {"error": {"message": "slow down"}}, {"retry-after": "7"}))
    status, headers, body = raw_stream(server, {})
    assert status == 429 and headers["content-type"] == "application/json"
    assert headers["retry-after"] == "7"
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"


@both_modes
def test_upstream_503_is_529_overloaded(server, fake_upstream, stream):
    fake_upstream.push(Reply(503, {"error": {"message": "busy"}}))
    with pytest.raises(anthropic.OverloadedError) as info:
        final(server, stream)
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"


def test_upstream_500_is_500_api_error(server, fake_upstream):
    fake_upstream.push(Reply(500, {"error": {"message": "kaput"}}))
    with pytest.raises(anthropic.InternalServerError) as info:
        create(server)
    assert info.value.status_code == 500
    assert info.value.body["error"] == {"type": "api_error", "message": "upstream 500: kaput"}


@both_modes
def test_context_overflow_uses_anthropic_wording(server, fake_upstream, stream):
    """Case 61 end to end: Claude Code recognises this text and compacts."""
    fake_upstream.push(Reply(400, {"error": {
        "code": "context_length_exceeded",
        "message": "This model's maximum context length is 131072 tokens. However, your messages "
                   "resulted in 140000 tokens."}}))
    with pytest.raises(anthropic.BadRequestError) as info:
        final(server, stream)
    error = info.value.body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("prompt is too long: 140000 tokens > 131072 maximum")


def test_upstream_timeout_is_504(start_server, fake_upstream, home):
    """Case 63: the upstream does not answer in time (a stream request: still an HTTP error)."""
    write_settings(str(home), fake_upstream.url)
    server = start_server(upstream_read_timeout_s=0.3)
    fake_upstream.push(Reply(stream=text_stream(), delay_s=1.0))
    with pytest.raises(anthropic.APIStatusError) as info:
        streamed(server)
    assert info.value.status_code == 504
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] in ("api_error", "timeout_error")


def test_upstream_timeout_mid_answer_non_stream_is_504(start_server, fake_upstream, home):
    """4.2: upstream timeout -> 504, also when it happens after the first chunk (the
    non-stream client has not been sent anything yet)."""
    write_settings(str(home), fake_upstream.url)
    server = start_server(upstream_read_timeout_s=0.3)
    fake_upstream.push(Reply(stream=text_stream(["a", "b"]), piece_delay_s=0.8))
    with pytest.raises(anthropic.APIStatusError) as info:
        create(server)
    assert info.value.status_code == 504


def test_error_as_first_event_of_200_stream_is_http_error(server, fake_upstream):
    """Case 56: nothing was sent yet, so it is still an HTTP status."""
    fake_upstream.push(Reply(stream=[{"error": {"message": "server overloaded", "code": "503"}}]))
    with pytest.raises(anthropic.OverloadedError) as info:
        streamed(server)
    assert "server overloaded" in info.value.body["error"]["message"]
    fake_upstream.push(Reply(stream=[{"status": "434", "msg": "Invalid apiKey"}]))
    with pytest.raises(anthropic.AuthenticationError) as info:
        create(server)
    assert "Invalid apiKey" in info.value.body["error"]["message"]


# -- errors: bad client input ------------------------------------------------------------------

def test_invalid_json_is_400_in_anthropic_shape(server, fake_upstream):
    status, headers, body = http(server, "POST", "/v1/messages", b"{not json",
                                 {"content-type": "application/json"})
    body = json.loads(body)
    assert status == 400 and headers["content-type"] == "application/json"
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]
    assert fake_upstream.chat_requests() == []


def test_missing_messages_is_400_naming_the_field(server, fake_upstream):
    status, _h, body = http(server, "POST", "/v1/messages", {"model": MODEL, "max_tokens": 10})
    error = json.loads(body)["error"]
    assert status == 400 and error["type"] == "invalid_request_error"
    assert error["message"].startswith("messages")
    with pytest.raises(anthropic.BadRequestError) as info:  # role system inside messages (case 21)
        create(server, messages=[{"role": "system", "content": "x"}])
    assert "system" in info.value.body["error"]["message"]
    assert fake_upstream.chat_requests() == []


def _too_large(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(max_body_bytes=1024 * 1024)
    with pytest.raises(anthropic.APIStatusError) as info:
        create(server, messages=[{"role": "user", "content": "x" * (2 * 1024 * 1024)}])
    return server, info.value


def test_body_over_limit_is_413_and_server_keeps_serving(start_server, fake_upstream, home):
    server, error = _too_large(start_server, fake_upstream, home)
    assert error.status_code == 413
    assert create(server).content[0].text == "Hello world"
    assert len(fake_upstream.chat_requests()) == 1  # the refused body never reached the upstream


def test_body_over_limit_is_request_too_large_in_anthropic_shape(start_server, fake_upstream, home,
                                                                 adapter, request):
    _server, error = _too_large(start_server, fake_upstream, home)
    assert error.status_code == 413
    assert error.body["type"] == "error" and error.body["error"]["type"] == "request_too_large"


# -- errors inside a started stream ---------------------------------------------------------------

def test_mid_stream_error_chunk_ends_with_error_event(server, fake_upstream):
    stream = [chunk({"role": "assistant", "content": ""}), chunk({"content": "partial"}),
              {"error": {"message": "server overloaded", "code": "503"}},
              chunk({"content": "never"}), chunk({}, "stop"), "[DONE]"]
    fake_upstream.push(Reply(stream=stream), Reply(stream=stream))
    status, _h, events = raw_stream(server, {})
    names = check_grammar(events)
    assert status == 200 and names[-1] == "error" and "message_stop" not in names
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    assert "server overloaded" in events[-1][1]["error"]["message"]
    assert all("never" not in json.dumps(data) for _n, data, _t in events)
    got = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with client(server).messages.stream(**params()) as s:
            for text in s.text_stream:
                got.append(text)
    assert got == ["partial"] and "server overloaded" in str(info.value)
    assert healthy(server)
    assert create(server).content[0].text == "Hello world"


def test_upstream_cut_mid_stream_gives_error_event(server, fake_upstream):
    """Case 53: EOF without finish -> api_error, never a truncated answer taken as complete."""
    pieces = text_stream(["a", "b", "c", "d"])
    fake_upstream.push(Reply(stream=pieces, drop_after=3), Reply(stream=pieces, drop_after=3),
                       Reply(stream=pieces, drop_after=3))
    status, _h, events = raw_stream(server, {})
    names = check_grammar(events)
    assert status == 200 and names[-1] == "error" and "message_stop" not in names
    error = events[-1][1]["error"]
    assert error["type"] == "api_error" and "upstream stream" in error["message"]
    with pytest.raises(anthropic.APIStatusError) as info:
        streamed(server)
    assert "upstream stream" in str(info.value)
    with pytest.raises(anthropic.APIStatusError) as info:  # non-stream client: an HTTP error
        create(server)
    assert info.value.status_code >= 500 and info.value.body["error"]["type"] == "api_error"
    assert healthy(server)


# -- count_tokens ---------------------------------------------------------------------------

def test_count_tokens_is_local(server, fake_upstream):
    """Case 66."""
    c = client(server)
    hello = [{"role": "user", "content": "hello world"}]
    n = c.messages.count_tokens(model=MODEL, messages=hello).input_tokens
    assert 1 <= n <= 20
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": png_base64(600, 400)}}
    with_image = c.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "hello world"}, image]}]).input_tokens
    assert 200 <= with_image - n <= 500  # 600 * 400 / 750 = 320
    more = c.messages.count_tokens(model=MODEL, system="You are a helpful assistant " * 20,
                                   tools=[BASH_TOOL],
                                   messages=hello).input_tokens
    assert more > n + 40
    assert fake_upstream.chat_requests() == []


def test_count_tokens_errors_in_anthropic_shape(server, fake_upstream):
    status, _h, body = http(server, "POST", "/v1/messages/count_tokens", {"model": MODEL})
    body = json.loads(body)
    assert status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "messages" in body["error"]["message"]
    status, _h, body = http(server, "POST", "/v1/messages/count_tokens", b"[oops")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"


# -- routes, models, mapping, headers ----------------------------------------------------------

def test_beta_query_routes_normally(server, fake_upstream):
    """Case 67: the SDK's beta resources (and Claude Code) add ?beta=true."""
    c = client(server)
    msg = c.beta.messages.create(**params())
    assert msg.content[0].text == "Hello world"
    assert 1 <= c.beta.messages.count_tokens(model=MODEL, messages=[
        {"role": "user", "content": "hello world"}]).input_tokens <= 20
    status, _h, body = http(server, "POST", "/v1/messages?beta=true", params())
    assert status == 200 and json.loads(body)["content"][0]["text"] == "Hello world"
    status, _h, body = http(server, "POST", "/v1/messages/count_tokens?beta=true",
                            {"model": MODEL, "messages": [{"role": "user", "content": "hello world"}]})
    assert status == 200 and json.loads(body)["input_tokens"] >= 1
    status, _h, events = raw_stream(server, {}, path="/v1/messages?beta=true")
    assert status == 200 and check_grammar(events)[-1] == "message_stop"


def test_telemetry_is_refused_fast_in_anthropic_shape(server, fake_upstream):
    status, _h, body = http(server, "POST", "/api/event_logging/batch", {"events": []})
    body = json.loads(body)
    assert status == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert fake_upstream.requests == []


def test_models_list_parsed_by_both_sdks(server, fake_upstream):
    """Case 68: one body for both SDKs."""
    models = list(client(server).models.list())
    ids = [m.id for m in models]
    assert "glm-5" in ids and "upstream-only-model" in ids
    glm = models[ids.index("glm-5")]
    assert glm.type == "model" and glm.display_name and glm.created_at.year >= 2024
    assert client(server).models.retrieve("glm-5").id == "glm-5"
    with pytest.raises(anthropic.NotFoundError):
        client(server).models.retrieve("nope")
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in oai.models.list()] == ids


def test_models_list_includes_claude_aliases(server, fake_upstream):
    ids = [m.id for m in client(server).models.list()]
    assert {"opus", "sonnet", "haiku"} <= set(ids)


def test_model_mapping_default(server, fake_upstream):
    for name in ("claude-haiku-4-5", "claude-3-5-haiku-20241022", "claude-opus-4-1[1m]",
                 "claude-unknown-9"):
        msg = create(server, model=name)
        assert msg.model == name
        assert fake_upstream.last_json()["model"] == "glm-5", name
    msg, _e = streamed(server, model="claude-haiku-4-5")
    assert msg.model == "claude-haiku-4-5" and fake_upstream.last_json()["model"] == "glm-5"


def test_model_mapping_custom_and_pass_through(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(model_map={"haiku": "glm-4.6", "sonnet": "glm-5", "opus": "glm-5"})
    assert create(server, model="claude-haiku-4-5").model == "claude-haiku-4-5"
    assert fake_upstream.last_json()["model"] == "glm-4.6"
    assert create(server, model="claude-sonnet-4-6-20260101").model == "claude-sonnet-4-6-20260101"
    assert fake_upstream.last_json()["model"] == "glm-5"
    msg, _e = streamed(server, model="kimi-k2")
    assert msg.model == "kimi-k2" and fake_upstream.last_json()["model"] == "kimi-k2"
    assert create(server, model="glm-4.6").model == "glm-4.6"
    assert fake_upstream.last_json()["model"] == "glm-4.6"


def test_claude_code_headers_accepted_and_not_forwarded(server, fake_upstream):
    cc_headers = {
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
                          "fine-grained-tool-streaming-2025-05-14,context-1m-2025-08-07",
        "anthropic-dangerous-direct-browser-access": "true", "x-app": "cli",
        "user-agent": "claude-cli/2.0.14 (external, cli)"}
    c = client(server, api_key="sk-ant-client-secret-123", default_headers=cc_headers)
    assert c.messages.create(**params()).content[0].text == "Hello world"
    with c.messages.stream(**params()) as s:
        assert s.get_final_message().content[0].text == "Hello world"
    status, _h, events = raw_stream(server, {}, dict(cc_headers, **{
        "anthropic-version": "2023-06-01", "authorization": "Bearer sk-ant-client-secret-123"}))
    assert status == 200 and check_grammar(events)[-1] == "message_stop"
    assert len(fake_upstream.chat_requests()) == 3
    for rec in fake_upstream.chat_requests():
        h = rec.headers
        assert not [k for k in h if k.startswith(CLIENT_HEADER_PREFIXES)], h
        assert h["authorization"] == "Bearer " + FAKE_KEY and h["user-agent"] == "iFlow-Cli"
        assert not [v for v in h.values() if "sk-ant-client" in v or "claude-code" in v]
        assert I.iflow_signature(FAKE_KEY, h["session-id"], int(h["x-iflow-timestamp"])) == \
            h["x-iflow-signature"]


def test_client_keys_enforced_in_anthropic_shape(start_server, fake_upstream, home):
    """Case 65."""
    write_settings(str(home), fake_upstream.url)
    server = start_server(api_keys=["k-123456789"])
    status, _h, body = http(server, "POST", "/v1/messages", params())
    body = json.loads(body)
    assert status == 401 and body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    status, _h, body = http(server, "POST", "/v1/messages/count_tokens",
                            {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    status, _h, body = http(server, "POST", "/v1/chat/completions",
                            {"model": "glm-5", "messages": [{"role": "user", "content": "x"}]})
    assert status == 401 and "type" not in json.loads(body)  # OpenAI shape there
    with pytest.raises(anthropic.AuthenticationError):
        create(server)  # api_key "x"
    assert fake_upstream.chat_requests() == []
    ok = client(server, api_key="k-123456789")
    assert ok.messages.create(**params()).content[0].text == "Hello world"
    status, _h, _b = http(server, "POST", "/v1/messages", params(),
                          {"authorization": "Bearer k-123456789"})
    assert status == 200
    assert "k-123456789" not in json.dumps(fake_upstream.chat_requests()[-1].headers)


# -- keep-alive, disconnects, aggregation --------------------------------------------------------

def test_pings_while_upstream_is_silent(server, fake_upstream, monkeypatch):
    """Case 69, scaled down: start after 0.3 s of silence, then ping every 0.3 s."""
    monkeypatch.setattr(I, "ANTHROPIC_START_AFTER_S", 0.3)
    monkeypatch.setattr(I, "ANTHROPIC_PING_S", 0.3)
    fake_upstream.push(Reply(stream=text_stream(), hang_s=1.2))
    status, _h, events = raw_stream(server, {})
    names = check_grammar(events)
    assert status == 200 and names[0] == "message_start" and names[-1] == "message_stop"
    first_block = names.index("content_block_start")
    assert names[1:first_block].count("ping") >= 2 and set(names[1:first_block]) == {"ping"}
    assert events[0][2] < 1.0, "message_start must come before the upstream's first data"
    assert events[first_block][2] >= 1.0
    assert "ping" not in names[first_block:]


def _send_and_leave(server, stream, wait_for=None, linger_s=0.0):
    """Send a /v1/messages request on a raw socket, optionally read until `wait_for`
    appears, then close the connection; returns the monotonic time of the close."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps(params(stream=stream))
    sock.sendall(("POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  "anthropic-version: 2023-06-01\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body)).encode())
    sock.settimeout(5)
    data = b""
    while wait_for is not None and wait_for not in data:
        piece = sock.recv(65536)
        assert piece, "stream ended before %r" % wait_for
        data += piece
    time.sleep(linger_s)
    sock.close()
    return time.monotonic(), data


def test_client_disconnect_mid_stream_closes_upstream(start_server, fake_upstream, home):
    """Case 70: upstream closed within 1 s, concurrency slot freed."""
    write_settings(str(home), fake_upstream.url)
    server = start_server(concurrency=1, queue_timeout_s=2)
    fake_upstream.push(Reply(stream=text_stream(["first"] + ["x"] * 50), piece_delay_s=0.2))
    left, data = _send_and_leave(server, True, wait_for=b"first")
    assert b"event: message_start" in data
    assert wait_until(lambda: fake_upstream.active_streams == 0, 3.0), \
        "upstream stream still open after the client left"
    assert time.monotonic() - left < 1.0
    assert wait_until(lambda: server.limiter.in_flight == 0, 1.0)
    assert create(server).content[0].text == "Hello world"  # the one slot is free again


def test_client_disconnect_before_stream_start_frees_slot(start_server, fake_upstream, home,
                                                          monkeypatch):
    """3.9: a client that leaves while a reasoning model is still silent (Esc in Claude Code)."""
    monkeypatch.setattr(I, "ANTHROPIC_START_AFTER_S", 5.0)
    write_settings(str(home), fake_upstream.url)
    server = start_server(concurrency=1, queue_timeout_s=2)
    fake_upstream.push(Reply(stream=text_stream(), hang_s=1.8))
    _send_and_leave(server, True, linger_s=0.2)
    assert wait_until(lambda: server.limiter.in_flight == 0, 1.0), "slot held after the client left"


def test_client_disconnect_non_stream_closes_upstream(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(concurrency=1, queue_timeout_s=2)
    fake_upstream.push(Reply(stream=text_stream(["first"] + ["x"] * 12), piece_delay_s=0.15))
    left, _data = _send_and_leave(server, False, linger_s=0.15)
    assert wait_until(lambda: fake_upstream.active_streams == 0, 1.0), \
        "upstream stream still open after the client left"
    assert wait_until(lambda: server.limiter.in_flight == 0, 0.5)


def test_non_stream_aggregation_equals_stream(server, fake_upstream):
    """Case 60 end to end: reasoning, text and two tool calls, thinking requested."""
    chunks = multi_tool_stream([("call_1", "Bash", '{"command": "ls"}'),
                                ("call_2", "Bash", '{"command": "pwd", "note": "\\u00e9t\\u00e9"}')],
                               text=["I will ", "run two."], reasoning=["plan: ", "ls then pwd"],
                               usage=(40, 17))
    fake_upstream.push(Reply(stream=chunks), Reply(stream=chunks))
    kw = dict(tools=[BASH_TOOL], thinking={"type": "enabled", "budget_tokens": 4000})
    plain = create(server, **kw)
    streamed_msg, _events = streamed(server, **kw)

    def comparable(msg):
        d = msg.model_dump(exclude_none=True)
        assert d.pop("id").startswith("msg_")
        assert d["content"][0]["type"] == "thinking" and d["content"][0].pop("signature")
        # message_start's extra usage fields (cache_creation, service_tier) survive in the stream
        d["usage"] = {k: d["usage"][k] for k in ("input_tokens", "output_tokens",
                                                 "cache_creation_input_tokens", "cache_read_input_tokens")}
        return d

    a, b = comparable(plain), comparable(streamed_msg)
    assert a == b
    assert [c["type"] for c in a["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert a["content"][3]["input"] == {"command": "pwd", "note": "été"}
    assert a["stop_reason"] == "tool_use" and a["usage"]["output_tokens"] == 17


def test_request_id_header_and_error_body(server, fake_upstream):
    raw = client(server).messages.with_raw_response.create(**params())
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["content-type"] == "application/json"
    with client(server).messages.with_streaming_response.create(**params(stream=True)) as resp:
        assert resp.headers["request-id"].startswith("req_")
        resp.read()
    fake_upstream.push(Reply(500, {"error": {"message": "kaput"}}))
    status, _h, body = http(server, "POST", "/v1/messages", params())
    assert status == 500 and json.loads(body)["request_id"].startswith("req_")


def test_upstream_json_answer_to_stream_request_is_replayed(server, fake_upstream):
    """3.10: an upstream that answers the (always streaming) call with one JSON body."""
    call = {"id": "call_7", "type": "function",
            "function": {"name": "Bash", "arguments": '{"command":"id"}'}}
    fake_upstream.push(Reply(body=completion("whole answer", tool_calls=[call])),
                       Reply(body=completion("whole answer")))
    msg, _e = streamed(server, tools=[BASH_TOOL])
    assert [b.type for b in msg.content] == ["text", "tool_use"] and msg.stop_reason == "tool_use"
    assert msg.content[1].input == {"command": "id"}
    assert create(server).content[0].text == "whole answer"


def test_upstream_sse_with_spaces_and_comments(server, fake_upstream):
    """3.10 input side over a real socket: `data: ` with a space and keep-alive comments."""
    pieces = [b": keep-alive\n\n"] + sse(text_stream(["a", "b"]), space=True)
    fake_upstream.push(Reply(stream=pieces))
    msg = create(server)
    assert msg.content[0].text == "ab"


@pytest.mark.parametrize("messages", ["hi", 5, None, [5]])
def test_count_tokens_refuses_bad_messages_in_the_words_of_the_messages_route(server, messages):
    body = {"model": MODEL, "max_tokens": 5, "messages": messages}
    counted = http(server, "POST", "/v1/messages/count_tokens", body)
    sent = http(server, "POST", "/v1/messages", body)
    assert counted[0] == sent[0] == 400
    assert json.loads(counted[2])["error"]["message"] == json.loads(sent[2])["error"]["message"]
