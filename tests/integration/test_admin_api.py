"""The web admin's JSON API (/admin/api/...) over real HTTP, for both adapters.

A test client keeps cookies in an http.cookiejar.CookieJar like a browser would, and
sends the CSRF token it was handed on every change. A "remote" client is simulated by
connecting from 127.0.0.2 (loopback on Linux, but not one of the addresses the server
treats as this machine), so nothing leaves the host.
"""
import base64
import json
import logging
import os
import re
import socket
import stat
import threading
import time
import urllib.parse
import urllib.request
from http.client import HTTPConnection
from http.cookiejar import CookieJar

import pytest

import iflow2api
from fakes import Reply, text_stream
from helpers import FAKE_KEY, free_port, http, port_open, run_cli, wait_until, write_settings

PASSWORD = "correct horse battery"
COOKIE = "iflow2api_admin"
REMOTE_SOURCE = "127.0.0.2"
CHAT = {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]}

# Every admin route that needs a signed-in session, as the admin API defines them; the test
# below also finds routes added later by reading the router.
GUARDED_ROUTES = [
    ("POST", "/admin/api/logout"), ("POST", "/admin/api/password"),
    ("GET", "/admin/api/status"), ("GET", "/admin/api/logs"), ("GET", "/admin/api/logs/stream"),
    ("GET", "/admin/api/instances"), ("POST", "/admin/api/instances"),
    ("POST", "/admin/api/instances/x/start"), ("POST", "/admin/api/instances/x/stop"),
    ("DELETE", "/admin/api/instances/x"),
    ("GET", "/admin/api/config"), ("PUT", "/admin/api/config"),
    ("GET", "/admin/api/accounts"), ("POST", "/admin/api/accounts"), ("DELETE", "/admin/api/accounts/x"),
    ("POST", "/admin/api/accounts/oauth/start"), ("GET", "/admin/api/accounts/oauth/x"),
    ("POST", "/admin/api/accounts/oauth/x"),
    ("GET", "/admin/api/providers"), ("POST", "/admin/api/providers"), ("DELETE", "/admin/api/providers/x"),
    ("GET", "/admin/api/keys"), ("POST", "/admin/api/keys"), ("DELETE", "/admin/api/keys/x"),
    ("GET", "/admin/api/models"), ("POST", "/admin/api/playground"), ("GET", "/admin/api/usage"),
]
OPEN_ROUTES = {"/admin/api/session", "/admin/api/setup", "/admin/api/login"}


# -- clients -------------------------------------------------------------------------------

class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def header(self, name):
        return self.headers.get(name)

    def all_headers(self, name):
        return self.headers.get_all(name) or []

    def __repr__(self):
        return "<%d %s>" % (self.status, self.body[:300])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


NO_FOLLOW = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


class Client:
    """A browser-like client: urllib with a cookie jar, no proxies, CSRF token on changes."""

    def __init__(self, base_url):
        self.base = base_url.rstrip("/")
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                  urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf = None

    def call(self, method, path, body=None, headers=None, csrf=True, raw=None, timeout=10):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = {"Content-Type": "application/json"} if data is not None else {}
        if csrf and self.csrf and method not in ("GET", "HEAD"):
            sent["X-CSRF-Token"] = self.csrf
        sent.update(headers or {})
        return Answer(*http(self.base, method, path, data, sent, timeout, opener=self.opener))

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.call("POST", path, {} if body is None and "raw" not in kw else body, **kw)

    def put(self, path, body=None, **kw):
        return self.call("PUT", path, body, **kw)

    def delete(self, path, **kw):
        return self.call("DELETE", path, **kw)

    def setup(self, password=PASSWORD):
        answer = self.post("/admin/api/setup", {"password": password})
        if answer.status == 200:
            self.csrf = answer.json()["csrf"]
        return answer

    def login(self, password=PASSWORD):
        answer = self.post("/admin/api/login", {"password": password})
        if answer.status == 200:
            self.csrf = answer.json()["csrf"]
        return answer

    @property
    def session_token(self):
        for cookie in self.jar:
            if cookie.name == COOKIE:
                return cookie.value
        return None


