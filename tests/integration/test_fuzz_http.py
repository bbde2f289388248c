"""Fuzzing both HTTP adapters over a real socket (issue 10, "Then keep it that way").

Requests are built as bytes (heads, bodies, chunked or not), cut at random points and
sent to the in-process server on 127.0.0.1. The property: a clean 4xx/5xx with a JSON
body in the route's dialect, or a correct answer (the fake upstream's reply); never a
connection dropped without an answer for a complete request, never a traceback in the
log or on stderr, the in-flight counters back at zero and GET /health 200 afterwards.

The inputs of the issue's defects 1, 8, 9 and 14 are kept as explicit cases at the end.
"""
import json
import logging
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import iflow2api
from fakes import Reply, chunk, sse
from fuzzing import json_values as json_junk, junk_or, split_at
from helpers import http, wait_until, write_settings
from test_admin_api import Client
from test_server import raw_request, read_response

SETTINGS = settings(max_examples=60, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ANSWER = "Hello world"  # what the fake upstream says by default
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions", "/api/v1/chat/completions")
MESSAGES_PATHS = ("/v1/messages", "/messages", "/api/v1/messages")


# -- fixtures: the log, stderr, and the server's state after each input --------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def watch(server, capfd):
    """check() after each input: no traceback logged or printed, counters at zero, /health 200."""
    logger = logging.getLogger("iflow2api")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)

    class Watch:
        records = handler.records

        def check(self, what=""):
            settle(server)
            problems = [r for r in handler.records if r.exc_info or "Traceback" in r.getMessage()]
            handler.records.clear()
            err = capfd.readouterr().err
            assert not problems, "traceback logged after %s: %s" % (what, logging.Formatter().format(problems[0]))
            assert "Traceback" not in err, "traceback on stderr after %s:\n%s" % (what, err[-3000:])
            status, _h, body = http(server, "GET", "/health")
            assert status == 200, "GET /health answered %d after %s: %r" % (status, what, body[:300])

        def messages(self):
            return [r.getMessage() for r in handler.records]

    yield Watch()
    logger.removeHandler(handler)
    logger.setLevel(level)


def in_flight(server) -> list:
    """Every in-flight counter of the instance: its limiter and each account of each provider."""
    counters = [("limiter", server.limiter.in_flight)]
    for route in server.backend.routes.values():
        counters += [("account %s" % a.id, a.in_flight) for a in route.accounts.accounts()]
    return [c for c in counters if c[1]]


def settle(server, timeout_s=3.0):
    """Wait until every in-flight counter is back at zero (a stream ends just after its last byte)."""
    assert wait_until(lambda: not in_flight(server), timeout_s), "in-flight counters stuck: %r" % in_flight(server)


# -- sending bytes and judging answers ------------------------------------------------------------

def exchange(server, pieces, timeout=5.0, pause_s=0.0, see_close=False):
    """Send the pieces on one connection and read one response.

    (status, headers, body, closed): with see_close, closed says whether the server closed
    the connection after answering (else None). None when it closed without any answer."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except OSError:
                break  # refused early (e.g. 413): read the answer below
            if pause_s:
                time.sleep(pause_s)
        try:
            status, headers, body = read_response(sock, timeout)
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, socket.timeout):
                raise AssertionError("no answer within %.0f s" % timeout) from None
            return None
        return status, headers, body, closed_soon(sock) if see_close else None
    finally:
        sock.close()


def closed_soon(sock, timeout=2.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def dialect_of(path: str) -> str:
    return "anthropic" if path.split("?")[0].startswith(MESSAGES_PATHS) else "openai"


def check_error_body(status, body, dialect, what=""):
    """A JSON error in the dialect's shape."""
    try:
        data = json.loads(body)
    except ValueError:
        raise AssertionError("%d answer to %s is not JSON: %r" % (status, what, body[:300])) from None
    if dialect == "anthropic":
        assert data.get("type") == "error", (what, data)
        assert isinstance(data["error"]["type"], str) and isinstance(data["error"]["message"], str), (what, data)
    else:
        assert isinstance(data.get("error"), dict), (what, data)
        assert isinstance(data["error"]["message"], str) and isinstance(data["error"]["type"], str), (what, data)
    return data


