"""A fake OpenAI-compatible upstream that tests start on 127.0.0.1 and inspect.

It records every request (method, path, headers, body) and answers from a
script: each test queues replies (`push`), or relies on the default replies
(a short completion, an SSE stream, a model list). Canned bodies live here so
tests never build SSE by string concatenation themselves.
"""
import collections
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Recorded = collections.namedtuple("Recorded", "method path headers body")


def completion(text="Hello world", reasoning=None, model="glm-5", usage=(12, 3), tool_calls=None,
               finish_reason=None):
    """A chat.completion body."""
    message = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop")}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                      "total_tokens": usage[0] + usage[1]}}


def chunk(delta=None, finish_reason=None, usage=None, model="glm-5"):
    """One chat.completion.chunk body."""
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
            "model": model, "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}]}
    if usage is not None:
        body["choices"] = []
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": usage[0] + usage[1]}
    return body


def compact_text_chunk(text, finish_reason=None) -> bytes:
    """A text chunk's data as compact JSON, the form the text fast path reads; odd lengths
    escape non-ASCII (\\u00e9) and even ones do not, so both spellings get covered."""
    return json.dumps(chunk({"content": text}, finish_reason), separators=(",", ":"),
                      ensure_ascii=len(text) % 2 == 0).encode()


def text_stream(pieces=("Hel", "lo", " world"), reasoning=(), usage=(12, 3), done=True):
    """Chunks of a streamed answer: reasoning pieces, text pieces, finish, usage, [DONE]."""
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"reasoning_content": r}) for r in reasoning]
    chunks += [chunk({"content": p}) for p in pieces]
    chunks.append(chunk({}, "stop"))
    if usage:
        chunks.append(chunk(usage=usage))
    if done:
        chunks.append("[DONE]")
    return chunks


def tool_delta(index, id=None, name=None, arguments=None):
    """A delta carrying one tool_calls fragment (any of id, name, arguments)."""
    entry = {"index": index}
    if id is not None:
        entry["id"], entry["type"] = id, "function"
    function = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    if function:
        entry["function"] = function
    return {"tool_calls": [entry]}


def multi_tool_stream(calls, text=(), reasoning=(), finish_reason="tool_calls", usage=(12, 3),
                      fragment_size=5, done=True):
    """Chunks of a streamed answer ending in tool calls, one call after another (OpenAI
    style): reasoning pieces, text pieces, then per call (id, name, arguments JSON) one
    chunk with id + name and the arguments in fragments of fragment_size characters."""
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"reasoning_content": r}) for r in reasoning]
    chunks += [chunk({"content": p}) for p in text]
    for i, (call_id, name, arguments) in enumerate(calls):
        chunks.append(chunk(tool_delta(i, id=call_id, name=name, arguments="")))
        for start in range(0, len(arguments), fragment_size):
            chunks.append(chunk(tool_delta(i, arguments=arguments[start:start + fragment_size])))
    chunks.append(chunk({}, finish_reason))
    if usage:
        chunks.append(chunk(usage=usage))
    if done:
        chunks.append("[DONE]")
    return chunks


def sse(events, space=False):
    """Encode chunks (dicts or "[DONE]") as iFlow does: `data:` without a space."""
    prefix = b"data: " if space else b"data:"
    out = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
        out.append(prefix + data.encode("utf-8") + b"\n\n")
    return out


class Reply:
    """A scripted answer: status, JSON/bytes body or a list of SSE pieces written one by one."""

    def __init__(self, status=200, body=None, headers=None, stream=None, delay_s=0.0,
                 piece_delay_s=0.0, drop_after=None, hang_s=0.0):
        self.status, self.body, self.headers = status, body, dict(headers or {})
        self.stream, self.delay_s, self.piece_delay_s = stream, delay_s, piece_delay_s
        self.drop_after, self.hang_s = drop_after, hang_s


