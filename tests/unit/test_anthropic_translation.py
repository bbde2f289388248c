"""Unit tests for the Anthropic <-> OpenAI translation layer (shared/docs/translation.md).

Test names say which rule they prove; "case N" refers to the list in section 8.
Every stream produced here goes through check_event_grammar (case 58).
"""
import base64
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iflow2api as T
from fakes import compact_text_chunk


# -- helpers ---------------------------------------------------------------------------

def make_ctx(**kwargs):
    kwargs.setdefault("client_model", "claude-sonnet-4-5")
    kwargs.setdefault("upstream_model", "glm-4.6")
    return T.TranslationContext(**kwargs)


def translate(req, **ctx_kwargs):
    req = dict(req)
    req.setdefault("model", "claude-sonnet-4-5")
    req.setdefault("max_tokens", 1000)
    ctx = make_ctx(**ctx_kwargs)
    return T.anthropic_to_openai_request(req, ctx), ctx


def body_for(messages, **ctx_kwargs):
    return translate({"messages": messages}, **ctx_kwargs)[0]


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def text(t, **extra):
    return dict({"type": "text", "text": t}, **extra)


def tool_use(id_, name, input_=None):
    block = {"type": "tool_use", "id": id_, "name": name}
    if input_ is not None:
        block["input"] = input_
    return block


def tool_result(id_, content=None, **extra):
    block = {"type": "tool_result", "tool_use_id": id_}
    if content is not None:
        block["content"] = content
    block.update(extra)
    return block


def png_base64(width, height):
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", width, height)
    return base64.b64encode(head + b"\x08\x06\x00\x00\x00" + b"\x00" * 40).decode()


def image_block(data=None, media_type="image/png"):
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": data or png_base64(2, 2)}}


def chunk(content=None, reasoning=None, tool_calls=None, finish=None, usage=None, **delta_extra):
    delta = dict(delta_extra)
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    out = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        out["usage"] = usage
    return out


def call(index, id_=None, name=None, args=None):
    entry = {"index": index}
    if id_ is not None:
        entry["id"] = id_
    function = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    if function:
        entry["function"] = function
    return entry


USAGE = {"prompt_tokens": 100, "completion_tokens": 20}


def run_stream(chunks, ctx=None, done=True):
    """Feed chunks, close, check the grammar (case 58) and return the events."""
    ctx = ctx or make_ctx()
    stream = T.AnthropicStream(ctx)
    events = []
    for c in chunks:
        events += stream.feed(c)
    events += stream.close(done)
    check_event_grammar(events)
    return events


def names(events):
    return [name for name, _ in events]


def blocks_of(events):
    return T.aggregate_stream_to_message(events)["content"]


def check_event_grammar(events):
    """3.2: message_start ping? (block_start delta* block_stop)* message_delta message_stop,
    or the same prefix ending in one error event; delta types match their blocks."""
    assert events, "no events"
    for name, data in events:
        assert data["type"] == name
    seq = names(events)
    assert seq[0] == "message_start" and seq.count("message_start") == 1
    failed = "error" in seq
    if failed:
        assert seq.count("error") == 1 and seq[-1] == "error"
        assert "message_delta" not in seq and "message_stop" not in seq
    else:
        assert seq[-2:] == ["message_delta", "message_stop"]
        assert seq.count("message_delta") == 1 and seq.count("message_stop") == 1
    message = events[0][1]["message"]
    for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                "cache_read_input_tokens"):
        assert isinstance(message["usage"][key], int)
    open_index, next_index, kind, content, signatures = None, 0, None, "", 0
    for name, data in events[1:]:
        if name == "content_block_start":
            assert open_index is None, "block started while another is open"
            assert data["index"] == next_index, "indices must grow by 1 without gaps"
            open_index, next_index = data["index"], next_index + 1
            block = data["content_block"]
            kind, content, signatures = block["type"], "", 0
            assert block == {"text": {"type": "text", "text": ""},
                             "thinking": {"type": "thinking", "thinking": "", "signature": ""},
                             "tool_use": dict(block, input={})}[kind]
            if kind == "tool_use":
                assert block["id"] and block["name"]
        elif name == "content_block_delta":
            assert data["index"] == open_index, "delta for a block that is not open"
            delta = data["delta"]
            expected = {"text_delta": "text", "thinking_delta": "thinking",
                        "signature_delta": "thinking", "input_json_delta": "tool_use"}
            assert expected[delta["type"]] == kind, "delta type does not match block"
            assert signatures == 0, "nothing may follow the signature_delta"
            if delta["type"] == "signature_delta":
                assert delta["signature"]
                signatures += 1
            else:
                content += delta.get("text", delta.get("thinking", delta.get("partial_json")))
        elif name == "content_block_stop":
            assert data["index"] == open_index
            if kind == "thinking":
                assert signatures == 1, "thinking block closed without signature_delta"
            if kind == "tool_use":
                assert isinstance(json.loads(content), dict)
            else:
                assert content.strip(), "empty block started (rule 7)"
            open_index = None
        elif name == "message_delta":
            assert open_index is None, "message_delta before all blocks stopped"
            assert data["delta"]["stop_reason"] in ("end_turn", "max_tokens", "stop_sequence",
                                                    "tool_use", "refusal")
            assert set(data["usage"]) == {"input_tokens", "output_tokens",
                                          "cache_creation_input_tokens",
                                          "cache_read_input_tokens"}
        elif name == "ping":
            assert "message_stop" not in seq[:seq.index("ping")]
        elif name in ("message_stop", "error"):
            pass
        else:
            raise AssertionError("unexpected event %r" % name)


def response(message, finish="stop", usage=None, **choice_extra):
    choice = dict({"index": 0, "message": message, "finish_reason": finish}, **choice_extra)
    out = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [choice]}
    if usage is not None:
        out["usage"] = usage
    return out


def non_stream(resp, **ctx_kwargs):
    ctx = make_ctx(**ctx_kwargs)
    return T.openai_to_anthropic_response(resp, ctx)


# == 1.1 Top-level fields ===============================================================

def test_model_alias_date_suffix_and_1m_marker_resolve():  # case 1
    known = ["glm-4.6", "glm-4.5-air"]
    assert T.resolve_model("claude-3-5-haiku-20241022", {"haiku": "glm-4.5-air"}, known,
                           "glm-4.6") == "glm-4.5-air"
    assert T.resolve_model("glm-4.6[1m]", {}, known, "x") == "glm-4.6"
    assert T.resolve_model("claude-sonnet-4-5[1m]", {"sonnet": "glm-4.6"}, known, "x") == "glm-4.6"


def test_model_resolution_order_known_alias_family_default_passthrough():
    known = ["glm-4.6", "qwen3-coder", "claude-opus-proxy"]
    model_map = {"claude-opus-4-1": "qwen3-coder", "opus": "glm-4.6", "sonnet": "glm-4.6"}
    assert T.resolve_model("claude-opus-proxy", model_map, known, "d") == "claude-opus-proxy"
    assert T.resolve_model("claude-opus-4-1-20250805", model_map, known, "d") == "qwen3-coder"
    assert T.resolve_model("claude-opus-4-5", model_map, known, "d") == "glm-4.6"
    assert T.resolve_model("claude-3-5-haiku-latest", model_map, known, "d") == "d"
    assert T.resolve_model("claude-instant", {}, known, "d") == "d"
    assert T.resolve_model("deepseek-chat", model_map, known, "d") == "deepseek-chat"


def test_response_carries_client_model_and_upstream_gets_resolved_model():  # case 1
    body, ctx = translate({"model": "claude-3-5-haiku-20241022", "messages": [user("hi")]},
                          client_model="claude-3-5-haiku-20241022", upstream_model="glm-4.5-air")
    assert body["model"] == "glm-4.5-air"
    msg = T.openai_to_anthropic_response(response({"content": "ok"}), ctx)
    assert msg["model"] == "claude-3-5-haiku-20241022"


def test_max_tokens_clamped_to_catalogue_output_limit():  # case 2
    req = {"max_tokens": 64000, "messages": [user("hi")]}
    assert translate(req, model_info={"max_output_tokens": 8192})[0]["max_tokens"] == 8192
    assert translate(req)[0]["max_tokens"] == 64000


def test_max_tokens_lowered_so_input_plus_output_fits_window():  # case 3 (1.8)
    req = {"max_tokens": 32000, "messages": [user("word " * 100000)]}
    body, ctx = translate(req)
    estimate = ctx.estimated_input_tokens
    window = estimate + 6072  # with the spec's numbers: 131072 - 125000 = 6072
    body, ctx = translate(req, model_info={"context_window": window})
    assert body["max_tokens"] == window - estimate - 1024 == 5048
    body, _ = translate(req, model_info={"context_window": estimate + 100})
    assert body["max_tokens"] == 1024  # at least 1024; the upstream reports if it cannot fit


def test_missing_max_tokens_uses_model_default_without_error():
    body, _ = translate({"messages": [user("hi")], "max_tokens": None},
                        model_info={"max_output_tokens": 4096})
    assert body["max_tokens"] == 4096
    body, _ = translate({"messages": [user("hi")], "max_tokens": None})
    assert "max_tokens" not in body


def test_max_tokens_field_profile_renames_field():
    body, _ = translate({"messages": [user("hi")]},
                        profile={"max_tokens_field": "max_completion_tokens"})
    assert body["max_completion_tokens"] == 1000 and "max_tokens" not in body


@pytest.mark.parametrize("value", ["100", 0, -5, True, 1.5])
def test_invalid_max_tokens_is_invalid_request(value):
    with pytest.raises(T.TranslationError) as info:
        translate({"messages": [user("hi")], "max_tokens": value})
    assert info.value.status == 400 and "max_tokens" in str(info.value)


def test_system_blocks_joined_without_billing_header_and_cache_control():  # case 4
    body, _ = translate({"messages": [user("hi")], "system": [
        text("x-anthropic-billing-header: cc_version=1.0; cch=abc"),
        text("You are X", cache_control={"type": "ephemeral"}),
        text("Rules")]})
    assert body["messages"][0] == {"role": "system", "content": "You are X\n\nRules"}
    assert "cache_control" not in json.dumps(body)
    assert translate({"messages": [user("hi")], "system": "plain"})[0]["messages"][0] == {
        "role": "system", "content": "plain"}