def raw_call(url, method, path, body=None, headers=None, source=None, timeout=10):
    """One request over http.client: exact path bytes, optional source address."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    conn = HTTPConnection(host, int(port), timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        sent = dict(headers or {})
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=sent)
        resp = conn.getresponse()
        return Answer(resp.status, resp.msg, resp.read())
    finally:
        conn.close()


def remote_call(url, method, path, body=None, headers=None):
    return raw_call(url, method, path, body, headers, source=REMOTE_SOURCE)


def v1(url, method, path, body=None, headers=None, timeout=10):
    """A public API call (/v1, /health) with urllib."""
    return Answer(*http(url, method, path, body, headers, timeout))


def read_config_file(server):
    with open(server.config.path, encoding="utf-8") as f:
        return f.read()


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture
def admin(server):
    """A client of a server with the fake upstream, before any admin password exists."""
    return Client(server.url)


@pytest.fixture
def signed_in(admin):
    answer = admin.setup()
    assert answer.status == 200, answer
    return admin


@pytest.fixture(scope="session")
def remote_source():
    """127.0.0.2 as a client address, where the OS allows it (Linux does)."""
    try:
        with socket.socket() as s:
            s.bind((REMOTE_SOURCE, 0))
    except OSError:
        pytest.skip("cannot use %s as a source address here" % REMOTE_SOURCE)
    return REMOTE_SOURCE


# -- first run, sign-in, sessions ----------------------------------------------------------

def test_first_run_setup_only_from_loopback_and_only_once(admin, server, remote_source):
    session = admin.get("/admin/api/session").json()
    assert session["logged_in"] is False and session["needs_setup"] is True
    assert session["setup_allowed"] is True and session["csrf"] is None
    assert remote_call(server.url, "GET", "/admin/api/session").json()["setup_allowed"] is False

    # No default credentials: nothing gets in before a password exists.
    assert admin.login("admin").status == 409
    assert admin.login("").status == 409
    assert admin.get("/admin/api/status").status == 401

    # Another machine cannot choose the password, whatever headers it sends.
    for headers in ({}, {"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.1"},
                    {"Forwarded": "for=127.0.0.1"}, {"Host": "127.0.0.1"}):
        answer = remote_call(server.url, "POST", "/admin/api/setup", {"password": PASSWORD}, headers)
        assert answer.status == 403, (headers, answer)
        assert COOKIE not in (answer.header("set-cookie") or "")

    # At least 8 characters, a string.
    for body in ({"password": "7-chars"}, {"password": ""}, {"password": 123456789}, {},
                 {"password": None}):
        answer = admin.post("/admin/api/setup", body)
        assert answer.status == 400, (body, answer)
        assert "8" in answer.json()["error"]["message"]
    assert admin.post("/admin/api/setup", raw=b"not json").status == 400
    assert admin.get("/admin/api/session").json()["needs_setup"] is True

    answer = admin.setup("exactly8")
    assert answer.status == 200, answer
    assert isinstance(answer.json()["csrf"], str) and len(answer.json()["csrf"]) >= 16
    assert admin.session_token, "setup signs this browser in"
    session = admin.get("/admin/api/session").json()
    assert session == dict(session, logged_in=True, needs_setup=False, csrf=admin.csrf)
    assert admin.get("/admin/api/status").status == 200

    # Only once: a second setup is a conflict, from here and from elsewhere.
    assert Client(server.url).setup("another password").status == 409
    assert admin.post("/admin/api/setup", {"password": "another password"}).status == 409
    assert remote_call(server.url, "POST", "/admin/api/setup", {"password": "another password"}).status == 409
    # Remote access works with the password (and only with it).
    assert remote_call(server.url, "POST", "/admin/api/login", {"password": "another password"}).status == 401
    answer = remote_call(server.url, "POST", "/admin/api/login", {"password": "exactly8"})
    assert answer.status == 200 and COOKIE + "=" in answer.header("set-cookie")


def test_two_simultaneous_setups_set_one_password(server):
    results = {}
    barrier = threading.Barrier(2)

    def set_password(password):
        client = Client(server.url)
        barrier.wait(5)
        results[password] = client.setup(password).status

    threads = [threading.Thread(target=set_password, args=(p,)) for p in ("first password", "second password")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results.values()) == [200, 409], results


def test_setup_refuses_a_cross_site_request(admin):
    answer = admin.post("/admin/api/setup", raw=json.dumps({"password": "chosen-by-evil.example"}).encode(),
                        headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://evil.example",
                                 "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"})
    assert answer.status in (400, 403, 415), answer
    assert admin.get("/admin/api/session").json()["needs_setup"] is True


def test_login_sets_an_httponly_samesite_strict_session_cookie(signed_in, server):
    client = Client(server.url)
    wrong = client.login("wrong password")
    assert wrong.status == 401
    assert wrong.json()["error"]["message"]
    assert not wrong.all_headers("set-cookie") and client.session_token is None
    assert client.get("/admin/api/status").status == 401

    answer = client.login()
    assert answer.status == 200
    cookies = [c for c in answer.all_headers("set-cookie") if c.startswith(COOKIE + "=")]
    assert len(cookies) == 1, answer.all_headers("set-cookie")
    attributes = [part.strip().lower() for part in cookies[0].split(";")]
    token = cookies[0].split(";")[0].split("=", 1)[1]
    assert len(token) >= 20
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert "path=/" in attributes
    assert not any(a.startswith(("domain=", "expires=", "max-age=")) for a in attributes)
    assert client.session_token == token
    assert answer.json()["csrf"] and answer.json()["csrf"] != token
    assert client.get("/admin/api/status").status == 200
    # Each sign-in is its own session with its own CSRF token.
    assert client.csrf != signed_in.csrf and client.session_token != signed_in.session_token
    # A made-up cookie is nobody's session.
    assert raw_call(server.url, "GET", "/admin/api/status",
                    headers={"Cookie": COOKIE + "=" + "A" * len(token)}).status == 401
    assert raw_call(server.url, "GET", "/admin/api/status", headers={"Cookie": COOKIE + "="}).status == 401


def _routes_of(server):
    """(method, path) of every /admin/api route the server's router knows (params filled in)."""
    routes = [(m, re.sub(r"\{[^}]*\}", "x", p)) for m, p in server.app.router.routes()]
    return [(m, p) for m, p in routes if p.startswith("/admin/api/")]


def test_every_admin_route_but_session_setup_login_needs_the_cookie(signed_in, server):
    routes = set(GUARDED_ROUTES)
    discovered = _routes_of(server)
    assert discovered, "the router lists no /admin/api routes"
    assert set(GUARDED_ROUTES) <= set(discovered), set(GUARDED_ROUTES) - set(discovered)
    routes |= {(m, p) for (m, p) in discovered if p not in OPEN_ROUTES}
    stranger = Client(server.url)
    stranger.csrf = signed_in.csrf  # even the right CSRF token is useless without the session
    for method, path in sorted(routes):
        body = None if method == "GET" else {"name": "x", "password": PASSWORD, "current": PASSWORD,
                                              "new": "new password", "changes": {}}
        for headers in ({}, {"Cookie": COOKIE + "=forged-session-token"}):
            answer = stranger.call(method, path, body, headers=headers)
            assert answer.status == 401, (method, path, headers, answer)
            assert answer.header("content-type").startswith("application/json")
    # Nothing above changed anything.
    assert signed_in.get("/admin/api/keys").json()["keys"] == []
    assert signed_in.get("/admin/api/status").status == 200
    for path in OPEN_ROUTES:
        assert any(p == path for _m, p in discovered), path


def test_every_change_needs_the_csrf_token(signed_in, server):
    changes = [(m, p) for (m, p) in set(GUARDED_ROUTES) | set(_routes_of(server))
               if m not in ("GET", "HEAD") and p not in OPEN_ROUTES]
    assert len(changes) >= 15
    other = Client(server.url)
    assert other.login().status == 200
    for method, path in sorted(changes):
        body = {"name": "csrf-test", "port": free_port(), "password": PASSWORD, "current": PASSWORD,
                "new": "new password", "changes": {"queue_timeout_s": 1}, "api_key": "sk-csrf-0000000000",
                "base_url": "http://127.0.0.1:9/v1", "model": "glm-5", "messages": CHAT["messages"]}
        for token in (None, "", "wrong-" + signed_in.csrf, other.csrf, signed_in.csrf.upper()):
            headers = {} if token is None else {"X-CSRF-Token": token}
            answer = signed_in.call(method, path, body, headers=headers, csrf=False)
            assert answer.status == 403, (method, path, token, answer)
            assert answer.json()["error"]["message"]
    # None of those changed anything: still signed in, same password, no key, no instance...
    assert signed_in.get("/admin/api/status").status == 200
    assert signed_in.get("/admin/api/keys").json()["keys"] == []
    assert [i["name"] for i in signed_in.get("/admin/api/instances").json()["instances"]] == ["default"]
    assert signed_in.get("/admin/api/config").json()["config"]["queue_timeout_s"] == 30.0
    assert Client(server.url).login().status == 200
    # ...and with the token the same kind of change goes through.
    answer = signed_in.post("/admin/api/keys")
    assert answer.status == 200, answer
    assert len(signed_in.get("/admin/api/keys").json()["keys"]) == 1
    # A GET needs no token.
    assert signed_in.get("/admin/api/keys", csrf=False).status == 200


