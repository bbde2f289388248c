"""The OpenAI Responses API (POST /v1/responses, issue 13) through the real server, with the
official `openai` SDK as client (`client.responses.create`, `client.responses.stream`) and
the fake chat-completions upstream recording what reached it. Runs on both adapters.

Tests that check one rule in both client modes loop over `stream` in one test body: a
server costs ~0.2 s to start and stop, and the file must stay fast."""
import json

import openai
import pytest

from fakes import Reply, chunk, multi_tool_stream, text_stream, tool_delta
from helpers import http

MODEL = "glm-5"
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}
CRM_NAMESPACE = {"type": "namespace", "name": "crm", "description": "Customer records",
                 "tools": [{"type": "function", "name": "lookup", "description": "Find a customer",
                            "parameters": {"type": "object", "properties": {"email": {"type": "string"}},
                                           "required": ["email"]}}]}
PATCH_TOOL = {"type": "custom", "name": "apply_patch", "description": "Apply a patch to files"}


# -- helpers ------------------------------------------------------------------------------

@pytest.fixture
def sdk(server):
    """The official SDK's client for the server, no retries; its connections closed at the end."""
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=10) as client:
        yield client


def params(**kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("input", "hi")
    return kw


def streamed(sdk, **kw):
    """(final response, the SDK's stream events) of `client.responses.stream`."""
    with sdk.responses.stream(**params(**kw)) as stream:
        events = list(stream)
        return stream.get_final_response(), events


def final(sdk, stream, **kw):
    """The response object, from `create` or from the end of `stream`."""
    if stream:
        return streamed(sdk, **kw)[0]
    return sdk.responses.create(**params(**kw))


def raw_events(sdk, **kw):
    """The raw events of `create(stream=True)` (no SDK accumulation on top)."""
    return list(sdk.responses.create(stream=True, **params(**kw)))


def check_sequence(events):
    """What every Responses stream must satisfy: created first, one terminal event last,
    sequence numbers strictly increasing, every added item done (and not twice)."""
    names = [e.type for e in events]
    assert names[:2] == ["response.created", "response.in_progress"], names
    terminals = {"response.completed", "response.incomplete", "response.failed"}
    assert names[-1] in terminals and sum(n in terminals for n in names) == 1, names
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)), numbers
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    if names[-1] != "response.failed":
        assert added == done == list(range(len(added))), (added, done)
    return names


def as_input(items):
    """Output items of a response, sent back as input items (what a client does)."""
    return [item.model_dump(exclude_none=True) for item in items]


def upstream_tool_names(body):
    return [t["function"]["name"] for t in body.get("tools") or []]


def _finish_stream(finish_reason):
    return [chunk({"role": "assistant", "content": ""}), chunk({"content": "partial answer"}),
            chunk({}, finish_reason), chunk(usage=(5, 7)), "[DONE]"]


# -- plain text ----------------------------------------------------------------------------

def test_text_non_stream(sdk, fake_upstream):
    resp = sdk.responses.create(model=MODEL, input="hi", instructions="Be brief.")
    assert resp.output_text == "Hello world"
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status == "completed" and resp.model == MODEL and resp.error is None
    [message] = resp.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert [(p.type, p.text) for p in message.content] == [("output_text", "Hello world")]
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (12, 3, 15)
    body = fake_upstream.last_json()  # non-stream clients are served from an upstream stream
    assert body["stream"] is True and body["model"] == "glm-5"
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hi"}]


