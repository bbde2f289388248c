"""Shared fixtures: a fake upstream, a temp HOME with iFlow credentials, and the
real server started in-process on 127.0.0.1 port 0 with either HTTP adapter. Plain helpers
(no fixtures) live in helpers.py; test modules import them from there."""
import ipaddress
import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import iflow2api  # noqa: E402
from fakes import FakeUpstream  # noqa: E402
from helpers import in_ci, write_settings  # noqa: E402


_real_getaddrinfo = socket.getaddrinfo


def _loopback_only_getaddrinfo(host, *args, **kwargs):
    """Tests never reach beyond 127.0.0.0/8: a name or address elsewhere fails here, in
    the test process, before any packet is sent (a safety net for a forgotten base URL)."""
    name = host.decode() if isinstance(host, bytes) else host
    if name not in (None, "", "localhost", "0.0.0.0", "::"):
        try:
            allowed = ipaddress.ip_address(name.strip("[]").split("%")[0]).is_loopback
        except ValueError:
            allowed = False
        if not allowed:
            raise socket.gaierror(socket.EAI_NONAME, "tests may not look up %r (loopback only)" % name)
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", _loopback_only_getaddrinfo)


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
