"""The update notice (issue 15): asks a releases URL at most once a day, compares versions,
only tells (log line, /health, admin dashboard), honours skip_version, never in tests or CI
unless asked, and a failure is one debug line. The releases server is a fake on 127.0.0.1."""
import json
import logging
import os

import pytest

import iflow2api as I
from fake_proxies import ImageServer


def releases(tag):
    return ImageServer({"/latest": ("application/json", json.dumps({"tag_name": tag}).encode()),
                        "/pypi": ("application/json", json.dumps({"info": {"version": tag}}).encode()),
                        "/garbage": ("application/json", b"{not json")})


def checker(tmp_path, url, **config):
    env = {"HOME": str(tmp_path)}  # no CI, no PYTEST_CURRENT_TEST: the check is allowed here
    config = I.Config(path=str(tmp_path / "config.json"), env=env, cli=dict(update_check_url=url, **config))
    return I.UpdateChecker(config, I.ConnectionPool(2.0, 5.0))


@pytest.mark.parametrize("tag, path, expected", [("v9.1.0", "/latest", "9.1.0"), ("9.1.0", "/pypi", "9.1.0"),
                                                 (I.__version__, "/latest", None), ("0.0.1", "/latest", None),
                                                 (I.__version__ + "rc1", "/latest", None)])
def test_a_newer_release_is_noticed_and_the_rest_is_not(tmp_path, tag, path, expected):
    server = releases(tag)
    try:
        check = checker(tmp_path, server.url(path))
        check.check()
        notice = check.notice()
        assert (notice and notice["latest"]) == expected or notice is expected
        if notice:
            assert notice["current"] == I.__version__ and notice["url"]
    finally:
        server.close()


def test_at_most_once_a_day_and_skip_version(tmp_path):
    server = releases("v9.1.0")
    try:
        first = checker(tmp_path, server.url("/latest"))
        first.check()
        assert server.requests == ["/latest"]
        again = checker(tmp_path, server.url("/latest"))
        again.check()
        assert server.requests == ["/latest"] and again.notice()["latest"] == "9.1.0"  # from the saved check
        skipping = checker(tmp_path, server.url("/latest"), skip_version="9.1.0")
        skipping.check()
        assert skipping.notice() is None
        later = checker(tmp_path, server.url("/latest"))
        later.clock = lambda: 10 ** 10  # a day later
        later.check()
        assert server.requests == ["/latest", "/latest"]
    finally:
        server.close()


@pytest.mark.parametrize("path", ["/garbage", "/missing", None])
def test_failures_are_one_debug_line_and_no_notice(tmp_path, caplog, path):
    server = releases("v9.1.0")
    url = server.url(path) if path else "http://127.0.0.1:%d/latest" % server.port
    if path is None:
        server.close()  # unreachable
    try:
        check = checker(tmp_path, url)
        with caplog.at_level(logging.DEBUG, logger="iflow2api"):
            check.check()
        assert check.notice() is None
        lines = [r for r in caplog.records if "update check" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
    finally:
        if path is not None:
            server.close()


def test_never_in_tests_or_ci_and_the_off_switch(tmp_path):
    server = releases("v9.1.0")
    try:
        for env in ({"CI": "true"}, {"PYTEST_CURRENT_TEST": "x"}, {"IFLOW2API_NO_UPDATE_CHECK": "1"}):
            config = I.Config(path=str(tmp_path / "c.json"), env=env, cli={"update_check_url": server.url("/latest")})
            I.UpdateChecker(config, I.ConnectionPool(2.0, 5.0)).check()
        off = checker(tmp_path, server.url("/latest"), check_update_on_startup=False)
        off.check()
        assert server.requests == [] and off.notice() is None
    finally:
        server.close()


def test_health_and_dashboard_carry_the_notice(start_service, fake_upstream, home):
    from helpers import write_settings
    write_settings(str(home), fake_upstream.url)
    service = start_service()
    service.backend.update.latest = "9.1.0"
    service.config.env.pop("PYTEST_CURRENT_TEST", None)
    service.config.env.pop("CI", None)
    from helpers import http
    status, _h, body = http(service.instances["default"], "GET", "/health")
    assert status == 200 and json.loads(body)["update"]["latest"] == "9.1.0"
    assert service.dashboard()["update"]["latest"] == "9.1.0"