def test_input_items_roles_and_parts(sdk, fake_upstream):
    items = [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                             {"type": "input_text", "text": "b"}]},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
             {"role": "user", "content": "c"}]
    sdk.responses.create(model=MODEL, input=items)
    messages = fake_upstream.last_json()["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == "Rules" and messages[2]["content"] == "ok"
    assert messages[3]["content"] == "c"
    assert "a" in json.dumps(messages[1]["content"]) and "b" in json.dumps(messages[1]["content"])


def test_text_stream_events_and_final_response(sdk, fake_upstream):
    resp, events = streamed(sdk)
    names = check_sequence(events)
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta",
                     "response.output_text.delta", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Hel", "lo", " world"]
    assert [e.text for e in events if e.type == "response.output_text.done"] == ["Hello world"]
    assert events[0].response.id == resp.id and events[0].response.status == "in_progress"
    assert resp.output_text == "Hello world" and resp.status == "completed"
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (12, 3)
    body = fake_upstream.last_json()
    assert body["stream"] is True and body["messages"] == [{"role": "user", "content": "hi"}]


def test_create_stream_true_gives_the_same_events(sdk, fake_upstream):
    events = raw_events(sdk)
    check_sequence(events)
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Hel", "lo", " world"]
    completed = events[-1].response
    assert completed.status == "completed" and completed.output_text == "Hello world"


def test_responses_path_without_v1(server, fake_upstream):
    status, headers, body = http(server, "POST", "/responses", {"model": MODEL, "input": "hi"},
                                 {"content-type": "application/json"})
    assert status == 200 and headers["content-type"].startswith("application/json")
    answer = json.loads(body)
    assert answer["object"] == "response" and answer["output_text"] == "Hello world"


# -- tools -----------------------------------------------------------------------------------

def test_function_tool_round_trip(sdk, fake_upstream):
    for stream in (False, True):
        fake_upstream.push(Reply(stream=multi_tool_stream([("call_abc", "get_weather", '{"city": "Paris"}')],
                                                          text=["Let me ", "check."])),
                           Reply(stream=text_stream(["Sunny in Paris."])))
        first_input = [{"role": "user", "content": "Weather in Paris?"}]
        first = final(sdk, stream, input=first_input, tools=[WEATHER_TOOL])
        assert [item.type for item in first.output] == ["message", "function_call"]
        call = first.output[1]
        assert (call.call_id, call.name, json.loads(call.arguments)) == ("call_abc", "get_weather",
                                                                         {"city": "Paris"})
        assert call.status == "completed" and first.status == "completed"
        assert fake_upstream.last_json()["tools"] == [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city",
            "parameters": WEATHER_TOOL["parameters"]}}]

        second_input = first_input + as_input(first.output) + [
            {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}]
        second = final(sdk, stream, input=second_input, tools=[WEATHER_TOOL])
        assert second.output_text == "Sunny in Paris."
        sent = fake_upstream.last_json()["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        assert sent[1]["content"] == "Let me check."
        [upstream_call] = sent[1]["tool_calls"]
        assert upstream_call["id"] == "call_abc" and upstream_call["function"]["name"] == "get_weather"
        assert json.loads(upstream_call["function"]["arguments"]) == {"city": "Paris"}
        assert sent[2] == {"role": "tool", "tool_call_id": "call_abc", "content": "18C, sunny"}


def test_function_call_stream_events(sdk, fake_upstream):
    fake_upstream.push(Reply(stream=multi_tool_stream([("call_1", "get_weather", '{"city": "Oslo"}')])))
    resp, events = streamed(sdk, tools=[WEATHER_TOOL])
    names = check_sequence(events)
    assert names[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert "response.function_call_arguments.delta" in names
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == {"city": "Oslo"}
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") \
        == done.arguments
    assert resp.output[0].call_id == "call_1" and json.loads(resp.output[0].arguments) == {"city": "Oslo"}


def _interleaved_parallel_chunks():
    """Two calls whose fragments interleave by index."""
    return [chunk({"role": "assistant", "content": ""}),
            chunk(tool_delta(0, id="call_a", name="get_weather", arguments="")),
            chunk(tool_delta(1, id="call_b", name="get_time", arguments="")),
            chunk(tool_delta(0, arguments='{"city"')),
            chunk(tool_delta(1, arguments='{"zone": "CET"}')),
            chunk(tool_delta(0, arguments=': "Rome"}')),
            chunk({}, "tool_calls"), chunk(usage=(30, 9)), "[DONE]"]


def test_parallel_tool_calls(sdk, fake_upstream):
    time_tool = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}
    for stream in (False, True):
        fake_upstream.push(Reply(stream=_interleaved_parallel_chunks()),
                           Reply(stream=text_stream(["Done."])))
        first = final(sdk, stream, tools=[WEATHER_TOOL, time_tool])
        calls = [(i.type, i.call_id, i.name, json.loads(i.arguments)) for i in first.output]
        assert calls == [("function_call", "call_a", "get_weather", {"city": "Rome"}),
                         ("function_call", "call_b", "get_time", {"zone": "CET"})]
        assert first.usage.output_tokens == 9
        history = [{"role": "user", "content": "hi"}] + as_input(first.output) + [
            {"type": "function_call_output", "call_id": "call_a", "output": "warm"},
            {"type": "function_call_output", "call_id": "call_b", "output": "noon"}]
        final(sdk, stream, input=history, tools=[WEATHER_TOOL, time_tool])
        sent = fake_upstream.last_json()["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
        assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_a", "call_b"]
        assert [(m["tool_call_id"], m["content"]) for m in sent[2:]] == [("call_a", "warm"),
                                                                          ("call_b", "noon")]


def test_namespace_tools_flattened_and_mapped_back(sdk, fake_upstream):
    for stream in (False, True):
        fake_upstream.push(Reply(stream=multi_tool_stream([("call_ns", "crm__lookup",
                                                            '{"email": "a@b.c"}')])),
                           Reply(stream=text_stream(["Found Ada."])))
        first = final(sdk, stream, tools=[CRM_NAMESPACE, WEATHER_TOOL])
        assert upstream_tool_names(fake_upstream.last_json()) == ["crm__lookup", "get_weather"]
        [call] = first.output
        assert (call.type, call.namespace, call.name, call.call_id) == ("function_call", "crm", "lookup",
                                                                        "call_ns")
        assert json.loads(call.arguments) == {"email": "a@b.c"}
        history = [{"role": "user", "content": "hi"}] + as_input(first.output) + [
            {"type": "function_call_output", "call_id": "call_ns", "output": "Ada"}]
        final(sdk, stream, input=history, tools=[CRM_NAMESPACE, WEATHER_TOOL])
        sent = fake_upstream.last_json()["messages"]
        assert sent[1]["tool_calls"][0]["function"]["name"] == "crm__lookup"
        assert sent[2] == {"role": "tool", "tool_call_id": "call_ns", "content": "Ada"}


def test_custom_tool_is_one_string_argument_and_mapped_back(sdk, fake_upstream):
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hello\n*** End Patch"
    for stream in (False, True):
        fake_upstream.push(Reply(stream=multi_tool_stream([("call_p", "apply_patch",
                                                            json.dumps({"input": patch}))])),
                           Reply(stream=text_stream(["Patched."])))
        first = final(sdk, stream, tools=[PATCH_TOOL])
        [tool] = fake_upstream.last_json()["tools"]
        assert tool["function"]["name"] == "apply_patch"
        schema = tool["function"]["parameters"]
        assert list(schema["properties"]) == ["input"] and schema["properties"]["input"]["type"] == "string"
        [call] = first.output
        assert (call.type, call.name, call.call_id, call.input) == ("custom_tool_call", "apply_patch",
                                                                    "call_p", patch)
        history = [{"role": "user", "content": "hi"}] + as_input(first.output) + [
            {"type": "custom_tool_call_output", "call_id": "call_p", "output": "applied"}]
        second = final(sdk, stream, input=history, tools=[PATCH_TOOL])
        assert second.output_text == "Patched."
        sent = fake_upstream.last_json()["messages"]
        upstream_call = sent[1]["tool_calls"][0]
        assert upstream_call["id"] == "call_p" and upstream_call["function"]["name"] == "apply_patch"
        assert json.loads(upstream_call["function"]["arguments"]) == {"input": patch}
        assert sent[2] == {"role": "tool", "tool_call_id": "call_p", "content": "applied"}


def test_builtin_tools_are_dropped(sdk, fake_upstream):
    builtin = [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}]
    resp = sdk.responses.create(model=MODEL, input="hi", tools=builtin + [WEATHER_TOOL])
    assert resp.status == "completed"
    assert upstream_tool_names(fake_upstream.last_json()) == ["get_weather"]


# -- reasoning and stop reasons ----------------------------------------------------------------

def test_reasoning_becomes_a_reasoning_item_with_summary(sdk, fake_upstream):
    for stream in (False, True):
        fake_upstream.push(Reply(stream=text_stream(["4"], reasoning=["2+2", " is 4"])))
        resp = final(sdk, stream, reasoning={"effort": "medium", "summary": "auto"})
        assert [item.type for item in resp.output] == ["reasoning", "message"]
        reasoning = resp.output[0]
        assert [(s.type, s.text) for s in reasoning.summary] == [("summary_text", "2+2 is 4")]
        assert resp.output_text == "4"
        assert isinstance(resp.usage.output_tokens_details.reasoning_tokens, int)


def test_reasoning_stream_events(sdk, fake_upstream):
    fake_upstream.push(Reply(stream=text_stream(["4"], reasoning=["2+2", " is 4"])))
    _resp, events = streamed(sdk, reasoning={"summary": "auto"})
    names = check_sequence(events)
    assert names.index("response.reasoning_summary_part.added") < names.index(
        "response.reasoning_summary_text.delta") < names.index("response.reasoning_summary_text.done") \
        < names.index("response.output_text.delta")
    assert "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta") \
        == "2+2 is 4"
    [done] = [e for e in events if e.type == "response.reasoning_summary_text.done"]
    assert done.text == "2+2 is 4" and done.output_index == 0