def sse_datas(body: bytes) -> list:
    parser = iflow2api.SSEParser()
    return [json.loads(d) for _e, d in parser.feed(body) + parser.flush() if d.strip() != "[DONE]"]


def answer_text(path, status, headers, body) -> str:
    """The text of a 200 answer on a chat route, however it was framed."""
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = sse_datas(body)
        if dialect_of(path) == "anthropic":
            return "".join(e["delta"].get("text", "") for e in events if e.get("type") == "content_block_delta")
        return "".join((c["choices"][0]["delta"].get("content") or "") for c in events if c.get("choices"))
    data = json.loads(body)
    if dialect_of(path) == "anthropic":
        return "".join(b.get("text", "") for b in data["content"] if b["type"] == "text")
    return data["choices"][0]["message"]["content"]


def judge(server, method, path, answer, what=""):
    """The property for one complete request; returns the answer."""
    assert answer is not None, "connection closed without an answer to %s" % what
    status, headers, body, _closed = answer
    assert 200 <= status <= 599, (status, what)
    assert status != 500, "500 for %s: %r" % (what, body[:500])
    if status >= 400 and method != "HEAD":
        check_error_body(status, body, dialect_of(path), what)
    elif status == 200 and method == "POST" and path in CHAT_PATHS + MESSAGES_PATHS:
        assert answer_text(path, status, headers, body) == ANSWER, (what, body[:500])
    return answer


def chunked(body: bytes, sizes) -> bytes:
    """body in chunked framing, chunk lengths taken from sizes (cycled)."""
    out, i, n = [], 0, 0
    while i < len(body):
        size = max(1, sizes[n % len(sizes)]) if sizes else len(body)
        out.append(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]))
        i, n = i + size, n + 1
    return b"".join(out) + b"0\r\n\r\n"


def request_bytes(method, path, body=b"", headers=(), framing="length", version="HTTP/1.1", sizes=()):
    """A complete request; framing: "length", "chunked" or "none" (no body header)."""
    headers = list(headers)
    if framing == "chunked":
        return raw_request(method, path, b"", headers + [("Transfer-Encoding", "chunked")], version) \
            + chunked(body, list(sizes))
    if framing == "length" and (body or method in ("POST", "PUT", "PATCH")):
        headers.append(("Content-Length", str(len(body))))
    return raw_request(method, path, b"", headers, version) + body


# -- strategies ------------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


chat_bodies = junk_or(st.fixed_dictionaries(
    {"model": junk_or(st.sampled_from(["glm-5", "glm-4.6", "sonnet"])),
     "messages": junk_or(st.lists(junk_or(st.fixed_dictionaries(
         {"role": junk_or(st.sampled_from(["user", "system", "assistant", "tool"])),
          "content": junk_or(text, st.lists(json_junk, max_size=2))})), min_size=1, max_size=3))},
    optional={"stream": junk_or(st.booleans()), "max_tokens": json_junk, "temperature": json_junk,
              "tools": json_junk, "stream_options": json_junk, "n": json_junk}))

message_bodies = junk_or(st.fixed_dictionaries(
    {"model": junk_or(st.sampled_from(["claude-sonnet-4-5", "glm-5", "haiku"])),
     "max_tokens": junk_or(st.integers(1, 4096)),
     "messages": junk_or(st.lists(junk_or(st.fixed_dictionaries(
         {"role": junk_or(st.sampled_from(["user", "assistant"])),
          "content": junk_or(text, st.lists(junk_or(st.fixed_dictionaries(
              {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "document", "thinking"]),
               "text": junk_or(text), "source": json_junk, "input": json_junk, "content": json_junk})),
              max_size=2))})), min_size=1, max_size=3))},
    optional={"stream": junk_or(st.booleans()), "system": json_junk, "tools": json_junk,
              "thinking": json_junk, "tool_choice": json_junk, "stop_sequences": json_junk}))