@pytest.mark.parametrize("system", ["", [], [text("  x-anthropic-billing-header: a")]])
def test_empty_system_prompt_is_omitted(system):  # case 5
    body, _ = translate({"messages": [user("hi")], "system": system})
    assert [m["role"] for m in body["messages"]] == ["user"]


def test_stop_sequences_keep_first_four_and_empty_is_omitted():  # case 6
    body, ctx = translate({"messages": [user("hi")], "stop_sequences": ["a", "b", "c", "d", "e"]})
    assert body["stop"] == ["a", "b", "c", "d"]
    assert ctx.stop_sequences == ["a", "b", "c", "d", "e"]
    assert "stop" not in translate({"messages": [user("hi")], "stop_sequences": []})[0]


def test_stream_requests_usage_unless_profile_says_no():  # case 7
    body, _ = translate({"messages": [user("hi")], "stream": True})
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    body, _ = translate({"messages": [user("hi")], "stream": True}, profile={"stream_usage": False})
    assert body["stream"] is True and "stream_options" not in body
    assert "stream" not in translate({"messages": [user("hi")], "stream": False})[0]


def test_unknown_and_anthropic_only_fields_are_dropped():  # case 8
    req = {"messages": [user("hi")], "context_management": {"edits": []},
           "metadata": {"user_id": "user_abc_account_x_session_y"}, "top_k": 5,
           "service_tier": "auto", "container": "c", "mcp_servers": [], "top_logprobs": 2,
           "output_config": {"effort": "high"}, "brand_new_field": 1}
    body, _ = translate(req)
    assert set(body) == {"model", "messages", "max_tokens"}
    assert "user_abc" not in json.dumps(body)


def test_top_k_sent_when_profile_accepts_it():
    body, _ = translate({"messages": [user("hi")], "top_k": 5}, profile={"accepts_top_k": True})
    assert body["top_k"] == 5


def test_temperature_and_top_p_copied_unless_profile_drops_them():
    req = {"messages": [user("hi")], "temperature": 0.7, "top_p": 0.9}
    body, _ = translate(req)
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9
    body, _ = translate(req, profile={"drop_sampling_params": True})
    assert "temperature" not in body and "top_p" not in body


def test_metadata_user_id_becomes_short_stable_hash_only_with_profile():
    req = {"messages": [user("hi")], "metadata": {"user_id": "user_abc_session_1"}}
    first, _ = translate(req, profile={"send_user": True})
    second, _ = translate(req, profile={"send_user": True})
    assert first["user"] == second["user"] and len(first["user"]) == 16
    assert "abc" not in first["user"]


# == 1.2 Content blocks =================================================================

def test_whitespace_text_blocks_dropped_and_text_only_user_becomes_string():  # case 9
    body = body_for([user([text("  "), text("hi", cache_control={"type": "ephemeral"})])])
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_text_only_user_parts_joined_with_newline():
    body = body_for([user([text("a"), text("b")])])
    assert body["messages"][0]["content"] == "a\nb"


def test_base64_image_becomes_data_url_unchanged():  # case 10
    data = png_base64(10, 10)
    body = body_for([user([text("look"), image_block(data)])])
    parts = body["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "look"}
    assert parts[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}


def test_url_image_copied_and_non_vision_model_gets_placeholder():  # case 11
    block = {"type": "image", "source": {"type": "url", "url": "https://x/cat.png"}}
    body = body_for([user([block])])
    assert body["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]
    body = body_for([user([text("see"), block, image_block()])], model_info={"vision": False})
    assert body["messages"][0]["content"] == (
        "see\n[image omitted: this model does not accept images]"
        "\n[image omitted: this model does not accept images]")


def test_file_image_becomes_placeholder_text():
    block = {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
    assert body_for([user([block])])["messages"][0]["content"] == (
        "[image omitted: file references are not supported]")


def test_documents_follow_their_source_rules():
    pdf = {"type": "document", "title": "spec.pdf",
           "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}
    docs = [
        {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain",
                                                          "data": "line 1"}},
        {"type": "document", "source": {"type": "content", "content": [text("inner")]}},
        {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}},
        pdf,
    ]
    assert body_for([user(docs)])["messages"][0]["content"] == (
        "Notes\nline 1\ninner\nDocument: https://x/a.pdf\n[PDF omitted: not supported by this model]")
    parts = body_for([user([pdf])], profile={"supports_pdf": True})["messages"][0]["content"]
    assert parts == [{"type": "file", "file": {"filename": "spec.pdf",
                                               "file_data": "data:application/pdf;base64,JVBERi0x"}}]


def test_document_content_source_images_follow_image_rules():
    doc = {"type": "document", "source": {"type": "content", "content": [text("cap"), image_block()]}}
    parts = body_for([user([doc])])["messages"][0]["content"]
    assert parts[0] == text("cap") and parts[1]["type"] == "image_url"


def test_search_result_becomes_text():
    block = {"type": "search_result", "title": "T", "source": "https://s", "content": [text("body")]}
    assert body_for([user([block])])["messages"][0]["content"] == "T\nhttps://s\nbody"


def test_blocks_not_valid_in_user_turn_are_dropped():
    blocks = [text("hi"), {"type": "thinking", "thinking": "x", "signature": "s"},
              {"type": "redacted_thinking", "data": "x"}, tool_use("t", "Bash", {}),
              {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}},
              {"type": "brand_new_block"}]
    assert body_for([user(blocks)])["messages"] == [{"role": "user", "content": "hi"}]


def test_assistant_text_and_tool_use_become_one_message():  # case 12
    body = body_for([user("read"), assistant([text("Let me look."),
                                              tool_use("toolu_1", "Read", {"file_path": "/a"})]),
                     user([tool_result("toolu_1", "x")])])
    msg = body["messages"][1]
    assert msg["role"] == "assistant" and msg["content"] == "Let me look."
    (tc,) = msg["tool_calls"]
    assert tc["id"] == "toolu_1" and tc["type"] == "function" and tc["function"]["name"] == "Read"
    assert json.loads(tc["function"]["arguments"]) == {"file_path": "/a"}


def test_tool_use_input_serialized_as_json_text():  # case 13
    def arguments(input_):
        body = body_for([user("x"), assistant([tool_use("t1", "Bash", input_)])])
        return body["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert arguments({}) == "{}"
    assert arguments(None) == "{}"
    assert arguments(["not", "object"]) == "{}"
    value = {"text": "héllo 世界 \"quoted\""}
    assert json.loads(arguments(value)) == value
    assert "世界" in arguments(value)  # ensure_ascii=False


def test_assistant_tool_calls_only_has_null_content_and_keeps_order():
    body = body_for([user("x"), assistant([tool_use("a", "A", {}), tool_use("b", "B", {})])])
    msg = body["messages"][1]
    assert msg["content"] is None and [c["id"] for c in msg["tool_calls"]] == ["a", "b"]


def test_assistant_texts_joined_and_server_blocks_dropped():
    body = body_for([user("x"), assistant([
        text("one"), {"type": "redacted_thinking", "data": "zz"},
        {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {"q": "x"}},
        {"type": "web_search_tool_result", "tool_use_id": "s1", "content": []}, text("two")])])
    assert body["messages"][1] == {"role": "assistant", "content": "one\ntwo"}


# == 1.3 Message order and tool results =================================================

def test_tool_results_come_first_then_user_text():  # case 14
    body = body_for([user("go"), assistant([tool_use("t1", "A", {}), tool_use("t2", "B", {})]),
                     user([text("go on"), tool_result("t1", "ok"), tool_result("t2", "ok2")])])
    assert body["messages"][2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "ok"},
        {"role": "tool", "tool_call_id": "t2", "content": "ok2"},
        {"role": "user", "content": "go on"}]


@pytest.mark.parametrize("content,expected", [
    ([text("a"), text("b")], "a\nb"),
    ([], "(no output)"),
    ("", "(no output)"),
    (None, "(no output)"),
    ("plain", "plain"),
    ([{"type": "tool_reference", "tool_name": "Grep"}], "Tool reference: Grep"),
])
def test_tool_result_content_becomes_string(content, expected):  # case 15
    body = body_for([user("x"), assistant([tool_use("t1", "A", {})]),
                     user([tool_result("t1", content)])])
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": expected}


def test_tool_result_image_moves_to_following_user_message():  # case 16
    data = png_base64(4, 4)
    body = body_for([user("x"), assistant([tool_use("t1", "Shot", {})]),
                     user([tool_result("t1", [text("shot"), image_block(data)])])])
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": "shot"}
    assert body["messages"][3] == {"role": "user", "content": [
        {"type": "text", "text": "Image output of tool call t1:"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}]}


@pytest.mark.parametrize("content,expected", [
    ("file not found", "Error: file not found"),
    ("<tool_use_error>x</tool_use_error>", "<tool_use_error>x</tool_use_error>"),
    ("Error: already", "Error: already"),
])
def test_tool_result_error_flag_becomes_text_prefix(content, expected):  # case 17
    body = body_for([user("x"), assistant([tool_use("t1", "A", {})]),
                     user([tool_result("t1", content, is_error=True)])])
    assert body["messages"][2]["content"] == expected


def test_missing_tool_result_gets_interrupted_stub():  # case 18
    body = body_for([user("x"), assistant([tool_use("t1", "A", {}), tool_use("t2", "B", {})]),
                     user([tool_result("t1", "ok")])])
    assert body["messages"][2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "ok"},
        {"role": "tool", "tool_call_id": "t2",
         "content": "(no result: the tool call was interrupted)"}]


def test_tool_calls_followed_by_assistant_or_at_the_end_get_stubs_right_after():  # 1.3 step 3
    body = body_for([user("x"), assistant([tool_use("t1", "A", {})]),
                     assistant([text("moving on"), tool_use("t2", "B", {})])])
    roles = [(m["role"], m.get("tool_call_id")) for m in body["messages"]]
    assert roles == [("user", None), ("assistant", None), ("tool", "t1"), ("assistant", None),
                     ("tool", "t2")]


def test_orphan_and_duplicate_tool_results_become_user_text():  # case 19
    body = body_for([user("x"), assistant([tool_use("t1", "A", {})]),
                     user([tool_result("t9", "lost"), tool_result("t1", "first"),
                           tool_result("t1", "second")])])
    assert body["messages"][2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "first"},
        {"role": "user", "content": "Result of tool call t9:\nlost\nResult of tool call t1:\nsecond"}]
    assert all(m["role"] != "tool" for m in body_for([user([tool_result("t9", "x")])])["messages"])