def test_login_rate_limit_then_429_with_retry_after(signed_in, server, remote_source):
    client = Client(server.url)
    for attempt in range(5):
        answer = client.login("wrong password %d" % attempt)
        assert answer.status == 401, (attempt, answer)
    for password in ("wrong again", PASSWORD):  # the right password does not help now
        answer = client.login(password)
        assert answer.status == 429, answer
        retry_after = answer.header("retry-after")
        assert retry_after and retry_after.isdigit() and 0 < int(retry_after) <= 301, retry_after
        assert client.session_token is None
        assert answer.json()["error"]["message"]
    # Limited per client address: another address may still sign in, and sessions live on.
    assert remote_call(server.url, "POST", "/admin/api/login", {"password": PASSWORD}).status == 200
    assert signed_in.get("/admin/api/status").status == 200


def test_a_successful_login_resets_the_failure_count(signed_in, server):
    client = Client(server.url)
    for _ in range(4):
        assert client.login("wrong password").status == 401
    assert client.login().status == 200
    for _ in range(4):
        assert client.login("wrong password").status == 401
    assert client.login().status == 200


def test_logout_ends_the_session(signed_in, server):
    other = Client(server.url)
    assert other.login().status == 200
    token = signed_in.session_token
    answer = signed_in.post("/admin/api/logout")
    assert answer.status == 200
    cleared = [c for c in answer.all_headers("set-cookie") if c.startswith(COOKIE + "=")]
    assert cleared and "max-age=0" in cleared[0].lower().replace(" ", "")
    assert signed_in.session_token is None
    # The old cookie value is dead on the server, not only forgotten by the browser.
    replay = {"Cookie": "%s=%s" % (COOKIE, token)}
    assert raw_call(server.url, "GET", "/admin/api/status", headers=replay).status == 401
    assert raw_call(server.url, "GET", "/admin/api/session", headers=replay).json()["logged_in"] is False
    assert raw_call(server.url, "POST", "/admin/api/keys", {}, dict(replay, **{"X-CSRF-Token": signed_in.csrf})
                    ).status == 401
    # Other sessions go on; signing in again works.
    assert other.get("/admin/api/status").status == 200
    assert signed_in.login().status == 200
    assert signed_in.get("/admin/api/status").status == 200


def test_change_password(signed_in, server):
    other = Client(server.url)
    assert other.login().status == 200
    assert signed_in.post("/admin/api/password", {"current": "not it", "new": "new password 1"}).status == 401
    assert signed_in.post("/admin/api/password", {"new": "new password 1"}).status == 401
    assert signed_in.post("/admin/api/password", {"current": PASSWORD, "new": "short"}).status == 400
    assert signed_in.post("/admin/api/password", {"current": PASSWORD, "new": 12345678}).status == 400
    assert signed_in.get("/admin/api/status").status == 200, "a refused change keeps the session"

    answer = signed_in.post("/admin/api/password", {"current": PASSWORD, "new": "new password 1"})
    assert answer.status == 200, answer
    signed_in.csrf = answer.json()["csrf"]
    assert signed_in.get("/admin/api/status").status == 200, "the browser that changed it stays in"
    assert other.get("/admin/api/status").status == 401, "every other session ends"
    assert Client(server.url).login(PASSWORD).status == 401
    assert Client(server.url).login("new password 1").status == 200
    stored = json.loads(read_config_file(server))["admin_password_hash"]
    assert "new password 1" not in read_config_file(server)
    assert iflow2api.verify_password("new password 1", _open_hash(server, stored))


def _open_hash(server, stored):
    if stored.startswith(iflow2api.SECRET_PREFIX):
        key_path = os.path.join(os.path.dirname(server.config.path), "secret.key")
        stored = iflow2api.SecretBox(iflow2api.load_secret_key(key_path)).open(stored)
    return stored


def test_password_is_stored_as_a_pbkdf2_sha256_hash(signed_in, server):
    text = read_config_file(server)
    assert PASSWORD not in text
    stored = json.loads(text)["admin_password_hash"]
    assert stored.startswith(("pbkdf2_sha256$", iflow2api.SECRET_PREFIX)), stored[:20]
    plain = _open_hash(server, stored)
    scheme, iterations, salt, digest = plain.split("$")
    assert scheme == "pbkdf2_sha256"
    assert int(iterations) >= 100000
    assert len(base64.b64decode(salt)) >= 16 and len(base64.b64decode(digest)) == 32
    assert iflow2api.verify_password(PASSWORD, plain)
    assert not iflow2api.verify_password(PASSWORD + "x", plain)
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(server.config.path).st_mode) == 0o600
    # A second password gets another salt.
    assert iflow2api.hash_password(PASSWORD).split("$")[2] != salt


# -- dashboard: status, logs -------------------------------------------------------------

def test_status_numbers_change_after_v1_calls(signed_in, server, fake_upstream):
    before = signed_in.get("/admin/api/status").json()
    assert before["version"] == iflow2api.__version__
    assert before["uptime_s"] >= 0
    assert (before["requests"], before["errors"], before["input_tokens"], before["output_tokens"]) == (0, 0, 0, 0)
    assert [i["name"] for i in before["instances"]] == ["default"] and before["instances"][0]["running"]
    assert set(before["latency_ms"]) >= {"avg", "p50", "p95"}
    assert {"by_model", "by_provider", "by_account", "accounts", "providers"} <= set(before)

    assert v1(server.url, "POST", "/v1/chat/completions", CHAT).status == 200
    streamed = v1(server.url, "POST", "/v1/chat/completions", dict(CHAT, stream=True))
    assert streamed.status == 200 and b"[DONE]" in streamed.body
    assert v1(server.url, "POST", "/v1/messages", {"model": "glm-5", "max_tokens": 50,
                                                   "messages": [{"role": "user", "content": "hi"}]}).status == 200
    assert v1(server.url, "POST", "/v1/chat/completions", {"messages": "not a list"}).status == 400
    assert len(fake_upstream.chat_requests()) == 3

    def counted():
        status = signed_in.get("/admin/api/status").json()
        return status if status["requests"] >= 4 and status["errors"] >= 1 else None
    after = wait_until(counted, 10)
    assert after, "the 4 calls never showed in /admin/api/status"
    assert after["requests"] == 4 and after["errors"] == 1
    assert after["input_tokens"] >= 3 * 12 and after["output_tokens"] >= 3 * 3
    assert after["by_model"].get("glm-5") == 3, after["by_model"]
    assert sum(after["by_provider"].values()) == 3, after["by_provider"]
    assert after["latency_ms"]["avg"] > 0 and after["latency_ms"]["p95"] >= after["latency_ms"]["p50"]
    assert after["instances"][0]["requests"] == 4
    assert after["uptime_s"] >= before["uptime_s"]
    # The admin's own traffic is not counted.
    for _ in range(3):
        signed_in.get("/admin/api/status")
    signed_in.get("/admin")
    assert signed_in.get("/admin/api/status").json()["requests"] == 4


