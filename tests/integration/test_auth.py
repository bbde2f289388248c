"""Accounts and auth (issue 5): iFlow OAuth login (browser and headless) against a fake
OAuth server on 127.0.0.1, settings.json written like the iFlow CLI, API-key mode, the
login/logout/accounts CLI, token refresh (threshold, background, on a 401, failure),
the account pool (failover, cool-down, least in flight, counters), secrets at rest
(sealed, wrong key, tampering, migration, file modes), client keys on a non-loopback
bind, and no secret in any log line or API response."""
import base64
import datetime
import json
import logging
import os
import queue
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import iflow2api as I
from fake_oauth import CLIENT_ID, CLIENT_SECRET, FakeOAuth
from fakes import FakeUpstream, Reply, text_stream
from helpers import DIRECT, SOURCE, cli_env, http, run_cli, wait_until, write_settings

ISO_LOCAL = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")  # no offset, no fraction (like the CLI)
CHAT = {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


# -- HTTP helpers (no proxies from the environment, no retries) ------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


NO_FOLLOW = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def browse(url):
    """What a browser does with the login URL: follow the redirects to the callback;
    (status, final url, headers, body). Not helpers.http: the tests check the final URL."""
    try:
        with DIRECT.open(url, timeout=10) as resp:
            return resp.status, resp.geturl(), resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.geturl(), err.headers, err.read()


def authorize_redirect(url):
    """The address the browser ends on (the fake's 302 Location), without going there."""
    status, headers, _body = http(url, opener=NO_FOLLOW)
    assert status == 302, status
    return headers["location"]


def chat(instance, headers=None, **extra):
    return http(instance, "POST", "/v1/chat/completions", dict(CHAT, **extra), headers)


def auth_headers(fake_upstream):
    return [r.headers.get("authorization") for r in fake_upstream.chat_requests()]


def settings_path(home):
    return os.path.join(str(home), ".iflow", "settings.json")


def read_settings(home):
    with open(settings_path(home), encoding="utf-8") as f:
        return json.load(f)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def by_id(snapshots):
    return {a["id"]: a for a in snapshots}


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture
def oauth():
    fake = FakeOAuth()
    yield fake
    fake.close()


@pytest.fixture
def make_service(home, oauth):
    """Services configured for the fake OAuth server (not started); all stopped at the end.

    Refresh defaults keep the background thread quiet unless a test asks otherwise:
    tokens from the fake live 3600 s, refresh starts 60 s before expiry."""
    services = []

    def make(adapter=None, **overrides):
        cli = dict(oauth.urls(), oauth_callback_port=0, oauth_refresh_before_s=60,
                   oauth_refresh_check_s=3600, host="127.0.0.1", port=0)
        cli.update(overrides)
        env = dict(os.environ)
        if adapter:
            env["IFLOW2API_HTTP"] = adapter
        service = I.Service(I.Config(env=env, cli=cli))
        services.append(service)
        return service

    yield make
    for service in services:
        service.stop()


@pytest.fixture
def served(make_service, adapter):
    """(service, running instance) on both HTTP adapters."""
    def start(**overrides):
        service = make_service(adapter=adapter, **overrides)
        return service, service.start()
    return start


@pytest.fixture
def second_upstream():
    fake = FakeUpstream()
    yield fake
    fake.close()


def headless_login(service, add=False):
    session = service.login_start(headless=True)
    return service.login_finish(session, pasted=authorize_redirect(session.url), add=add)


# == OAuth: browser flow ===================================================================

CLI_SETTINGS = {
    "theme": "Default", "modelName": "glm-4.7", "baseUrl": "https://mirror.example/v1",
    "selectedAuthType": "api-key", "apiKey": "sk-old-0123456789abcdef", "cna": "abc123",
    "userName": "张三", "mcpServers": {"fs": {"command": "npx", "args": ["-y", "server-fs"]}},
    "telemetry": {"enabled": False}, "checkpointing": {"enabled": True},
}


def test_browser_login_follows_redirect_and_writes_settings_like_the_cli(make_service, oauth, home):
    os.makedirs(os.path.join(str(home), ".iflow"))
    with open(settings_path(home), "w", encoding="utf-8") as f:
        json.dump(CLI_SETTINGS, f, indent=2, ensure_ascii=False)
    inode_before = os.stat(settings_path(home)).st_ino
    service = make_service()

    session = service.login_start()
    assert re.match(r"^http://localhost:\d+/oauth2callback$", session.redirect_uri)
    parts = urllib.parse.urlsplit(session.url)
    assert "%s://%s%s" % (parts.scheme, parts.netloc, parts.path) == oauth.urls()["oauth_authorize_url"]
    assert dict(urllib.parse.parse_qsl(parts.query)) == {
        "client_id": CLIENT_ID, "loginMethod": "phone", "type": "phone",
        "redirect": session.redirect_uri, "state": session.state}

    result = {}
    waiter = threading.Thread(target=lambda: result.update(id=service.login_finish(session, timeout_s=10)))
    waiter.start()
    status, final_url, _h, page = browse(session.url)  # fake 302 -> local callback server
    waiter.join(10)
    assert not waiter.is_alive()
    assert status == 200 and final_url.startswith(session.redirect_uri + "?code=")
    assert b"Login complete" in page
    assert result["id"] == "iflow-cli"

    # the token and user-info calls as the original makes them
    (token_req,) = oauth.token_requests()
    basic = "Basic " + base64.b64encode(("%s:%s" % (CLIENT_ID, CLIENT_SECRET)).encode()).decode()
    assert token_req.headers["authorization"] == basic
    assert token_req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert token_req.headers["accept"] == "application/json"
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(final_url).query)["code"][0]
    assert token_req.form == {"grant_type": "authorization_code", "code": code,
                              "redirect_uri": session.redirect_uri, "client_id": CLIENT_ID,
                              "client_secret": CLIENT_SECRET}
    (info_req,) = oauth.user_info_requests()
    access_token = info_req.query["accessToken"]
    assert info_req.headers["user-agent"] == "iFlow-Cli"

    # settings.json: the CLI's keys and formats, every other key kept
    data = read_settings(home)
    api_key = oauth.api_key_for(access_token)
    assert data["selectedAuthType"] == "oauth-iflow"
    assert data["apiKey"] == api_key
    assert data["baseUrl"] == "https://mirror.example/v1"  # the user's choice stays
    assert data["oauth_access_token"] == access_token
    assert data["oauth_refresh_token"] in oauth.live_refresh_tokens()
    for key in ("oauth_expires_at", "api_key_expires_at"):
        assert ISO_LOCAL.match(data[key]), data[key]
        expires = datetime.datetime.fromisoformat(data[key])
        assert expires.tzinfo is None
        assert abs(expires.timestamp() - (time.time() + 3600)) < 10
    for key in ("theme", "modelName", "cna", "userName", "mcpServers", "telemetry", "checkpointing"):
        assert data[key] == CLI_SETTINGS[key]
    assert set(data) == set(CLI_SETTINGS) | {"oauth_access_token", "oauth_refresh_token",
                                             "oauth_expires_at", "api_key_expires_at"}
    with open(settings_path(home), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith('{\n  "') and "张三" in text  # 2-space JSON, UTF-8 kept (JSON.stringify(s, null, 2))

    # written atomically: a new file replaced the old one, nothing left behind, owner-only
    assert os.stat(settings_path(home)).st_ino != inode_before
    assert os.listdir(os.path.join(str(home), ".iflow")) == ["settings.json"]
    assert mode(settings_path(home)) == 0o600

    (account,) = service.accounts()
    assert account["id"] == "iflow-cli" and account["auth_type"] == "oauth-iflow"
    assert account["status"] == "ok" and account["expires_at"] == data["oauth_expires_at"]
    assert account["api_key"] == I.mask_secret(api_key) and api_key not in json.dumps(account)


def test_browser_login_without_settings_creates_them_with_the_default_base_url(make_service, oauth, home):
    service = make_service()
    session = service.login_start()
    waiter = threading.Thread(target=service.login_finish, args=(session,), kwargs={"timeout_s": 10})
    waiter.start()
    assert browse(session.url)[0] == 200
    waiter.join(10)
    data = read_settings(home)
    assert data["baseUrl"] == "https://apis.iflow.cn/v1" and data["selectedAuthType"] == "oauth-iflow"
    assert mode(os.path.join(str(home), ".iflow")) == 0o700
    assert mode(settings_path(home)) == 0o600


def test_callback_port_taken_uses_another_free_port(make_service, oauth, home):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    try:
        service = make_service(oauth_callback_port=taken)
        session = service.login_start()
        port = urllib.parse.urlsplit(session.redirect_uri).port
        assert port != taken
        waiter = threading.Thread(target=service.login_finish, args=(session,), kwargs={"timeout_s": 10})
        waiter.start()
        assert browse(session.url)[0] == 200
        waiter.join(10)
        assert read_settings(home)["selectedAuthType"] == "oauth-iflow"
    finally:
        blocker.close()


def test_callback_with_wrong_state_is_refused(make_service, oauth, home):
    service = make_service()
    session = service.login_start()
    status, _h, page = http(session.redirect_uri + "?code=stolen-code&state=someone-else")
    assert status == 400 and b"Login failed" in page
    with pytest.raises(I.AuthenticationError, match="state"):
        service.login_finish(session, timeout_s=5)
    assert oauth.token_requests() == [] and not os.path.exists(settings_path(home))


def test_denied_login_is_reported(make_service, oauth, home):
    oauth.deny = True
    service = make_service()
    session = service.login_start()
    waiter_error = []

    def finish():
        try:
            service.login_finish(session, timeout_s=10)
        except I.AuthenticationError as exc:
            waiter_error.append(str(exc))
    waiter = threading.Thread(target=finish)
    waiter.start()
    assert browse(session.url)[0] == 400
    waiter.join(10)
    assert waiter_error and "access_denied" in waiter_error[0]
    assert not os.path.exists(settings_path(home))


def test_browser_login_times_out_and_frees_the_port(make_service, oauth):
    service = make_service()
    session = service.login_start()
    started = time.monotonic()
    with pytest.raises(I.AuthenticationError, match="no login within"):
        service.login_finish(session, timeout_s=0.3)
    assert time.monotonic() - started < 5
    port = urllib.parse.urlsplit(session.redirect_uri).port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_token_endpoint_refusal_is_a_clear_error(make_service, oauth, home):
    service = make_service(oauth_client_secret="not-the-secret")
    session = service.login_start(headless=True)
    with pytest.raises(I.AuthenticationError, match="401"):
        service.login_finish(session, pasted=authorize_redirect(session.url))
    assert not os.path.exists(settings_path(home))


def test_settings_the_cli_cannot_parse_are_never_overwritten(make_service, oauth, home):
    os.makedirs(os.path.join(str(home), ".iflow"))
    with open(settings_path(home), "w") as f:
        f.write('{"theme": "Default", // a comment the CLI tolerates\n}')
    service = make_service()
    session = service.login_start(headless=True)
    with pytest.raises(I.Iflow2apiError):
        service.login_finish(session, pasted=authorize_redirect(session.url))
    with open(settings_path(home)) as f:
        assert "a comment the CLI tolerates" in f.read()


# == OAuth: headless flow ==================================================================

def test_headless_login_with_the_pasted_redirect_url(make_service, oauth, home):
    write_settings(str(home), "https://apis.iflow.cn/v1")
    service = make_service(oauth_callback_port=11451)
    session = service.login_start(headless=True)
    assert session.redirect_uri == "http://localhost:11451/oauth2callback"  # like the original
    location = authorize_redirect(session.url)
    assert location.startswith(session.redirect_uri + "?code=")
    assert service.login_finish(session, pasted="  " + location + "\n") == "iflow-cli"
    data = read_settings(home)
    assert data["selectedAuthType"] == "oauth-iflow" and data["apiKey"] == oauth.api_keys()[-1]
    assert data["modelName"] == "glm-5" and data["theme"] == "Default"
    assert oauth.token_requests()[0].form["redirect_uri"] == "http://localhost:11451/oauth2callback"


def test_headless_login_with_a_bare_code(make_service, oauth, home):
    service = make_service()
    session = service.login_start(headless=True)
    location = authorize_redirect(session.url)
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["code"][0]
    assert service.login_finish(session, pasted=code + "\n") == "iflow-cli"
    assert read_settings(home)["apiKey"] == oauth.api_keys()[-1]


@pytest.mark.parametrize("tamper, message", [
    (lambda loc: re.sub(r"state=[^&]+", "state=0123456789abcdef", loc), "state"),
    (lambda loc: loc.split("?")[0] + "?error=access_denied&state=x", "access_denied"),
    (lambda loc: re.sub(r"code=[^&]+&?", "", loc), "no code"),
], ids=["wrong-state", "error", "no-code"])
def test_headless_login_rejects_foreign_or_broken_answers(make_service, oauth, home, tamper, message):
    service = make_service()
    session = service.login_start(headless=True)
    pasted = tamper(authorize_redirect(session.url))
    with pytest.raises(I.AuthenticationError, match=message):
        service.login_finish(session, pasted=pasted)
    assert oauth.token_requests() == [] and not os.path.exists(settings_path(home))


# == API-key mode ==========================================================================

def test_api_key_login_replaces_the_oauth_login_and_keeps_other_keys(make_service, oauth, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    service = make_service()
    headless_login(service)
    assert "oauth_refresh_token" in read_settings(home)
    assert service.login_api_key("  sk-pasted-0123456789abcdef  ") == {"id": "iflow-cli", "check": "ok"}
    (check,) = [r for r in fake_upstream.requests if r.path.endswith("/models")]
    assert check.headers["authorization"] == "Bearer sk-pasted-0123456789abcdef"
    assert check.headers["user-agent"].startswith("iFlow-Cli")  # asked the way the CLI asks
    data = read_settings(home)
    assert data == {"selectedAuthType": "api-key", "apiKey": "sk-pasted-0123456789abcdef",
                    "baseUrl": fake_upstream.url, "modelName": "glm-5", "theme": "Default"}
    (account,) = service.accounts()
    assert account["auth_type"] == "api-key" and account["expires_at"] is None
    assert account["api_key"] == "sk-...cdef"


@pytest.mark.parametrize("bad", ["", "   ", "two words", "line\nbreak"])
def test_api_key_login_rejects_non_keys(make_service, home, bad):
    with pytest.raises(I.InvalidRequestError):
        make_service().login_api_key(bad)
    assert not os.path.exists(settings_path(home))


def test_api_key_login_add_goes_to_config_sealed(make_service, home):
    service = make_service()
    saved = service.login_api_key("sk-extra-0123456789abcdef", add=True, base_url="http://127.0.0.1:9/v1")
    account_id = saved["id"]
    assert account_id.startswith("acct-") and saved["check"] == "unreachable"  # nothing listens on port 9
    assert not os.path.exists(settings_path(home))  # the iFlow CLI's login is untouched
    raw = open(service.config.path).read()
    assert "sk-extra-0123456789abcdef" not in raw
    (entry,) = json.loads(raw)["accounts"]
    assert entry["api_key"].startswith("enc:v1:") and entry["auth_type"] == "api-key"
    assert entry["base_url"] == "http://127.0.0.1:9/v1"
    again = I.Config(env=dict(os.environ))
    assert again.warnings == [] and again["accounts"][0]["api_key"] == "sk-extra-0123456789abcdef"
    snap = by_id(service.accounts())[account_id]
    assert snap["api_key"] == "sk-...cdef" and snap["base_url"] == "http://127.0.0.1:9/v1"


def test_api_key_login_uses_the_base_url_it_is_given(make_service, home):
    write_settings(str(home), "https://apis.iflow.cn/v1")
    make_service().login_api_key("sk-pasted-0123456789abcdef", base_url="http://127.0.0.1:9/v1")
    assert read_settings(home)["baseUrl"] == "http://127.0.0.1:9/v1"


def test_a_refused_key_is_saved_only_when_forced(make_service, home, fake_upstream):
    fake_upstream.refused_keys.add("sk-refused-0123456789abcdef")
    service = make_service()
    with pytest.raises(I.KeyRefusedError) as refused:
        service.login_api_key("sk-refused-0123456789abcdef", base_url=fake_upstream.url)
    assert refused.value.status == 422 and "refused this API key (nothing was saved)" in str(refused.value)
    assert fake_upstream.url in str(refused.value) and "sk-refused" not in str(refused.value)
    assert not os.path.exists(settings_path(home))
    with pytest.raises(I.KeyRefusedError):
        service.login_api_key("sk-refused-0123456789abcdef", add=True, base_url=fake_upstream.url)
    assert service.config.get("accounts") == []
    forced = service.login_api_key("sk-refused-0123456789abcdef", base_url=fake_upstream.url, force=True)
    assert forced == {"id": "iflow-cli", "check": "refused"}
    assert read_settings(home)["apiKey"] == "sk-refused-0123456789abcdef"


def test_a_key_check_against_an_answer_that_says_nothing_of_the_key_saves_it(make_service, home, fake_upstream):
    service = make_service()
    fake_upstream.models_status = 500  # no verdict on the key
    saved = service.login_api_key("sk-maybe-0123456789abcdef", base_url=fake_upstream.url)
    assert saved == {"id": "iflow-cli", "check": "unreachable"}
    with pytest.raises(I.ConfigError):  # credentials go only to https or this machine
        service.login_api_key("sk-maybe-0123456789abcdef", base_url="http://example.invalid/v1")


def test_logout_removes_only_credentials(make_service, oauth, home):
    write_settings(str(home), "https://apis.iflow.cn/v1", cna="xyz")
    service = make_service()
    headless_login(service)
    extra = headless_login(service, add=True)
    assert {a["id"] for a in service.accounts()} == {"iflow-cli", extra}
    assert service.logout() is True
    assert read_settings(home) == {"baseUrl": "https://apis.iflow.cn/v1", "modelName": "glm-5",
                                   "theme": "Default", "cna": "xyz"}
    assert service.logout() is False
    assert service.logout("no-such-account") is False
    assert service.logout(extra) is True
    assert service.accounts() == [] and I.Config(env=dict(os.environ))["accounts"] == []


# == CLI ===================================================================================

def cli_config(home, oauth, **extra):
    """A config file in its own directory (so --config is what finds it), with the fake's URLs."""
    path = os.path.join(str(home), "cfg", "config.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(oauth.urls(), **extra), f)
    return path


class LineReader:
    """Lines of a subprocess's stdout, read by a thread, with bounded waits."""

    def __init__(self, stream):
        self.lines, self._queue = [], queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, predicate, timeout_s=15.0):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("timed out; output so far: %r" % self.lines)
            if line is None:
                raise AssertionError("process ended; output: %r" % self.lines)
            self.lines.append(line)
            if predicate(line):
                return line

    def rest(self, timeout_s=15.0):
        try:
            self.until(lambda line: False, timeout_s)
        except AssertionError as exc:
            if "process ended" not in str(exc):
                raise
        return "".join(self.lines)


def assert_no_secrets(text, secrets_):
    leaked = [s for s in secrets_ if s and s in text]
    assert not leaked, "secrets leaked: %r in %r" % (leaked, text[:2000])


def test_cli_api_key_login_accounts_and_logout(home, oauth, fake_upstream):
    cfg = cli_config(home, oauth)
    key, extra_key = "sk-cli-0123456789abcdef01", "sk-cli-extra-abcdef0123456"
    out = run_cli(home, "login", "--api-key", key, "--base-url", fake_upstream.url, "--config", cfg)
    assert out.returncode == 0, out.stderr
    assert "Saved the API key as account iflow-cli; the iFlow API accepted it." in out.stdout
    assert read_settings(home) == {"selectedAuthType": "api-key", "apiKey": key, "baseUrl": fake_upstream.url}
    out2 = run_cli(home, "login", "--api-key", extra_key, "--add", "--base-url", "http://127.0.0.1:9/v1",
                   "--config", cfg)
    assert "the iFlow API could not be reached to check it" in out2.stdout
    assert out2.returncode == 0, out2.stderr
    extra_id = re.search(r"account (acct-\w+)", out2.stdout).group(1)
    raw = open(cfg).read()
    assert extra_key not in raw and "enc:v1:" in raw
    assert mode(os.path.join(str(home), "cfg", "secret.key")) == 0o600
    assert not os.path.exists(os.path.join(str(home), ".iflow2api"))  # --config was honoured

    table = run_cli(home, "accounts", "--config", cfg)
    assert table.returncode == 0, table.stderr
    assert "iflow-cli" in table.stdout and extra_id in table.stdout and "api-key" in table.stdout
    assert I.mask_secret(key) in table.stdout and I.mask_secret(extra_key) in table.stdout
    listed = json.loads(run_cli(home, "accounts", "--json", "--config", cfg).stdout)
    assert [a["id"] for a in listed] == ["iflow-cli", extra_id]
    assert all(a["status"] == "ok" for a in listed)

    out3 = run_cli(home, "logout", "--config", cfg)
    assert out3.returncode == 0 and "Logged out of account iflow-cli" in out3.stdout
    assert read_settings(home) == {"baseUrl": fake_upstream.url}
    again = run_cli(home, "logout", "--config", cfg)
    assert again.returncode != 0 and "no account" in again.stderr
    assert run_cli(home, "logout", extra_id, "--config", cfg).returncode == 0
    empty = run_cli(home, "accounts", "--config", cfg)
    assert "No accounts" in empty.stdout
    for result in (out, out2, table, out3, again, empty):
        assert_no_secrets(result.stdout + result.stderr, [key, extra_key])


def test_cli_headless_login_reads_the_pasted_address(home, oauth):
    write_settings(str(home), "https://apis.iflow.cn/v1")
    cfg = cli_config(home, oauth, oauth_callback_port=11451)
    errors = open(os.path.join(str(home), "stderr.txt"), "w+")
    proc = subprocess.Popen([sys.executable, SOURCE, "login", "--headless", "--config", cfg], env=cli_env(home),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        reader = LineReader(proc.stdout)
        url = reader.until(lambda line: oauth.base in line).strip()
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert query["redirect"] == "http://localhost:11451/oauth2callback" and query["client_id"] == CLIENT_ID
        proc.stdin.write(authorize_redirect(url) + "\n")
        proc.stdin.close()
        output = reader.rest()
        assert proc.wait(15) == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "Logged in: account iflow-cli" in output
    data = read_settings(home)
    assert data["selectedAuthType"] == "oauth-iflow" and data["apiKey"] == oauth.api_keys()[-1]
    assert data["modelName"] == "glm-5"

    table = run_cli(home, "accounts", "--config", cfg)
    line = next(l for l in table.stdout.splitlines() if l.startswith("iflow-cli"))
    assert "oauth-iflow" in line and I.mask_secret(data["apiKey"]) in line and data["oauth_expires_at"] in line
    errors.seek(0)
    assert_no_secrets(output + errors.read() + table.stdout + table.stderr, oauth.secrets())
    errors.close()


def test_cli_browser_login_waits_for_the_callback(home, oauth):
    cfg = cli_config(home, oauth, oauth_callback_port=0)
    proc = subprocess.Popen([sys.executable, SOURCE, "login", "--no-browser", "--timeout", "20",
                             "--config", cfg], env=cli_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        reader = LineReader(proc.stdout)
        url = reader.until(lambda line: oauth.base in line).strip()
        reader.until(lambda line: "Waiting for the browser" in line)
        status, _u, _h, page = browse(url)
        assert status == 200 and b"Login complete" in page
        output = reader.rest()
        assert proc.wait(15) == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "Logged in: account iflow-cli" in output
    assert read_settings(home)["apiKey"] == oauth.api_keys()[-1]
    assert_no_secrets(output, oauth.secrets())


def test_cli_refused_key_needs_force(home, oauth, fake_upstream):
    cfg = cli_config(home, oauth)
    key = "sk-cli-refused-0123456789ab"
    fake_upstream.refused_keys.add(key)
    out = run_cli(home, "login", "--api-key", key, "--base-url", fake_upstream.url, "--config", cfg)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "refused this API key (nothing was saved); --force saves it anyway" in out.stderr
    assert not os.path.exists(settings_path(home))
    forced = run_cli(home, "login", "--api-key", key, "--base-url", fake_upstream.url, "--force", "--config", cfg)
    assert forced.returncode == 0 and "the iFlow API refused it (saved anyway)" in forced.stdout
    assert read_settings(home)["apiKey"] == key
    assert_no_secrets(out.stdout + out.stderr + forced.stdout + forced.stderr, [key])


def test_cli_api_key_can_be_typed_in_instead_of_given_on_the_command_line(home, oauth, fake_upstream):
    cfg = cli_config(home, oauth)
    key = "sk-typed-0123456789abcdef"
    out = run_cli(home, "login", "--api-key", "--base-url", fake_upstream.url, "--config", cfg, stdin=key + "\n")
    assert out.returncode == 0, out.stderr
    assert read_settings(home)["apiKey"] == key
    assert_no_secrets(out.stdout + out.stderr, [key])


def test_cli_headless_login_with_a_foreign_answer_fails_cleanly(home, oauth):
    cfg = cli_config(home, oauth, oauth_callback_port=11451)
    pasted = "http://localhost:11451/oauth2callback?code=code-0123456789abcdef&state=not-this-login"
    out = run_cli(home, "login", "--headless", "--config", cfg, stdin=pasted + "\n")
    assert out.returncode != 0
    assert "state" in out.stderr and "Traceback" not in out.stderr
    assert oauth.token_requests() == [] and not os.path.exists(settings_path(home))


# == Token refresh =========================================================================

def test_refresh_waits_for_the_threshold_then_requests_use_the_new_key(make_service, oauth, home,
                                                                       fake_upstream, adapter):
    write_settings(str(home), fake_upstream.url)
    first = make_service(oauth_refresh_before_s=600)
    headless_login(first)  # token lives 3600 s: not due with a 600 s threshold
    old_key = read_settings(home)["apiKey"]
    first.backend.refresher.check()
    assert oauth.token_requests("refresh_token") == []

    oauth.expires_in = 10 ** 6  # the refreshed token lives long: nothing more to do afterwards
    service = make_service(adapter=adapter, oauth_refresh_before_s=7200)  # now 3600 s left is due
    service.backend.refresher.check()
    (refresh_req,) = oauth.token_requests("refresh_token")
    assert refresh_req.form["grant_type"] == "refresh_token"
    assert refresh_req.form["client_id"] == CLIENT_ID and refresh_req.form["client_secret"] == CLIENT_SECRET
    assert refresh_req.headers["authorization"].startswith("Basic ")
    new_key = read_settings(home)["apiKey"]
    assert new_key != old_key and new_key == oauth.api_keys()[-1]
    data = read_settings(home)
    assert data["oauth_refresh_token"] in oauth.live_refresh_tokens()  # the rotated one is stored
    assert datetime.datetime.fromisoformat(data["oauth_expires_at"]).timestamp() > time.time() + 10 ** 5
    assert data["api_key_expires_at"] == data["oauth_expires_at"]

    instance = service.start()
    status, _h, _b = chat(instance)
    assert status == 200
    assert auth_headers(fake_upstream) == ["Bearer " + new_key]
    assert len(oauth.token_requests("refresh_token")) == 1


def test_background_refresh_before_expiry(make_service, oauth, home, fake_upstream, adapter):
    write_settings(str(home), fake_upstream.url)
    service = make_service(adapter=adapter, oauth_refresh_before_s=7200, oauth_refresh_check_s=0.1)
    headless_login(service)
    old_key = read_settings(home)["apiKey"]
    oauth.expires_in = 10 ** 6
    instance = service.start()
    assert wait_until(lambda: read_settings(home)["apiKey"] != old_key, 5)
    time.sleep(0.4)  # a few more checks: the new token is not due, so no more refreshes
    assert len(oauth.token_requests("refresh_token")) == 1
    assert chat(instance)[0] == 200
    assert auth_headers(fake_upstream) == ["Bearer " + oauth.api_keys()[-1]]


def test_upstream_401_refreshes_once_and_retries_with_the_new_key(make_service, oauth, home, fake_upstream,
                                                                  adapter):
    write_settings(str(home), fake_upstream.url)
    service = make_service(adapter=adapter)
    headless_login(service)
    old_key = read_settings(home)["apiKey"]
    instance = service.start()
    fake_upstream.push(Reply(401, {"error": {"message": "invalid apiKey", "type": "invalid_request_error"}}))
    status, _h, body = chat(instance)
    assert status == 200, body
    new_key = oauth.api_keys()[-1]
    assert new_key != old_key
    assert auth_headers(fake_upstream) == ["Bearer " + old_key, "Bearer " + new_key]
    assert len(oauth.token_requests("refresh_token")) == 1
    assert read_settings(home)["apiKey"] == new_key
    (snap,) = service.accounts()
    assert snap["status"] == "ok" and snap["requests"] == 2 and snap["errors"] == 1 and snap["in_flight"] == 0


def test_second_401_after_a_refresh_marks_the_account(make_service, oauth, home, fake_upstream, adapter):
    write_settings(str(home), fake_upstream.url)
    service = make_service(adapter=adapter)
    headless_login(service)
    instance = service.start()
    refused = Reply(401, {"error": {"message": "invalid apiKey", "type": "invalid_request_error"}})
    fake_upstream.push(refused, refused)
    status, _h, body = chat(instance)
    assert status == 401, body
    assert "log in" in json.loads(body)["error"]["message"]
    assert len(oauth.token_requests("refresh_token")) == 1  # once, not in a loop
    assert len(fake_upstream.chat_requests()) == 2
    (snap,) = service.accounts()
    assert snap["status"] == "auth_failed" and "log in" in snap["message"]


def test_refresh_failure_after_expiry_marks_the_account(make_service, oauth, home):
    oauth.expires_in = 1
    service = make_service(oauth_refresh_before_s=7200)
    headless_login(service)
    expires = datetime.datetime.fromisoformat(read_settings(home)["oauth_expires_at"]).timestamp()
    assert wait_until(lambda: time.time() > expires + 0.05, 3)
    oauth.fail_refresh = True
    service.backend.refresher.check()
    assert len(oauth.token_requests("refresh_token")) == 1
    (snap,) = service.accounts()
    assert snap["status"] == "refresh_failed"
    assert "iflow2api login" in snap["message"] and "log in again" in snap["message"]
    assert read_settings(home)["apiKey"] == oauth.api_keys()[0]  # nothing overwritten
    # logging in again (or a later successful refresh) clears the mark
    oauth.fail_refresh = False
    assert service.backend.refresher.refresh_now(service.backend.accounts.get("iflow-cli")) is True
    assert service.accounts()[0]["status"] == "ok" and service.accounts()[0]["message"] == ""


def test_refresh_failure_before_expiry_retries_with_backoff(make_service, oauth, home):
    service = make_service(oauth_refresh_before_s=7200)
    headless_login(service)
    oauth.fail_refresh = True
    refresher = service.backend.refresher
    refresher.check()
    refresher.check()  # backing off: no second attempt right away
    assert len(oauth.token_requests("refresh_token")) == 1
    assert service.accounts()[0]["status"] == "ok"  # still valid for an hour: not marked yet
    account = service.backend.accounts.get("iflow-cli")
    assert account.next_refresh_at > time.time() + 30
    for _ in range(I.TokenRefresher.MAX_FAILURES - 1):
        refresher.refresh_now(account)
    snap = service.accounts()[0]
    assert snap["status"] == "refresh_failed" and "iflow2api login" in snap["message"]


def test_refresh_of_an_added_oauth_account_is_stored_sealed(make_service, oauth, home):
    service = make_service(oauth_refresh_before_s=7200)
    account_id = headless_login(service, add=True)
    assert not os.path.exists(settings_path(home))
    snap = by_id(service.accounts())[account_id]
    assert snap["auth_type"] == "oauth-iflow" and snap["label"] == "user1" and snap["expires_at"]
    service.backend.refresher.check()
    assert len(oauth.token_requests("refresh_token")) == 1
    new_key = oauth.api_keys()[-1]
    raw = open(service.config.path).read()
    assert_no_secrets(raw, oauth.secrets())
    entry = I.Config(env=dict(os.environ))["accounts"][0]
    assert entry["api_key"] == new_key and entry["oauth_refresh_token"] in oauth.live_refresh_tokens()
    assert by_id(service.accounts())[account_id]["api_key"] == I.mask_secret(new_key)


def test_concurrent_401s_refresh_only_once(make_service, oauth, home, fake_upstream, adapter):
    write_settings(str(home), fake_upstream.url)
    service = make_service(adapter=adapter)
    headless_login(service)
    old_key = read_settings(home)["apiKey"]
    instance = service.start()
    refused = Reply(401, {"error": {"message": "invalid apiKey"}}, delay_s=0.3)
    fake_upstream.push(refused, refused)  # both requests are refused with the old key, concurrently
    results = []
    threads = [threading.Thread(target=lambda: results.append(chat(instance)[0])) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200, 200]
    assert auth_headers(fake_upstream)[:2] == ["Bearer " + old_key] * 2
    assert len(oauth.token_requests("refresh_token")) == 1


def test_logging_in_again_clears_a_failed_refresh(make_service, oauth, home):
    oauth.expires_in = 1
    service = make_service(oauth_refresh_before_s=7200)
    headless_login(service)
    expires = datetime.datetime.fromisoformat(read_settings(home)["oauth_expires_at"]).timestamp()
    assert wait_until(lambda: time.time() > expires + 0.05, 3)
    oauth.fail_refresh = True
    service.backend.refresher.check()
    assert service.accounts()[0]["status"] == "refresh_failed"
    oauth.fail_refresh, oauth.expires_in = False, 3600
    headless_login(service)  # what the message tells the user to do (the CLI's login does the same)
    (snap,) = service.accounts()
    assert snap["api_key"] == I.mask_secret(oauth.api_keys()[-1])
    assert (snap["status"], snap["message"]) == ("ok", "")


# == Account pool ==========================================================================

FAILURES = {
    "429": (Reply(429, {"error": {"message": "rate limited"}}, headers={"retry-after": "120"}), "cooling_down"),
    "500": (Reply(500, {"error": {"message": "boom"}}), "cooling_down"),
    "503": (Reply(503, {"error": {"message": "overloaded"}}), "cooling_down"),
    "401": (Reply(401, {"error": {"message": "invalid apiKey"}}), "auth_failed"),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failover_to_the_second_account(served, home, fake_upstream, second_upstream, failure):
    reply, first_status = FAILURES[failure]
    write_settings(str(home), fake_upstream.url, api_key="sk-first-0123456789abcdef")
    service, instance = served(accounts=[{"id": "second", "api_key": "sk-second-0123456789abcdef",
                                          "base_url": second_upstream.url}])
    fake_upstream.push(reply)
    for _ in range(2):
        status, _h, body = chat(instance)
        assert status == 200, body
    assert auth_headers(fake_upstream) == ["Bearer sk-first-0123456789abcdef"]  # tried once, then avoided
    assert auth_headers(second_upstream) == ["Bearer sk-second-0123456789abcdef"] * 2
    snaps = by_id(service.accounts())
    first, second = snaps["iflow-cli"], snaps["second"]
    assert first["status"] == first_status
    assert (first["requests"], first["errors"], first["in_flight"]) == (1, 1, 0)
    assert (second["requests"], second["errors"], second["in_flight"]) == (2, 0, 0)
    if failure == "429":
        assert 100 < first["cooldown_s"] <= 120  # Retry-After honoured
    elif first_status == "cooling_down":
        assert 20 < first["cooldown_s"] <= 30  # account_cooldown_s
    else:
        assert "log in" in first["message"]
    assert second["status"] == "ok"


def test_unreachable_account_fails_over(served, home, fake_upstream):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_url = "http://127.0.0.1:%d/v1" % closed.getsockname()[1]
    closed.close()
    write_settings(str(home), dead_url, api_key="sk-first-0123456789abcdef")
    service, instance = served(accounts=[{"id": "second", "api_key": "sk-second-0123456789abcdef",
                                          "base_url": fake_upstream.url}])
    assert chat(instance)[0] == 200
    snaps = by_id(service.accounts())
    assert snaps["iflow-cli"]["status"] == "cooling_down" and snaps["iflow-cli"]["errors"] == 1
    assert auth_headers(fake_upstream) == ["Bearer sk-second-0123456789abcdef"]


def test_when_every_account_fails_the_client_gets_the_error(served, home, fake_upstream, second_upstream):
    write_settings(str(home), fake_upstream.url, api_key="sk-first-0123456789abcdef")
    service, instance = served(accounts=[{"id": "second", "api_key": "sk-second-0123456789abcdef",
                                          "base_url": second_upstream.url}])
    fake_upstream.push(Reply(429, {"error": {"message": "rate limited"}}))
    second_upstream.push(Reply(429, {"error": {"message": "rate limited"}}))
    status, _h, body = chat(instance)
    assert status == 429 and "error" in json.loads(body)
    assert len(fake_upstream.chat_requests()) == 1 and len(second_upstream.chat_requests()) == 1
    # a cooling account is still a last resort: the next request is not refused locally
    assert chat(instance)[0] == 200


def test_concurrent_streams_go_to_the_least_busy_account(served, home, fake_upstream):
    write_settings(str(home), fake_upstream.url, api_key="sk-first-0123456789abcdef")
    service, instance = served(accounts=[{"id": "second", "api_key": "sk-second-0123456789abcdef",
                                          "base_url": fake_upstream.url}])
    slow = Reply(stream=text_stream(), hang_s=0.6)
    fake_upstream.push(slow, slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(chat(instance, stream=True))) for _ in range(2)]
    threads[0].start()
    assert wait_until(lambda: len(fake_upstream.chat_requests()) == 1, 5)
    busy = by_id(service.accounts())
    assert busy["iflow-cli"]["in_flight"] == 1 and busy["second"]["in_flight"] == 0
    threads[1].start()
    for t in threads:
        t.join(10)
    assert [r[0] for r in results] == [200, 200]
    assert all(b"[DONE]" in r[2] for r in results)
    assert sorted(auth_headers(fake_upstream)) == ["Bearer sk-first-0123456789abcdef",
                                                   "Bearer sk-second-0123456789abcdef"]
    snaps = by_id(service.accounts())
    for account_id in ("iflow-cli", "second"):
        assert (snaps[account_id]["requests"], snaps[account_id]["in_flight"]) == (1, 0)


# == Secrets at rest =======================================================================

SECRETS = {"api_key": "sk-top-0123456789abcdef", "custom_api_key": "client-key-0123456789",
           "api_keys": ["client-a-0123456789", "client-b-0123456789"],
           "accounts": [{"id": "a1", "label": "one", "auth_type": "oauth-iflow",
                         "api_key": "ifk-acct-0123456789abcdef", "base_url": "https://apis.iflow.cn/v1",
                         "oauth_access_token": "at-0123456789abcdef", "oauth_refresh_token": "rt-0123456789abc",
                         "oauth_expires_at": "2030-01-01T00:00:00"}]}
PLAIN = ["sk-top-0123456789abcdef", "client-key-0123456789", "client-a-0123456789", "client-b-0123456789",
         "ifk-acct-0123456789abcdef", "at-0123456789abcdef", "rt-0123456789abc"]


def config_paths(home):
    directory = os.path.join(str(home), ".iflow2api")
    return directory, os.path.join(directory, "config.json"), os.path.join(directory, "secret.key")


def saved_config(home):
    config = I.Config(env=dict(os.environ))
    config.update(dict(SECRETS, port=28001))
    return config


def test_secrets_are_sealed_round_trip_with_owner_only_files(home):
    directory, path, key_path = config_paths(home)
    saved_config(home)
    raw = open(path).read()
    assert_no_secrets(raw, PLAIN)
    data = json.loads(raw)
    sealed = [data["api_key"], data["custom_api_key"]] + data["api_keys"] + [
        data["accounts"][0][k] for k in ("api_key", "oauth_access_token", "oauth_refresh_token")]
    assert all(v.startswith("enc:v1:") for v in sealed) and len(set(sealed)) == 7
    assert data["port"] == 28001 and data["accounts"][0]["label"] == "one"  # the rest stays readable
    assert mode(path) == 0o600 and mode(key_path) == 0o600 and mode(directory) == 0o700
    key = open(key_path, "rb").read().strip()
    assert len(base64.b64decode(key)) >= 32 and key.decode() not in raw
    assert [f for f in os.listdir(directory) if f not in ("config.json", "secret.key")] == []

    again = I.Config(env=dict(os.environ))
    assert again.warnings == []
    for name, value in SECRETS.items():
        assert again[name] == value
    # the same plaintext seals differently each time (random nonce), and opens back
    box = I.SecretBox(base64.b64decode(key))
    assert box.seal("same") != box.seal("same") and box.open(box.seal("same")) == "same"


@pytest.mark.parametrize("change", ["replace", "delete"])
def test_wrong_or_missing_key_file_warns_and_keeps_the_sealed_values(make_service, home, change):
    _directory, path, key_path = config_paths(home)
    saved_config(home)
    sealed_before = json.loads(open(path).read())
    original_key = open(key_path, "rb").read()
    if change == "replace":
        with open(key_path, "wb") as f:
            f.write(base64.b64encode(os.urandom(32)) + b"\n")
    else:
        os.unlink(key_path)

    config = I.Config(env=dict(os.environ))
    assert len(config.warnings) == 7
    assert all(("integrity" in w if change == "replace" else "missing" in w) for w in config.warnings)
    assert_no_secrets(" ".join(config.warnings), PLAIN)
    assert I.usable_secret(config["accounts"][0]["api_key"]) == ""
    service = I.Service(config)
    try:
        assert service.accounts()[0]["api_key"] == "" and not service.backend.accounts.has_credentials
        # the client keys stay sealed, and unreadable keys lock the API, they do not open it
        assert config["api_keys"] and all(k.startswith("enc:v1:") for k in config["api_keys"])
        keys = I.ClientKeys(config)
        assert keys.required and not keys.has_usable_key
    finally:
        service.stop()

    config.update({"port": 28002})  # an unrelated save must not lose the unreadable values
    after = json.loads(open(path).read())
    assert after["port"] == 28002
    for name in ("api_key", "custom_api_key", "api_keys", "accounts"):
        assert after[name] == sealed_before[name]
    with open(key_path, "wb") as f:  # the right key brings them back
        f.write(original_key)
    restored = I.Config(env=dict(os.environ))
    assert restored.warnings == [] and restored["accounts"] == SECRETS["accounts"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "not-base64"])
def test_tampered_ciphertext_is_detected_and_not_lost(home, damage):
    _directory, path, _key_path = config_paths(home)
    saved_config(home)
    data = json.loads(open(path).read())
    token = data["accounts"][0]["api_key"]
    if damage == "flip":
        i = len("enc:v1:") + 30
        bad = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
    elif damage == "truncate":
        bad = token[:len("enc:v1:") + 24]
    else:
        bad = token[:-6] + "!!!!=="
    data["accounts"][0]["api_key"] = bad
    with open(path, "w") as f:
        json.dump(data, f)

    config = I.Config(env=dict(os.environ))
    (warning,) = config.warnings
    assert ("integrity" if damage == "flip" else "not readable") in warning
    assert config["accounts"][0]["api_key"] == bad and I.usable_secret(bad) == ""
    assert config["accounts"][0]["oauth_access_token"] == "at-0123456789abcdef"  # the others are fine
    assert config["api_keys"] == SECRETS["api_keys"]
    config.update({"theme_mode": "dark"})
    after = json.loads(open(path).read())
    assert after["accounts"][0]["api_key"] == bad and after["theme_mode"] == "dark"


def test_plaintext_from_an_old_config_is_sealed_on_the_next_save(home):
    directory, path, key_path = config_paths(home)
    os.makedirs(directory, mode=0o700)
    old = dict(SECRETS, port=28000, theme_mode="light", language="zh", some_future_key={"x": 1},
               oauth_access_token="at-top-0123456789abcdef", oauth_refresh_token="rt-top-0123456789abcdef")
    with open(path, "w") as f:
        json.dump(old, f)
    os.chmod(path, 0o644)
    config = I.Config(env=dict(os.environ))
    assert config.warnings == [] and config["accounts"] == SECRETS["accounts"]
    assert config["oauth_refresh_token"] == "rt-top-0123456789abcdef"
    assert open(path).read() == json.dumps(old)  # reading alone changes nothing

    config.update({"theme_mode": "dark"})
    raw = open(path).read()
    assert_no_secrets(raw, PLAIN + ["at-top-0123456789abcdef", "rt-top-0123456789abcdef"])
    data = json.loads(raw)
    assert data["oauth_access_token"].startswith("enc:v1:") and data["accounts"][0]["api_key"].startswith("enc:v1:")
    assert data["some_future_key"] == {"x": 1} and data["language"] == "zh" and data["theme_mode"] == "dark"
    assert mode(path) == 0o600 and mode(key_path) == 0o600
    again = I.Config(env=dict(os.environ))
    assert again.warnings == [] and again["accounts"] == SECRETS["accounts"]
    assert again["custom_api_key"] == SECRETS["custom_api_key"] and again["api_keys"] == SECRETS["api_keys"]


def test_config_get_and_accounts_mask_every_secret(make_service, home):
    saved_config(home)
    service = make_service()
    shown = json.dumps(service.config_get()) + json.dumps(service.accounts()) + json.dumps(service.status())
    assert_no_secrets(shown, PLAIN)
    assert service.config_get()["accounts"][0]["api_key"] == I.mask_secret("ifk-acct-0123456789abcdef")


# == Client keys on a non-loopback bind ======================================================

def test_remote_bind_generates_a_key_and_enforces_it(served, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    service, instance = served(host="127.0.0.2")
    key = instance.generated_key
    assert key.startswith("sk-i2a-") and len(key) > 30
    assert instance.url.startswith("http://127.0.0.2:")

    status, _h, body = chat(instance)
    err = json.loads(body)
    assert status == 401 and "type" not in err and "API key" in err["error"]["message"]  # OpenAI shape
    status, _h, body = http(instance, "POST", "/v1/messages", MESSAGES)
    err = json.loads(body)
    assert status == 401 and err["type"] == "error" and err["error"]["type"] == "authentication_error"
    assert http(instance, "GET", "/v1/models")[0] == 401
    assert chat(instance, {"Authorization": "Bearer wrong-key-0123456789"})[0] == 401
    assert http(instance, "POST", "/v1/messages", MESSAGES, {"x-api-key": "wrong-key-0123456789"})[0] == 401
    assert fake_upstream.chat_requests() == []  # refused before any upstream call

    assert chat(instance, {"Authorization": "Bearer " + key})[0] == 200
    assert chat(instance, {"x-api-key": key})[0] == 200
    assert http(instance, "POST", "/v1/messages", MESSAGES, {"x-api-key": key})[0] == 200
    assert http(instance, "GET", "/v1/models", None, {"Authorization": "Bearer " + key})[0] == 200
    status, _h, body = http(instance, "GET", "/health")
    assert status == 200 and key not in body.decode()

    # stored sealed, and reused (not regenerated) on the next start
    raw = open(service.config.path).read()
    assert key not in raw and json.loads(raw)["api_keys"][0].startswith("enc:v1:")
    service.stop()
    _service2, instance2 = served(host="127.0.0.2")
    assert instance2.generated_key == ""
    assert chat(instance2)[0] == 401 and chat(instance2, {"x-api-key": key})[0] == 200


def test_remote_bind_without_key_only_when_the_user_opts_out(served, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    service, instance = served(host="127.0.0.2", allow_remote_without_key=True)
    assert instance.generated_key == ""
    assert chat(instance)[0] == 200
    assert service.config.get("api_keys") == [] and not os.path.exists(service.config.path)


def test_configured_keys_apply_on_loopback_too(served, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    _service, instance = served(api_keys=["client-key-0123456789"])
    assert instance.generated_key == ""
    assert chat(instance)[0] == 401
    assert chat(instance, {"Authorization": "Bearer client-key-0123456789"})[0] == 200


@pytest.mark.parametrize("host, needed", [("127.0.0.1", False), ("::1", False), ("localhost", False),
                                          ("0.0.0.0", True), ("127.0.0.2", True), ("192.168.1.20", True),
                                          ("::", True)])
def test_which_binds_need_client_keys(home, host, needed):
    assert I.needs_client_key(I.Config(env=dict(os.environ)), host) is needed
    assert I.needs_client_key(I.Config(env=dict(os.environ), cli={"allow_remote_without_key": True}),
                              host) is False


def test_cli_serve_prints_the_generated_key_once(home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    env = cli_env(home)
    errors_path = os.path.join(str(home), "serve-stderr.txt")

    def serve_once(expect_key):
        with open(errors_path, "w") as errors:
            proc = subprocess.Popen([sys.executable, SOURCE, "--host", "127.0.0.2", "--port", "0"], env=env,
                                    stdout=subprocess.PIPE, stderr=errors, text=True)
            try:
                if expect_key:
                    reader = LineReader(proc.stdout)
                    line = reader.until(lambda l: "sk-i2a-" in l)
                    key = line.strip()
                else:
                    key = None
                    assert wait_until(lambda: "OpenAI clients" in open(errors_path).read(), 15)
            finally:
                proc.terminate()
                proc.wait(10)
        output = "" if expect_key else proc.stdout.read()
        proc.stdout.close()
        return key, output, open(errors_path).read()

    key, _out, log_text = serve_once(True)
    assert re.match(r"^sk-i2a-[A-Za-z0-9_\-]{20,}$", key)
    assert "127.0.0.2" in log_text and key not in log_text
    raw = open(os.path.join(str(home), ".iflow2api", "config.json")).read()
    assert key not in raw
    assert I.Config(env=env)["api_keys"] == [key]
    _none, out, log_text = serve_once(False)
    assert "sk-i2a-" not in out and key not in log_text


# == No secret in logs or API responses =====================================================

def test_no_secret_in_any_log_line_or_response(make_service, oauth, home, fake_upstream, adapter, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="iflow2api")
    write_settings(str(home), fake_upstream.url, api_key="plain-old-key-0123456789")
    service = make_service(adapter=adapter, host="127.0.0.2", oauth_refresh_before_s=7200)

    # browser login, an added API-key account, a refresh, a server on a remote bind
    session = service.login_start()
    waiter = threading.Thread(target=service.login_finish, args=(session,), kwargs={"timeout_s": 10})
    waiter.start()
    assert browse(session.url)[0] == 200
    waiter.join(10)
    oauth.expires_in = 10 ** 6  # after the refresh below, the background thread has nothing to do
    extra_key = "added-key-0123456789abcdef"
    service.login_api_key(extra_key, add=True, base_url=fake_upstream.url)
    service.backend.refresher.check()
    instance = service.start()
    client_key = instance.generated_key
    auth = {"Authorization": "Bearer " + client_key}

    responses = []
    fake_upstream.push(Reply(401, {"error": {"message": "invalid apiKey"}}))  # refresh on 401
    responses.append(chat(instance, auth))
    responses.append(chat(instance, auth, stream=True))
    responses.append(http(instance, "POST", "/v1/messages", MESSAGES, {"x-api-key": client_key}))
    responses.append(chat(instance, {"Authorization": "Bearer not-the-key-0123456789"}))
    oauth.fail_refresh = True  # its error text quotes the refresh token
    service.backend.refresher.refresh_now(service.backend.accounts.get("iflow-cli"))
    for path in ("/health", "/v1/models", "/"):
        responses.append(http(instance, "GET", path, None, auth))
    assert [r[0] for r in responses][:4] == [200, 200, 200, 401]
    assert len(oauth.token_requests("refresh_token")) == 3

    secrets_ = oauth.secrets() + [extra_key, client_key, "plain-old-key-0123456789"]
    assert len(secrets_) > 10
    shown = [json.dumps(service.config_get()), json.dumps(service.accounts()), json.dumps(service.status())]
    shown += [r[2].decode("utf-8", "replace") + str(dict(r[1])) for r in responses]
    assert_no_secrets("\n".join(shown), secrets_)
    logs = [caplog.text] + [r.getMessage() for r in caplog.records] + service.recent_logs(1000)
    assert any("refresh" in line for line in logs)  # the run did log what happened
    assert_no_secrets("\n".join(logs), secrets_)



# == Keys follow the bind, not the count of usable keys (issue 10, defect 2) ====================

def test_revoking_the_last_key_on_a_network_bind_is_refused(served, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    service, instance = served(host="127.0.0.2")
    only = service.client_keys()
    assert len(only) == 1
    with pytest.raises(I.InvalidRequestError, match="last client key"):
        service.revoke_client_key(only[0]["id"])
    second = service.create_client_key()
    assert service.revoke_client_key(only[0]["id"]) is True
    assert chat(instance)[0] == 401 and chat(instance, {"x-api-key": second["key"]})[0] == 200


def test_unreadable_keys_lock_the_api_instead_of_opening_it(served, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    service, instance = served()
    service.config.update({"api_keys": ["client-key-0123456789"]})  # saved sealed with secret.key
    service.stop()
    os.unlink(os.path.join(os.path.dirname(service.config.path), "secret.key"))
    _service2, instance2 = served()
    assert chat(instance2)[0] == 401
    assert chat(instance2, {"x-api-key": "client-key-0123456789"})[0] == 401  # cannot be checked: refused


def test_a_network_bind_with_every_key_revoked_in_the_file_stays_locked(served, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    service, instance = served(host="127.0.0.2")
    service.config.update({"api_keys": []})  # as a hand edit would; the server must not open up
    assert chat(instance)[0] == 401 and fake_upstream.chat_requests() == []


# == Web pages and DNS rebinding (issue 10, defect 3) ===========================================

@pytest.mark.parametrize("host_header, allowed", [
    ("127.0.0.1:28000", True), ("localhost", True), ("[::1]:28000", True), ("app.localhost", True),
    ("evil.example", False), ("evil.example:28000", False), ("127.0.0.1.nip.io", False)])
def test_loopback_bind_without_keys_serves_only_loopback_host_names(served, home, fake_upstream,
                                                                    host_header, allowed):
    write_settings(str(home), fake_upstream.url)
    _service, instance = served()
    status, _h, body = chat(instance, {"Host": host_header})
    if allowed:
        assert status == 200
    else:
        assert status == 403 and "allowed_hosts" in json.loads(body)["error"]["message"]
        assert http(instance, "GET", "/admin/api/session", None, {"Host": host_header})[0] == 403
        assert fake_upstream.chat_requests() == []


def test_allowed_hosts_and_client_keys_lift_the_host_check(served, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    _service, instance = served(allowed_hosts=["my-box.lan"])
    assert chat(instance, {"Host": "my-box.lan:28000"})[0] == 200
    assert chat(instance, {"Host": "other.lan"})[0] == 403
    _service, keyed = served(api_keys=["client-key-0123456789"])
    assert chat(keyed, {"Host": "other.lan", "x-api-key": "client-key-0123456789"})[0] == 200