def test_consecutive_same_role_messages_merge():  # case 20
    assert body_for([user("a"), user("b")])["messages"] == [{"role": "user", "content": "a\n\nb"}]
    body = body_for([user("a"), assistant([text("")]), user("b")])
    assert body["messages"] == [{"role": "user", "content": "a\n\nb"}]
    body = body_for([user("a"), user([text("b"), image_block()])])
    assert [p["type"] for p in body["messages"][0]["content"]] == ["text", "text", "image_url"]


def test_consecutive_assistants_merge_texts_and_tool_calls():
    body = body_for([user("q"), assistant("one"), assistant([text("two"), tool_use("t", "A", {})]),
                     user([tool_result("t", "r")])])
    assert body["messages"][1]["content"] == "one\ntwo"
    assert [c["id"] for c in body["messages"][1]["tool_calls"]] == ["t"]
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "t", "content": "r"}


@pytest.mark.parametrize("req", [
    {"messages": [{"role": "system", "content": "x"}]},
    {"messages": []},
    {"messages": "hi"},
    {},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": ["not a block"]}]},
    {"messages": [user("   ")]},
])
def test_invalid_messages_are_invalid_request(req):  # case 21
    req = dict(req, model="claude-x", max_tokens=10)
    with pytest.raises(T.TranslationError) as info:
        T.anthropic_to_openai_request(req, make_ctx())
    assert info.value.status == 400 and info.value.error_type == "invalid_request_error"


def test_system_role_error_uses_anthropic_wording():
    with pytest.raises(T.TranslationError, match='Unexpected role "system"'):
        translate({"messages": [{"role": "system", "content": "x"}]})


def test_assistant_first_allowed_and_profile_inserts_continue():
    assert body_for([assistant("hello"), user("hi")])["messages"][0]["role"] == "assistant"
    body = body_for([assistant("hello"), user("hi")], profile={"needs_user_first": True})
    assert body["messages"][0] == {"role": "user", "content": "(continue)"}


def test_final_assistant_prefill_is_kept_last():
    body = body_for([user("count"), assistant("1, 2,")])
    assert body["messages"][-1] == {"role": "assistant", "content": "1, 2,"}


def test_history_tool_ids_are_remembered():
    _, ctx = translate({"messages": [user("x"), assistant([tool_use("call_0", "A", {})]),
                                     user([tool_result("call_0", "r")])]})
    assert ctx.history_tool_ids == {"call_0"}


# == 1.4 Tools ==========================================================================

BASH = {"name": "Bash", "description": "Run", "input_schema": {
    "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}


def test_server_tools_dropped_and_tool_extras_removed():  # case 22
    body, _ = translate({"messages": [user("x")], "tools": [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "bash_20250124", "name": "bash"},
        dict(BASH, cache_control={"type": "ephemeral"}, defer_loading=True, strict=True,
             input_examples=[{}], allowed_callers=["x"])]})
    assert body["tools"] == [{"type": "function", "function": {
        "name": "Bash", "description": "Run", "parameters": BASH["input_schema"]}}]


def test_long_tool_name_shortened_consistently_and_mapped_back():  # case 23
    long_name = "mcp__" + "x" * 70
    short = T.shorten_tool_name(long_name)
    assert len(short) == 64 and short.startswith("mcp__xxx")
    assert short[-9] == "_" and all(c in "0123456789abcdef" for c in short[-8:])
    body, ctx = translate({
        "messages": [user("x"), assistant([tool_use("t1", long_name, {})]),
                     user([tool_result("t1", "r")])],
        "tools": [dict(BASH, name=long_name)],
        "tool_choice": {"type": "tool", "name": long_name}})
    assert body["tools"][0]["function"]["name"] == short
    assert body["messages"][1]["tool_calls"][0]["function"]["name"] == short
    assert body["tool_choice"] == {"type": "function", "function": {"name": short}}
    resp = response({"content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": short, "arguments": "{}"}}]},
        finish="tool_calls")
    assert T.openai_to_anthropic_response(resp, ctx)["content"][0]["name"] == long_name


@pytest.mark.parametrize("name", ["Bash", "a" * 64, "mcp__server__tool-x"])
def test_valid_tool_names_are_unchanged(name):
    assert T.shorten_tool_name(name) == name


def test_names_with_invalid_characters_are_sanitized_deterministically():
    short = T.shorten_tool_name("my.tool/v2")
    assert short == T.shorten_tool_name("my.tool/v2") and short.startswith("my_tool_v2_")
    assert T.shorten_tool_name("my.tool/v3") != short


def test_schema_gets_properties_everywhere_and_loses_dollar_schema():  # case 24
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"}
    body, _ = translate({"messages": [user("x")], "tools": [dict(BASH, input_schema=schema)]})
    assert body["tools"][0]["function"]["parameters"] == {"type": "object", "properties": {}}
    nested = {"type": "object", "properties": {
        "opts": {"type": "object"}, "list": {"type": "array", "items": {"type": "object"}},
        "any": {"anyOf": [{"type": "object"}, {"type": "string"}]}}}
    body, _ = translate({"messages": [user("x")], "tools": [dict(BASH, input_schema=nested)]})
    props = body["tools"][0]["function"]["parameters"]["properties"]
    assert props["opts"] == {"type": "object", "properties": {}}
    assert props["list"]["items"] == {"type": "object", "properties": {}}
    assert props["any"]["anyOf"][0] == {"type": "object", "properties": {}}


def test_strict_schema_profile_strips_format_additional_properties_default():
    schema = {"type": "object", "additionalProperties": False, "properties": {
        "when": {"type": "string", "format": "date-time", "default": "now"},
        "format": {"type": "string"}, "default": {"type": "integer"}}}
    body, _ = translate({"messages": [user("x")], "tools": [dict(BASH, input_schema=schema)]},
                        profile={"strict_schema": True})
    params = body["tools"][0]["function"]["parameters"]
    assert params == {"type": "object", "properties": {
        "when": {"type": "string"}, "format": {"type": "string"}, "default": {"type": "integer"}}}
    body, _ = translate({"messages": [user("x")], "tools": [dict(BASH, input_schema=schema)]})
    assert body["tools"][0]["function"]["parameters"]["additionalProperties"] is False


def test_missing_tool_description_becomes_empty_string():
    tool = {"name": "T", "input_schema": {"type": "object", "properties": {}}}
    body, _ = translate({"messages": [user("x")], "tools": [tool]})
    assert body["tools"][0]["function"]["description"] == ""


def test_no_tools_left_omits_tools_tool_choice_and_parallel_flag():  # case 25
    body, _ = translate({"messages": [user("x")],
                         "tools": [{"type": "web_search_20250305", "name": "web_search"}],
                         "tool_choice": {"type": "any", "disable_parallel_tool_use": True}})
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(body)
    body, _ = translate({"messages": [user("x")], "tools": []})
    assert "tools" not in body


# == 1.5 tool_choice ====================================================================

@pytest.mark.parametrize("choice,profile,expected", [
    ({"type": "auto"}, {}, "auto"),
    ({"type": "any"}, {}, "required"),
    ({"type": "any"}, {"tool_choice_any": "auto"}, "auto"),
    ({"type": "none"}, {}, "none"),
    ({"type": "tool", "name": "Bash"}, {}, {"type": "function", "function": {"name": "Bash"}}),
    ({"type": "tool", "name": "web_search"}, {}, "auto"),
])
def test_tool_choice_mapping(choice, profile, expected):  # case 26
    body, _ = translate({"messages": [user("x")], "tools": [BASH], "tool_choice": choice},
                        profile=profile)
    assert body["tool_choice"] == expected
    assert "parallel_tool_calls" not in body


def test_disable_parallel_tool_use_sends_parallel_false_unless_profile_forbids():  # case 26
    req = {"messages": [user("x")], "tools": [BASH],
           "tool_choice": {"type": "tool", "name": "Bash", "disable_parallel_tool_use": True}}
    body, _ = translate(req)
    assert body["tool_choice"] == {"type": "function", "function": {"name": "Bash"}}
    assert body["parallel_tool_calls"] is False
    body, _ = translate(req, profile={"parallel_tool_calls": False})
    assert "parallel_tool_calls" not in body


def test_tool_choice_absent_stays_absent_and_dropped_when_thinking_if_profile_says():
    assert "tool_choice" not in translate({"messages": [user("x")], "tools": [BASH]})[0]
    req = {"messages": [user("x")], "tools": [BASH], "tool_choice": {"type": "any"},
           "thinking": {"type": "enabled", "budget_tokens": 2000}}
    assert translate(req)[0]["tool_choice"] == "required"
    assert "tool_choice" not in translate(req, profile={"drop_tool_choice_when_thinking": True})[0]


# == 1.6 Extended thinking ==============================================================

@pytest.mark.parametrize("thinking,extra,expected", [
    ({"type": "enabled", "budget_tokens": 31999}, {}, "high"),
    ({"type": "enabled", "budget_tokens": 1024}, {}, "low"),
    ({"type": "enabled", "budget_tokens": 4000}, {}, "medium"),
    ({"type": "enabled", "budget_tokens": 8192}, {}, "medium"),
    ({"type": "enabled"}, {}, "medium"),
    ({"type": "adaptive"}, {}, "medium"),
    ({"type": "adaptive"}, {"output_config": {"effort": "low"}}, "low"),
    ({"type": "adaptive"}, {"output_config": {"effort": "max"}}, "high"),
    ({"type": "disabled"}, {}, None),
    (None, {}, None),
])
def test_thinking_maps_to_reasoning_effort(thinking, extra, expected):  # case 27
    req = dict({"messages": [user("x")]}, **extra)
    if thinking is not None:
        req["thinking"] = thinking
    body, ctx = translate(req)
    assert body.get("reasoning_effort") == expected
    assert ctx.thinking_requested == (expected is not None)