def _read_sse_event(resp, want, deadline):
    """Read `event:`/`data:` blocks from an http.client response until one's data has `want`."""
    event, data = None, []
    while time.monotonic() < deadline:
        line = resp.readline()
        if not line:
            raise AssertionError("the log stream ended")
        line = line.decode("utf-8").rstrip("\r\n")
        if line == "":
            if data and want in "\n".join(data):
                return event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    raise AssertionError("no log event with %r in time" % want)


def test_logs_and_the_live_log_stream(signed_in, server, caplog):
    caplog.set_level(logging.INFO, logger="iflow2api")  # as `iflow2api serve` does
    assert v1(server.url, "GET", "/v1/models").status == 200
    lines = wait_until(lambda: [l for l in signed_in.get("/admin/api/logs?n=50").json()["lines"]
                                if "/v1/models" in l], 10)
    assert lines and "status=200" in lines[-1]
    assert len(signed_in.get("/admin/api/logs?n=1").json()["lines"]) == 1

    host, port = server.url.split("//")[1].rsplit(":", 1)
    conn = HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/admin/api/logs/stream", headers={"Cookie": "%s=%s" % (COOKIE, signed_in.session_token),
                                                               "Accept": "text/event-stream"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("content-type").startswith("text/event-stream")
        assert resp.readline().startswith(b":"), "a comment opens the stream"
        deadline = time.monotonic() + 10
        assert v1(server.url, "POST", "/v1/chat/completions", CHAT).status == 200
        event, data = _read_sse_event(resp, "/v1/chat/completions", deadline)
        assert event == "log"
        line = json.loads(data)["line"]
        assert "POST /v1/chat/completions" in line and "status=200" in line
        # A second line arrives on the same stream.
        assert v1(server.url, "GET", "/health").status == 200
        _event, data = _read_sse_event(resp, "/health", deadline)
        assert FAKE_KEY not in data
    finally:
        conn.close()
    # Whoever has no session gets no log.
    assert Client(server.url).get("/admin/api/logs/stream").status == 401


# -- instances -------------------------------------------------------------------------

def _instances(client):
    return {i["name"]: i for i in client.get("/admin/api/instances").json()["instances"]}


def test_instances_add_start_stop_remove(signed_in, server, fake_upstream):
    port = free_port()
    answer = signed_in.post("/admin/api/instances", {"name": "second", "host": "127.0.0.1", "port": port})
    assert answer.status == 200, answer
    added = answer.json()
    assert added["name"] == "second" and added["running"] is True
    assert added["host"] == "127.0.0.1" and added["port"] == port
    assert added["url"] == "http://127.0.0.1:%d" % port
    assert set(_instances(signed_in)) == {"default", "second"}
    saved = json.loads(read_config_file(server))["instances"]
    assert saved == [{"name": "second", "host": "127.0.0.1", "port": port}]

    # A real request through the new instance reaches the upstream.
    answer = v1(added["url"], "POST", "/v1/chat/completions", CHAT)
    assert answer.status == 200 and answer.json()["choices"][0]["message"]["content"] == "Hello world"
    assert len(fake_upstream.chat_requests()) == 1
    assert wait_until(lambda: _instances(signed_in)["second"]["requests"] == 1, 5), "instance counter"

    # Refused definitions.
    for body in ({"name": "second", "port": free_port()}, {"name": "default", "port": free_port()},
                 {"name": "../evil", "port": free_port()}, {"name": "", "port": free_port()},
                 {"name": "third", "port": 0}, {"name": "third", "port": 70000},
                 {"name": "third", "port": "abc"}, {"name": "third", "port": True},
                 {"name": "third", "host": "999.1.1.1", "port": free_port()},  # never looked up
                 {"name": "third", "host": 5, "port": free_port()},
                 {"name": "third", "host": "127.0.0.1", "port": port}):  # taken by "second"
        answer = signed_in.post("/admin/api/instances", body)
        assert answer.status == 400, (body, answer)
    assert set(_instances(signed_in)) == {"default", "second"}

    assert signed_in.post("/admin/api/instances/second/stop").status == 200
    assert wait_until(lambda: _instances(signed_in)["second"]["running"] is False, 10), "second stopped"
    assert wait_until(lambda: not port_open(port), 10), "port %d closed" % port
    assert _instances(signed_in)["default"]["running"] is True
    assert signed_in.post("/admin/api/instances/second/stop").status == 404

    answer = signed_in.post("/admin/api/instances/second/start")
    assert answer.status == 200 and answer.json()["running"] is True and answer.json()["port"] == port
    assert v1(added["url"], "GET", "/health").status == 200
    assert _instances(signed_in)["second"]["running"] is True

    assert signed_in.delete("/admin/api/instances/second").status == 200
    assert wait_until(lambda: "second" not in _instances(signed_in), 10), "second removed"
    assert wait_until(lambda: not port_open(port), 10), "port %d closed after remove" % port
    assert json.loads(read_config_file(server))["instances"] == []
    assert signed_in.delete("/admin/api/instances/second").status == 404
    assert signed_in.post("/admin/api/instances/nothing/start").status == 404
    assert signed_in.post("/admin/api/instances/nothing/stop").status == 404
    # The default instance (the one serving this API) lives on.
    assert signed_in.get("/admin/api/status").status == 200


def test_adding_a_lan_instance_shows_the_generated_client_key(signed_in, server):
    answer = signed_in.post("/admin/api/instances", {"name": "lan", "host": "0.0.0.0", "port": free_port()})
    assert answer.status == 200, answer
    try:
        keys = [k for k in server.config.get("api_keys") or [] if iflow2api.usable_secret(k)]
        if keys:  # a key was made for the LAN bind: the admin must be able to see it (once)
            assert any(k in answer.text for k in keys), answer
        else:  # or no key is required, and loopback clients go on working
            assert v1(server.url, "GET", "/v1/models").status == 200
    finally:
        signed_in.post("/admin/api/instances/lan/stop")


# -- config --------------------------------------------------------------------------