ROUTES = st.sampled_from([("POST", p, "chat") for p in CHAT_PATHS] + [("POST", p, "messages") for p in MESSAGES_PATHS]
                         + [("POST", "/v1/messages/count_tokens", "messages"), ("POST", "/v1", "chat"),
                            ("POST", "/", "messages"), ("GET", "/health", None), ("GET", "/v1/models", None),
                            ("GET", "/v1/models/glm-5", None), ("POST", "/admin/api/login", "junk"),
                            ("GET", "/admin/api/config", None), ("GET", "/static/admin/app.js", None),
                            ("DELETE", "/v1/chat/completions", "chat"), ("OPTIONS", "/v1/messages", None),
                            ("PUT", "/nowhere", "junk"), ("GET", "/v1/models/%00", None)])

EXTRA_HEADERS = st.lists(st.sampled_from([
    ("Content-Type", "application/json"), ("Content-Type", "text/plain"), ("Connection", "close"),
    ("Connection", "keep-alive"), ("Accept", "text/event-stream"), ("Accept-Encoding", "gzip"),
    ("Origin", "http://127.0.0.1"), ("Access-Control-Request-Method", "POST"), ("Authorization", "Bearer x"),
    ("x-api-key", "whatever"), ("anthropic-version", "2023-06-01"), ("X-Empty", ""),
    ("X-Latin", "caf\xe9"), ("X-Long", "a" * 3000), ("Cookie", "iflow2api_admin=nope")]), max_size=5, unique=True)