@pytest.mark.parametrize("style,enabled_form,disabled_form", [
    ("enable_thinking", {"enable_thinking": True, "thinking_budget": 4000},
     {"enable_thinking": False}),
    ("thinking_type", {"thinking": {"type": "enabled"}}, {"thinking": {"type": "disabled"}}),
    ("chat_template_kwargs", {"chat_template_kwargs": {"enable_thinking": True}},
     {"chat_template_kwargs": {"enable_thinking": False}}),
])
def test_thinking_profile_styles_send_their_own_switch(style, enabled_form, disabled_form):
    profile = {"thinking_style": style}
    on, _ = translate({"messages": [user("x")], "thinking": {"type": "enabled", "budget_tokens": 4000}},
                      profile=profile)
    off, _ = translate({"messages": [user("x")], "thinking": {"type": "disabled"}}, profile=profile)
    absent, _ = translate({"messages": [user("x")]}, profile=profile)
    base = {"model", "messages", "max_tokens"}
    assert {k: on[k] for k in set(on) - base} == enabled_form
    assert {k: off[k] for k in set(off) - base} == disabled_form
    assert set(absent) == base


def test_reasoning_split_profile_flag_is_sent():
    body, _ = translate({"messages": [user("x")]}, profile={"reasoning_split": True})
    assert body["reasoning_split"] is True


# == 1.7 Thinking blocks in history =====================================================

HISTORY_WITH_THINKING = [
    user("x"),
    assistant([{"type": "thinking", "thinking": "plan", "signature": "SIG-SECRET"},
               tool_use("t1", "Bash", {"command": "ls"})]),
    user([tool_result("t1", "ok")]),
]


def test_history_thinking_dropped_by_default_and_replayed_with_profile():  # case 28
    body = body_for(HISTORY_WITH_THINKING)
    assert "reasoning_content" not in body["messages"][1]
    body = body_for(HISTORY_WITH_THINKING, profile={"replay_reasoning": True})
    assert body["messages"][1]["reasoning_content"] == "plan"
    assert "SIG-SECRET" not in json.dumps(body)


def test_replay_reasoning_placeholder_for_tool_calls_without_thinking():  # case 29
    body = body_for([user("x"), assistant([tool_use("t1", "Bash", {})]),
                     user([tool_result("t1", "ok")]), assistant("done")],
                    profile={"replay_reasoning": True})
    assert body["messages"][1]["reasoning_content"] == "(reasoning omitted)"
    assert "reasoning_content" not in body["messages"][3]
    body = body_for([user("x"), assistant([tool_use("t1", "Bash", {})])],
                    profile={"replay_reasoning": True, "reasoning_placeholder": "..."})
    assert body["messages"][1]["reasoning_content"] == "..."


def test_redacted_thinking_never_sent():
    body = body_for([user("x"), assistant([{"type": "redacted_thinking", "data": "opaque"},
                                           text("hi")])], profile={"replay_reasoning": True})
    assert "opaque" not in json.dumps(body)


# == 2. Non-streaming response ==========================================================

def test_response_envelope_has_fresh_message_id_and_client_model():  # 2.1
    msg = non_stream(response({"content": "Hi"}, usage=USAGE))
    assert msg["id"].startswith("msg_") and msg["id"] != "chatcmpl-1"
    assert msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["model"] == "claude-sonnet-4-5"
    assert msg["stop_reason"] == "end_turn" and msg["stop_sequence"] is None
    assert msg["content"] == [{"type": "text", "text": "Hi"}]


def test_reasoning_becomes_thinking_block_only_when_requested():  # case 30
    resp = response({"reasoning_content": "hmm", "content": "Hi"})
    ctx = make_ctx()
    ctx.thinking_requested = True
    content = T.openai_to_anthropic_response(resp, ctx)["content"]
    assert content[0]["type"] == "thinking" and content[0]["thinking"] == "hmm"
    assert content[0]["signature"]
    assert content[1] == {"type": "text", "text": "Hi"}
    assert non_stream(resp)["content"] == [{"type": "text", "text": "Hi"}]


def test_preserve_reasoning_or_replay_profile_also_shows_thinking():  # 2.2 step 1
    resp = response({"reasoning_content": "hmm", "content": "Hi"})
    assert non_stream(resp, preserve_reasoning=True)["content"][0]["type"] == "thinking"
    assert non_stream(resp, profile={"replay_reasoning": True})["content"][0]["type"] == "thinking"


@pytest.mark.parametrize("message", [
    {"reasoning": "hmm", "content": "Hi"},
    {"reasoning_details": [{"type": "reasoning.text", "text": "hm"}, {"text": "m"}], "content": "Hi"},
    {"content": "<think>hmm</think>Hi"},
])
def test_reasoning_sources_in_order(message):  # 2.2 step 1, 3.7
    msg = non_stream(response(message), preserve_reasoning=True)
    assert msg["content"][0]["thinking"] == "hmm" and msg["content"][1]["text"] == "Hi"


def test_whitespace_only_reasoning_makes_no_block():
    msg = non_stream(response({"reasoning_content": " \n ", "content": "Hi"}), preserve_reasoning=True)
    assert msg["content"] == [{"type": "text", "text": "Hi"}]


def test_leading_think_tag_is_split_from_answer():  # case 31
    resp = response({"content": "<think>plan</think>\n\nAnswer"})
    shown = non_stream(resp, preserve_reasoning=True)["content"]
    assert shown[0]["thinking"] == "plan" and shown[1] == {"type": "text", "text": "Answer"}
    assert non_stream(resp)["content"] == [{"type": "text", "text": "Answer"}]


def test_reasoning_only_answer_falls_back_to_text():  # case 32
    msg = non_stream(response({"content": None, "reasoning_content": "The answer is 4."}))
    assert msg["content"] == [{"type": "text", "text": "The answer is 4."}]
    assert msg["stop_reason"] == "end_turn"


def test_tool_call_response_becomes_tool_use_block():  # case 33
    resp = response({"content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "Bash", "arguments": "{\"command\":\"ls\"}"}}]}, finish="tool_calls")
    msg = non_stream(resp)
    assert msg["content"] == [{"type": "tool_use", "id": "call_1", "name": "Bash",
                               "input": {"command": "ls"}}]
    assert msg["stop_reason"] == "tool_use"


@pytest.mark.parametrize("arguments,expected", [
    ("", {}),
    (None, {}),
    ("\"{\\\"a\\\":1}\"", {"a": 1}),
    ("{\"a\":1", {"a": 1}),
    ("not json", {}),
    ("```json\n{\"a\": 1}\n```", {"a": 1}),
    ("{\"a\": 1} trailing words", {"a": 1}),
    ("{\"cmd\": \"echo \\\"hi", {"cmd": "echo \"hi"}),
    ("{\"a\": [1, 2", {"a": [1, 2]}),
    ("{\"a\": 1, \"b\":", {"a": 1, "b": None}),
    ({"a": 1}, {"a": 1}),
    ("[1, 2]", {}),
])
def test_tool_arguments_parsed_and_repaired(arguments, expected):  # cases 34, 35
    function = {"name": "Bash"}
    if arguments is not None:
        function["arguments"] = arguments
    resp = response({"tool_calls": [{"id": "c1", "type": "function", "function": function}]},
                    finish="tool_calls")
    assert non_stream(resp)["content"][0]["input"] == expected


def test_tool_ids_replaced_when_invalid_duplicate_or_reused():  # case 35
    ctx = make_ctx()
    ctx.history_tool_ids = {"call_0"}
    calls = [{"id": i, "type": "function", "function": {"name": "Bash", "arguments": "{}"}}
             for i in ("call:0/x", "", "dup", "dup", "call_0", "call_7")]
    ids = [b["id"] for b in T.openai_to_anthropic_response(
        response({"tool_calls": calls}, finish="tool_calls"), ctx)["content"]]
    assert ids[2] == "dup" and ids[5] == "call_7"
    for fresh in (ids[0], ids[1], ids[3], ids[4]):
        assert fresh.startswith("toolu_") and len(fresh) == 6 + 24
    assert len(set(ids)) == 6


def test_functions_prefixed_names_map_to_declared_tools():  # case 35
    _, ctx = translate({"messages": [user("x")], "tools": [BASH]})
    calls = [{"id": "functions.Bash:0", "type": "function",
              "function": {"name": "functions.Bash:0", "arguments": "{}"}},
             {"id": "c2", "type": "function", "function": {"name": "functions.Bash", "arguments": "{}"}},
             {"id": "c3", "type": "function", "function": {"name": "functions.Other:1", "arguments": "{}"}}]
    content = T.openai_to_anthropic_response(response({"tool_calls": calls}, finish="tool_calls"),
                                             ctx)["content"]
    assert [b["name"] for b in content] == ["Bash", "Bash", "functions.Other:1"]
    assert content[0]["id"].startswith("toolu_")  # "." and ":" are not valid id characters


def test_legacy_function_call_becomes_tool_use():
    resp = response({"content": None, "function_call": {"name": "Bash", "arguments": "{\"a\":1}"}},
                    finish="function_call")
    msg = non_stream(resp)
    assert msg["content"][0]["name"] == "Bash" and msg["content"][0]["input"] == {"a": 1}
    assert msg["content"][0]["id"].startswith("toolu_") and msg["stop_reason"] == "tool_use"


def test_empty_answer_gives_empty_content():  # case 36
    msg = non_stream(response({"content": ""}))
    assert msg["content"] == [] and msg["stop_reason"] == "end_turn"


def test_refusal_and_content_parts_become_text():  # 2.2 step 2, 7
    assert non_stream(response({"content": "", "refusal": "I can't"}))["content"] == [
        {"type": "text", "text": "I can't"}]
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert non_stream(response({"content": parts}))["content"] == [{"type": "text", "text": "ab"}]


def test_stop_sequence_reported_only_when_upstream_names_it():  # case 37
    _, ctx = translate({"messages": [user("x")], "stop_sequences": ["END"]})
    msg = T.openai_to_anthropic_response(response({"content": "a"}, stop_reason="END"), ctx)
    assert msg["stop_reason"] == "stop_sequence" and msg["stop_sequence"] == "END"
    msg = T.openai_to_anthropic_response(response({"content": "a"}, matched_stop="END"), ctx)
    assert msg["stop_sequence"] == "END"
    msg = T.openai_to_anthropic_response(response({"content": "a"}), ctx)
    assert msg["stop_reason"] == "end_turn" and msg["stop_sequence"] is None
    msg = T.openai_to_anthropic_response(response({"content": "a"}, stop_reason="OTHER"), ctx)
    assert msg["stop_reason"] == "end_turn"


