"""Fuzzing of the pure parts (issue 10, "Then keep it that way"): the chunked-body
decoders, the SSE parser, the Anthropic <-> OpenAI translations and config loading.

The property everywhere: a correct result, or the documented error (an Iflow2apiError
with an HTTP status; ValueError where a docstring says so), never any other exception.
Inputs that once broke something are kept as explicit cases (@example / plain tests).
"""
import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import iflow2api as I
from fuzzing import clean_text, json_values, junk_or, split_at
from test_anthropic_translation import check_event_grammar, make_ctx

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def is_documented_error(exc, *also) -> bool:
    """An Iflow2apiError (with an HTTP status) or one of `also`."""
    if isinstance(exc, I.Iflow2apiError):
        return isinstance(exc.status, int) and 400 <= exc.status <= 599
    return isinstance(exc, also)


@st.composite
def chunked_bodies(draw):
    """(body, its valid chunked encoding): random chunk sizes, hex case, extensions, trailers."""
    pieces = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    out = []
    for piece in pieces:
        size = "%x" % len(piece)
        size = size.upper() if draw(st.booleans()) else size
        ext = draw(st.sampled_from([b"", b";name=value", b";x"]))
        out.append(size.encode() + ext + b"\r\n" + piece + b"\r\n")
    trailer = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"]))
    out.append(b"0\r\n" + trailer + b"\r\n")
    return b"".join(pieces), b"".join(out)


# Chunk-size lines that are not 1*HEXDIG (defect 1): each must be refused.
BAD_CHUNK_SIZES = [b"-1", b"+2", b"1_0", b"0x10", b"", b"g", b"-0", b"\xd9\xa1",  # Arabic-Indic 1
                   b"1" * 40]


# == Chunked decoders ======================================================================

@FUZZ
@given(chunked_bodies(), st.lists(st.integers(0, 10 ** 4), max_size=8))
def test_chunked_decoder_decodes_any_split_of_a_valid_body(encoded, cuts):
    body, raw = encoded
    decoder = I.ChunkedDecoder()
    out = b"".join(decoder.feed(piece) for piece in split_at(raw, cuts))
    assert out == body and decoder.done


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(0, 10 ** 4), max_size=6))
@example(b"-1\r\n" + b"x" * 50, [])
@example(b"+2\r\nab\r\n0\r\n\r\n", [])
@example(b"1_0\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n", [])
def test_chunked_decoder_random_bytes_give_bytes_or_a_documented_error(raw, cuts):
    decoder = I.ChunkedDecoder()
    produced = b""
    try:
        for piece in split_at(raw, cuts):
            produced += decoder.feed(piece)
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions
        assert is_documented_error(exc, ValueError), repr(exc)
        return
    assert len(produced) <= len(raw)  # a decoder never invents body bytes


@pytest.mark.parametrize("size", BAD_CHUNK_SIZES, ids=repr)
def test_chunked_decoder_refuses_a_size_that_is_not_hex_digits(size):
    raw = size + b"\r\n" + b"z" * 16 + b"\r\n0\r\n\r\n"
    decoder = I.ChunkedDecoder()
    with pytest.raises((ValueError, I.Iflow2apiError)):
        decoder.feed(raw)


def limited_decoder(limit):
    """A decoder that refuses bodies over limit bytes (the request-body decoder of both adapters)."""
    try:
        return I.ChunkedDecoder(limit)
    except TypeError:
        pytest.fail("ChunkedDecoder(max_bytes) is the request-body decoder; it takes a limit")


@FUZZ
@given(st.binary(max_size=300), st.integers(1, 64), st.lists(st.integers(0, 10 ** 4), max_size=6))
@example(b"-1\r\n" + b"x" * 200, 32, [])
@example(b"+2\r\nab\r\n0\r\n\r\n", 32, [])
@example(b"1_0\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n", 32, [])
@example(b"-1\r\n" + b"x" * 200 + b"\r\n0\r\n\r\n", 32, [])
@example(b"10\r\n" + b"x" * 16 + b"\r\n" + b"11\r\n" + b"x" * 17 + b"\r\n0\r\n\r\n", 32, [3, 40])
def test_chunked_decoder_with_a_limit_never_gives_more_than_the_limit(raw, limit, cuts):
    decoder = limited_decoder(limit)
    produced = b""
    try:
        for piece in split_at(raw, cuts):
            produced += decoder.feed(piece)
    except Exception as exc:  # noqa: BLE001
        assert is_documented_error(exc, ValueError), repr(exc)
        assert not isinstance(exc, I.Iflow2apiError) or exc.status == 413, repr(exc)
        return
    assert len(produced) <= limit


