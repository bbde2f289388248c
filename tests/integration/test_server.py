"""HTTP-level behaviour of both adapters over raw sockets: keep-alive, framing,
limits and timeouts, protocol errors, startup as a real process."""
import json
import socket
import subprocess
import sys
import time

import pytest

from helpers import SOURCE, cli_env, free_port, healthy, http, run_cli, wait_until, write_settings

CHAT = json.dumps({"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]}).encode()


def raw_request(method, path, body=b"", headers=(), version="HTTP/1.1"):
    lines = ["%s %s %s" % (method, path, version), "Host: 127.0.0.1"]
    lines += ["%s: %s" % h for h in headers]
    if body and not any(h[0].lower() == "transfer-encoding" for h in headers):
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(sock, timeout=5):
    """(status, headers dict, body) of one response; handles length and chunked framing."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError("closed before head: %r" % buf)
        buf += piece
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            rest += sock.recv(65536)
        return status, headers, rest[:n]
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            while len(rest) < size + 2:
                rest += sock.recv(65536)
            body, rest = body + rest[:size], rest[size + 2:]
            if size == 0:
                return status, headers, body
    while True:  # close-delimited
        piece = sock.recv(65536)
        if not piece:
            return status, headers, rest
        rest += piece


def connect(server):
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def test_keep_alive_serves_several_requests_on_one_connection(server, fake_upstream):
    sock = connect(server)
    for _ in range(3):
        sock.sendall(raw_request("POST", "/v1/chat/completions", CHAT,
                                 [("Content-Type", "application/json")]))
        status, headers, body = read_response(sock)
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello world"
    sock.sendall(raw_request("GET", "/health"))
    assert read_response(sock)[0] == 200
    sock.close()


def _length_delimited_answers(sock, count):
    """The status and body of `count` answers read off one connection (Content-Length framing)."""
    buf, answers = b"", []
    while len(answers) < count:
        head_end = buf.find(b"\r\n\r\n")
        length = None
        if head_end >= 0:
            head = buf[:head_end].decode("latin-1").lower()
            length = int(head.split("content-length:")[1].split("\r\n")[0])
        if length is not None and len(buf) >= head_end + 4 + length:
            answers.append((int(buf.split(b" ", 2)[1]), buf[head_end + 4:head_end + 4 + length]))
            buf = buf[head_end + 4 + length:]
            continue
        piece = sock.recv(65536)
        assert piece, "closed after %d answers" % len(answers)
        buf += piece
    return answers


def test_pipelined_requests_are_answered_in_order(server, fake_upstream):
    """Three requests in one write: the later ones wait in the adapter's buffer, whole."""
    sock = connect(server)
    chat = raw_request("POST", "/v1/chat/completions", CHAT, [("Content-Type", "application/json")])
    sock.sendall(raw_request("GET", "/health") + chat + raw_request("GET", "/v1/models"))
    (health, _), (completion, body), (models, listing) = _length_delimited_answers(sock, 3)
    assert (health, completion, models) == (200, 200, 200)
    assert json.loads(body)["choices"][0]["message"]["content"] == "Hello world"
    assert json.loads(listing)["object"] == "list"
    sock.close()


def test_a_head_trickled_in_small_pieces_within_its_time_is_served(server, fake_upstream):
    sock = connect(server)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = raw_request("POST", "/v1/chat/completions", CHAT, [("Content-Type", "application/json")])
    head_end = request.index(b"\r\n\r\n") + 4
    for i in range(0, head_end, 7):  # a head in pieces of 7 bytes, each its own segment
        sock.sendall(request[i:min(i + 7, head_end)])
        time.sleep(0.005)
    time.sleep(0.1)
    sock.sendall(request[head_end:])  # and the body a while later, as HTTP clients often send it
    status, _headers, body = read_response(sock)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello world"
    sock.close()


def test_stream_is_chunked_on_http11_and_close_delimited_on_http10(server, fake_upstream):
    body = json.dumps({"model": "glm-5", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    for version, framing in (("HTTP/1.1", "chunked"), ("HTTP/1.0", None)):
        sock = connect(server)
        sock.sendall(raw_request("POST", "/v1/chat/completions", body.encode(), version=version))
        status, headers, data = read_response(sock)
        assert status == 200 and headers.get("transfer-encoding") == framing
        assert headers["content-type"].startswith("text/event-stream")
        assert b"data: [DONE]" in data or b"data:[DONE]" in data
        sock.close()


def test_chunked_request_body_is_accepted(server, fake_upstream):
    sock = connect(server)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
    sock.sendall(raw_request("POST", "/v1/chat/completions", chunked, [("Transfer-Encoding", "chunked")]))
    status, _h, body = read_response(sock)
    assert status == 200 and b"Hello world" in body


def test_head_and_options_requests(server):
    sock = connect(server)
    sock.sendall(raw_request("HEAD", "/health"))
    status, headers, _body = _read_head_only(sock)
    assert status == 200 and int(headers["content-length"]) > 0
    sock.sendall(raw_request("GET", "/health"))
    assert read_response(sock)[0] == 200  # the connection is still in sync after HEAD


def _read_head_only(sock):
    sock.settimeout(5)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(1)
    lines = buf.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
    return int(lines[0].split()[1]), headers, b""


def test_malformed_request_is_400_json_and_connection_closed(server):
    sock = connect(server)
    sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
    status, headers, body = read_response(sock)
    assert status == 400
    assert "error" in json.loads(body)
    assert sock.recv(10) == b""


def test_content_length_over_limit_is_413_without_reading_body(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(max_body_bytes=1000)
    sock = connect(server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000000\r\n\r\n")
    status, _h, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_slow_client_times_out_and_does_not_block_others(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(header_timeout_s=0.5)
    slow = connect(server)
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # head never finishes
    fast = connect(server)
    started = time.time()
    fast.sendall(raw_request("POST", "/v1/chat/completions", CHAT))
    assert read_response(fast)[0] == 200
    assert time.time() - started < 2
    slow.settimeout(5)
    data = b""
    try:
        while True:
            piece = slow.recv(4096)
            if not piece:
                break
            data += piece
    except ConnectionResetError:
        pass
    assert time.time() - started < 4  # the slow client was cut off by the header timeout
    assert data == b"" or b" 408 " in data.split(b"\r\n")[0]


def test_idle_keep_alive_connection_is_closed(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(idle_timeout_s=0.3)
    sock = connect(server)
    sock.sendall(raw_request("GET", "/health"))
    assert read_response(sock)[0] == 200
    sock.settimeout(3)
    assert sock.recv(10) == b""


def test_max_connections_answers_503(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(max_connections=2)
    held = [connect(server), connect(server)]
    time.sleep(0.2)
    extra = connect(server)
    status, headers, _b = read_response(extra)
    assert status == 503 and headers["retry-after"] == "1"
    for sock in held:
        sock.close()
    time.sleep(0.2)
    sock = connect(server)
    sock.sendall(raw_request("GET", "/health"))
    assert read_response(sock)[0] == 200


def test_expect_100_continue(server, fake_upstream):
    sock = connect(server)
    sock.sendall(raw_request("POST", "/v1/chat/completions", b"", [("Expect", "100-continue"),
                                                                    ("Content-Length", str(len(CHAT)))]))
    status, _h, _b = _read_head_only(sock)
    assert status == 100
    sock.sendall(CHAT)
    assert read_response(sock)[0] == 200


# -- as a real process ------------------------------------------------------------------------

@pytest.mark.parametrize("http_impl", ["h11", "stdlib"])
def test_cli_process_serves_and_stops_on_sigterm(tmp_path, fake_upstream, http_impl):
    write_settings(str(tmp_path), fake_upstream.url)
    port = free_port()
    base = "http://127.0.0.1:%d" % port
    proc = subprocess.Popen([sys.executable, SOURCE, "--port", str(port)], env=cli_env(tmp_path, IFLOW2API_HTTP=http_impl),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: healthy(base), 10)
        health = json.loads(http(base, "GET", "/health")[2])
        assert health["status"] == "ok" and health["http_adapter"] == http_impl
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode()
        assert proc.returncode == 0
        assert "listening on http://127.0.0.1:%d" % port in out
        assert "sk-fake" not in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_port_in_use_is_a_clear_message(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    result = run_cli(tmp_path, "--port", str(port), timeout=20)
    sock.close()
    assert result.returncode != 0
    assert "cannot listen on 127.0.0.1:%d" % port in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_env_and_config_file_precedence(tmp_path):
    home = tmp_path / ".iflow2api"
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"port": 1234, "concurrency": 3}))
    env = {"IFLOW2API_CONCURRENCY": "5"}
    out = run_cli(tmp_path, "config", "concurrency", env=env, timeout=20)
    assert out.stdout.strip() == "5"
    out = run_cli(tmp_path, "config", "port", "28005", env=env, timeout=20)
    assert out.returncode == 0
    assert json.loads((home / "config.json").read_text()) == {"port": 28005, "concurrency": 3}
    out = run_cli(tmp_path, "config", "port", "abc", env=env, timeout=20)
    assert out.returncode != 0 and "port" in out.stderr and "Traceback" not in out.stderr


def test_slow_loris_head_is_cut_off_by_a_total_deadline(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(header_timeout_s=0.6)
    sock = connect(server)
    sock.settimeout(0.1)
    started = time.time()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40
    answer = None
    for i in range(len(head)):  # one byte every 0.1 s: every read is quick, the head never ends
        try:
            sock.sendall(head[i:i + 1])
            answer = sock.recv(4096)  # times out while the server still waits
            break
        except socket.timeout:
            continue
        except OSError:
            answer = b""
            break
    cut_after = time.time() - started
    assert answer is not None, "the server kept waiting for the head"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")
    assert cut_after < 2.0


# == Framing and bodies (issue 10: defects 1, 7, 14) ============================================

@pytest.mark.parametrize("size", [b"-1", b"+2", b"1_0", b"0x10", b" ", b"1" * 17])
def test_chunk_sizes_that_are_not_plain_hex_are_refused(start_server, fake_upstream, home, size):
    write_settings(str(home), fake_upstream.url)
    server = start_server(max_body_bytes=1000)
    sock = connect(server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + size + b"\r\n" + b"x" * 2000)
    status, _h, body = read_response(sock)
    assert status in (400, 413) and "error" in json.loads(body)
    assert fake_upstream.chat_requests() == []


def test_chunked_body_over_the_limit_is_413(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(max_body_bytes=1000)
    sock = connect(server)
    sock.sendall(raw_request("POST", "/v1/chat/completions", b"400\r\n" + b"x" * 1024 + b"\r\n",
                             [("Transfer-Encoding", "chunked")]))
    status, _h, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("headers, status", [
    ([("Content-Length", "5"), ("Content-Length", "6")], 400),
    ([("Transfer-Encoding", "gzip")], 501),
    ([("Transfer-Encoding", "xchunked")], 501),
    ([("Transfer-Encoding", "chunked"), ("Content-Length", "5")], 400)])
def test_ambiguous_framing_is_refused_and_the_connection_closed(server, fake_upstream, headers, status):
    sock = connect(server)
    lines = "".join("%s: %s\r\n" % h for h in headers)
    sock.sendall(("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % lines).encode()
                 + b"5\r\nhello\r\n0\r\n\r\n")
    got, _h, body = read_response(sock)
    assert got == status and "error" in json.loads(body)
    sock.settimeout(5)
    assert sock.recv(100) == b""  # closed, never read as a second request
    assert fake_upstream.chat_requests() == []


def test_keyless_body_on_a_keyed_server_is_refused_before_it_is_sent(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(api_keys=["client-key-0123456789"])
    sock = connect(server)
    started = time.monotonic()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 30000000\r\n\r\n")
    status, _h, body = read_response(sock)  # answered on the head alone: not one body byte sent
    assert status == 401 and time.monotonic() - started < 3


@pytest.mark.parametrize("framing, trickle", [
    (b"Content-Length: 100", b"x"),
    (b"Transfer-Encoding: chunked", b"0"),  # a chunk-size line of zeros that never ends
])
def test_a_trickled_body_is_cut_off_by_a_total_deadline(start_server, fake_upstream, home, framing, trickle):
    write_settings(str(home), fake_upstream.url)
    server = start_server(body_timeout_s=1.0, header_timeout_s=5.0)
    sock = connect(server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + framing + b"\r\n\r\n")
    started = time.monotonic()
    for _ in range(30):  # one byte every 0.2 s: each read is in time, the whole is not
        sock.sendall(trickle)
        sock.settimeout(0.2)
        try:
            if sock.recv(1, socket.MSG_PEEK):
                break  # answered
        except socket.timeout:
            pass
    status, _h, _b = read_response(sock)
    assert status == 408 and time.monotonic() - started < 4


@pytest.mark.parametrize("path", ["/v1/models%00", "/v1/mod\x00els"])
def test_nul_byte_in_the_path_is_400(server, path):
    sock = connect(server)
    sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path).encode("latin-1"))
    status, _h, body = read_response(sock)
    assert status == 400 and "error" in json.loads(body)


# == Graceful stop (issue 10) ===================================================================

def _serve_process(tmp_path, fake_upstream, http_impl, grace_s):
    write_settings(str(tmp_path), fake_upstream.url)
    port = free_port()
    env = cli_env(tmp_path, IFLOW2API_HTTP=http_impl, IFLOW2API_SHUTDOWN_GRACE_S=str(grace_s))
    proc = subprocess.Popen([sys.executable, SOURCE, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait_until(lambda: healthy("http://127.0.0.1:%d" % port), 10):
        return proc, port
    proc.kill()
    raise AssertionError("server did not start: %s" % proc.communicate()[0].decode())


def _start_stream(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = json.dumps({"model": "glm-5", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock.sendall(raw_request("POST", "/v1/chat/completions", body, [("Content-Type", "application/json")]))
    buf = b""
    while b"data:" not in buf:  # the stream has begun
        buf += sock.recv(65536)
    return sock, buf


def _read_until_closed(sock, buf=b""):
    sock.settimeout(15)
    while True:
        piece = sock.recv(65536)
        if not piece:
            return buf
        buf += piece


@pytest.mark.parametrize("http_impl", ["h11", "stdlib"])
def test_sigterm_lets_a_stream_finish_and_refuses_new_connections(tmp_path, fake_upstream, http_impl):
    from fakes import Reply, text_stream
    fake_upstream.script.append(Reply(stream=text_stream(["one ", "two ", "three ", "four"]), piece_delay_s=0.3))
    proc, port = _serve_process(tmp_path, fake_upstream, http_impl, grace_s=10)
    try:
        sock, buf = _start_stream(port)
        proc.terminate()
        time.sleep(0.3)
        with pytest.raises(OSError):  # no longer listening
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        text = _read_until_closed(sock, buf).decode()
        assert "four" in text and "[DONE]" in text and "shutting down" not in text
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_sigterm_cuts_a_long_stream_with_an_error_event_after_the_grace(tmp_path, fake_upstream, path):
    from fakes import Reply, text_stream
    fake_upstream.script.append(Reply(stream=text_stream(["word "] * 200), piece_delay_s=0.1))
    proc, port = _serve_process(tmp_path, fake_upstream, "h11", grace_s=0.5)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        body = {"model": "glm-5", "stream": True, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
        sock.sendall(raw_request("POST", path, json.dumps(body).encode(), [("Content-Type", "application/json")]))
        buf = b""
        while b"word" not in buf:
            buf += sock.recv(65536)
        started = time.monotonic()
        proc.terminate()
        text = _read_until_closed(sock, buf).decode()
        assert "the server is shutting down" in text and time.monotonic() - started < 8
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