BASH_CALL = {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": "{}"}}


@pytest.mark.parametrize("message,finish,expected", [
    ({"tool_calls": [BASH_CALL]}, "stop", "tool_use"),
    ({"tool_calls": [BASH_CALL]}, None, "tool_use"),
    ({"content": "hi"}, "tool_calls", "end_turn"),
    ({"content": "hi"}, "content_filter", "refusal"),
    ({"content": "hi"}, "length", "max_tokens"),
    ({"tool_calls": [BASH_CALL]}, "length", "max_tokens"),
    ({"content": "hi"}, "eos", "end_turn"),
    ({"content": "hi"}, None, "end_turn"),
])
def test_stop_reason_table_and_overrides(message, finish, expected):  # case 38
    msg = non_stream(response(message, finish=finish))
    assert msg["stop_reason"] == expected
    if "tool_calls" in message:
        assert msg["content"][0]["type"] == "tool_use"


def test_refusal_can_be_mapped_to_end_turn_by_profile():
    msg = non_stream(response({"content": "no"}, finish="content_filter"),
                     profile={"refusal_as_end_turn": True})
    assert msg["stop_reason"] == "end_turn"


@pytest.mark.parametrize("usage,expected", [
    ({"prompt_tokens": 1000, "completion_tokens": 50, "prompt_tokens_details": {"cached_tokens": 800}},
     (200, 800, 50)),
    ({"prompt_tokens": 10, "completion_tokens": 3, "cached_tokens": 4}, (6, 4, 3)),
    ({"prompt_tokens": 10, "completion_tokens": 3, "prompt_cache_hit_tokens": 7}, (3, 7, 3)),
    ({"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9}},
     (0, 9, 1)),
    ({"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": None}, (5, 0, 1)),
])
def test_usage_subtracts_cached_tokens(usage, expected):  # case 39
    got = non_stream(response({"content": "x"}, usage=usage))["usage"]
    assert got == {"input_tokens": expected[0], "cache_read_input_tokens": expected[1],
                   "cache_creation_input_tokens": 0, "output_tokens": expected[2]}


def test_missing_usage_is_estimated():  # 2.4
    body, ctx = translate({"messages": [user("hello there")]})
    msg = T.openai_to_anthropic_response(response({"content": "a fairly long answer text"}), ctx)
    assert msg["usage"]["input_tokens"] == ctx.estimated_input_tokens > 0
    assert msg["usage"]["output_tokens"] == T.estimate_text_tokens("a fairly long answer text")


def test_iflow_error_in_200_body_raises_upstream_error():  # case 40
    with pytest.raises(T.UpstreamError) as info:
        non_stream({"status": "434", "msg": "Invalid apiKey"})
    err = info.value
    assert "Invalid apiKey" in err.message and err.message.startswith("upstream 434: ")
    assert err.status == 401 and err.anthropic_type == "authentication_error"
    body = T.anthropic_error_body(err.anthropic_type, err.message, "req_1")
    assert body == {"type": "error", "error": {"type": "authentication_error",
                                               "message": err.message}, "request_id": "req_1"}


def test_error_object_without_choices_raises_and_no_choices_is_502():  # 2.1
    with pytest.raises(T.UpstreamError) as info:
        non_stream({"error": {"message": "bad model", "type": "invalid_request_error", "code": 400}})
    assert info.value.status == 400 and "bad model" in info.value.message
    with pytest.raises(T.UpstreamError) as info:
        non_stream({"id": "x", "choices": []})
    assert info.value.status == 502 and info.value.anthropic_type == "api_error"
    assert info.value.message == "upstream returned no choices"


# == 3. Streaming =======================================================================

def test_text_stream_event_sequence():  # case 41
    events = run_stream([chunk("Hel"), chunk("lo"), chunk(finish="stop"),
                         {"choices": [], "usage": USAGE}])
    assert names(events) == ["message_start", "ping", "content_block_start", "content_block_delta",
                             "content_block_delta", "content_block_stop", "message_delta",
                             "message_stop"]
    assert events[2][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    assert [e[1]["delta"]["text"] for e in events[3:5]] == ["Hel", "lo"]
    assert events[6][1] == {"type": "message_delta",
                            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"input_tokens": 100, "cache_creation_input_tokens": 0,
                                      "cache_read_input_tokens": 0, "output_tokens": 20}}


def test_message_start_payload_has_usage_and_client_model():  # 3.2
    ctx = make_ctx()
    ctx.estimated_input_tokens = 42
    start = run_stream([chunk("x")], ctx)[0][1]["message"]
    assert start["model"] == "claude-sonnet-4-5" and start["content"] == []
    assert start["stop_reason"] is None and start["id"].startswith("msg_")
    assert start["usage"]["input_tokens"] == 42 and start["usage"]["output_tokens"] == 1
    assert start["usage"]["cache_creation"] == {"ephemeral_5m_input_tokens": 0,
                                                "ephemeral_1h_input_tokens": 0}


REASONING_TOOLS_CHUNKS = [
    chunk(reasoning="Let me "), chunk(reasoning="think."),
    chunk("I will run "), chunk("two commands."),
    chunk(tool_calls=[call(0, "call_a", "Bash", "")]),
    chunk(tool_calls=[call(0, args="{\"command\":\"ls\"}")]),
    chunk(tool_calls=[call(1, "call_b", "Read", "{\"file_path\":")]),
    chunk(tool_calls=[call(1, args="\"/a\"}")]),
    chunk(finish="tool_calls"),
    {"choices": [], "usage": {"prompt_tokens": 900, "completion_tokens": 30,
                              "prompt_tokens_details": {"cached_tokens": 600}}},
]


def thinking_ctx():
    ctx = make_ctx()
    ctx.thinking_requested = True
    ctx.tool_names = {"Bash": "Bash", "Read": "Read"}
    return ctx


def test_reasoning_text_and_tools_stream_in_block_order():  # case 42
    events = run_stream(REASONING_TOOLS_CHUNKS, thinking_ctx())
    starts = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use", "tool_use"]
    thinking_deltas = [d["delta"]["type"] for n, d in events
                       if n == "content_block_delta" and d["index"] == 0]
    assert thinking_deltas == ["thinking_delta", "thinking_delta", "signature_delta"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    message = T.aggregate_stream_to_message(events)
    assert message["content"][2]["input"] == {"command": "ls"}
    assert message["content"][3]["input"] == {"file_path": "/a"}


def test_usage_after_finish_lands_in_the_single_message_delta():  # case 43
    events = run_stream([chunk("a", finish="stop"), {"choices": [], "usage": USAGE}], done=False)
    (delta,) = [d for n, d in events if n == "message_delta"]
    assert delta["usage"]["output_tokens"] == 20
    assert names(events).index("message_delta") > names(events).index("content_block_stop")


def test_usage_in_every_chunk_is_overwritten_not_added():  # 3.5 step 6
    events = run_stream([chunk("a", usage={"prompt_tokens": 5, "completion_tokens": 1}),
                         chunk("b", usage={"prompt_tokens": 5, "completion_tokens": 2}),
                         chunk(finish="stop", usage={"prompt_tokens": 5, "completion_tokens": 3})])
    assert events[-2][1]["usage"]["output_tokens"] == 3


def test_hidden_reasoning_starts_no_block():  # case 44
    events = run_stream([chunk(reasoning="secret"), chunk("answer"), chunk(finish="stop")])
    starts = [d for n, d in events if n == "content_block_start"]
    assert len(starts) == 1 and starts[0]["index"] == 0
    assert starts[0]["content_block"]["type"] == "text"
    assert "secret" not in json.dumps(events)


def test_think_tags_split_across_chunks():  # case 45
    events = run_stream([chunk("<thi"), chunk("nk>abc</th"), chunk("ink>\n\ndone"), chunk(finish="stop")],
                        thinking_ctx())
    assert blocks_of(events)[0]["thinking"] == "abc"
    assert blocks_of(events)[1] == {"type": "text", "text": "done"}
    events = run_stream([chunk("a <think> b"), chunk(finish="stop")], thinking_ctx())
    assert blocks_of(events) == [{"type": "text", "text": "a <think> b"}]


@pytest.mark.parametrize("pieces,expected", [
    (["  \n", "<think>x</think>y"], [("reasoning", "x"), ("text", "y")]),
    (["<", "t", "h", "i", "n", "k", ">", "x", "<", "/think", ">", "\n", "\n", "y"],
     [("reasoning", "x"), ("text", "y")]),
    (["<b>bold</b>"], [("text", "<b>bold</b>")]),
    (["  hi"], [("text", "  hi")]),
    (["<think>never closed"], [("reasoning", "never closed")]),
    (["<thi"], [("text", "<thi")]),
    (["x</think>"], [("text", "x</think>")]),
])
def test_think_parser_states(pieces, expected):  # 3.7
    parser = T._ThinkTagParser()
    out = []
    for piece in pieces:
        out += parser.feed(piece)
    out += parser.flush()
    merged = []
    for kind, s in out:
        if merged and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + s)
        else:
            merged.append((kind, s))
    assert merged == expected


def test_empty_first_delta_opens_no_block():  # case 46
    events = run_stream([{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                         chunk(finish="stop")])
    assert names(events) == ["message_start", "ping", "message_delta", "message_stop"]


def test_whitespace_only_text_before_tool_call_opens_no_block():  # 3.2 rule 7
    events = run_stream([chunk("\n\n"), chunk(tool_calls=[call(0, "c1", "Bash", "{}")]),
                         chunk(finish="tool_calls")])
    assert [b["type"] for b in blocks_of(events)] == ["tool_use"]


def test_interleaved_parallel_tool_calls_emitted_whole_in_index_order():  # case 47
    events = run_stream([
        chunk(tool_calls=[call(0, "c0", "A")]), chunk(tool_calls=[call(1, "c1", "B")]),
        chunk(tool_calls=[call(0, args="{\"a\"")]), chunk(tool_calls=[call(1, args="{\"b\":2}")]),
        chunk(tool_calls=[call(0, args=":1}")]), chunk(finish="tool_calls")])
    tool_events = [(n, d) for n, d in events if n.startswith("content_block")]
    assert [n for n, _ in tool_events] == ["content_block_start", "content_block_delta",
                                           "content_block_stop"] * 2
    assert tool_events[0][1]["content_block"]["id"] == "c0"
    assert tool_events[1][1]["delta"]["partial_json"] == "{\"a\":1}"
    assert tool_events[4][1]["delta"]["partial_json"] == "{\"b\":2}"


def test_tool_id_and_name_in_separate_chunks():  # case 48
    events = run_stream([chunk(tool_calls=[call(0, "call_9")]), chunk(tool_calls=[call(0, name="Bash")]),
                         chunk(tool_calls=[call(0, args="{\"co")]), chunk(tool_calls=[call(0, args="mmand\":")]),
                         chunk(tool_calls=[call(0, args="\"pwd\"}")]), chunk(finish="tool_calls")])
    assert blocks_of(events) == [{"type": "tool_use", "id": "call_9", "name": "Bash",
                                  "input": {"command": "pwd"}}]


def test_repeated_id_and_name_on_every_chunk_are_not_duplicated():  # 3.5 step 4
    events = run_stream([chunk(tool_calls=[call(0, "c1", "Bash", "{\"a\"")]),
                         chunk(tool_calls=[call(0, "c1", "Bash", ":1}")]), chunk(finish="tool_calls")])
    assert blocks_of(events) == [{"type": "tool_use", "id": "c1", "name": "Bash", "input": {"a": 1}}]


def test_tool_calls_without_index_matched_by_id_then_position():  # 3.5 step 4
    no_index = lambda **kw: {k: v for k, v in call(0, **kw).items() if k != "index"}  # noqa: E731
    events = run_stream([
        chunk(tool_calls=[no_index(id_="x", name="A", args="{\"a\":")]),
        chunk(tool_calls=[no_index(args="1}")]),
        chunk(tool_calls=[no_index(id_="y", name="B", args="{}")]),
        chunk(tool_calls=[no_index(id_="x", args="")]),
        chunk(finish="tool_calls")])
    assert [(b["id"], b["input"]) for b in blocks_of(events)] == [("x", {"a": 1}), ("y", {})]


def test_last_fragment_finish_and_usage_in_one_chunk():  # case 49
    events = run_stream([chunk(tool_calls=[call(0, "c1", "Bash", "{\"a\":")]),
                         chunk(tool_calls=[call(0, args="1}")], finish="tool_calls", usage=USAGE)])
    assert blocks_of(events)[0]["input"] == {"a": 1}
    assert [d["usage"]["output_tokens"] for n, d in events if n == "message_delta"] == [20]


def test_whole_answer_in_one_chunk_equals_split_answer():  # case 50
    whole = run_stream([chunk("Hello there", tool_calls=[call(0, "c1", "Bash", "{\"a\":1}")],
                              finish="tool_calls", usage=USAGE)])
    split = run_stream([chunk("Hello "), chunk("there"), chunk(tool_calls=[call(0, "c1", "Bash")]),
                        chunk(tool_calls=[call(0, args="{\"a\":1}")]), chunk(finish="tool_calls"),
                        {"choices": [], "usage": USAGE}])
    assert T.aggregate_stream_to_message(whole) == T.aggregate_stream_to_message(split)


def test_cumulative_argument_snapshots_replace_instead_of_append():  # case 51
    events = run_stream([chunk(tool_calls=[call(0, "c1", "Bash", "{\"a\"")]),
                         chunk(tool_calls=[call(0, args="{\"a\":1")]),
                         chunk(tool_calls=[call(0, args="{\"a\":1}")]), chunk(finish="tool_calls")])
    assert blocks_of(events)[0]["input"] == {"a": 1}


def test_valid_arguments_forwarded_byte_for_byte_and_repaired_ones_reserialized():  # 3.6
    raw = "{ \"a\" :  1 }"
    events = run_stream([chunk(tool_calls=[call(0, "c1", "Bash", raw)]), chunk(finish="tool_calls")])
    assert [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"] == [raw]
    events = run_stream([chunk(tool_calls=[call(0, "c1", "Bash", "{\"a\": \"é")]),
                         chunk(finish="tool_calls")])
    assert [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"] == [
        "{\"a\": \"é\"}"]
    events = run_stream([chunk(tool_calls=[call(0, "c1", "Bash", "")]), chunk(finish="tool_calls")])
    assert [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"] == ["{}"]


def test_tool_call_without_name_is_dropped():  # case 52
    events = run_stream([chunk(tool_calls=[call(0, "c1", args="{\"a\":1}")]), chunk(finish="tool_calls")])
    assert blocks_of(events) == [] and events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_tool_call_without_id_gets_generated_id():  # 3.6
    events = run_stream([chunk(tool_calls=[call(0, name="Bash", args="{}")]), chunk(finish="tool_calls")])
    assert blocks_of(events)[0]["id"].startswith("toolu_")


def test_eof_after_finish_ends_normally_and_eof_mid_text_is_error():  # case 53
    events = run_stream([chunk("hi"), chunk(finish="stop")], done=False)
    assert names(events)[-1] == "message_stop"
    events = run_stream([chunk("hi")], done=False)
    assert names(events)[-1] == "error"
    assert events[-1][1]["error"] == {"type": "api_error",
                                      "message": "upstream stream ended unexpectedly"}


def test_eof_before_anything_raises_so_http_layer_can_answer_with_status():  # 3.4
    stream = T.AnthropicStream(make_ctx())
    with pytest.raises(T.UpstreamError) as info:
        stream.close(done=False)
    assert info.value.status == 502


def test_done_as_only_event_gives_empty_well_formed_message():  # case 54
    events = run_stream([])
    assert names(events) == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[2][1]["delta"]["stop_reason"] == "end_turn"


def test_tool_calls_emitted_at_done_when_no_finish_came():  # 3.6
    events = run_stream([chunk("x"), chunk(tool_calls=[call(0, "c1", "Bash", "{}")])])
    assert [b["type"] for b in blocks_of(events)] == ["text", "tool_use"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_mid_stream_error_chunk_becomes_error_event():  # case 55
    stream = T.AnthropicStream(make_ctx())
    events = stream.feed(chunk("partial"))
    events += stream.feed({"error": {"message": "server overloaded", "code": "503"}})
    events += stream.feed(chunk("more")) + stream.close(True)
    check_event_grammar(events)
    assert names(events)[-1] == "error"
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    assert "server overloaded" in events[-1][1]["error"]["message"]
    assert stream.state.done


def test_error_as_first_event_raises_for_an_http_error():  # case 56
    stream = T.AnthropicStream(make_ctx())
    with pytest.raises(T.UpstreamError) as info:
        stream.feed({"status": "449", "msg": "rate limit exceeded"})
    assert info.value.status == 429 and not stream.state.started


def test_reasoning_only_stream_falls_back_to_text():  # case 57
    events = run_stream([chunk(reasoning="The answer "), chunk(reasoning="is 4."), chunk(finish="stop")])
    assert blocks_of(events) == [{"type": "text", "text": "The answer is 4."}]
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_thinking_block_always_gets_signature_before_stop():  # 3.3
    ctx = thinking_ctx()
    for chunks in ([chunk(reasoning="r"), chunk("t"), chunk(finish="stop")],
                   [chunk(reasoning="r"), chunk(tool_calls=[call(0, "c", "Bash", "{}")]), chunk(finish="stop")],
                   [chunk(reasoning="r"), chunk(finish="stop")],
                   [chunk(reasoning="r")]):
        run_stream(chunks, ctx)  # the grammar checker asserts the signature


def test_start_forces_message_start_and_ping_only_once():  # 3.4
    stream = T.AnthropicStream(make_ctx())
    assert names(stream.start()) == ["message_start", "ping"] and stream.state.started
    assert stream.start() == []
    events = stream.feed(chunk("x"))
    assert "message_start" not in names(events)


def test_nothing_after_done_and_fail_before_start_emits_nothing():  # 3.5 step 8, 3.9
    stream = T.AnthropicStream(make_ctx())
    stream.feed(chunk("x"))
    stream.close(True)
    assert stream.feed(chunk("y")) == [] and stream.close(True) == [] and stream.fail("api_error", "x") == []
    fresh = T.AnthropicStream(make_ctx())
    assert fresh.fail("api_error", "boom") == [] and fresh.state.done


def test_fail_after_start_emits_single_error_without_closing_blocks():  # 3.9
    stream = T.AnthropicStream(thinking_ctx())
    events = stream.feed(chunk(reasoning="thinking..."))
    events += stream.fail("overloaded_error", "upstream 503: busy")
    check_event_grammar(events)
    assert names(events)[-2:] == ["content_block_delta", "error"]


def test_chunk_with_message_instead_of_delta_and_content_parts():  # section 7 quirks
    events = run_stream([{"choices": [{"index": 0, "message": {"content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, "finish_reason": "stop"}]}])
    assert blocks_of(events) == [{"type": "text", "text": "ab"}]


def test_choices_other_than_the_first_are_ignored():  # 2.1
    events = run_stream([{"choices": [{"index": 1, "delta": {"content": "no"}},
                                      {"index": 0, "delta": {"content": "yes"}}]}, chunk(finish="stop")])
    assert blocks_of(events) == [{"type": "text", "text": "yes"}]


def test_usage_for_log_and_estimate_without_usage():
    ctx = make_ctx()
    ctx.estimated_input_tokens = 7
    stream = T.AnthropicStream(ctx)
    stream.feed(chunk("hello world", finish="stop"))
    stream.close(True)
    assert stream.usage_for_log() == (7, T.estimate_text_tokens("hello world"))
    stream = T.AnthropicStream(make_ctx())
    stream.feed(chunk("x", finish="stop", usage={"prompt_tokens": 10, "completion_tokens": 2,
                                                 "cached_tokens": 4}))
    stream.close(True)
    assert stream.usage_for_log() == (6, 2)


def test_encode_anthropic_event_is_compact_utf8_sse():  # 3.1
    raw = T.encode_anthropic_event(("content_block_delta", {
        "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "é 世"}}))
    assert raw == ('event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                   '"delta":{"type":"text_delta","text":"é 世"}}\n\n').encode("utf-8")


def test_event_grammar_checker_rejects_broken_streams():  # case 58
    good = run_stream([chunk("hi"), chunk(finish="stop")])
    broken = [
        good[1:],                                    # no message_start
        good[:2] + good[3:],                         # delta without start
        good[:-2] + good[-1:],                       # no message_delta
        good + good[-1:],                            # two message_stop
        good[:5] + [good[4]] + good[5:],             # start while another block is open... (dup stop)
    ]
    bad_type = list(good)
    bad_type[3] = ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "thinking_delta", "thinking": "x"}})
    broken.append(bad_type)
    for events in broken:
        with pytest.raises(AssertionError):
            check_event_grammar(events)


# == 3.11 Aggregation ===================================================================

def test_aggregated_stream_equals_non_stream_translation():  # case 60
    streamed = T.aggregate_stream_to_message(run_stream(REASONING_TOOLS_CHUNKS, thinking_ctx()))
    full = response({"reasoning_content": "Let me think.", "content": "I will run two commands.",
                     "tool_calls": [
                         {"id": "call_a", "type": "function",
                          "function": {"name": "Bash", "arguments": "{\"command\":\"ls\"}"}},
                         {"id": "call_b", "type": "function",
                          "function": {"name": "Read", "arguments": "{\"file_path\":\"/a\"}"}}]},
                    finish="tool_calls", usage=REASONING_TOOLS_CHUNKS[-1]["usage"])
    direct = T.openai_to_anthropic_response(full, thinking_ctx())
    assert streamed == direct
    assert [b["type"] for b in direct["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert direct["usage"] == {"input_tokens": 300, "output_tokens": 30,
                               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 600}


def test_aggregate_raises_on_error_event_and_on_unfinished_stream():  # 3.11
    with pytest.raises(T.UpstreamError) as info:
        T.aggregate_stream_to_message(run_stream([chunk("x")], done=False))
    assert info.value.anthropic_type == "api_error"
    stream = T.AnthropicStream(make_ctx())
    with pytest.raises(T.UpstreamError):
        T.aggregate_stream_to_message(stream.feed(chunk("x")))


# == property test: random chunk sequences ==============================================

ALPHABET = st.sampled_from(list("ab xy\n\té世🙂{}\"\\:,"))
# Text pieces include think tags and their fragments, so the 3.7 parser is exercised too.
TEXT_TOKENS = list("ab xy\n\té世🙂{}\"\\:,") + ["<think>", "</think>", "<", ">", "<th"]
small_text = st.lists(st.sampled_from(TEXT_TOKENS), min_size=1, max_size=8).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(ALPHABET, max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("abc", min_size=1, max_size=3),
                                                                inner, max_size=3),
    max_leaves=6)


def cut(draw, s):
    """Split s at random points (possibly into one piece)."""
    if len(s) < 2:
        return [s]
    points = sorted(draw(st.sets(st.integers(1, len(s) - 1), max_size=4)))
    return [s[a:b] for a, b in zip([0] + points, points + [len(s)])]


@st.composite
def upstream_scripts(draw):
    """A random but valid upstream answer as a list of chunks: text and reasoning runs in any
    order, then tool calls whose fragments interleave, finish, usage."""
    chunks = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["content", "reasoning"]))
        for piece in cut(draw, draw(small_text)):
            chunks.append(chunk(**{kind if kind == "content" else "reasoning": piece}))
    tool_count = draw(st.integers(0, 3))
    queues = []
    for i in range(tool_count):
        args = json.dumps(draw(st.dictionaries(st.text("abcd", min_size=1, max_size=4), json_values,
                                               max_size=3)), ensure_ascii=draw(st.booleans()))
        pieces = cut(draw, args)
        first = call(i, "call_%d" % i, "Tool%d" % i, pieces[0])
        queues.append([first] + [call(i, args=p) for p in pieces[1:]])
    while any(queues):
        live = [q for q in queues if q]
        q = live[draw(st.integers(0, len(live) - 1))]
        chunks.append(chunk(tool_calls=[q.pop(0)]))
    finish = "tool_calls" if tool_count else draw(st.sampled_from(["stop", "length", None]))
    usage = {"prompt_tokens": draw(st.integers(0, 500)), "completion_tokens": draw(st.integers(0, 500))}
    if draw(st.booleans()):
        chunks.append(chunk(finish=finish, usage=usage))
    else:
        chunks.append(chunk(finish=finish))
        chunks.append({"choices": [], "usage": usage})
    return chunks


def merge_neighbours(chunks, draw):
    """Merge runs of same-kind chunks into one (text+text, reasoning+reasoning, tool fragments)."""
    out = []
    for c in chunks:
        delta = c["choices"][0]["delta"] if c["choices"] else None
        prev = out[-1]["choices"][0]["delta"] if out and out[-1]["choices"] else None
        same_kind = (delta and prev and set(delta) == set(prev) and len(delta) == 1
                     and c["choices"][0]["finish_reason"] is None
                     and out[-1]["choices"][0]["finish_reason"] is None
                     and "usage" not in c and "usage" not in out[-1])
        if same_kind and draw(st.booleans()):
            key = next(iter(delta))
            prev[key] = prev[key] + delta[key]  # strings concatenate, tool-call lists join
            continue
        out.append(json.loads(json.dumps(c)))
    return out


def split_strings(chunks):
    """Split every text / reasoning delta into single characters."""
    out = []
    for c in chunks:
        delta = c["choices"][0]["delta"] if c["choices"] else {}
        keys = [k for k in ("content", "reasoning_content") if k in delta]
        if len(keys) == 1 and len(delta) == 1 and not c["choices"][0]["finish_reason"] and "usage" not in c:
            for ch in delta[keys[0]]:
                out.append(chunk(**{"content" if keys[0] == "content" else "reasoning": ch}))
        else:
            out.append(c)
    return out


def property_ctx(show):
    ctx = make_ctx()
    ctx.thinking_requested = show
    ctx.tool_names = {"Tool%d" % i: "Tool%d" % i for i in range(3)}
    return ctx


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=upstream_scripts(), show=st.booleans(), data=st.data())
def test_random_chunk_sequences_obey_grammar_and_rechunking_changes_nothing(script, show, data):
    draw = data.draw
    reference = T.aggregate_stream_to_message(run_stream(script, property_ctx(show)))
    merged = merge_neighbours(script, draw)
    split = split_strings(script)
    for variant in (merged, split):
        assert T.aggregate_stream_to_message(run_stream(variant, property_ctx(show))) == reference
    tools = [b for b in reference["content"] if b["type"] == "tool_use"]
    assert [b["id"] for b in tools] == ["call_%d" % i for i in range(len(tools))]
    if tools:
        assert reference["stop_reason"] == "tool_use"


@settings(max_examples=150, deadline=None)
@given(reasoning=st.lists(small_text, max_size=3), texts=st.lists(small_text, max_size=3),
       args=st.lists(st.dictionaries(st.text("ab", min_size=1, max_size=2), json_values, max_size=2),
                     max_size=2),
       show=st.booleans(), data=st.data())
def test_stream_aggregation_equals_non_stream_for_random_answers(reasoning, texts, args, show, data):
    """3.11: the same content through the stream path and the non-stream path agrees."""
    calls = [{"id": "call_%d" % i, "type": "function",
              "function": {"name": "Tool%d" % i, "arguments": json.dumps(a)}} for i, a in enumerate(args)]
    message = {"content": "".join(texts) or None, "reasoning_content": "".join(reasoning) or None}
    if calls:
        message["tool_calls"] = calls
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    direct = T.openai_to_anthropic_response(response(message, finish="stop", usage=usage),
                                            property_ctx(show))
    chunks = [chunk(reasoning=r) for r in reasoning] + [chunk(t) for t in texts]
    for i, c in enumerate(calls):
        pieces = cut(data.draw, c["function"]["arguments"])
        chunks.append(chunk(tool_calls=[call(i, c["id"], c["function"]["name"], pieces[0])]))
        chunks += [chunk(tool_calls=[call(i, args=p)]) for p in pieces[1:]]
    chunks.append(chunk(finish="stop", usage=usage))
    assert T.aggregate_stream_to_message(run_stream(chunks, property_ctx(show))) == direct


# == 4. Errors ==========================================================================

def test_context_overflow_uses_anthropic_wording():  # case 61
    body = {"error": {"code": "context_length_exceeded", "message": (
        "This model's maximum context length is 131072 tokens. However, your messages resulted "
        "in 140000 tokens. Please reduce the length of the messages.")}}
    err = T.upstream_error(400, json.dumps(body).encode())
    assert err.status == 400 and err.anthropic_type == "invalid_request_error"
    assert err.message.startswith("prompt is too long: 140000 tokens > 131072 maximum")


@pytest.mark.parametrize("text,expected", [
    ("This model's maximum context length is 32768 tokens. However, you requested 40000 tokens "
     "(8000 in the messages, 32000 in the completion). Please reduce the length.",
     "input length and max_tokens exceed context limit: 8000 + 32000 > 32768, decrease input "
     "length or max_tokens and try again"),
    ("'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's maximum context "
     "length is 32768 tokens and your request has 1000 input tokens (32000 > 32768 - 1000).",
     "input length and max_tokens exceed context limit: 1000 + 32000 > 32768, decrease input "
     "length or max_tokens and try again"),
    ("Input is too long for this model", "prompt is too long: Input is too long for this model"),
    ("prompt is too long: 210000 tokens > 200000 maximum",
     "prompt is too long: 210000 tokens > 200000 maximum"),
])
def test_context_overflow_variants(text, expected):  # 4.3
    err = T.upstream_error(400, {"error": {"message": text}})
    assert err.message == expected and err.status == 400


@pytest.mark.parametrize("status,body,expected", [
    (400, {"error": {"message": "bad"}}, (400, "invalid_request_error", "invalid_request_error")),
    (422, {"detail": "bad field"}, (400, "invalid_request_error", "invalid_request_error")),
    (401, {"error": "nope"}, (401, "authentication_error", "invalid_request_error")),
    (402, "pay", (402, "billing_error", "insufficient_quota")),
    (429, {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}},
     (402, "billing_error", "insufficient_quota")),
    (403, {"message": "forbidden"}, (403, "permission_error", "permission_error")),
    (404, {"error": {"message": "model not found"}}, (404, "not_found_error", "invalid_request_error")),
    (413, "too big", (413, "request_too_large", "invalid_request_error")),
    (429, {"error": {"message": "slow down"}}, (429, "rate_limit_error", "rate_limit_error")),
    (500, "oops", (500, "api_error", "server_error")),
    (502, "bad gateway", (502, "api_error", "server_error")),
    (503, "unavailable", (529, "overloaded_error", "server_error")),
    (500, {"error": {"message": "Server overloaded, try later"}}, (529, "overloaded_error", "server_error")),
    (504, "timeout", (504, "api_error", "server_error")),
    (200, {"status": "434", "msg": "Invalid apiKey"}, (401, "authentication_error", "invalid_request_error")),
    (200, {"status": "449", "msg": "rate limit"}, (429, "rate_limit_error", "rate_limit_error")),
    (200, {"status": "8211", "msg": "weird"}, (502, "api_error", "server_error")),
])
def test_upstream_status_and_type_table(status, body, expected):  # 4.2
    err = T.upstream_error(status, body)
    assert (err.status, err.anthropic_type, err.openai_type) == expected


def test_overloaded_is_503_on_openai_routes_and_retry_after_is_kept():  # 4.2
    err = T.upstream_error(503, b"busy", {"Retry-After": "7"})
    assert err.status == 529 and err.openai_status == 503 and err.retry_after == "7"
    err = T.upstream_error(429, b"{}", {"retry-after": "3"})
    assert err.retry_after == "3" and err.openai_code == "rate_limit_exceeded"


@pytest.mark.parametrize("body,expected", [
    ({"error": {"message": "m1"}, "message": "m2"}, "m1"),
    ({"error": "m1", "message": "m2"}, "m1"),
    ({"message": "m2", "msg": "m3"}, "m2"),
    ({"msg": "m3", "detail": "m4"}, "m3"),
    ({"detail": "m4"}, "m4"),
    ("plain text body", "plain text body"),
])
def test_error_text_extraction_order(body, expected):  # 4.2
    assert T.upstream_error(400, body).message == "upstream 400: " + expected


def test_error_message_truncated_and_secrets_redacted():  # 4.2
    err = T.upstream_error(500, "x" * 5000)
    assert len(err.message) <= 1000
    err = T.upstream_error(401, {"error": {"message": "bad key sk-abcdefghijklmnop, Bearer abcdefghijkl"}})
    assert "abcdefghijklmnop" not in err.message and "abcdefghijkl" not in err.message


def test_error_bodies_have_both_dialect_shapes():  # 4.1
    assert T.anthropic_error_body("api_error", "boom") == {
        "type": "error", "error": {"type": "api_error", "message": "boom"}}
    assert T.openai_error_body("boom", "server_error", "x") == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": "x"}}


def test_translation_error_defaults():
    err = T.TranslationError("messages: Field required")
    assert err.status == 400 and err.error_type == "invalid_request_error"
    assert str(err) == "messages: Field required"


# == 5. count_tokens estimator ==========================================================

def test_count_tokens_small_text_and_png_adds_about_320():  # case 66
    req = {"model": "x", "messages": [{"role": "user", "content": "hello world"}]}
    base = T.estimate_tokens_anthropic(req)
    assert 1 <= base <= 20
    with_image = T.estimate_tokens_anthropic({"model": "x", "messages": [user(
        [text("hello world"), image_block(png_base64(600, 400))])]})
    assert 300 <= with_image - base <= 340


def test_estimate_counts_system_tools_and_forwarded_thinking_only():  # section 5
    plain = {"model": "x", "messages": [user("hi")]}
    base = T.estimate_tokens_anthropic(plain)
    assert T.estimate_tokens_anthropic(dict(plain, system="You are helpful.")) > base
    assert T.estimate_tokens_anthropic(dict(plain, tools=[BASH])) >= base + 10
    history = {"model": "x", "messages": [user("x"), assistant([
        {"type": "thinking", "thinking": "long thoughts " * 50, "signature": "s"}, text("ok")])]}
    dropped = T.estimate_tokens_anthropic(history)
    replayed = T.estimate_tokens_anthropic(history, make_ctx(profile={"replay_reasoning": True}))
    assert replayed - dropped >= 100


def test_count_tokens_validates_like_messages():  # section 5
    with pytest.raises(T.TranslationError):
        T.estimate_tokens_anthropic({"model": "x"})


@pytest.mark.parametrize("s,expected", [
    ("", 0),
    ("abcd", 1),
    ("abcde", 2),
    ("a     b", 1),          # whitespace runs count as one char: "a b" = 3 chars
    ("世界你好", 4),
    ("éééé", 2),
    ("hello 世界", 4),        # 6 ASCII / 4 = 1.5, + 2 CJK -> 3.5 -> 4
])
def test_text_estimator_character_classes(s, expected):  # section 5
    assert T.estimate_text_tokens(s) == expected


def test_image_sizes_read_from_headers():  # section 5
    gif = b"GIF89a" + struct.pack("<HH", 320, 200) + b"\x00" * 10
    jpeg = (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
            + b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 480, 640) + b"\x00" * 20)
    vp8 = b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 10 + struct.pack("<HH", 100, 50) + b"\x00" * 8
    vp8x = b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"\x00" * 8 + (99).to_bytes(3, "little") + (
        49).to_bytes(3, "little") + b"\x00" * 8
    w, h = 300, 150
    vp8l_bits = (w - 1) | ((h - 1) << 14)
    vp8l = b"RIFF\x00\x00\x00\x00WEBPVP8L" + b"\x00" * 4 + b"\x2f" + vp8l_bits.to_bytes(4, "little") + b"\x00" * 8
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    assert T.image_size_from_base64(png_base64(600, 400)) == (600, 400)
    assert T.image_size_from_base64(b64(gif)) == (320, 200)
    assert T.image_size_from_base64(b64(jpeg)) == (640, 480)
    assert T.image_size_from_base64(b64(vp8)) == (100, 50)
    assert T.image_size_from_base64(b64(vp8x)) == (100, 50)
    assert T.image_size_from_base64(b64(vp8l)) == (300, 150)
    assert T.image_size_from_base64("not an image") is None


def test_unknown_url_and_huge_images_count_1600():  # section 5
    base = T.estimate_tokens_anthropic({"model": "x", "messages": [user([text("x")])]})
    url_image = {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}
    assert T.estimate_tokens_anthropic({"model": "x", "messages": [user([text("x"), url_image])]}) - base == 1600
    huge = image_block(png_base64(8000, 8000))
    assert T.estimate_tokens_anthropic({"model": "x", "messages": [user([text("x"), huge])]}) - base == 1600


def test_pdf_estimate_uses_size_rule():  # section 5
    data = "A" * 40000  # 30000 bytes -> 10 tokens
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}}
    ctx = make_ctx(profile={"supports_pdf": True})
    base = T.estimate_tokens_anthropic({"model": "x", "messages": [user([text("x")])]})
    assert T.estimate_tokens_anthropic({"model": "x", "messages": [user([text("x"), pdf])]}, ctx) - base == 10


def test_names_and_ids_with_trailing_newline_are_not_accepted_as_valid():  # 1.4, 2.2 step 3
    assert T.shorten_tool_name("Bash\n") != "Bash\n"
    resp = response({"tool_calls": [{"id": "call_1\n", "type": "function",
                                     "function": {"name": "Bash", "arguments": "{}"}}]})
    assert non_stream(resp)["content"][0]["id"].startswith("toolu_")


# -- notes instead of log lines (translation never logs) -----------------------------------------

def test_dropped_server_tools_and_extra_stop_sequences_are_noted_on_the_context(caplog):
    ctx = make_ctx()
    req = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
           "stop_sequences": ["a", "b", "c", "d", "e"],
           "tools": [{"type": "web_search_20250305", "name": "web_search"},
                     {"name": "Bash", "input_schema": {"type": "object"}}]}
    with caplog.at_level("DEBUG", logger="iflow2api"):
        body = T.anthropic_to_openai_request(req, ctx)
    assert [t["function"]["name"] for t in body["tools"]] == ["Bash"] and len(body["stop"]) == 4
    assert any("web_search_20250305" in n for n in ctx.notes)
    assert any("4 stop sequences" in n for n in ctx.notes)
    assert ctx.warnings == [] and caplog.records == []
    T.anthropic_to_openai_request(req, ctx)  # the same request again: each note once
    assert len(ctx.notes) == 2


def test_stream_anomalies_are_warnings_on_the_context(caplog):
    ctx = make_ctx()
    stream = T.AnthropicStream(ctx)
    with caplog.at_level("DEBUG", logger="iflow2api"):
        stream.feed({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        stream.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "function": {"arguments": "{not json"}}]}}]})
        stream.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        stream.close(True)
    assert any("without a name" in w for w in ctx.warnings)
    assert any("no usage" in n for n in ctx.notes)
    assert caplog.records == []