def test_config_get_masks_secrets_and_put_validates_and_persists(signed_in, server, fake_upstream):
    key = signed_in.post("/admin/api/keys").json()["key"]
    provider_key = "sk-provider-secret-0123456789abcdef"
    assert signed_in.post("/admin/api/providers", {"name": "local", "base_url": fake_upstream.url,
                                                   "api_key": provider_key, "models": ["tiny-1"]}).status == 200
    answer = signed_in.get("/admin/api/config")
    assert answer.status == 200
    data = answer.json()
    for secret in (key, provider_key, PASSWORD):
        assert secret not in answer.text
    assert data["config"]["api_keys"] == [iflow2api.mask_secret(key)]
    assert data["config"]["providers"]["local"]["api_keys"] == [iflow2api.mask_secret(provider_key)]
    editable = set(data["editable"])
    assert {"queue_timeout_s", "preserve_reasoning_content", "concurrency", "model_map"} <= editable
    assert not editable & {"admin_password_hash", "api_keys", "accounts", "providers", "instances"}
    assert data["config"]["queue_timeout_s"] == 30.0

    on_disk = read_config_file(server)
    for body in ({"changes": {"queue_timeout_s": "soon"}},
                 {"changes": {"preserve_reasoning_content": "maybe"}},
                 {"changes": {"concurrency": "many"}},
                 {"changes": {"model_map": ["not", "an", "object"]}},
                 {"changes": {"queue_timeout_s": 5, "concurrency": "many"}},  # all or nothing
                 {"changes": {"admin_password_hash": "pbkdf2_sha256$1$AAAA$AAAA"}},
                 {"changes": {"api_keys": []}},
                 {"changes": {"instances": []}},
                 {"changes": "queue_timeout_s=5"}, {"queue_timeout_s": 5}, []):
        answer = signed_in.put("/admin/api/config", body)
        assert answer.status == 400, (body, answer)
        assert answer.json()["error"]["message"]
    assert signed_in.put("/admin/api/config", raw=b"{not json").status == 400
    assert read_config_file(server) == on_disk, "a refused change writes nothing"
    assert signed_in.get("/admin/api/config").json()["config"]["queue_timeout_s"] == 30.0

    answer = signed_in.put("/admin/api/config", {"changes": {"queue_timeout_s": 12.5,
                                                             "preserve_reasoning_content": True}})
    assert answer.status == 200, answer
    assert answer.json()["config"]["queue_timeout_s"] == 12.5
    assert key not in answer.text and provider_key not in answer.text
    saved = json.loads(read_config_file(server))
    assert saved["queue_timeout_s"] == 12.5 and saved["preserve_reasoning_content"] is True
    assert saved["admin_password_hash"]
    assert saved.get("instances", []) == [], saved.get("instances")
    # The file is what a fresh start reads.
    fresh = iflow2api.Config(path=server.config.path, env={"IFLOW2API_HOME": os.path.dirname(server.config.path)})
    assert fresh["queue_timeout_s"] == 12.5 and fresh["preserve_reasoning_content"] is True
    assert fresh["api_keys"] == [key]
    assert key not in read_config_file(server), "client keys are sealed at rest"
    assert signed_in.get("/admin/api/config").json()["config"]["preserve_reasoning_content"] is True
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(server.config.path).st_mode) == 0o600
    leftovers = [n for n in os.listdir(os.path.dirname(server.config.path)) if n.endswith(".tmp")]
    assert leftovers == []


def test_keys_that_redirect_credentials_need_the_password_again(signed_in, server):
    on_disk = read_config_file(server)
    for changes in ({"oauth_token_url": "https://elsewhere.example/token"},
                    {"upstream_proxy": "http://127.0.0.1:3128", "upstream_proxy_enabled": True},
                    {"base_url": "https://elsewhere.example/v1"}):
        answer = signed_in.put("/admin/api/config", {"changes": changes})
        assert answer.status == 403 and answer.json()["error"]["code"] == "password_required", answer
        answer = signed_in.put("/admin/api/config", {"changes": changes, "password": "wrong password!"})
        assert answer.status == 401
    assert read_config_file(server) == on_disk
    answer = signed_in.put("/admin/api/config", {"changes": {"oauth_token_url": "http://evil.example/t"},
                                                 "password": PASSWORD})
    assert answer.status == 400 and "https://" in answer.json()["error"]["message"]
    answer = signed_in.put("/admin/api/config", {"changes": {"oauth_token_url": "https://elsewhere.example/t"},
                                                 "password": PASSWORD})
    assert answer.status == 200 and server.config["oauth_token_url"] == "https://elsewhere.example/t"


def test_a_bad_value_never_poisons_later_saves(signed_in, server):
    answer = signed_in.put("/admin/api/config", raw=b'{"changes": {"default_model": "glm\\ud800"}}')
    assert answer.status == 400
    assert signed_in.post("/admin/api/keys").status == 200
    assert len(json.loads(read_config_file(server))["api_keys"]) == 1  # saved, not only in memory
    answer = signed_in.post("/admin/api/password", {"current": PASSWORD, "new": "another password 123"})
    assert answer.status == 200


def test_config_get_does_not_send_the_password_hash(signed_in, server):
    stored = json.loads(read_config_file(server))["admin_password_hash"]
    plain = _open_hash(server, stored)
    answer = signed_in.get("/admin/api/config")
    assert plain.split("$")[3] not in answer.text


# -- client keys, providers, playground --------------------------------------------------

def test_client_keys_create_list_revoke_and_enforce(signed_in, server):
    assert signed_in.get("/admin/api/keys").json()["keys"] == []
    assert v1(server.url, "GET", "/v1/models").status == 200, "no keys: this machine may call the API"

    created = signed_in.post("/admin/api/keys").json()
    key, key_id = created["key"], created["id"]
    assert key.startswith("sk-") and len(key) >= 32 and key_id and key_id not in key
    listing = signed_in.get("/admin/api/keys")
    assert key not in listing.text, "the full key is shown only once"
    assert listing.json()["keys"] == [{"id": key_id, "masked": iflow2api.mask_secret(key)}]

    assert v1(server.url, "GET", "/v1/models").status == 401
    assert v1(server.url, "POST", "/v1/chat/completions", CHAT).status == 401
    assert v1(server.url, "GET", "/v1/models", headers={"Authorization": "Bearer sk-wrong-key-000000000"}).status == 401
    assert v1(server.url, "GET", "/v1/models", headers={"Authorization": "Bearer " + key}).status == 200
    assert v1(server.url, "GET", "/v1/models", headers={"x-api-key": key}).status == 200
    assert v1(server.url, "POST", "/v1/chat/completions", CHAT,
              headers={"Authorization": "Bearer " + key}).status == 200

    second = signed_in.post("/admin/api/keys").json()
    assert second["key"] != key and second["id"] != key_id
    assert len(signed_in.get("/admin/api/keys").json()["keys"]) == 2
    assert signed_in.delete("/admin/api/keys/" + key_id).status == 200
    assert signed_in.delete("/admin/api/keys/" + key_id).status == 404
    assert signed_in.delete("/admin/api/keys/no-such-key").status == 404
    assert v1(server.url, "GET", "/v1/models", headers={"Authorization": "Bearer " + key}).status == 401
    assert v1(server.url, "GET", "/v1/models", headers={"Authorization": "Bearer " + second["key"]}).status == 200
    assert signed_in.delete("/admin/api/keys/" + second["id"]).status == 200
    assert signed_in.get("/admin/api/keys").json()["keys"] == []
    assert v1(server.url, "GET", "/v1/models").status == 200
    assert signed_in.get("/admin/api/status").status == 200, "the admin itself never needs a client key"