@st.composite
def requests(draw):
    """(method, path, raw bytes, description) of one complete request."""
    method, path, kind = draw(ROUTES)
    if kind == "chat":
        body = json.dumps(draw(chat_bodies)).encode()
    elif kind == "messages":
        body = json.dumps(draw(message_bodies)).encode()
    elif kind == "junk":
        body = draw(st.binary(max_size=200) | json_junk.map(lambda v: json.dumps(v).encode()))
    else:
        body = b""
    framing = draw(st.sampled_from(["length", "chunked"])) if body else draw(st.sampled_from(["length", "none"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    if version == "HTTP/1.0" and framing == "chunked":
        framing = "length"
    headers = draw(EXTRA_HEADERS)
    raw = request_bytes(method, path, body, headers, framing, version, draw(st.lists(st.integers(1, 64), max_size=4)))
    return method, path, raw


@SETTINGS
@given(req=requests(), cuts=st.lists(st.integers(0, 10 ** 5), max_size=6), pause=st.sampled_from([0.0, 0.0, 0.002]))
@example(req=("POST", "/v1/messages", request_bytes("POST", "/v1/messages", b'{"model": "haiku", "max_tokens": 16, '
                                                    b'"messages": 1.5e+190}')), cuts=[], pause=0.0)
def test_any_complete_request_gets_a_clean_answer(server, watch, req, cuts, pause):
    method, path, raw = req
    what = repr(raw[:300])
    judge(server, method, path, exchange(server, split_at(raw, cuts), pause_s=pause), what)
    watch.check(what)


mutations = st.lists(st.tuples(st.integers(0, 10 ** 5), st.sampled_from(["flip", "insert", "delete"]),
                               st.binary(min_size=1, max_size=3)), min_size=1, max_size=4)


def mutate(raw: bytes, edits) -> bytes:
    data = bytearray(raw)
    for pos, op, value in edits:
        i = pos % (len(data) + 1)
        if op == "insert":
            data[i:i] = value
        elif op == "delete":
            del data[i:i + len(value)]
        elif i < len(data):
            data[i] = value[0]
    return bytes(data)


@SETTINGS
@given(req=requests(), edits=mutations, cuts=st.lists(st.integers(0, 10 ** 5), max_size=4))
@example(req=("GET", "/health", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"), edits=[(4, "flip", b"\x00")],
         cuts=[])
@example(req=("GET", "/health", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"), edits=[(9, "insert", b"\r\n")],
         cuts=[3])
def test_damaged_requests_are_answered_or_closed_never_500(server, watch, req, edits, cuts):
    """Bytes changed anywhere: the server answers (not 500) or closes; it never hangs once
    the client stops sending, and stays healthy."""
    method, path, raw = req
    data = mutate(raw, edits)
    what = repr(data[:300])
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        for piece in split_at(data, cuts):
            try:
                sock.sendall(piece)
            except OSError:
                break
        sock.settimeout(1.5)
        try:
            first = sock.recv(65536)
        except socket.timeout:  # the server waits for more (a longer body, the end of the head)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            try:
                first = sock.recv(65536)
            except socket.timeout:
                raise AssertionError("no answer and no close 5 s after the client's EOF: %s" % what) from None
            except OSError:
                first = b""
        except OSError:
            first = b""
        if first:
            status = int(first.split(b" ", 2)[1]) if first.startswith(b"HTTP/1.") else None
            assert status is not None and 100 <= status <= 599 and status != 500, (first[:300], what)
    finally:
        sock.close()
    watch.check(what)


# == Explicit cases: the inputs of issue 10 (defects 1, 8, 9, 14) ===================================

CHAT = {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
BODY = json.dumps(CHAT).encode()
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def refused(server, raw, path="/v1/chat/completions", statuses=range(400, 500), must_close=True, pieces=None):
    """raw gets an error answer in the path's dialect (and the connection closed)."""
    answer = exchange(server, pieces or [raw], see_close=must_close)
    assert answer is not None, "connection closed without an answer"
    status, _headers, body, closed = answer
    assert status in statuses, "answered %d: %r" % (status, body[:300])
    check_error_body(status, body, dialect_of(path), repr(raw[:120]))
    if must_close:
        assert closed, "connection kept open after a refused framing"
    return answer


@pytest.mark.parametrize("size", [b"-1", b"+2", b"1_0"])
def test_chunk_size_that_is_not_hex_digits_is_a_400(server, watch, size):  # defect 1
    raw = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + BODY[:16] + b"\r\n0\r\n\r\n"
    refused(server, raw)
    watch.check(repr(size))


def test_negative_chunk_size_does_not_bypass_max_body_bytes(watch_limits):
    """A "-1" chunk followed by more than max_body_bytes, the connection left open: refused at once."""
    server = watch_limits(max_body_bytes=1000)
    raw = HEAD + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n" + b"x" * 50000
    started = time.monotonic()
    refused(server, raw)
    assert time.monotonic() - started < 4


@pytest.fixture
def watch_limits(start_server, fake_upstream, home):
    """start(**config): a server with other limits, on the fake upstream."""
    write_settings(str(home), fake_upstream.url)
    return start_server


def test_two_different_content_lengths_are_a_400_and_close(server, watch):  # defect 14
    raw = HEAD + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(BODY) + BODY
    refused(server, raw)
    watch.check("two Content-Length values")


@pytest.mark.parametrize("coding", [b"gzip", b"xchunked", b"chunked, gzip", b"identity"])
def test_transfer_encoding_other_than_chunked_is_refused_and_closed(server, watch, coding):  # defect 14
    body = chunked(BODY, [16]) if b"chunked" in coding else BODY
    raw = HEAD + b"Transfer-Encoding: " + coding + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    refused(server, raw, statuses=(400, 501))
    watch.check(repr(coding))


def test_content_length_with_transfer_encoding_is_a_400_and_close(server, watch):  # defect 14
    body = chunked(BODY, [10])
    raw = HEAD + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body) + body
    refused(server, raw)
    watch.check("CL + TE")


DEEP = b"[" * 100000 + b"]" * 100000
DEEP_OBJECT = b'{"model": "glm-5", "messages": ' + b'{"a":' * 50000 + b"1" + b"}" * 50000 + b"}"


@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT], ids=["array", "object"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_deeply_nested_json_is_a_400_in_the_route_dialect(server, watch, path, body):  # defect 8
    raw = request_bytes("POST", path, body, [("Content-Type", "application/json")])
    refused(server, raw, path, statuses=(400, 413), must_close=False)
    watch.check("deep JSON on %s" % path)


def test_deeply_nested_json_on_admin_login_is_a_400(server, watch):  # defect 8
    assert Client(server.url).setup().status == 200  # login parses the body only once a password exists
    raw = request_bytes("POST", "/admin/api/login", DEEP, [("Content-Type", "application/json")])
    refused(server, raw, "/admin/api/login", statuses=(400, 413), must_close=False)
    watch.check("deep JSON on /admin/api/login")


def with_surrogate(body: dict, field: str) -> bytes:
    """body as JSON text with a lone surrogate escape in one field (content, model or role)."""
    marker = "SURROGATE-HERE"
    body = json.loads(json.dumps(body))
    if field == "model":
        body["model"] += marker
    else:
        body["messages"][0][field] += marker
    return json.dumps(body).replace(marker, "\\ud800").encode()


@pytest.mark.parametrize("field", ["content", "model", "role"])
@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT), ("/v1/messages", MESSAGE),
                                       ("/v1/messages", dict(MESSAGE, stream=True)),
                                       ("/v1/chat/completions", dict(CHAT, stream=True))],
                         ids=["openai", "anthropic", "anthropic-stream", "openai-stream"])
def test_lone_surrogates_are_a_400_and_release_the_counters(server, watch, path, body, field):  # defect 8
    raw = request_bytes("POST", path, with_surrogate(body, field), [("Content-Type", "application/json")])
    refused(server, raw, path, must_close=False)
    watch.check("lone surrogate in %s on %s" % (field, path))  # includes: in-flight counters at zero


def test_image_with_a_number_as_source_is_a_400(server, watch):  # defect 8
    body = dict(MESSAGE, messages=[{"role": "user", "content": [{"type": "text", "text": "look"},
                                                               {"type": "image", "source": 5}]}])
    raw = request_bytes("POST", "/v1/messages", json.dumps(body).encode(), [("Content-Type", "application/json")])
    refused(server, raw, "/v1/messages", must_close=False)
    watch.check('"source": 5')


@pytest.mark.parametrize("target", [b"/static/%00", b"/static/a%00.js", b"/admin/%00", b"/v1/models/%00",
                                    b"/v1/chat/completions%00", b"/static/\x00", b"/v1/\x00models", b"/\x00"],
                         ids=repr)
def test_nul_byte_in_the_path_is_a_4xx(server, watch, target):  # defect 8
    raw = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer = exchange(server, [raw])
    assert answer is not None, "connection closed without an answer"
    status, _h, body, _closed = answer
    assert 400 <= status < 500, "answered %d: %r" % (status, body[:300])
    check_error_body(status, body, "openai", repr(target))
    watch.check(repr(target))


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT), ("/v1/messages", MESSAGE)])
def test_model_name_with_a_newline_does_not_forge_log_lines(server, watch, path, body):  # defect 15
    forged = "glm-5\n12:00:00 INFO FORGED-LINE status=200\r\nX"
    raw = request_bytes("POST", path, json.dumps(dict(body, model=forged)).encode(),
                        [("Content-Type", "application/json")])
    judge(server, "POST", path, exchange(server, [raw]), "model with a newline")
    time.sleep(0.2)  # the access line is written when the response closes
    lines = watch.messages()
    assert any("FORGED-LINE" in m for m in lines), "the model name is not logged at all"
    forged_lines = [m for m in lines if "\nFORGED" in m or "\r\n" in m or "\rX" in m]
    assert not forged_lines, "a log line carries the raw newline: %r" % forged_lines[0]
    watch.check("model with a newline")


