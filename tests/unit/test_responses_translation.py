"""Unit tests for the OpenAI Responses <-> chat completions translation (issue 13).

Test names say which rule they prove. Every stream produced here goes through
check_responses_events, the grammar checker the hypothesis property also uses.
"""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iflow2api
import iflow2api as R
from fakes import compact_text_chunk

try:
    import pydantic
    from openai.types.responses import Response as SDKResponse
    from openai.types.responses import ResponseStreamEvent as SDKStreamEvent
    SDK_EVENT = pydantic.TypeAdapter(SDKStreamEvent)
except ImportError:  # pragma: no cover (the test venv has the openai SDK)
    SDKResponse = SDK_EVENT = None


# -- helpers ---------------------------------------------------------------------------

def make_ctx(**kwargs):
    kwargs.setdefault("client_model", "glm-5")
    kwargs.setdefault("upstream_model", "glm-5")
    kwargs.setdefault("created_at", 1700000000)
    return R.ResponsesContext(**kwargs)


def translate(req, **ctx_kwargs):
    req = dict(req)
    req.setdefault("model", "glm-5")
    ctx = make_ctx(**ctx_kwargs)
    return R.responses_to_openai_request(req, ctx), ctx


def messages_for(items, **ctx_kwargs):
    return translate({"input": items}, **ctx_kwargs)[0]["messages"]


def user(content):
    return {"type": "message", "role": "user", "content": content}


def assistant(text):
    return {"type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def fcall(call_id, name, arguments="{}", **extra):
    return dict({"type": "function_call", "call_id": call_id, "name": name,
                 "arguments": arguments}, **extra)


def fout(call_id, output):
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def fn_tool(name, **extra):
    return dict({"type": "function", "name": name, "description": "d",
                 "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}},
                **extra)


def chunk(delta=None, finish=None, usage=None, choices=True):
    out = {"id": "chatcmpl-1", "object": "chat.completion.chunk"}
    out["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    if usage is not None:
        out["usage"] = usage
    return out


def tc(index, id_=None, name=None, args=None):
    entry = {"index": index}
    if id_ is not None:
        entry["id"] = id_
        entry["type"] = "function"
    function = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    if function:
        entry["function"] = function
    return entry


def run_stream(chunks, ctx=None, done=True, **ctx_kwargs):
    ctx = ctx or make_ctx(**ctx_kwargs)
    stream = R.ResponsesStream(ctx)
    events = []
    for c in chunks:
        events += stream.feed(c)
    events += stream.close(done)
    check_responses_events(events)
    return events, stream


def types(events):
    return [e["type"] for e in events]


def terminal(events):
    return events[-1]["response"]


def completion(message, finish="stop", usage=None):
    resp = {"id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "message": dict({"role": "assistant"}, **message),
                         "finish_reason": finish}]}
    if usage is not None:
        resp["usage"] = usage
    return resp


def respond(message, finish="stop", usage=None, req=None, **ctx_kwargs):
    ctx = make_ctx(**ctx_kwargs)
    if req is not None:
        R.responses_to_openai_request(dict(req, model="glm-5"), ctx)
    return R.openai_to_responses_response(completion(message, finish, usage), ctx)


_TERMINALS = ("response.completed", "response.incomplete", "response.failed")


def check_responses_events(events):
    """The grammar every Responses stream must obey (also run by the property test)."""
    if not events:
        return
    assert [e["sequence_number"] for e in events] == list(range(events[0]["sequence_number"],
                                                                events[0]["sequence_number"]
                                                                + len(events)))
    assert events[0]["sequence_number"] == 0
    assert types(events)[:2] == ["response.created", "response.in_progress"]
    assert sum(e["type"] in _TERMINALS for e in events) == 1
    assert events[-1]["type"] in _TERMINALS
    assert events[0]["response"]["status"] == "in_progress"
    done_items = []
    open_item, index = None, -1
    texts = {}
    for e in events[2:-1]:
        kind = e["type"]
        assert kind not in ("response.created", "response.in_progress")
        if kind == "response.output_item.added":
            assert open_item is None, "an item was added while another was open"
            index += 1
            assert e["output_index"] == index
            open_item = e["item"]
            texts = {"delta": "", "parts_added": 0, "parts_done": 0}
            continue
        assert open_item is not None, "%s outside an item" % kind
        assert e["output_index"] == index
        if kind == "response.output_item.done":
            item = e["item"]
            assert item["id"] == open_item["id"] and item["type"] == open_item["type"]
            assert texts["parts_added"] == texts["parts_done"] <= 1
            if item["type"] == "message":
                assert texts["parts_added"] == 1
                assert [p["text"] for p in item["content"]] == [texts["delta"]]
                assert item["status"] in ("completed", "incomplete")
            elif item["type"] == "reasoning":
                assert texts["parts_added"] == 1
                assert [p["text"] for p in item["summary"]] == [texts["delta"]]
            elif item["type"] == "function_call":
                assert item["arguments"] == texts["delta"] == texts.get("final")
                assert isinstance(json.loads(item["arguments"]), dict)
            elif item["type"] == "custom_tool_call":
                assert item["input"] == texts["delta"] == texts.get("final")
            done_items.append(item)
            open_item = None
            continue
        assert e["item_id"] == open_item["id"]
        if kind in ("response.content_part.added", "response.reasoning_summary_part.added"):
            assert texts["parts_added"] == 0 and e["part"]["text"] == ""
            texts["parts_added"] += 1
        elif kind in ("response.output_text.delta", "response.reasoning_summary_text.delta",
                      "response.function_call_arguments.delta",
                      "response.custom_tool_call_input.delta"):
            assert e["delta"] != ""
            assert "final" not in texts
            texts["delta"] += e["delta"]
        elif kind in ("response.output_text.done", "response.reasoning_summary_text.done"):
            assert e["text"] == texts["delta"]
            texts["final"] = e["text"]
        elif kind == "response.function_call_arguments.done":
            texts["final"] = e["arguments"]
        elif kind == "response.custom_tool_call_input.done":
            texts["final"] = e["input"]
        elif kind in ("response.content_part.done", "response.reasoning_summary_part.done"):
            assert e["part"]["text"] == texts["final"]
            texts["parts_done"] += 1
        else:
            raise AssertionError("unexpected event %s" % kind)
    assert open_item is None, "an item was added but never done"
    final = events[-1]
    response = final["response"]
    assert response["status"] == final["type"].split(".")[1]
    assert response["output"] == done_items
    if response["status"] != "failed":
        usage = response["usage"]
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
        assert response["output_text"] == "".join(
            p["text"] for item in done_items if item["type"] == "message" for p in item["content"])
    else:
        assert response["error"]["message"]
    if SDK_EVENT is not None:
        for e in events:
            if e["type"] == "response.failed":
                # The SDK's code list lacks the codes Codex acts on (server_is_overloaded...).
                e = dict(e, response=dict(e["response"], error=dict(e["response"]["error"],
                                                                    code="server_error")))
            SDK_EVENT.validate_python(e)


# -- Request: input ---------------------------------------------------------------------

def test_string_input_becomes_one_user_message():
    body, _ = translate({"input": "hello"})
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["model"] == "glm-5"


def test_instructions_become_the_leading_system_message():
    body, _ = translate({"input": "hi", "instructions": "Be brief."})
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}


