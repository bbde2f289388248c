"""A budget of work per streamed chunk: a guard against a change that adds per-chunk work
to the two hot paths (issue 16), counted rather than timed so it is deterministic.

The count is of interpreter calls (Python functions and C functions, every socket or
regex call among them) made while the relay turns upstream chunks into client bytes.
The upstream here is a scripted object handing the relay one event per read (or ten),
so the count does not depend on timing; the cost per chunk is the difference between
300 and 100 chunks divided by 200, so start-up and the end of the stream cancel out.
When a change makes a number go down, lower its budget; when it must go up, say why in
the commit."""
import gc
import sys

import pytest

import iflow2api as I

CHUNK = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"glm-5",'
         b'"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n')
DONE = b"data: [DONE]\n\n"

# Calls per chunk, (one chunk per read, ten chunks per read). Measured when set: OpenAI relay
# 11 and 1.1 (bytes pass through untouched), Anthropic text 33 and 15, Responses text 39 and
# 18.3 (both on the fast path).
OPENAI_RELAY_BUDGET = (11, 1.2)
CHUNKED_DECODER_BUDGET = 5  # whole chunks in 64 KiB reads; measured 4 (through the state machine alone: 6)
ANTHROPIC_TEXT_BUDGET = (33, 15)
RESPONSES_TEXT_BUDGET = (39, 18.5)


class ScriptedUpstream:
    """What the relays read: read_some() hands out the next scripted piece, then b""."""

    content_type = "text/event-stream"

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def read_some(self, timeout_s=None):
        return self.pieces.pop(0) if self.pieces else b""

    def close(self):
        pass


class FakeRequest:
    id = "req_budget"

    def __init__(self):
        self.log = {}


def pieces(chunks, per_read):
    events = [CHUNK] * chunks + [DONE]
    return [b"".join(events[i:i + per_read]) for i in range(0, len(events), per_read)]


def calls_made(consume) -> int:
    count = [0]

    def profile(_frame, event, _arg):
        if event in ("call", "c_call"):
            count[0] += 1
    gc.collect()  # garbage of earlier tests (a generator's finally...) must not run in the count
    gc.disable()
    sys.setprofile(profile)
    try:
        consume()
    finally:
        sys.setprofile(None)
        gc.enable()
    return count[0]


def per_chunk(make_stream) -> float:
    """Calls per chunk: consuming 300 chunks minus consuming 100, over 200."""
    few, many = make_stream(100), make_stream(300)
    return (calls_made(lambda: list(many)) - calls_made(lambda: list(few))) / 200


@pytest.fixture
def api(home):
    return I.Instance(I.Config(cli={"port": 0})).api  # never started: only its relays are used


@pytest.mark.parametrize("per_read,budget", [(1, OPENAI_RELAY_BUDGET[0]), (10, OPENAI_RELAY_BUDGET[1])])
def test_the_openai_relay_passes_a_chunk_on_within_its_budget(api, per_read, budget):
    def relay(chunks):
        upstream = ScriptedUpstream(pieces(chunks, per_read))
        return api._relay(FakeRequest(), upstream, lambda: None, upstream.read_some(), I.ReasoningMerger(False))
    cost = per_chunk(relay)
    assert cost <= budget, "the OpenAI relay now makes %.1f calls per chunk (budget %s)" % (cost, budget)


@pytest.mark.parametrize("per_read,budget", [(1, ANTHROPIC_TEXT_BUDGET[0]), (10, ANTHROPIC_TEXT_BUDGET[1])])
def test_an_anthropic_text_chunk_is_translated_within_its_budget(api, per_read, budget):
    def translate(chunks):
        body = {"model": "glm-5", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        stream = I.AnthropicStream(api._anthropic_context(FakeRequest(), body))
        reader = I.ChunkReader(ScriptedUpstream(pieces(chunks, per_read)))
        opening = I._feed_items(stream, reader.next(None), I.ANTHROPIC_FAST)  # starts the message, opens the block
        assert stream.plain_text_target() is not None, "the fast path is not in use"
        return api._anthropic_events(FakeRequest(), reader, stream, opening, lambda: None)
    cost = per_chunk(translate)
    assert cost <= budget, "an Anthropic text chunk now costs %.1f calls (budget %s)" % (cost, budget)


@pytest.mark.parametrize("per_read,budget", [(1, RESPONSES_TEXT_BUDGET[0]), (10, RESPONSES_TEXT_BUDGET[1])])
def test_a_responses_text_chunk_is_translated_within_its_budget(api, per_read, budget):
    def translate(chunks):
        body = {"model": "glm-5", "stream": True, "input": "hi"}
        stream = I.ResponsesStream(api._responses_context(FakeRequest(), body))
        reader = I.ChunkReader(ScriptedUpstream(pieces(chunks, per_read)))
        opening = I._feed_items(stream, reader.next(None), I.RESPONSES_FAST)  # starts, opens the message
        assert stream.plain_text_target() is not None, "the fast path is not in use"
        return api._responses_events(FakeRequest(), reader, stream, opening, lambda: None, None)
    cost = per_chunk(translate)
    assert cost <= budget, "a Responses text chunk now costs %.1f calls (budget %s)" % (cost, budget)


def test_the_chunked_decoder_takes_a_whole_chunk_within_its_budget():
    """Below the relays: the upstream's chunked framing, taken off each read (issue 16)."""
    def decode(chunks):
        body = b"".join(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK) for _ in range(chunks)) + b"0\r\n\r\n"
        decoder = I.ChunkedDecoder()
        return (decoder.feed(body[i:i + 65536]) for i in range(0, len(body), 65536))
    cost = per_chunk(decode)
    assert cost <= CHUNKED_DECODER_BUDGET, "the chunked decoder now makes %.1f calls per chunk" % cost


def test_the_budget_counter_sees_added_work(api):
    """The counter can fail: a relay that parses every chunk's JSON costs more than the budget."""
    def parsing_relay(chunks):
        upstream = ScriptedUpstream(pieces(chunks, 1))
        relay = api._relay(FakeRequest(), upstream, lambda: None, upstream.read_some(), I.ReasoningMerger(False))
        return (I.json.loads(piece[6:-2]) if piece.startswith(b"data: {") else piece for piece in relay)
    assert per_chunk(parsing_relay) > OPENAI_RELAY_BUDGET[0]