# -- rule 3.1 fast path: chunks that only add text ------------------------------------------------

def _sse_events(raw: bytes) -> list:
    """(name, data dict) of every event in encoded SSE bytes."""
    return [(name, json.loads(data)) for name, data in T.SSEParser().feed(raw)]


def _translated(chunks, fast: bool) -> list:
    """The client's events for upstream chunk data (bytes), with or without the fast path."""
    stream = T.AnthropicStream(make_ctx())
    items = list(chunks) + [T.ChunkReader.DONE]
    out = T._feed_items(stream, items, T.ANTHROPIC_FAST if fast else None)
    raw = T.ANTHROPIC_FAST.join(out)
    return _sse_events(raw), stream.usage_for_log()


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=8))
def test_the_fast_path_gives_the_events_the_state_machine_gives(texts):
    chunks = [compact_text_chunk(t) for t in texts]
    chunks.append(compact_text_chunk("", "stop"))
    assert _translated(chunks, fast=True) == _translated(chunks, fast=False)


@pytest.mark.parametrize("chunk", [
    b'{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"}]}',
    b'{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}],"usage":{"prompt_tokens":1}}',
    b'{"choices":[{"index":0,"delta":{"content":"a","reasoning_content":"r"},"finish_reason":null}]}',
    b'{"choices":[{"index":0,"delta":{"content":"a","tool_calls":[]},"finish_reason":null}]}',
    b'{"choices":[{"index":0,"delta":{"content":"<think>"},"finish_reason":null}]}',
    b'{"choices":[{"index":0,"delta":{"content":"\\u003cthink>"},"finish_reason":null}]}',
    b'{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}',
    b'{"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]}',
    b'{"error":{"message":"x"},"choices":[{"index":0,"delta":{"content":"a"}}]}',
])
def test_chunks_that_do_more_than_add_text_take_the_full_path(chunk):
    assert T.plain_text_literal(chunk) is None
    opening = [compact_text_chunk("Hello")]
    assert _translated(opening + [chunk], fast=True) == _translated(opening + [chunk], fast=False)