# == SSE parser ============================================================================

sse_bytes = st.lists(st.sampled_from([b"data:", b"data: ", b"event:", b"event: x", b":c", b"id: 1",
                                      b"\n", b"\r", b"\r\n", b"\n\n", b" ", b"{}", b"[DONE]",
                                      "é你".encode(), b"\xe4", b"\xff", b"\x00", b"data:\r"])
                     | st.binary(max_size=8), max_size=40).map(b"".join)


def parse_all(pieces) -> list:
    parser = I.SSEParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.flush()


@FUZZ
@given(sse_bytes, st.lists(st.integers(0, 10 ** 4), max_size=8))
@example(b"data: a\r", [])
@example(b"data: a\r\n\r\ndata: b\n\r\n", [])
@example("data: 你好\n\n".encode(), [7])
def test_sse_parser_split_anywhere_or_byte_by_byte_gives_the_same_events(raw, cuts):
    whole = parse_all([raw])
    assert parse_all(split_at(raw, cuts)) == whole
    assert parse_all([raw[i:i + 1] for i in range(len(raw))]) == whole
    for event, data in whole:
        assert event is None or isinstance(event, str)
        assert isinstance(data, str)


# == Anthropic -> OpenAI request ===========================================================

image_sources = junk_or(
    st.fixed_dictionaries({"type": st.just("base64"), "media_type": junk_or(st.just("image/png")),
                           "data": junk_or(st.just("iVBORw0KGgo="))}),
    st.fixed_dictionaries({"type": st.just("url"), "url": junk_or(st.just("https://example.com/a.png"))}),
    st.fixed_dictionaries({"type": junk_or(st.just("file"), st.just("text")), "data": json_values}))

blocks = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": junk_or(clean_text)}),
    st.fixed_dictionaries({"type": st.just("image"), "source": image_sources}),
    st.fixed_dictionaries({"type": st.just("document"), "source": image_sources,
                           "title": json_values}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": junk_or(st.just("toolu_1")),
                           "name": junk_or(st.just("Read")), "input": json_values}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": junk_or(st.just("toolu_1")),
                           "content": json_values, "is_error": json_values}),
    st.fixed_dictionaries({"type": st.just("thinking"), "thinking": json_values,
                           "signature": json_values}),
    st.fixed_dictionaries({"type": st.just("search_result"), "title": json_values,
                           "content": json_values, "source": json_values}),
    st.dictionaries(clean_text, json_values, max_size=3))

messages = st.lists(junk_or(st.fixed_dictionaries({
    "role": junk_or(st.sampled_from(["user", "assistant", "system"])),
    "content": junk_or(clean_text, st.lists(blocks, max_size=4))})), max_size=5)

tools = st.lists(junk_or(st.fixed_dictionaries({
    "name": junk_or(clean_text), "description": json_values,
    "input_schema": junk_or(st.just({"type": "object", "properties": {"a": {"type": "string"}}}))})),
    max_size=3)

anthropic_requests = junk_or(st.fixed_dictionaries(
    {"model": junk_or(st.just("claude-sonnet-4-5")), "messages": messages},
    optional={"max_tokens": junk_or(st.integers(-5, 10 ** 7)), "system": junk_or(clean_text, st.lists(blocks)),
              "tools": tools, "tool_choice": json_values, "thinking": json_values,
              "stop_sequences": json_values, "temperature": json_values, "top_p": json_values,
              "top_k": json_values, "stream": json_values, "metadata": json_values}))

IMAGE_SOURCE_5 = {"model": "claude-sonnet-4-5", "max_tokens": 10,
                  "messages": [{"role": "user", "content": [{"type": "image", "source": 5}]}]}


@FUZZ
@given(anthropic_requests, st.booleans())
@example(IMAGE_SOURCE_5, True)
@example({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [
    {"type": "document", "source": 5}]}]}, True)
@example({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [
    {"type": "image", "source": {"type": "base64", "media_type": 5, "data": []}}]}]}, True)
def test_anthropic_request_translates_or_is_a_400(req, vision):
    ctx = make_ctx(model_info={"vision": vision, "max_output_tokens": 8192, "context_window": 128000})
    try:
        body = I.anthropic_to_openai_request(req, ctx)
    except Exception as exc:  # noqa: BLE001
        assert is_documented_error(exc) and exc.status < 500, repr(exc)
        return
    assert body["model"] == ctx.upstream_model
    assert isinstance(body["messages"], list) and body["messages"]
    assert all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in body["messages"])
    json.dumps(body, ensure_ascii=False).encode("utf-8")  # what the provider sends upstream