def test_providers_add_use_and_remove(signed_in, server, fake_upstream):
    names = [p["name"] for p in signed_in.get("/admin/api/providers").json()["providers"]]
    assert names[0] == "iflow"
    provider_key = "sk-local-provider-0123456789abcdef"
    answer = signed_in.post("/admin/api/providers", {"name": "local", "base_url": fake_upstream.url + "/",
                                                     "api_key": provider_key, "models": ["tiny-1"]})
    assert answer.status == 200, answer
    listing = signed_in.get("/admin/api/providers")
    assert provider_key not in listing.text
    local = {p["name"]: p for p in listing.json()["providers"]}["local"]
    assert local["configured"] and local["enabled"] and not local["default"]
    assert local["base_url"] == fake_upstream.url
    assert local["keys"] == [iflow2api.mask_secret(provider_key)]

    models = signed_in.get("/admin/api/models").json()["models"]
    assert "glm-5" in models and "local/tiny-1" in models, models
    answer = v1(server.url, "POST", "/v1/chat/completions", dict(CHAT, model="local/tiny-1"))
    assert answer.status == 200, answer
    sent = fake_upstream.chat_requests()[-1]
    assert sent.headers["authorization"] == "Bearer " + provider_key
    assert json.loads(sent.body)["model"] == "tiny-1"

    for body in ({"name": "iflow", "base_url": fake_upstream.url}, {"name": "not-a-preset-xyz"},
                 {"name": "bad name!", "base_url": fake_upstream.url},
                 {"name": "local", "models": "tiny-1"}, {"name": "local", "models": [1, 2]}):
        assert signed_in.post("/admin/api/providers", body).status == 400, body

    assert signed_in.delete("/admin/api/providers/local").status == 200
    providers = {p["name"]: p for p in signed_in.get("/admin/api/providers").json()["providers"]}
    assert "local" not in providers or not providers["local"]["configured"]
    assert "local/tiny-1" not in signed_in.get("/admin/api/models").json()["models"]
    assert signed_in.delete("/admin/api/providers/local").status == 404
    assert signed_in.delete("/admin/api/providers/iflow").status in (400, 404)
    assert "local" not in json.loads(read_config_file(server)).get("providers", {})


def test_playground_streams_from_the_fake_upstream(signed_in, server, fake_upstream):
    fake_upstream.push(Reply(stream=text_stream(["Play", "ground ", "works"])))
    body = {"model": "glm-5", "messages": [{"role": "user", "content": "hello playground"}], "stream": True}
    answer = signed_in.post("/admin/api/playground", body)
    assert answer.status == 200, answer
    assert answer.header("content-type").startswith("text/event-stream")
    text = ""
    for line in answer.text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            for choice in json.loads(line[5:]).get("choices") or []:
                text += (choice.get("delta") or {}).get("content") or ""
    assert text == "Playground works"
    assert "data: [DONE]" in answer.text or "data:[DONE]" in answer.text
    sent = json.loads(fake_upstream.chat_requests()[-1].body)
    assert sent["messages"][-1]["content"] == "hello playground" and sent["stream"] is True

    answer = signed_in.post("/admin/api/playground", dict(body, stream=False))
    assert answer.status == 200 and answer.json()["choices"][0]["message"]["content"] == "Hello world"
    # It needs the session and the token, never a client key.
    assert signed_in.post("/admin/api/playground", body, csrf=False).status == 403
    assert Client(server.url).post("/admin/api/playground", body).status == 401
    signed_in.post("/admin/api/keys")
    assert signed_in.post("/admin/api/playground", dict(body, stream=False)).status == 200
    assert signed_in.post("/admin/api/playground", {"model": "glm-5", "messages": []}).status == 400


def test_playground_can_ask_the_responses_api(signed_in, server, fake_upstream):
    fake_upstream.push(Reply(stream=text_stream(["Respon", "ses ", "too"])))
    body = {"api": "responses", "model": "glm-5", "input": "hello responses", "stream": True}
    answer = signed_in.post("/admin/api/playground", body)
    assert answer.status == 200 and answer.header("content-type").startswith("text/event-stream")
    deltas = [json.loads(line[5:])["delta"] for line in answer.text.splitlines()
              if line.startswith("data:") and '"response.output_text.delta"' in line]
    assert "".join(deltas) == "Responses too" and "event: response.completed" in answer.text
    sent = json.loads(fake_upstream.chat_requests()[-1].body)
    assert sent["messages"][-1]["content"] == "hello responses" and "api" not in sent
    answer = signed_in.post("/admin/api/playground", dict(body, stream=False))
    assert answer.status == 200 and answer.json()["object"] == "response"


# -- CORS, pages, static files -------------------------------------------------------------

EVIL = "http://evil.example"


def _cors_headers(answer):
    return [(k, v) for k, v in answer.headers.items() if k.lower().startswith("access-control-")]