def test_length_is_incomplete_with_max_output_tokens(sdk, fake_upstream):
    fake_upstream.push(Reply(stream=_finish_stream("length")))
    resp = sdk.responses.create(model=MODEL, input="hi", max_output_tokens=16)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == "partial answer"
    assert fake_upstream.last_json()["max_tokens"] == 16

    fake_upstream.push(Reply(stream=_finish_stream("length")))
    events = raw_events(sdk, max_output_tokens=16)
    assert check_sequence(events)[-1] == "response.incomplete"
    last = events[-1].response
    assert last.status == "incomplete" and last.incomplete_details.reason == "max_output_tokens"
    assert last.output_text == "partial answer"


# -- errors --------------------------------------------------------------------------------------

def _error_body(exc):
    body = exc.body if isinstance(exc.body, dict) else {}
    return body.get("error", body)  # the SDK may hand over the inner "error" object already


def test_upstream_429_before_first_byte_is_rate_limit_error(sdk, fake_upstream):
    for stream in (False, True):
        fake_upstream.push(Reply(429, {"error": {"message": "slow down"}}, {"retry-after": "7"}))
        with pytest.raises(openai.RateLimitError) as info:
            final(sdk, stream)
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "7"
        assert info.value.response.headers["content-type"].startswith("application/json")
        assert "slow down" in _error_body(info.value)["message"]


