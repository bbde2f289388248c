"""Shared fixtures: a fake upstream, a temp HOME with iFlow credentials, and the
real server started in-process on 127.0.0.1 port 0 with either HTTP adapter."""
import json
import os
import socket
import sys
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import iflow2api  # noqa: E402
from fakes import FakeUpstream  # noqa: E402

FAKE_KEY = "sk-fake-0123456789abcdef0123456789"


# Test clients talk to 127.0.0.1 directly, whatever proxy variables the machine has.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(server, method, path, body=None, headers=None, timeout=10):
    """(status, headers, body bytes) with plain urllib, no client-side retries, no proxy."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers or {})
    try:
        with DIRECT.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def healthy(server):
    status, _h, body = http(server, "GET", "/health")
    return status == 200 and json.loads(body)["status"] == "ok"


def free_port() -> int:
    """A port nothing listens on right now (for servers a test starts itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def write_settings(home, base_url, api_key=FAKE_KEY, **extra):
    """~/.iflow/settings.json as the iFlow CLI writes it."""
    os.makedirs(os.path.join(home, ".iflow"), exist_ok=True)
    data = {"selectedAuthType": "api-key", "apiKey": api_key, "baseUrl": base_url,
            "modelName": "glm-5", "theme": "Default"}
    data.update(extra)
    with open(os.path.join(home, ".iflow", "settings.json"), "w") as f:
        json.dump(data, f)


@pytest.fixture
def fake_upstream():
    fake = FakeUpstream()
    yield fake
    fake.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty temp HOME and IFLOW2API_HOME; nothing from the real home leaks in."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("IFLOW2API_HOME", str(tmp_path / ".iflow2api"))
    for name in list(os.environ):
        if name.startswith("IFLOW2API_") and name != "IFLOW2API_HOME":
            monkeypatch.delenv(name)
    return tmp_path


@pytest.fixture(params=["h11", "stdlib"])
def adapter(request):
    if request.param == "h11" and iflow2api.h11 is None:
        if in_ci():
            pytest.fail("h11 must be installed in CI")
        pytest.skip("h11 not installed")
    return request.param


@pytest.fixture
def start_server(start_service):
    """Start the real server with config overrides (its "default" instance); all stop at the end."""
    def start(**overrides):
        return start_service(**overrides).instances["default"]
    return start


@pytest.fixture
def server(start_server, fake_upstream, home):
    """The server with credentials pointing at the fake upstream."""
    write_settings(str(home), fake_upstream.url)
    return start_server()


@pytest.fixture
def start_service(home, adapter):
    """Like start_server, but returns the Service itself (its "default" instance started,
    reachable as service.instances["default"].url), so a test can stop it and start a
    new Service on the same HOME and config file. Every Service is stopped at the end."""
    services = []

    def start(**overrides):
        overrides.setdefault("port", 0)
        overrides.setdefault("host", "127.0.0.1")
        env = dict(os.environ, IFLOW2API_HTTP=adapter)
        service = iflow2api.add_web_admin(iflow2api.Service(iflow2api.Config(env=env, cli=overrides)))
        services.append(service)
        service.start()
        return service

    yield start
    for service in services:
        service.stop()