@pytest.mark.parametrize("when", ["after the head", "after the request", "after the answer", "mid-stream"])
def test_client_reset_leaves_no_traceback(server, watch, fake_upstream, when):
    """A client that resets its connection (SO_LINGER 0) at any point is no error of ours."""
    if when == "mid-stream":
        fake_upstream.push(Reply(stream=sse([chunk({"content": "x"})] * 20), piece_delay_s=0.05))
    raw = stream_request("/v1/chat/completions") if when == "mid-stream" else \
        request_bytes("POST", "/v1/chat/completions", BODY, [("Content-Type", "application/json")])
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(raw[:raw.index(b"\r\n\r\n") + 4] if when == "after the head" else raw)
    if when == "after the answer":
        assert read_response(sock)[0] == 200
    elif when == "mid-stream":
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    sock.close()  # RST
    time.sleep(0.3)
    watch.check("client reset %s" % when)


# -- defect 9: upstream faults right after the 200 head ---------------------------------------------

def stream_request(path):
    body = dict(CHAT if dialect_of(path) == "openai" else MESSAGE, stream=True)
    return request_bytes("POST", path, json.dumps(body).encode(), [("Content-Type", "application/json")])


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_upstream_reset_right_after_its_200_head_is_a_502(server, watch, fake_upstream, path):
    fake_upstream.push(Reply(stream=sse([chunk({"content": "x"})]), drop_after=0))
    status, _h, body, _c = exchange(server, [stream_request(path)])
    if status == 200:  # already streaming: the failure must be an error event, not a silent end
        assert b"error" in body, body[:300]
    else:
        assert status == 502, "answered %d: %r" % (status, body[:300])
        check_error_body(status, body, dialect_of(path))
    watch.check("reset after 200 on %s" % path)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_upstream_timeout_right_after_its_200_head_is_a_504(fake_upstream, watch_limits, path):
    server = watch_limits(upstream_read_timeout_s=0.5)
    fake_upstream.push(Reply(stream=sse([chunk({"content": "x"})]), hang_s=2.0))
    status, _h, body, _c = exchange(server, [stream_request(path)], timeout=10)
    if status == 200:
        assert b"error" in body, body[:300]
    else:
        assert status == 504, "answered %d: %r" % (status, body[:300])
        check_error_body(status, body, dialect_of(path))