def test_leading_developer_and_system_messages_join_instructions():
    items = [{"type": "message", "role": "developer",
              "content": [{"type": "input_text", "text": "sandbox: none"}]},
             {"role": "system", "content": "sys"}, user("go")]
    body, _ = translate({"input": items, "instructions": "base"})
    assert body["messages"] == [{"role": "system", "content": "base\n\nsandbox: none\n\nsys"},
                                {"role": "user", "content": "go"}]


def test_later_developer_message_becomes_user_text_in_place():
    items = [user("one"), assistant("ok"),
             {"type": "message", "role": "developer", "content": "now read-only"}, user("two")]
    assert messages_for(items) == [
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "now read-only\n\ntwo"}]


def test_message_without_type_is_a_message():
    assert messages_for([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]


def test_unknown_role_is_refused():
    with pytest.raises(iflow2api.TranslationError, match='input\\[0\\].role: Unexpected role "tool"'):
        messages_for([{"type": "message", "role": "tool", "content": "x"}])


@pytest.mark.parametrize("req, message", [
    ({}, "input: Field required"),
    ({"input": "  "}, "input: must not be empty"),
    ({"input": 5}, "input: Input should be a valid string or list"),
    ({"input": ["x"]}, "input\\[0\\]: Input should be an item object"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "no message to answer"),
    ({"input": [{"role": "user", "content": 3}]}, "input\\[0\\].content"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": True}, "max_output_tokens"),
    ({"input": "x", "tools": {}}, "tools: Input should be a valid list"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools\\[0\\].name: Field required"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format.schema"),
])
def test_invalid_requests_are_refused_with_the_field(req, message):
    with pytest.raises(iflow2api.TranslationError, match=message):
        translate(req)


def test_text_parts_join_into_one_string():
    content = [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "  "},
               {"type": "input_text", "text": "b"}]
    assert messages_for([user(content)]) == [{"role": "user", "content": "a\nb"}]


def test_input_image_url_and_data_url_become_image_url_parts():
    content = [{"type": "input_text", "text": "look"},
               {"type": "input_image", "image_url": "https://x/a.png", "detail": "high"},
               {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]
    assert messages_for([user(content)])[0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]


def test_input_image_file_id_is_refused_clearly():
    with pytest.raises(iflow2api.TranslationError) as err:
        messages_for([user([{"type": "input_image", "file_id": "file-1"}])])
    assert "input[0].content[0]" in err.value.message and "file_id" in err.value.message
    assert "image_url" in err.value.message


def test_image_for_a_text_only_model_becomes_a_note():
    content = [{"type": "input_image", "image_url": "https://x/a.png"}]
    assert messages_for([user(content)], model_info={"vision": False}) == [
        {"role": "user", "content": "[image omitted: this model does not accept images]"}]


def test_input_file_inline_pdf_only_where_supported():
    part = {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,QQ=="}
    assert messages_for([user([part])], profile={"supports_pdf": True})[0]["content"] == [
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,QQ=="}}]
    assert "a.pdf" in messages_for([user([part])])[0]["content"]
    with pytest.raises(iflow2api.TranslationError, match="file_id"):
        messages_for([user([{"type": "input_file", "file_id": "file-1"}])])


def test_assistant_output_text_becomes_assistant_content():
    assert messages_for([user("hi"), assistant("Hello"), user("again")]) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "again"}]


def test_function_call_and_output_become_tool_call_and_tool_message():
    items = [user("list"), assistant("Listing."), fcall("call_1", "exec_command", '{"cmd":"ls"}'),
             fout("call_1", "a.txt")]
    assert messages_for(items) == [
        {"role": "user", "content": "list"},
        {"role": "assistant", "content": "Listing.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "exec_command", "arguments": '{"cmd":"ls"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"}]


def test_parallel_calls_share_one_assistant_message():
    items = [user("x"), fcall("c1", "f"), fcall("c2", "g"), fout("c2", "two"), fout("c1", "one")]
    msgs = messages_for(items)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["c1", "c2"]
    assert msgs[1]["content"] is None


def test_sequential_calls_make_separate_assistant_messages():
    items = [user("x"), fcall("c1", "f"), fout("c1", "one"), fcall("c2", "f"), fout("c2", "two"),
             assistant("done")]
    assert [m["role"] for m in messages_for(items)] == ["user", "assistant", "tool", "assistant",
                                                        "tool", "assistant"]


def test_missing_output_gets_the_interrupted_stub():
    msgs = messages_for([user("x"), fcall("c1", "f"), user("stop")])
    assert msgs[2] == {"role": "tool", "tool_call_id": "c1",
                       "content": "(no result: the tool call was interrupted)"}
    assert msgs[3] == {"role": "user", "content": "stop"}


def test_orphan_and_repeated_outputs_become_user_text_after_the_tool_messages():
    items = [user("x"), fcall("c1", "f"), fout("zz", "lost"), fout("c1", "one"), fout("c1", "again")]
    msgs = messages_for(items)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "user"]
    assert msgs[2]["content"] == "one"
    assert msgs[3]["content"] == "Result of tool call zz:\nlost\nResult of tool call c1:\nagain"


def test_output_parts_text_stays_images_move_to_a_user_message():
    output = [{"type": "input_text", "text": "shot:"},
              {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]
    msgs = messages_for([user("x"), fcall("c1", "view"), fout("c1", output), user("and?")])
    assert msgs[2] == {"role": "tool", "tool_call_id": "c1", "content": "shot:"}
    assert msgs[3]["role"] == "user"
    assert msgs[3]["content"] == [
        {"type": "text", "text": "Image output of tool call c1:"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "and?"}]


def test_empty_output_becomes_no_output():
    assert messages_for([user("x"), fcall("c1", "f"), fout("c1", "")])[2]["content"] == "(no output)"


def test_custom_tool_call_and_output():
    items = [user("patch"),
             {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin"},
             {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done"}]
    msgs = messages_for(items)
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "apply_patch",
                                                    "arguments": '{"input": "*** Begin"}'}
    assert msgs[2] == {"role": "tool", "tool_call_id": "c1", "content": "Done"}


def test_local_shell_call_and_output():
    items = [user("ls"),
             {"type": "local_shell_call", "id": "lsh_1", "call_id": "c1", "status": "completed",
              "action": {"type": "exec", "command": ["ls", "-a"], "timeout_ms": 1000,
                         "working_directory": "/tmp", "env": {}, "user": None}},
             {"type": "local_shell_call_output", "id": "c1", "output": "a\nb"}]
    msgs = messages_for(items)
    function = msgs[1]["tool_calls"][0]["function"]
    assert function["name"] == "local_shell"
    assert json.loads(function["arguments"]) == {"command": ["ls", "-a"], "workdir": "/tmp",
                                                 "timeout_ms": 1000}
    assert msgs[2] == {"role": "tool", "tool_call_id": "c1", "content": "a\nb"}


def test_namespaced_call_in_history_uses_the_flat_name():
    msgs = messages_for([user("x"), fcall("c1", "read", namespace="mcp_fs"), fout("c1", "ok")])
    assert msgs[1]["tool_calls"][0]["function"]["name"] == "mcp_fs__read"


def test_reasoning_summary_is_replayed_only_for_replay_profiles():
    reasoning = {"type": "reasoning", "id": "rs_1",
                 "summary": [{"type": "summary_text", "text": "plan"}],
                 "encrypted_content": "SECRET-BLOB"}
    items = [user("x"), reasoning, fcall("c1", "f"), fout("c1", "ok"), assistant("done")]
    body, _ = translate({"input": items}, profile={"replay_reasoning": True})
    assert body["messages"][1]["reasoning_content"] == "plan"
    # the second assistant turn had no reasoning: the placeholder only goes on tool calls
    assert "reasoning_content" not in body["messages"][3]
    assert "SECRET-BLOB" not in json.dumps(body)
    plain, _ = translate({"input": items})
    assert "reasoning_content" not in json.dumps(plain) and "SECRET-BLOB" not in json.dumps(plain)


def test_replay_profile_gets_a_placeholder_on_tool_calls_without_reasoning():
    body, _ = translate({"input": [user("x"), fcall("c1", "f"), fout("c1", "ok")]},
                        profile={"replay_reasoning": True})
    assert body["messages"][1]["reasoning_content"] == "(reasoning omitted)"


def test_reasoning_of_an_unfinished_turn_is_not_replayed_on_the_next():
    reasoning = {"type": "reasoning", "summary": [{"type": "summary_text", "text": "old"}]}
    msgs = messages_for([user("x"), reasoning, user("y"), assistant("z")],
                        profile={"replay_reasoning": True})
    assert "reasoning_content" not in msgs[-1]


def test_history_call_ids_are_remembered():
    _, ctx = translate({"input": [user("x"), fcall("call_0", "f"), fout("call_0", "ok")]})
    assert "call_0" in ctx.history_tool_ids


def test_server_side_items_are_dropped_and_noted():
    items = [user("x"), {"type": "web_search_call", "id": "ws_1", "status": "completed"},
             {"type": "item_reference", "id": "msg_1"}]
    body, ctx = translate({"input": items})
    assert body["messages"] == [{"role": "user", "content": "x"}]
    assert any("web_search_call" in n for n in ctx.notes)
    assert any("item_reference" in n for n in ctx.notes)


def test_a_stored_response_output_is_valid_input():
    """What the HTTP layer prepends for previous_response_id: earlier input + output."""
    earlier = respond({"reasoning_content": "hmm", "content": "Let me look.",
                       "tool_calls": [{"id": "call_9", "type": "function",
                                       "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                      finish="tool_calls")
    items = [user("x")] + earlier["output"] + [fout("call_9", "42")]
    msgs = messages_for(items, profile={"replay_reasoning": True})
    assert msgs[1] == {"role": "assistant", "content": "Let me look.", "reasoning_content": "hmm",
                       "tool_calls": [{"id": "call_9", "type": "function",
                                       "function": {"name": "f", "arguments": "{\"a\":1}"}}]}
    assert msgs[2] == {"role": "tool", "tool_call_id": "call_9", "content": "42"}


# -- Request: tools -----------------------------------------------------------------------

def test_function_tool_becomes_chat_function_without_strict_by_default():
    tool = fn_tool("f", strict=True)
    tool["parameters"]["$schema"] = "http://json-schema.org/draft-07/schema#"
    body, ctx = translate({"input": "x", "tools": [tool]})
    assert body["tools"] == [{"type": "function", "function": {
        "name": "f", "description": "d",
        "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}]
    assert ctx.tool_specs["f"] == R.ResponsesTool("function", "f", None)


def test_strict_is_kept_where_the_profile_accepts_it():
    tool = fn_tool("f", strict=True)
    tool["parameters"]["additionalProperties"] = False
    body, _ = translate({"input": "x", "tools": [tool]},
                        profile={"accepts_strict_tools": True, "strict_schema": True})
    function = body["tools"][0]["function"]
    assert function["strict"] is True
    assert function["parameters"]["additionalProperties"] is False


def test_function_without_parameters_gets_an_empty_object_schema():
    body, _ = translate({"input": "x", "tools": [{"type": "function", "name": "now"}]})
    assert body["tools"][0]["function"]["parameters"] == {"type": "object", "properties": {}}


def test_namespace_tools_are_flattened_and_map_back():
    ns = {"type": "namespace", "name": "mcp_fs", "description": "Files.",
          "tools": [fn_tool("read"), {"type": "custom", "name": "write"}]}
    body, ctx = translate({"input": "x", "tools": [ns]})
    names = [t["function"]["name"] for t in body["tools"]]
    assert names == ["mcp_fs__read", "mcp_fs__write"]
    assert body["tools"][0]["function"]["description"] == "d\n\n(mcp_fs: Files.)"
    assert R.responses_tool_for("mcp_fs__read", ctx) == R.ResponsesTool("function", "read", "mcp_fs")
    assert R.responses_tool_for("mcp_fs__write", ctx) == R.ResponsesTool("custom", "write", "mcp_fs")
    # an undeclared function in a declared namespace still splits at the separator
    assert R.responses_tool_for("mcp_fs__stat", ctx) == R.ResponsesTool("function", "stat", "mcp_fs")
    assert R.responses_tool_for("functions.mcp_fs__read:0", ctx).name == "read"
    assert R.responses_tool_for("other__x", ctx) == R.ResponsesTool("function", "other__x", None)


def test_undeclared_name_splits_at_the_longest_declared_namespace():
    tools = [{"type": "namespace", "name": "a", "tools": [fn_tool("f")]},
             {"type": "namespace", "name": "a__b", "tools": [fn_tool("g")]}]
    _, ctx = translate({"input": "x", "tools": tools})
    assert R.responses_tool_for("a__b__c", ctx) == R.ResponsesTool("function", "c", "a__b")
    assert R.responses_tool_for("a__z", ctx) == R.ResponsesTool("function", "z", "a")


def test_namespace_mapping_is_reversible_for_long_and_double_underscore_names():
    long_ns = "n" * 40
    tools = [{"type": "namespace", "name": long_ns, "tools": [fn_tool("f" * 40)]},
             {"type": "namespace", "name": "a__b", "tools": [fn_tool("c__d")]}]
    body, ctx = translate({"input": "x", "tools": tools})
    flat = [t["function"]["name"] for t in body["tools"]]
    assert all(len(name) <= 64 for name in flat)
    assert R.responses_tool_for(flat[0], ctx) == R.ResponsesTool("function", "f" * 40, long_ns)
    assert R.responses_tool_for(flat[1], ctx) == R.ResponsesTool("function", "c__d", "a__b")
    assert R.namespaced_tool_name(long_ns, "f" * 40) == flat[0]


def test_custom_tool_becomes_a_function_with_one_string_input():
    tool = {"type": "custom", "name": "apply_patch", "description": "Patch files.",
            "format": {"type": "grammar", "syntax": "lark", "definition": "start: BEGIN"}}
    body, ctx = translate({"input": "x", "tools": [tool]})
    function = body["tools"][0]["function"]
    assert function["parameters"] == {"type": "object", "properties": {
        "input": {"type": "string", "description": "The raw input for the tool."}},
        "required": ["input"]}
    assert function["description"].startswith("Patch files.")
    assert "lark grammar:\nstart: BEGIN" in function["description"]
    assert ctx.tool_specs["apply_patch"].kind == "custom"


@pytest.mark.parametrize("kind", ["web_search", "web_search_preview", "file_search",
                                  "computer_use_preview", "image_generation", "code_interpreter",
                                  "mcp", "tool_search"])
def test_built_in_tools_are_dropped_and_noted(kind):
    body, ctx = translate({"input": "x", "tools": [{"type": kind}, fn_tool("f")]})
    assert [t["function"]["name"] for t in body["tools"]] == ["f"]
    assert any(repr(kind) in note for note in ctx.notes)


def test_local_shell_tool_becomes_a_function():
    body, ctx = translate({"input": "x", "tools": [{"type": "local_shell"}]})
    assert body["tools"][0]["function"]["name"] == "local_shell"
    assert ctx.tool_specs["local_shell"].kind == "local_shell"


def test_no_tools_left_means_no_tool_fields():
    body, _ = translate({"input": "x", "tools": [{"type": "web_search"}], "tool_choice": "required",
                         "parallel_tool_calls": False})
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(body)


@pytest.mark.parametrize("choice, profile, expected", [
    ("auto", {}, "auto"),
    ("none", {}, "none"),
    ("required", {}, "required"),
    ("required", {"tool_choice_any": "auto"}, "auto"),
    ({"type": "function", "name": "f"}, {}, {"type": "function", "function": {"name": "f"}}),
    ({"type": "function", "name": "gone"}, {}, "auto"),
    ({"type": "function", "name": "read"}, {}, {"type": "function", "function": {"name": "ns__read"}}),
    ({"type": "function", "name": "read", "namespace": "ns"}, {},
     {"type": "function", "function": {"name": "ns__read"}}),
    ({"type": "custom", "name": "apply_patch"}, {},
     {"type": "function", "function": {"name": "apply_patch"}}),
    ({"type": "allowed_tools", "mode": "required", "tools": []}, {}, "required"),
    ({"type": "allowed_tools", "mode": "auto", "tools": []}, {}, "auto"),
    ({"type": "web_search_preview"}, {}, "auto"),
    (None, {}, None),
])
def test_tool_choice(choice, profile, expected):
    tools = [fn_tool("f"), {"type": "custom", "name": "apply_patch"},
             {"type": "namespace", "name": "ns", "tools": [fn_tool("read")]}]
    req = {"input": "x", "tools": tools}
    if choice is not None:
        req["tool_choice"] = choice
    body, _ = translate(req, profile=profile)
    assert body.get("tool_choice") == expected


def test_tool_choice_dropped_while_thinking_where_the_profile_says_so():
    body, _ = translate({"input": "x", "tools": [fn_tool("f")], "tool_choice": "required",
                         "reasoning": {"effort": "high"}},
                        profile={"drop_tool_choice_when_thinking": True})
    assert "tool_choice" not in body


def test_parallel_tool_calls_false_is_sent_true_is_default():
    body, _ = translate({"input": "x", "tools": [fn_tool("f")], "parallel_tool_calls": False})
    assert body["parallel_tool_calls"] is False
    body, _ = translate({"input": "x", "tools": [fn_tool("f")], "parallel_tool_calls": True})
    assert "parallel_tool_calls" not in body
    body, _ = translate({"input": "x", "tools": [fn_tool("f")], "parallel_tool_calls": False},
                        profile={"parallel_tool_calls": False})
    assert "parallel_tool_calls" not in body


# -- Request: parameters ------------------------------------------------------------------

def test_max_output_tokens_becomes_max_tokens_and_is_clamped():
    body, _ = translate({"input": "x", "max_output_tokens": 500})
    assert body["max_tokens"] == 500
    body, _ = translate({"input": "x", "max_output_tokens": 64000},
                        model_info={"max_output_tokens": 8192})
    assert body["max_tokens"] == 8192
    body, _ = translate({"input": "x", "max_output_tokens": 500},
                        profile={"max_tokens_field": "max_completion_tokens"})
    assert body["max_completion_tokens"] == 500 and "max_tokens" not in body
    body, _ = translate({"input": "x"})
    assert "max_tokens" not in body


def test_sampling_is_copied_unless_the_profile_drops_it():
    body, _ = translate({"input": "x", "temperature": 0.2, "top_p": 0.9})
    assert (body["temperature"], body["top_p"]) == (0.2, 0.9)
    body, _ = translate({"input": "x", "temperature": 0.2}, profile={"drop_sampling_params": True})
    assert "temperature" not in body


@pytest.mark.parametrize("effort, profile, expected", [
    ("minimal", {}, {"reasoning_effort": "low"}),
    ("low", {}, {"reasoning_effort": "low"}),
    ("medium", {}, {"reasoning_effort": "medium"}),
    ("high", {}, {"reasoning_effort": "high"}),
    ("xhigh", {}, {"reasoning_effort": "high"}),
    ("none", {}, {}),
    (None, {}, {}),
    ("high", {"thinking_style": "thinking_type"}, {"thinking": {"type": "enabled"}}),
    ("none", {"thinking_style": "thinking_type"}, {"thinking": {"type": "disabled"}}),
    ("low", {"thinking_style": "chat_template_kwargs"},
     {"chat_template_kwargs": {"enable_thinking": True}}),
    ("none", {"thinking_style": "enable_thinking"}, {"enable_thinking": False}),
    ("high", {"thinking_style": "provider"}, {}),
])
def test_reasoning_effort_uses_the_anthropic_route_quirks(effort, profile, expected):
    reasoning = {"summary": "auto"}
    if effort is not None:
        reasoning["effort"] = effort
    body, ctx = translate({"input": "x", "reasoning": reasoning}, profile=profile)
    thinking_keys = ("reasoning_effort", "thinking", "chat_template_kwargs", "enable_thinking")
    assert {k: body[k] for k in thinking_keys if k in body} == expected
    assert ctx.thinking_requested is (effort not in (None, "none"))


def test_text_format_becomes_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body, _ = translate({"input": "x", "text": {"format": {
        "type": "json_schema", "name": "out", "schema": schema, "strict": True}}})
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "out", "schema": schema, "strict": True}}
    body, _ = translate({"input": "x", "text": {"format": {"type": "json_object"}}})
    assert body["response_format"] == {"type": "json_object"}
    body, _ = translate({"input": "x", "text": {"format": {"type": "text"}, "verbosity": "low"}})
    assert "response_format" not in body


def test_fields_the_upstream_does_not_know_are_dropped_and_noted():
    req = {"input": "x", "metadata": {"a": "b"}, "user": "u1", "prompt_cache_key": "k",
           "store": False, "include": ["reasoning.encrypted_content"], "service_tier": "auto",
           "truncation": "auto", "previous_response_id": "resp_1", "safety_identifier": "s",
           "background": False}
    body, ctx = translate(req)
    assert set(body) == {"model", "messages"}
    note = [n for n in ctx.notes if n.startswith("ignored request fields")][0]
    for key in ("metadata", "user", "prompt_cache_key", "include", "service_tier", "truncation"):
        assert key in note
    assert "store" not in note and "previous_response_id" not in note


def test_stream_asks_for_usage():
    body, _ = translate({"input": "x", "stream": True})
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    body, _ = translate({"input": "x", "stream": True}, profile={"stream_usage": False})
    assert "stream_options" not in body


def test_codex_request_translates():
    """The shape testing.md records for Codex CLI requests."""
    req = {"model": "glm-5", "instructions": None, "stream": True, "store": False,
           "include": ["reasoning.encrypted_content"], "prompt_cache_key": "abc",
           "reasoning": {"summary": "auto"}, "tool_choice": "auto", "parallel_tool_calls": False,
           "input": [
               {"type": "message", "role": "developer",
                "content": [{"type": "input_text", "text": "<permissions instructions>"}]},
               {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "<environment_context/>"}]},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "say hi"}]}],
           "tools": [
               {"type": "function", "name": "exec_command", "description": "Run", "strict": False,
                "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}},
                               "required": ["cmd"], "additionalProperties": False}},
               {"type": "namespace", "name": "mcp__docs", "description": "",
                "tools": [{"type": "function", "name": "search", "parameters": {"type": "object"}}]},
               {"type": "web_search", "external_web_access": False}]}
    body, ctx = translate(req)
    assert body["messages"] == [
        {"role": "system", "content": "<permissions instructions>"},
        {"role": "user", "content": "<environment_context/>\n\nsay hi"}]
    assert [t["function"]["name"] for t in body["tools"]] == ["exec_command", "mcp__docs__search"]
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False
    assert R.responses_tool_for("mcp__docs__search", ctx) == R.ResponsesTool(
        "function", "search", "mcp__docs")
    assert not {"store", "include", "prompt_cache_key", "reasoning"} & set(body)
    assert ctx.echo["store"] is False and ctx.echo["parallel_tool_calls"] is False


# -- Response (non-streaming) --------------------------------------------------------------

def test_text_answer_response_object():
    usage = {"prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050,
             "prompt_tokens_details": {"cached_tokens": 800},
             "completion_tokens_details": {"reasoning_tokens": 20}}
    resp = respond({"content": "Hi"}, usage=usage,
                   req={"input": "x", "instructions": "be", "temperature": 0.5, "metadata": {"k": "v"},
                        "max_output_tokens": 100, "tools": [fn_tool("f")], "tool_choice": "auto"})
    assert resp["id"].startswith("resp_") and resp["object"] == "response"
    assert resp["created_at"] == 1700000000 and resp["model"] == "glm-5"
    assert resp["status"] == "completed" and resp["error"] is None
    assert resp["incomplete_details"] is None
    assert resp["output"] == [{"id": resp["output"][0]["id"], "type": "message", "status": "completed",
                               "role": "assistant",
                               "content": [{"type": "output_text", "text": "Hi", "annotations": []}]}]
    assert resp["output_text"] == "Hi"
    assert resp["usage"] == {"input_tokens": 1000,
                             "input_tokens_details": {"cached_tokens": 800, "cache_write_tokens": 0},
                             "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 20},
                             "total_tokens": 1050}
    assert (resp["instructions"], resp["temperature"], resp["metadata"]) == ("be", 0.5, {"k": "v"})
    assert (resp["max_output_tokens"], resp["tool_choice"], resp["top_p"]) == (100, "auto", 1.0)
    assert resp["tools"] == [fn_tool("f")] and resp["parallel_tool_calls"] is True
    assert resp["previous_response_id"] is None and resp["text"] == {"format": {"type": "text"}}
    if SDKResponse is not None:
        SDKResponse.model_validate(resp)


def test_output_items_in_order_reasoning_message_calls():
    resp = respond({"reasoning_content": "hmm", "content": "Running.",
                    "tool_calls": [{"id": "call_a", "type": "function",
                                    "function": {"name": "f", "arguments": "{\"a\":1}"}},
                                   {"id": "call_b", "type": "function",
                                    "function": {"name": "g", "arguments": "{}"}}]},
                   finish="tool_calls")
    assert [i["type"] for i in resp["output"]] == ["reasoning", "message", "function_call",
                                                   "function_call"]
    assert resp["output"][0]["summary"] == [{"type": "summary_text", "text": "hmm"}]
    call = resp["output"][2]
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == (
        "call_a", "f", "{\"a\":1}", "completed")
    assert call["id"].startswith("fc_") and "namespace" not in call
    assert resp["output_text"] == "Running."
    if SDKResponse is not None:
        SDKResponse.model_validate(resp)


def test_namespace_custom_and_local_shell_calls_map_back():
    req = {"input": "x", "tools": [
        {"type": "namespace", "name": "mcp_fs", "description": "Files.", "tools": [fn_tool("read")]},
        {"type": "custom", "name": "apply_patch"}, {"type": "local_shell"}]}
    calls = [{"id": "c1", "type": "function", "function": {"name": "mcp_fs__read", "arguments": "{\"a\":\"p\"}"}},
             {"id": "c2", "type": "function", "function": {"name": "apply_patch",
                                                           "arguments": "{\"input\":\"*** Begin\"}"}},
             {"id": "c3", "type": "function", "function": {"name": "local_shell",
                                                           "arguments": "{\"command\":[\"ls\"],\"workdir\":\"/w\"}"}}]
    resp = respond({"content": None, "tool_calls": calls}, finish="tool_calls", req=req)
    read, patch, shell = resp["output"]
    assert (read["type"], read["name"], read["namespace"]) == ("function_call", "read", "mcp_fs")
    assert patch == {"id": patch["id"], "type": "custom_tool_call", "call_id": "c2",
                     "name": "apply_patch", "input": "*** Begin"}
    assert shell["type"] == "local_shell_call" and shell["call_id"] == "c3"
    assert shell["action"] == {"type": "exec", "command": ["ls"], "timeout_ms": None,
                               "working_directory": "/w", "env": {}, "user": None}
    if SDKResponse is not None:
        SDKResponse.model_validate(resp)


@pytest.mark.parametrize("arguments, expected", [
    ('{"input":"text"}', "text"), ('{"patch":"text"}', "text"), ("raw text", "raw text"),
    ('{"input":{"a":1}}', '{"a": 1}'), ("{}", ""), ('"quoted"', "quoted"),
    ('{"input":"trunc', "trunc"),
])
def test_custom_tool_input_extraction(arguments, expected):
    req = {"input": "x", "tools": [{"type": "custom", "name": "t"}]}
    calls = [{"id": "c1", "type": "function", "function": {"name": "t", "arguments": arguments}}]
    resp = respond({"tool_calls": calls}, finish="tool_calls", req=req)
    assert resp["output"][0]["input"] == expected


def test_length_finish_is_incomplete_max_output_tokens():
    resp = respond({"content": "Partial"}, finish="length")
    assert resp["status"] == "incomplete"
    assert resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["output"][0]["status"] == "incomplete"
    assert respond({"content": "x"}, finish="content_filter")["incomplete_details"] == {
        "reason": "content_filter"}


def test_think_tags_become_reasoning():
    resp = respond({"content": "<think>plan</think>\n\nAnswer"})
    assert [i["type"] for i in resp["output"]] == ["reasoning", "message"]
    assert resp["output"][0]["summary"][0]["text"] == "plan"
    assert resp["output_text"] == "Answer"


def test_reasoning_only_answer_falls_back_to_a_message():
    resp = respond({"content": None, "reasoning_content": "The answer is 4."})
    assert [i["type"] for i in resp["output"]] == ["reasoning", "message"]
    assert resp["output_text"] == "The answer is 4."


def test_reasoning_field_of_other_providers_is_read():
    resp = respond({"reasoning": "thinking", "content": "ok"})
    assert resp["output"][0]["summary"][0]["text"] == "thinking"


def test_error_bodies_and_missing_choices_raise():
    with pytest.raises(iflow2api.UpstreamError):
        R.openai_to_responses_response({"error": {"message": "bad", "code": "500"}}, make_ctx())
    with pytest.raises(iflow2api.UpstreamError, match="no choices"):
        R.openai_to_responses_response({"choices": []}, make_ctx())
    with pytest.raises(iflow2api.UpstreamError):
        R.openai_to_responses_response({"status": "434", "msg": "Invalid apiKey"}, make_ctx())


def test_usage_is_estimated_when_the_upstream_sends_none():
    resp = respond({"content": "hello world"})
    assert resp["usage"]["output_tokens"] > 0
    assert resp["usage"]["total_tokens"] == resp["usage"]["input_tokens"] + resp["usage"]["output_tokens"]


def test_call_ids_are_fresh_when_repeated_or_already_in_the_history():
    ctx = make_ctx()
    R.responses_to_openai_request({"model": "m", "input": [user("x"), fcall("call_0", "f"),
                                                           fout("call_0", "ok")]}, ctx)
    calls = [{"id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    resp = R.openai_to_responses_response(completion({"tool_calls": calls}, "tool_calls"), ctx)
    ids = [item["call_id"] for item in resp["output"]]
    assert ids[1] == "call_1"
    assert ids[0] != "call_0" and ids[2] != "call_1" and len(set(ids)) == 3


# -- Streaming ---------------------------------------------------------------------------------

def test_text_stream_event_sequence():
    events, stream = run_stream([
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
        chunk({"content": "lo"}), chunk(finish="stop"),
        chunk(choices=False, usage={"prompt_tokens": 10, "completion_tokens": 2})])
    assert types(events) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hel", "lo"]
    assert terminal(events)["usage"]["input_tokens"] == 10
    assert terminal(events)["output_text"] == "Hello"
    assert stream.state.done and stream.state.status == "completed"
    assert stream.usage_for_log() == (10, 2)


def test_reasoning_streams_as_a_summary_before_the_message():
    events, _ = run_stream([chunk({"reasoning_content": "Let me"}), chunk({"reasoning_content": " think"}),
                            chunk({"content": "\n\n"}), chunk({"content": "Answer"}), chunk(finish="stop")])
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["reasoning", "message"]
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta"]
    assert deltas == ["Let me", " think"]
    assert terminal(events)["output"][1]["content"][0]["text"] == "\n\nAnswer"


def test_interleaved_parallel_tool_calls_are_emitted_whole_in_index_order():
    events, _ = run_stream([
        chunk({"tool_calls": [tc(0, "call_a", "f", "")]}), chunk({"tool_calls": [tc(1, "call_b", "g", "")]}),
        chunk({"tool_calls": [tc(0, args='{"a"')]}), chunk({"tool_calls": [tc(1, args='{"b":2}')]}),
        chunk({"tool_calls": [tc(0, args=":1}")]}), chunk(finish="tool_calls")])
    items = terminal(events)["output"]
    assert [(i["call_id"], i["name"], i["arguments"]) for i in items] == [
        ("call_a", "f", '{"a":1}'), ("call_b", "g", '{"b":2}')]
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == ['{"a":1}', '{"b":2}']


def test_tool_call_with_late_id_and_name():
    events, _ = run_stream([chunk({"tool_calls": [{"index": 0, "id": "call_x"}]}),
                            chunk({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}),
                            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
                            chunk(finish="tool_calls")])
    assert [(i["call_id"], i["name"]) for i in terminal(events)["output"]] == [("call_x", "f")]


def test_tool_call_without_a_name_is_dropped_and_noted():
    ctx = make_ctx()
    events, _ = run_stream([chunk({"tool_calls": [tc(0, "c", None, "{}")]}), chunk(finish="tool_calls")],
                           ctx=ctx)
    assert terminal(events)["output"] == []
    assert any("without a name" in n for n in ctx.warnings)


def test_custom_tool_streams_input_events():
    ctx = make_ctx()
    R.responses_to_openai_request({"model": "m", "input": "x",
                                   "tools": [{"type": "custom", "name": "apply_patch"}]}, ctx)
    events, _ = run_stream([chunk({"tool_calls": [tc(0, "c1", "apply_patch", '{"input":"*** Begin"}')]}),
                            chunk(finish="tool_calls")], ctx=ctx)
    assert "response.custom_tool_call_input.delta" in types(events)
    done = [e for e in events if e["type"] == "response.custom_tool_call_input.done"][0]
    assert done["input"] == "*** Begin"


def test_usage_in_the_finish_chunk_and_empty_choices_chunks():
    usage = {"prompt_tokens": 7, "completion_tokens": 3}
    events, _ = run_stream([chunk(choices=False), chunk({"content": "x"}, finish="stop", usage=usage)])
    assert terminal(events)["usage"]["output_tokens"] == 3


def test_done_only_stream_completes_empty():
    events, _ = run_stream([])
    assert types(events) == ["response.created", "response.in_progress", "response.completed"]
    assert terminal(events)["output"] == []


def test_eof_without_finish_fails_instead_of_ending_silently():
    events, stream = run_stream([chunk({"content": "partial"})], done=False)
    assert events[-1]["type"] == "response.failed"
    assert terminal(events)["error"] == {"code": "server_error",
                                         "message": "upstream stream ended unexpectedly"}
    assert terminal(events)["output"][0]["status"] == "incomplete"
    assert stream.state.failed


def test_eof_after_finish_is_a_normal_end():
    events, _ = run_stream([chunk({"content": "ok"}, finish="stop")], done=False)
    assert events[-1]["type"] == "response.completed"


def test_eof_before_any_data_raises_for_an_http_error():
    with pytest.raises(iflow2api.UpstreamError):
        R.ResponsesStream(make_ctx()).close(done=False)


def test_error_chunk_before_start_raises_after_start_fails():
    with pytest.raises(iflow2api.UpstreamError):
        R.ResponsesStream(make_ctx()).feed({"error": {"message": "overloaded", "code": "503"}})
    stream = R.ResponsesStream(make_ctx())
    events = stream.feed(chunk({"content": "Hi"}))
    events += stream.feed({"error": {"message": "server overloaded", "code": "503"}})
    check_responses_events(events)
    assert events[-1]["type"] == "response.failed"
    assert "server overloaded" in terminal(events)["error"]["message"]
    assert stream.feed(chunk({"content": "more"})) == [] and stream.close(True) == []


@pytest.mark.parametrize("status, body, code", [
    (400, {"error": {"code": "context_length_exceeded", "message": "This model's maximum context "
                     "length is 131072 tokens. However, your messages resulted in 140000 tokens."}},
     "context_length_exceeded"),
    (429, {"error": {"message": "rate limit reached"}}, "rate_limit_exceeded"),
    (503, {"error": {"message": "server overloaded"}}, "server_is_overloaded"),
    (402, {"error": {"message": "insufficient balance"}}, "insufficient_quota"),
    (400, {"error": {"message": "bad request"}}, "invalid_prompt"),
    (500, {"error": {"message": "boom"}}, "server_error"),
])
def test_failed_codes_are_the_ones_codex_acts_on(status, body, code):
    assert R.responses_error_code(iflow2api.upstream_error(status, body)) == code


def test_fail_reports_the_given_code_and_nothing_follows():
    stream = R.ResponsesStream(make_ctx())
    events = stream.feed(chunk({"reasoning_content": "hm"}))
    events += stream.fail("context too long", "context_length_exceeded")
    assert terminal(events)["error"] == {"code": "context_length_exceeded", "message": "context too long"}
    assert stream.fail("again", "x") == [] and stream.close(True) == []
    assert R.ResponsesStream(make_ctx()).fail("before start", "x") == []


def test_close_arguments_override_usage_and_finish():
    stream = R.ResponsesStream(make_ctx())
    events = stream.feed(chunk({"content": "abc"}))
    events += stream.close(True, usage={"prompt_tokens": 4, "completion_tokens": 1},
                           finish_reason="length")
    check_responses_events(events)
    assert events[-1]["type"] == "response.incomplete"
    assert terminal(events)["usage"]["input_tokens"] == 4


def test_start_is_idempotent_and_feeding_after_done_is_ignored():
    stream = R.ResponsesStream(make_ctx())
    assert types(stream.start()) == ["response.created", "response.in_progress"]
    assert stream.start() == []
    events = stream.close(True)
    assert types(events) == ["response.completed"] and events[0]["sequence_number"] == 2
    assert stream.feed(chunk({"content": "late"})) == []


def test_a_long_answer_streams_in_linear_time_and_joins_exactly():
    pieces = ["piece %d " % i for i in range(20000)]
    events, _ = run_stream([chunk({"content": p}) for p in pieces] + [chunk(finish="stop")])
    assert terminal(events)["output_text"] == "".join(pieces)


def test_split_think_tags_in_a_stream():
    events, _ = run_stream([chunk({"content": "<thi"}), chunk({"content": "nk>abc</th"}),
                            chunk({"content": "ink>\n\ndone"}), chunk(finish="stop")])
    output = terminal(events)["output"]
    assert output[0]["summary"][0]["text"] == "abc" and output[1]["content"][0]["text"] == "done"


def test_streaming_and_non_streaming_give_the_same_output():
    message = {"reasoning_content": "r", "content": "text",
               "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    whole = R.openai_to_responses_response(completion(message, "tool_calls"), make_ctx())
    events, _ = run_stream([chunk({"reasoning_content": "r"}), chunk({"content": "te"}),
                            chunk({"content": "xt"}),
                            chunk({"tool_calls": [tc(0, "c1", "f", "{}")]}), chunk(finish="tool_calls")])
    assert terminal(events)["output"] == whole["output"]


def test_snapshots_echo_the_request():
    ctx = make_ctx()
    R.responses_to_openai_request({"model": "m", "input": "x", "instructions": "sys",
                                   "reasoning": {"effort": "low", "summary": "auto"}}, ctx)
    events, _ = run_stream([chunk({"content": "ok"}, finish="stop")], ctx=ctx)
    for e in (events[0], events[1], events[-1]):
        assert e["response"]["instructions"] == "sys"
        assert e["response"]["reasoning"] == {"effort": "low", "summary": "auto"}
        assert e["response"]["id"] == events[0]["response"]["id"]


# -- SSE encoding ------------------------------------------------------------------------------

def _generic_encoding(event):
    return ("event: %s\ndata: %s\n\n" % (event["type"], json.dumps(
        event, ensure_ascii=False, separators=(",", ":")))).encode("utf-8")


def test_encode_responses_event_format():
    event = {"type": "response.completed", "sequence_number": 3, "response": {"id": "r"}}
    assert R.encode_responses_event(event) == (
        b'event: response.completed\ndata: {"type":"response.completed","sequence_number":3,'
        b'"response":{"id":"r"}}\n\n')


@given(text=st.text(min_size=1))
def test_fast_delta_encoding_equals_the_generic_one(text):
    ctx = make_ctx()
    stream = R.ResponsesStream(ctx)
    events = stream.feed(chunk({"reasoning_content": "x" + text})) + stream.feed(chunk({"content": "y" + text}))
    deltas = [e for e in events if e["type"].endswith("_text.delta")]
    assert len(deltas) == 2
    for e in deltas:
        assert R.encode_responses_event(e) == _generic_encoding(e)


# -- Property: any valid upstream stream gives a well-formed event sequence ------------------------

small_text = st.text(alphabet=st.sampled_from(list("ab \n<>/thinké中{}\":,")), max_size=8)
think_text = st.sampled_from(["<think>", "</think>", "<thi", "nk>", "\n\n", " "]) | small_text


@st.composite
def upstream_scripts(draw):
    steps = draw(st.lists(st.one_of(
        st.tuples(st.just("content"), think_text),
        st.tuples(st.just("reasoning_content"), small_text),
        st.tuples(st.just("reasoning"), small_text),
        st.tuples(st.just("tool"), st.integers(0, 2), st.sampled_from(["head", "args"]),
                  st.sampled_from(['{"a"', ':1}', '{"b":2}', '', '"x"', '{}', 'junk'])),
        st.tuples(st.just("usage"), st.integers(0, 50), st.integers(0, 50)),
        st.tuples(st.just("empty")),
        st.tuples(st.just("role")),
        st.tuples(st.just("error")),
    ), max_size=25))
    finish = draw(st.sampled_from([None, "stop", "length", "tool_calls", "content_filter"]))
    done = draw(st.booleans())
    return steps, finish, done


def script_chunks(steps):
    chunks = []
    for step in steps:
        kind = step[0]
        if kind in ("content", "reasoning_content", "reasoning"):
            chunks.append(chunk({kind: step[1]}))
        elif kind == "tool":
            _, index, part, text = step
            if part == "head":
                chunks.append(chunk({"tool_calls": [tc(index, "call_%d" % index, "tool%d" % index, text)]}))
            else:
                chunks.append(chunk({"tool_calls": [tc(index, args=text)]}))
        elif kind == "usage":
            chunks.append(chunk(choices=False, usage={"prompt_tokens": step[1], "completion_tokens": step[2]}))
        elif kind == "empty":
            chunks.append(chunk(choices=False))
        elif kind == "role":
            chunks.append(chunk({"role": "assistant", "content": ""}))
        else:
            chunks.append({"error": {"message": "boom", "code": "500"}})
    return chunks


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=upstream_scripts())
def test_any_upstream_stream_gives_a_well_formed_event_sequence(script):
    steps, finish, done = script
    chunks = script_chunks(steps)
    if finish:
        chunks.append(chunk(finish=finish))
    stream = R.ResponsesStream(make_ctx())
    events = []
    try:
        for c in chunks:
            events += stream.feed(c)
        events += stream.close(done)
    except iflow2api.UpstreamError:
        # Only before the start: the HTTP layer answers with a status instead.
        assert events == [] and not stream.state.started
        return
    check_responses_events(events)
    status = events[-1]["type"]
    errored = any(s[0] == "error" for s in steps)
    if not errored:
        if finish is None and not done:
            assert status == "response.failed"
        elif finish in ("length", "content_filter"):
            assert status == "response.incomplete"
        else:
            assert status == "response.completed"
    # every tool index that got a name became exactly one call, arguments a JSON object
    named = {s[1] for s in steps if s[0] == "tool" and s[2] == "head"}
    if status != "response.failed":
        calls = [i for i in terminal(events)["output"] if i["type"] == "function_call"]
        assert sorted(c["name"] for c in calls) == sorted("tool%d" % i for i in named)


def test_the_anthropic_route_glue_drives_a_responses_stream_too():
    """_feed_items / _until_started only need feed(), close(done), start() and state."""
    stream = R.ResponsesStream(make_ctx())
    items = [chunk({"content": "hi"}), chunk(finish="stop"), iflow2api.ChunkReader.DONE]
    events = iflow2api._feed_items(stream, items)
    check_responses_events(events)
    assert stream.state.done and events[-1]["type"] == "response.completed"
    eof = R.ResponsesStream(make_ctx())
    events = iflow2api._feed_items(eof, [chunk({"content": "hi"}), iflow2api.ChunkReader.EOF])
    assert events[-1]["type"] == "response.failed"


# -- rule 3.1 fast path: chunks that only add text ------------------------------------------------

def _translated(chunks, fast: bool):
    """The client's events (type, data) and the final response for upstream chunk data."""
    stream = R.ResponsesStream(make_ctx())
    out = R._feed_items(stream, list(chunks) + [R.ChunkReader.DONE], R.RESPONSES_FAST if fast else None)
    raw = R.RESPONSES_FAST.join(out)
    return [(name, json.loads(data)) for name, data in R.SSEParser().feed(raw)], stream.result


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=8))
def test_the_fast_path_gives_the_events_and_response_the_state_machine_gives(texts):
    chunks = [compact_text_chunk(t) for t in texts] + [compact_text_chunk("", "stop")]
    assert _translated(chunks, fast=True) == _translated(chunks, fast=False)