def test_upstream_500_before_first_byte_is_internal_server_error(sdk, fake_upstream):
    for stream in (False, True):
        fake_upstream.push(Reply(500, {"error": {"message": "boom"}}))
        with pytest.raises(openai.InternalServerError) as info:
            final(sdk, stream)
        assert info.value.status_code >= 500
        error = _error_body(info.value)
        assert "boom" in error["message"] and error["type"]


def test_upstream_reset_mid_stream_is_response_failed(sdk, fake_upstream):
    pieces = ["a"] * 20
    fake_upstream.push(Reply(stream=text_stream(pieces), drop_after=6))
    events = raw_events(sdk)
    names = check_sequence(events)
    assert names[-1] == "response.failed"
    assert "response.output_text.delta" in names  # the failure came after the first byte
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None and failed.error.message

    fake_upstream.push(Reply(stream=text_stream(pieces), drop_after=6))
    with sdk.responses.stream(**params()) as stream:
        names = [e.type for e in stream]
        assert names[-1] == "response.failed"
        with pytest.raises(RuntimeError):  # the SDK helper has no completed response to give
            stream.get_final_response()


def test_upstream_reset_non_stream_is_5xx(sdk, fake_upstream):
    fake_upstream.push(Reply(stream=text_stream(["a"] * 20), drop_after=6))
    with pytest.raises(openai.APIStatusError) as info:
        sdk.responses.create(model=MODEL, input="hi")
    assert info.value.status_code in (502, 504)


# -- store, previous_response_id, retrieve, delete ------------------------------------------------

def test_store_previous_response_id_retrieve_delete(sdk, fake_upstream):
    fake_upstream.push(Reply(stream=text_stream(["Nice to meet you, Ada."])),
                       Reply(stream=text_stream(["Your name is Ada."])))
    first = sdk.responses.create(model=MODEL, input="My name is Ada.", store=True)
    second = sdk.responses.create(model=MODEL, input="What is my name?", store=True,
                                  previous_response_id=first.id)
    assert second.output_text == "Your name is Ada." and second.previous_response_id == first.id
    assert fake_upstream.last_json()["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"}]

    got = sdk.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == "Nice to meet you, Ada." and got.status == "completed"

    sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as info:
        sdk.responses.retrieve(first.id)
    error = _error_body(info.value)
    assert first.id in error["message"] and error.get("type") == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        sdk.responses.delete(first.id)
    assert sdk.responses.retrieve(second.id).output_text == "Your name is Ada."


def test_previous_response_id_chains_tool_calls(sdk, fake_upstream):
    """Codex-like turn over a stored response: only the tool output is sent the second time."""
    fake_upstream.push(Reply(stream=multi_tool_stream([("call_w", "get_weather", '{"city": "Lima"}')])),
                       Reply(stream=text_stream(["Mild."])))
    first = sdk.responses.create(model=MODEL, input="Weather in Lima?", tools=[WEATHER_TOOL])
    second = sdk.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER_TOOL],
                                  input=[{"type": "function_call_output", "call_id": "call_w",
                                          "output": "20C"}])
    assert second.output_text == "Mild."
    sent = fake_upstream.last_json()["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == "call_w"
    assert sent[2] == {"role": "tool", "tool_call_id": "call_w", "content": "20C"}


def test_streamed_response_is_stored(sdk, fake_upstream):
    resp, _events = streamed(sdk, store=True)
    got = sdk.responses.retrieve(resp.id)
    assert got.output_text == "Hello world" and got.status == "completed"


def test_store_false_keeps_nothing(sdk, fake_upstream):
    resp = sdk.responses.create(model=MODEL, input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model=MODEL, input="again", previous_response_id=resp.id)


def test_unknown_response_id_is_404_in_openai_shape(sdk, server, fake_upstream):
    for method in ("GET", "DELETE"):
        status, headers, body = http(server, method, "/v1/responses/resp_doesnotexist")
        assert status == 404 and headers["content-type"].startswith("application/json")
        error = json.loads(body)["error"]
        assert "resp_doesnotexist" in error["message"]
        assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model=MODEL, input="hi", previous_response_id="resp_doesnotexist")
    assert fake_upstream.chat_requests() == []