def test_admin_api_and_pages_never_send_cors_headers(start_server, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    server = start_server(cors_allow_origins=["*"])  # the API answers CORS, the admin never does
    signed_in = Client(server.url)
    assert signed_in.setup().status == 200
    origin = {"Origin": EVIL}
    checks = [signed_in.get("/admin", headers=origin), signed_in.get("/admin/", headers=origin),
              signed_in.get("/admin/api/session", headers=origin),
              signed_in.get("/admin/api/status", headers=origin),
              signed_in.get("/admin/api/config", headers=origin),
              signed_in.post("/admin/api/keys", headers=origin),
              Client(server.url).get("/admin/api/status", headers=origin),
              Client(server.url).post("/admin/api/login", {"password": "x"}, headers=origin)]
    for path, method in (("/admin/api/login", "POST"), ("/admin/api/config", "PUT"),
                         ("/admin/api/keys", "POST"), ("/admin/api/status", "GET"), ("/admin", "GET")):
        checks.append(raw_call(server.url, "OPTIONS", path, headers={
            "Origin": EVIL, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type, x-csrf-token"}))
    for answer in checks:
        assert _cors_headers(answer) == [], answer
    # The public API does answer CORS when enabled: the check above can see them.
    assert _cors_headers(v1(server.url, "GET", "/v1/models", headers=origin))


def test_docs_pages_and_static_files_have_the_right_content_types(admin):
    expected = {"/docs": "text/html", "/redoc": "text/html", "/admin": "text/html", "/admin/": "text/html",
                "/static/admin/app.js": "text/javascript", "/static/admin/i18n.js": "text/javascript",
                "/static/admin/app.css": "text/css", "/static/docs-fallback.js": "text/javascript",
                "/static/docs.css": "text/css", "/static/favicon.svg": "image/svg+xml",
                "/openapi.json": "application/json"}
    for path, content_type in expected.items():
        answer = admin.get(path)
        assert answer.status == 200, (path, answer)
        assert answer.header("content-type").split(";")[0].strip() == content_type, (path, answer.headers)
        assert answer.body
    assert b"docs-fallback.js" in admin.get("/docs").body and b'data-ui="swagger"' in admin.get("/docs").body
    assert b'data-ui="redoc"' in admin.get("/redoc").body
    assert admin.get("/openapi.json").json()["paths"]
    page = admin.get("/admin")
    assert page.header("x-content-type-options") == "nosniff"
    assert "frame-ancestors 'none'" in (page.header("content-security-policy") or "")
    assert b'id="setup-password"' in page.body
    with open(os.path.join(os.path.dirname(iflow2api.__file__), "static", "admin", "app.js"), "rb") as f:
        assert admin.get("/static/admin/app.js").body == f.read()
    assert admin.get("/static/admin/missing.js").status == 404
    assert admin.get("/static/admin").status == 404


@pytest.mark.parametrize("path", [
    "/static/../iflow2api.py", "/static/%2e%2e/iflow2api.py", "/static/%2E%2E/iflow2api.py",
    "/static/..%2fiflow2api.py", "/static/%2e%2e%2fiflow2api.py", "/static/admin/../../iflow2api.py",
    "/static/admin/%2e%2e/%2e%2e/iflow2api.py", "/static/./../iflow2api.py", "/static//etc/passwd",
    "/static/%2fetc%2fpasswd", "/static/..%5ciflow2api.py", "/static/.%2e/iflow2api.py",
    "/static/admin/..%2f..%2ftests%2fconftest.py", "/static/../../../../../../etc/passwd",
])
def test_path_traversal_under_static_is_404(server, path):
    answer = raw_call(server.url, "GET", path)
    assert answer.status == 404, (path, answer)
    assert b"import " not in answer.body and b"root:" not in answer.body


# -- iFlow login started from the browser -----------------------------------------------------

def _oauth_server(start_server, fake_upstream, home):
    from fake_oauth import FakeOAuth
    oauth = FakeOAuth()
    server = start_server(oauth_callback_port=free_port(), **oauth.urls())
    client = Client(server.url)
    assert client.setup().status == 200
    return oauth, server, client


def test_oauth_login_started_from_the_admin_completes_by_redirect(start_server, fake_upstream, home):
    oauth, server, client = _oauth_server(start_server, fake_upstream, home)
    try:
        started = client.post("/admin/api/accounts/oauth/start", {"add": False}).json()
        assert started["url"].startswith(oauth.urls()["oauth_authorize_url"])
        status, _h, page = http(started["url"])  # the iFlow login page redirects to our callback
        assert status == 200 and b"Login complete" in page
        state = {}
        assert wait_until(lambda: state.update(client.get("/admin/api/accounts/oauth/" + started["session"]).json())
                          or state.get("state") == "done"), "login done"
        assert state["account"] == "iflow-cli"
        settings = json.load(open(os.path.join(str(home), ".iflow", "settings.json")))
        assert settings["selectedAuthType"] == "oauth-iflow" and settings["apiKey"] in oauth.api_keys()
        accounts = client.get("/admin/api/accounts").json()["accounts"]
        assert [a["id"] for a in accounts] == ["iflow-cli"] and settings["apiKey"] not in json.dumps(accounts)
    finally:
        oauth.close()


def test_oauth_login_from_the_admin_by_pasting_the_address_and_cancel(start_server, fake_upstream, home):
    oauth, server, client = _oauth_server(start_server, fake_upstream, home)
    try:
        started = client.post("/admin/api/accounts/oauth/start", {"add": True}).json()
        # A remote admin cannot reach our callback: it pastes where the browser ended instead.
        query = urllib.parse.urlsplit(started["url"]).query
        params = urllib.parse.parse_qs(query)
        status, headers, _body = http(started["url"], opener=NO_FOLLOW)
        assert 300 <= status < 400, "the authorize page should redirect"
        ended_on = headers["location"]
        assert ended_on.startswith(params["redirect"][0])
        answer = client.post("/admin/api/accounts/oauth/" + started["session"], {"pasted": ended_on}).json()
        assert answer["state"] == "done" and answer["account"].startswith("acct-")
        assert client.get("/admin/api/accounts").json()["accounts"][0]["auth_type"] == "oauth-iflow"
        second = client.post("/admin/api/accounts/oauth/start", {"add": True}).json()
        assert client.delete("/admin/api/accounts/oauth/" + second["session"]).status == 200
        assert client.get("/admin/api/accounts/oauth/" + second["session"]).status == 404
    finally:
        oauth.close()


def test_admin_password_from_the_command_line_applies_to_the_running_server(signed_in, server, home):
    assert signed_in.get("/admin/api/status").status == 200
    env = {"IFLOW2API_HOME": os.path.dirname(server.config.path)}
    result = run_cli(home, "admin-password", "--stdin", stdin="a forgotten one reset\n", env=env)
    assert result.returncode == 0, result.stderr
    assert "a forgotten one reset" not in result.stdout + result.stderr
    assert signed_in.get("/admin/api/status").status == 401  # signed out at once
    fresh = Client(server.url)
    assert fresh.post("/admin/api/login", {"password": PASSWORD}).status == 401
    assert fresh.post("/admin/api/login", {"password": "a forgotten one reset"}).status == 200
    short = run_cli(home, "admin-password", "--stdin", stdin="short\n", env=env)
    assert short.returncode == 1 and "8 characters" in short.stderr


# -- what the admin pages are built from (issue 14) ---------------------------------------

def test_only_the_admins_own_session_expiry_says_admin_session(signed_in, server, fake_upstream):
    assert Client(server.url).get("/admin/api/status").json()["error"]["code"] == "admin_session"
    # The playground's upstream refusing its key is a 401 too, but not the admin's: no sign-out.
    fake_upstream.push(Reply(401, {"error": {"message": "invalid api key", "type": "authentication_error"}}))
    answer = signed_in.post("/admin/api/playground", dict(CHAT, stream=False))
    assert answer.status == 401 and answer.json()["error"]["code"] != "admin_session", answer
    assert signed_in.get("/admin/api/status").status == 200
    wrong = signed_in.post("/admin/api/password", {"current": "not it at all", "new": "another password 123"})
    assert wrong.status == 401 and wrong.json()["error"]["code"] == "wrong_password"


def test_config_schema_gives_each_editable_key_its_group_control_and_restart_flag(signed_in):
    data = signed_in.get("/admin/api/config").json()
    schema, groups = data["schema"], data["groups"]
    assert groups == ["server", "upstream", "models", "accounts", "desktop", "advanced"]
    assert set(schema) == set(data["editable"])
    assert all(entry["group"] in groups for entry in schema.values())
    assert schema["port"] == {"group": "server", "type": "int", "min": 0, "max": 65535, "restart": True,
                              "secret": False, "password": False}
    assert schema["concurrency"]["min"] == 1 and "max" not in schema["concurrency"]
    assert schema["concurrency"]["restart"] is False  # a running server follows it
    assert schema["log_level"]["choices"] == ["DEBUG", "INFO", "WARNING", "ERROR"]
    assert schema["vision_fallback"]["choices"] == ["route", "reject"]
    assert schema["upstream_proxy"]["password"] is True and schema["upstream_proxy"]["group"] == "upstream"
    assert schema["preserve_reasoning_content"]["type"] == "bool"
    assert schema["model_map"]["type"] == "object" and schema["allowed_hosts"]["type"] == "list"
    assert schema["oauth_token_url"]["group"] == "advanced"
    assert schema["theme_mode"]["group"] == "desktop" and schema["theme_mode"]["restart"] is True
    # Every key of the config has a group (a key added later cannot be forgotten).
    grouped = [key for _group, keys in iflow2api.CONFIG_GROUPS for key in keys]
    assert sorted(grouped) == sorted(iflow2api.DEFAULT_CONFIG)


@pytest.mark.parametrize("changes,param", [
    ({"port": 70000}, "port"), ({"concurrency": "abc"}, "concurrency"), ({"log_level": "LOUD"}, "log_level"),
    ({"queue_timeout_s": 1, "header_timeout_s": 0}, "header_timeout_s"), ({"no_such_key": 1}, "no_such_key")])
def test_a_refused_config_value_names_its_key_in_param(signed_in, server, changes, param):
    on_disk = read_config_file(server)
    error = signed_in.put("/admin/api/config", {"changes": changes}).json()["error"]
    assert error["param"] == param and param in error["message"], error
    assert read_config_file(server) == on_disk


def test_the_instance_serving_the_page_is_marked(signed_in, server):
    port = free_port()
    assert signed_in.post("/admin/api/instances", {"name": "other", "port": port}).status == 200
    marked = {i["name"]: i["this_page"] for i in signed_in.get("/admin/api/instances").json()["instances"]}
    assert marked == {"default": True, "other": False}
    assert {i["name"]: i["this_page"] for i in signed_in.get("/admin/api/status").json()["instances"]} == marked
    # Seen through the other instance, the other one is this page.
    other = Client("http://127.0.0.1:%d" % port)
    other.opener, other.csrf = signed_in.opener, signed_in.csrf  # the same browser (cookies are per host)
    assert {i["name"]: i["this_page"] for i in other.get("/admin/api/instances").json()["instances"]} == \
        {"default": False, "other": True}


def test_dashboard_says_whether_there_are_credentials(start_server, home, fake_upstream):
    client = Client(start_server().url)
    assert client.setup().status == 200
    assert client.get("/admin/api/status").json()["credentials"] is False
    write_settings(str(home), fake_upstream.url)
    assert wait_until(lambda: client.get("/admin/api/status").json()["credentials"] is True, 5)


def test_models_name_the_default_model(signed_in, server):
    data = signed_in.get("/admin/api/models").json()
    assert data["default"] == "glm-5" and "glm-5" in data["models"]
    assert signed_in.put("/admin/api/config", {"changes": {"default_model": "upstream-only-model"}}).status == 200
    assert signed_in.get("/admin/api/models").json()["default"] == "upstream-only-model"


def test_adding_an_api_key_account_checks_the_key_first(signed_in, server, fake_upstream):
    fake_upstream.refused_keys.add("sk-admin-refused-0123456789")
    body = {"api_key": "sk-admin-refused-0123456789", "add": True}
    answer = signed_in.post("/admin/api/accounts", body)
    assert answer.status == 422 and answer.json()["error"]["code"] == "key_refused", answer
    assert "nothing was saved" in answer.json()["error"]["message"]
    assert len(signed_in.get("/admin/api/accounts").json()["accounts"]) == 1
    answer = signed_in.post("/admin/api/accounts", dict(body, force=True))
    assert answer.status == 200 and answer.json()["check"] == "refused"
    assert len(signed_in.get("/admin/api/accounts").json()["accounts"]) == 2


def _browser(server):
    """A client that first loads the page's session call, as a browser does (its cookie)."""
    client = Client(server.url)
    assert client.get("/admin/api/session").status == 200
    return client


def test_wrong_passwords_from_this_machine_lock_only_that_browser(signed_in, server):
    mistyping = _browser(server)
    for _ in range(5):
        assert mistyping.login("wrong password").status == 401
    assert mistyping.login().status == 429  # this browser waits...
    assert _browser(server).login().status == 200  # ...the owner's other browser does not


def test_many_browsers_on_this_machine_share_a_ceiling(signed_in, server):
    for _ in range(10):  # 10 browsers x 5 wrong passwords: the ceiling of 50 for the machine
        browser = _browser(server)
        for _ in range(5):
            assert browser.login("wrong password").status == 401
    answer = _browser(server).login()
    assert answer.status == 429 and int(answer.header("retry-after")) > 0


def test_usage_report_for_the_dashboard_charts(signed_in, server, fake_upstream):
    for model in ("glm-5", "glm-5", "upstream-only-model"):
        assert v1(server.url, "POST", "/v1/chat/completions", dict(CHAT, model=model)).status == 200
    assert wait_until(lambda: signed_in.get("/admin/api/usage").json()["days"], 10)
    assert wait_until(lambda: signed_in.get("/admin/api/usage").json()["days"][-1]["requests"] == 3, 10)
    report = signed_in.get("/admin/api/usage?since=24h").json()
    assert report["enabled"] is True and abs(report["since"] - (time.time() - 86400)) < 60
    assert [(m["key"], m["requests"]) for m in report["models"]] == [("glm-5", 2), ("upstream-only-model", 1)]
    assert [(p["key"], p["requests"]) for p in report["providers"]] == [("iflow", 3)]
    (today,) = report["days"]
    assert today["input_tokens"] == 36 and today["errors"] == 0 and today["p95_ms"] >= today["p50_ms"] > 0
    bad = signed_in.get("/admin/api/usage?since=whenever")
    assert bad.status == 400 and "expected 7d, 24h, 30m or a date" in bad.json()["error"]["message"]