def test_image_block_with_a_number_as_source_is_a_400():  # issue 10, defect 8
    with pytest.raises(I.Iflow2apiError) as info:
        I.anthropic_to_openai_request(IMAGE_SOURCE_5, make_ctx(model_info={"vision": True}))
    assert info.value.status == 400


# == OpenAI -> Anthropic response, and the stream state machine ============================

tool_call_entries = junk_or(st.fixed_dictionaries(
    {"index": junk_or(st.integers(0, 3)), "id": junk_or(st.just("call_1")), "type": json_values,
     "function": junk_or(st.fixed_dictionaries({"name": junk_or(st.just("Read")),
                                                "arguments": junk_or(st.just('{"a": 1}'), clean_text)}))}))

deltas = junk_or(st.fixed_dictionaries({}, optional={
    "role": json_values, "content": junk_or(clean_text, st.just("<think>a</think>b")),
    "reasoning_content": junk_or(clean_text), "tool_calls": junk_or(st.lists(tool_call_entries, max_size=3)),
    "function_call": json_values}))

usages = junk_or(st.fixed_dictionaries({}, optional={
    "prompt_tokens": junk_or(st.integers(0, 10 ** 6)), "completion_tokens": junk_or(st.integers(0, 10 ** 6)),
    "prompt_tokens_details": json_values}))

choices = junk_or(st.fixed_dictionaries(
    {"index": json_values, "delta": deltas, "message": deltas,
     "finish_reason": junk_or(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))}))

openai_chunks = junk_or(st.fixed_dictionaries({"choices": junk_or(st.lists(choices, max_size=2))},
                                              optional={"usage": usages, "error": json_values,
                                                        "msg": json_values, "status": json_values}))


def stream_ctx(thinking):
    ctx = make_ctx()
    ctx.thinking_requested = thinking
    ctx.tool_names = {"Read": "Read"}
    return ctx


@FUZZ
@given(openai_chunks, st.booleans())
@example({"choices": [{"message": 5}]}, False)
@example({"choices": [5]}, False)
@example({"choices": [{"message": {"tool_calls": [{"function": 5}]}, "finish_reason": "tool_calls"}]}, False)
@example({"choices": [{"message": {"content": ["a"]}}], "usage": {"prompt_tokens": "x"}}, False)
def test_openai_response_translates_or_is_an_upstream_error(resp, thinking):
    try:
        message = I.openai_to_anthropic_response(resp, stream_ctx(thinking))
    except Exception as exc:  # noqa: BLE001
        assert is_documented_error(exc), repr(exc)
        return
    assert message["type"] == "message" and message["role"] == "assistant"
    assert isinstance(message["content"], list)
    json.dumps(message, ensure_ascii=False).encode("utf-8")


@FUZZ
@given(st.lists(openai_chunks, max_size=6), st.booleans(), st.booleans())
@example([{"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": 5}}]}}]}], True, False)
@example([{"choices": [{"delta": {"content": 5}}]}, {"choices": 5}], True, True)
def test_anthropic_stream_gives_a_valid_event_sequence_for_any_chunks(chunks, done, thinking):
    stream = I.AnthropicStream(stream_ctx(thinking))
    events = []
    try:
        for c in chunks:
            events += stream.feed(c)
        events += stream.close(done)
    except Exception as exc:  # noqa: BLE001
        # only allowed before anything was sent: the HTTP layer then answers an HTTP error
        assert is_documented_error(exc), repr(exc)
        assert not events, "error raised after events were sent: %r" % exc
        return
    check_event_grammar(events)
    if events[-1][0] == "error":
        with pytest.raises(I.UpstreamError):  # documented: a failed stream aggregates to an error
            I.aggregate_stream_to_message(events)
    else:
        I.aggregate_stream_to_message(events)
    for event in events:
        I.encode_anthropic_event(event)


# == Config loading ========================================================================

def value_for(default):
    """Values for a config key: its own type mostly, anything sometimes."""
    if isinstance(default, bool):
        own = st.booleans() | st.sampled_from(["yes", "off", "maybe"])
    elif isinstance(default, (int, float)):
        own = st.integers(-10, 10 ** 9) | st.floats() | st.sampled_from(["inf", "-inf", "nan", "1e400", "12"])
    elif isinstance(default, str):
        own = clean_text | st.sampled_from(["notaurl", "http://127.0.0.1:1", "socks5://u:p@127.0.0.1:1"])
    else:
        own = json_values
    return own | json_values


config_files = st.fixed_dictionaries({}, optional={key: value_for(default)
                                                   for key, default in I.DEFAULT_CONFIG.items()}) \
    | st.dictionaries(clean_text, json_values, max_size=4)