@pytest.mark.parametrize("choices", [5, [5], [{"message": 5}], [{"message": {"content": 5}}], "x", [None]],
                         ids=repr)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_malformed_upstream_choices_are_not_a_500(server, watch, fake_upstream, path, choices):
    fake_upstream.push(Reply(body={"id": "x", "object": "chat.completion", "choices": choices}))
    body = CHAT if dialect_of(path) == "openai" else MESSAGE
    raw = request_bytes("POST", path, json.dumps(body).encode(), [("Content-Type", "application/json")])
    status, _h, data, _c = exchange(server, [raw])
    assert status != 500, "answered 500: %r" % data[:300]
    if status >= 400:
        check_error_body(status, data, dialect_of(path))
    watch.check("choices=%r on %s" % (choices, path))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_one_huge_upstream_sse_event_fails_the_stream_quickly(server, watch, fake_upstream, path):
    huge = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * (30 * 1024 * 1024) + b'"}}]}\n\n'
    fake_upstream.push(Reply(stream=[huge[i:i + 1024 * 1024] for i in range(0, len(huge), 1024 * 1024)]))
    started = time.monotonic()
    status, _h, body, _c = exchange(server, [stream_request(path)], timeout=30)
    elapsed = time.monotonic() - started
    assert status != 500, body[:300]
    if status >= 400:
        check_error_body(status, body, dialect_of(path))
    else:
        assert b"error" in body[-2000:], "the 30 MB event was passed on: %d bytes" % len(body)
    assert elapsed < 5, "a 30 MB event took %.1f s" % elapsed
    watch.check("30 MB SSE event on %s" % path)