class _QuietServer(ThreadingHTTPServer):
    """No traceback on stderr when the proxy under test hangs up mid-answer (tests cause that)."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FakeUpstream:
    """Threaded fake upstream; `url` is the API base (ends in /v1)."""

    def __init__(self):
        self.requests = []
        self.script = collections.deque()
        self.models = ["glm-5", "upstream-only-model"]
        self.refused_keys = set()  # GET /models with one of these keys: 401
        self.models_status = 200  # GET /models answers this (an error body when not 200)
        self.lock = threading.Lock()
        self.closed_connections = 0
        self.active_streams = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._record(b"")
                key = (self.headers.get("authorization") or "").partition(" ")[2]
                if self.path.rstrip("/").endswith("/models") and key in fake.refused_keys:
                    self._send(Reply(401, {"error": {"message": "invalid api key", "type": "authentication_error"}}))
                elif self.path.rstrip("/").endswith("/models") and fake.models_status != 200:
                    self._send(Reply(fake.models_status, {"error": {"message": "models unavailable"}}))
                elif self.path.rstrip("/").endswith("/models"):
                    self._send(Reply(body={"object": "list", "data": [{"id": m, "object": "model"}
                                                                      for m in fake.models]}))
                else:
                    self._send(Reply(404, {"error": {"message": "not found"}}))

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                self._record(body)
                try:
                    request = json.loads(body)
                except ValueError:
                    request = {}
                with fake.lock:
                    reply = fake.script.popleft() if fake.script else None
                if callable(reply):
                    reply = reply(request)
                if reply is None:
                    reply = fake.default_reply(request)
                self._send(reply)

            def _record(self, body):
                with fake.lock:
                    fake.requests.append(Recorded(self.command, self.path,
                                                  {k.lower(): v for k, v in self.headers.items()}, body))

            def _send(self, reply):
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.stream is not None:
                    return self._send_stream(reply)
                body = reply.body
                if not isinstance(body, (bytes, str)):
                    body = json.dumps(body)
                if isinstance(body, str):
                    body = body.encode("utf-8")
                self.send_response(reply.status)
                headers = {"content-type": "application/json"}
                headers.update(reply.headers)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _send_stream(self, reply):
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.send_response(reply.status)
                headers = {"content-type": "text/event-stream"}
                headers.update(reply.headers)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                pieces = reply.stream if reply.stream and isinstance(reply.stream[0], bytes) \
                    else sse(reply.stream)
                with fake.lock:
                    fake.active_streams += 1
                try:
                    if reply.hang_s:
                        time.sleep(reply.hang_s)
                    for i, piece in enumerate(pieces):
                        if reply.drop_after is not None and i >= reply.drop_after:
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        if reply.piece_delay_s:
                            time.sleep(reply.piece_delay_s)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    with fake.lock:
                        fake.closed_connections += 1
                    self.close_connection = True
                finally:
                    with fake.lock:
                        fake.active_streams -= 1

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d/v1" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def default_reply(self, request):
        if request.get("stream"):
            return Reply(stream=text_stream())
        return Reply(body=completion())

    def push(self, *replies):
        with self.lock:
            self.script.extend(replies)

    def chat_requests(self):
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def last_json(self):
        return json.loads(self.chat_requests()[-1].body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def tool_call_stream(name, arguments, call_id="call_fake_1", text=None, usage=(50, 10)):
    """Chunks of an answer that calls one tool (arguments split in two fragments)."""
    chunks = [chunk({"role": "assistant", "content": ""})]
    if text:
        chunks.append(chunk({"content": text}))
    args = json.dumps(arguments)
    half = len(args) // 2
    chunks.append(chunk({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                         "function": {"name": name, "arguments": ""}}]}))
    for part in (args[:half], args[half:]):
        chunks.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
    chunks.append(chunk({}, "tool_calls"))
    chunks.append(chunk(usage=usage))
    chunks.append("[DONE]")
    return chunks