def check_loaded_config(config):
    for key, default in I.DEFAULT_CONFIG.items():
        value = config[key]
        assert isinstance(value, type(default)), (key, value)
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
        assert I._out_of_range(key, value) is None, (key, value)
    I.Limits.from_config(config)
    config.save()  # a loaded config can be written back (defect 4: one value poisons every save)
    backend = I.Backend(config)  # what `serve` builds next: must not fail on a loaded config
    try:
        backend.has_credentials()
        for route in backend.routes.values():
            route.catalogue.known_ids()
    finally:
        backend.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(config_files)
@example({"upstream_connect_timeout_s": "inf"})  # defect 12
@example({"upstream_read_timeout_s": 1e400})
@example({"upstream_proxy": "notaurl", "upstream_proxy_enabled": True})  # defect 12
@example({"default_model": "a\ud800b"})  # defect 4
@example({"providers": {"p": 5, "q": {"base_url": 5, "headers": 5, "api_keys": 5}}})
@example({"accounts": [5, {"api_key": 5}, {"id": None}]})
@example({"model_map": {"a": 5}, "port": 70000, "api_keys": [5, None, "enc:v1:!!"]})
def test_config_from_a_random_json_file_loads_usable_values(home, data):
    path = home / "config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    try:
        config = I.Config(path=str(path))
    except Exception as exc:  # noqa: BLE001
        assert is_documented_error(exc), repr(exc)
        return
    check_loaded_config(config)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.sampled_from([b"{\"port\": 1", b"[]", b"null", b"\x00", b"{}"]))
@example(b"\xff\xfe{}")
def test_config_from_random_bytes_falls_back_to_defaults_with_a_warning(home, raw):
    path = home / "config.json"
    path.write_bytes(raw)
    try:
        config = I.Config(path=str(path))
    except Exception as exc:  # noqa: BLE001
        assert is_documented_error(exc), repr(exc)
        return
    check_loaded_config(config)
    try:
        is_object = isinstance(json.loads(raw.decode("utf-8")), dict)
    except ValueError:
        is_object = False
    if raw.strip() and not is_object:
        assert config.warnings and not config.file_data


def test_a_finish_reason_that_is_not_a_string_is_ignored():
    resp = {"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": [None]}]}
    message = I.openai_to_anthropic_response(resp, I.TranslationContext(client_model="m", upstream_model="m"))
    assert message["content"] == [{"type": "text", "text": "hi"}]
    ctx = I.ResponsesContext(client_model="m", upstream_model="m")
    assert I.openai_to_responses_response(resp, ctx)["output_text"] == "hi"


# -- the Responses request translation ------------------------------------------------------------

input_parts = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "refusal"]),
                           "text": junk_or(clean_text)}),
    st.fixed_dictionaries({"type": st.just("input_image"),
                           "image_url": junk_or(st.sampled_from(["https://x/y.png", "data:image/png;base64,AA"]))}),
    json_values)
input_items = st.lists(junk_or(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer"]),
                           "content": junk_or(st.lists(input_parts, max_size=3) | clean_text)}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": junk_or(st.just("call_1")),
                           "name": junk_or(st.just("f")), "arguments": junk_or(st.just("{}"))}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": junk_or(st.just("call_1")),
                           "output": junk_or(clean_text)}),
    st.fixed_dictionaries({"type": st.just("reasoning"), "summary": junk_or(st.lists(json_values, max_size=2))}))),
    max_size=5)
responses_requests = junk_or(st.fixed_dictionaries(
    {"model": junk_or(st.just("glm-5")), "input": junk_or(input_items | clean_text)},
    optional={"instructions": junk_or(clean_text), "max_output_tokens": junk_or(st.integers(-5, 10 ** 7)),
              "tools": junk_or(st.lists(junk_or(st.fixed_dictionaries(
                  {"type": st.sampled_from(["function", "custom", "namespace", "web_search"]),
                   "name": junk_or(st.just("t"))})), max_size=3)),
              "tool_choice": json_values, "reasoning": json_values, "text": json_values}))


@FUZZ
@given(responses_requests)
def test_responses_request_translates_or_is_a_400(req):
    ctx = I.ResponsesContext(client_model="glm-5", upstream_model="glm-5",
                             model_info={"vision": True, "max_output_tokens": 8192, "context_window": 128000})
    try:
        body = I.responses_to_openai_request(req, ctx)
    except Exception as exc:  # noqa: BLE001
        assert is_documented_error(exc) and exc.status < 500, repr(exc)
        return
    assert body["model"] == "glm-5" and isinstance(body["messages"], list)
    json.dumps(body, ensure_ascii=False).encode("utf-8")
