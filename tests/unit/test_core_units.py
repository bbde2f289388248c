"""Pure parts of the core: signature, per-model tweaks, reasoning, SSE, config, redaction."""
import collections
import hashlib
import hmac
import io
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from unittest import mock

import pytest
from hypothesis import given, strategies as st

import iflow2api as I
from helpers import wait_until


# -- iFlow protocol -------------------------------------------------------------

def test_signature_is_hmac_sha256_of_agent_session_timestamp():
    expected = hmac.new(b"sk-abc", b"iFlow-Cli:sess-1:1700000000000", hashlib.sha256).hexdigest()
    assert I.iflow_signature("sk-abc", "sess-1", 1700000000000) == expected


def test_provider_headers_stream_has_no_accept_and_signature_matches():
    account = I.Account("a")
    account.api_key, account.base_url = "sk-test-key-123", "http://up/v1"
    provider = I.IFlowProvider(session_id="sid", clock=lambda: 1700000000.5)
    url, headers, body = provider.prepare({"model": "glm-4.6", "stream": True, "messages": []}, account)
    assert url == "http://up/v1/chat/completions"
    assert "Accept" not in headers
    assert headers["User-Agent"] == "iFlow-Cli"
    assert headers["Authorization"] == "Bearer sk-test-key-123"
    assert headers["session-id"] == "sid"
    assert headers["x-iflow-timestamp"] == "1700000000500"
    assert headers["x-iflow-signature"] == I.iflow_signature("sk-test-key-123", "sid", 1700000000500)
    assert json.loads(body)["chat_template_kwargs"] == {"enable_thinking": True}
    _url, headers2, _ = provider.prepare({"model": "x", "messages": []}, account)
    assert headers2["Accept"] == "application/json"
    assert headers2["conversation-id"] != headers["conversation-id"]


@pytest.mark.parametrize("model, added, absent", [
    ("deepseek-v3.2-chat", {"thinking_mode": True, "reasoning": True}, []),
    ("glm-5", {"chat_template_kwargs": {"enable_thinking": True}, "enable_thinking": True,
               "thinking": {"type": "enabled"}}, []),
    ("glm-4.7", {"chat_template_kwargs": {"enable_thinking": True}}, ["enable_thinking"]),
    ("glm-4.6", {"chat_template_kwargs": {"enable_thinking": True}}, ["thinking"]),
    ("kimi-k2.5", {"thinking": {"type": "enabled"}}, []),
    ("kimi-k2-thinking", {"thinking_mode": True}, []),
    ("mimo-v2", {"thinking": {"type": "enabled"}}, []),
    ("claude-x", {"chat_template_kwargs": {"enable_thinking": True}}, []),
    ("my-reasoning-model", {"reasoning": True}, []),
    ("qwen3-coder-plus", {}, ["thinking_mode", "reasoning", "chat_template_kwargs"]),
])
def test_model_tweaks_follow_the_iflow_cli(model, added, absent):
    body = I.iflow_model_tweaks({"model": model})
    for key, value in added.items():
        assert body[key] == value
    for key in absent:
        assert key not in body


def test_model_tweaks_never_override_client_fields_and_qwen_4b_strips_thinking():
    assert I.iflow_model_tweaks({"model": "glm-5", "enable_thinking": False})["enable_thinking"] is False
    body = I.iflow_model_tweaks({"model": "qwen3-4b", "reasoning": True, "thinking_mode": True})
    assert "reasoning" not in body and "thinking_mode" not in body


# -- reasoning ----------------------------------------------------------------------

def test_default_mode_merges_reasoning_into_content():
    msg = I.normalize_reasoning_message({"content": "4", "reasoning_content": "2+2"}, preserve=False)
    assert msg == {"content": "2+2\n\n4"}


def test_default_mode_reasoning_only_becomes_content():
    msg = I.normalize_reasoning_message({"content": None, "reasoning_content": "it is 4"}, False)
    assert msg == {"content": "it is 4"}


def test_preserve_mode_keeps_reasoning_and_fills_empty_content():
    assert I.normalize_reasoning_message({"content": "4", "reasoning_content": "r"}, True) == \
        {"content": "4", "reasoning_content": "r"}
    assert I.normalize_reasoning_message({"content": "", "reasoning_content": "r"}, True) == \
        {"content": "r", "reasoning_content": "r"}


def _merge_stream(deltas):
    merger = I.ReasoningMerger()
    out = []
    for delta in deltas:
        data = json.dumps({"choices": [{"index": 0, "delta": delta}]})
        out.append(json.loads(merger.rewrite(data))["choices"][0]["delta"])
    return out


def test_stream_merger_turns_reasoning_into_content_with_one_separator():
    out = _merge_stream([{"reasoning_content": "a"}, {"reasoning_content": "b"}, {"content": "X"},
                         {"content": "Y"}])
    assert [d.get("content") for d in out] == ["a", "b", "\n\nX", "Y"]
    assert all("reasoning_content" not in d for d in out)


def test_stream_merger_leaves_plain_chunks_unparsed():
    merger = I.ReasoningMerger()
    assert not merger.wants(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')


# -- SSE codec ------------------------------------------------------------------------

def test_sse_split_anywhere_gives_same_events():
    raw = b'event: a\ndata: {"x":1}\n\n: keep-alive\r\ndata:[DONE]\r\n\r\n'
    whole = I.SSEParser().feed(raw)
    parser = I.SSEParser()
    pieces = [ev for i in range(len(raw)) for ev in parser.feed(raw[i:i + 1])]
    assert pieces == whole == [("a", '{"x":1}'), (None, "[DONE]")]


def test_sse_multibyte_character_split_across_reads():
    raw = 'data: {"t":"你好"}\n\n'.encode("utf-8")
    parser = I.SSEParser()
    events = parser.feed(raw[:12]) + parser.feed(raw[12:])
    assert events == [(None, '{"t":"你好"}')]


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                                 blacklist_characters="\r\n"), max_size=20),
                min_size=1, max_size=8),
       st.integers(min_value=1, max_value=7))
def test_sse_parser_property_any_split(datas, step):
    raw = b"".join(b"data: " + d.encode("utf-8") + b"\n\n" for d in datas)
    parser = I.SSEParser()
    events = [ev for i in range(0, len(raw), step) for ev in parser.feed(raw[i:i + step])]
    # exactly one space after "data:" is the separator; the rest is the value
    assert events == [(None, d) for d in datas]


def test_event_splitter_keeps_partial_tail():
    splitter = I.EventSplitter()
    assert splitter.feed(b"data: a\n\ndata: b\r\n\r\ndata: c") == b"data: a\n\ndata: b\r\n\r\n"
    assert splitter.pending == b"data: c"
    assert splitter.feed(b"\n") == b"" and splitter.feed(b"\n") == b"data: c\n\n"


@given(st.binary(max_size=300), st.integers(1, 40))
def test_event_splitter_byte_at_a_time_cuts_where_all_at_once_does(data, step):
    whole = I.EventSplitter()
    at_once = whole.feed(data)
    pieces = I.EventSplitter()
    fed = b"".join(pieces.feed(data[i:i + step]) for i in range(0, len(data), step))
    assert fed == at_once and pieces.pending == whole.pending


def test_event_splitter_and_sse_parser_refuse_a_huge_event():
    splitter, parser = I.EventSplitter(max_event_bytes=1000), I.SSEParser(max_event_bytes=1000)
    with pytest.raises(ValueError):
        for _ in range(20):
            splitter.feed(b"x" * 100)
    with pytest.raises(ValueError):
        parser.feed(b"data: " + b"x" * 600 + b"\ndata: " + b"x" * 600 + b"\n")


def test_last_usage_found_in_stream_tail():
    tail = b'ta: {"choices":[]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":5}}\n\ndata: [DONE]\n\n'
    assert I.last_usage_in_stream(tail) == {"prompt_tokens": 5}


def test_last_usage_is_the_last_object_behind_null_usages_and_cut_lines():
    chunk = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\r\n\r\n'
    tail = (b'e":{"prompt_tokens":1}}\n\n' + b'data: {"choices":[],"usage":{"prompt_tokens":2}}\r\n\r\n'
            + chunk * 30 + b"data: [DONE]\r\n\r\n")
    assert I.last_usage_in_stream(tail) == {"prompt_tokens": 2}
    assert I.last_usage_in_stream(b'data: {"choices":[],"usage":{"prompt_tokens":3}}') == {"prompt_tokens": 3}
    assert I.last_usage_in_stream(b'data: {"usage": 5}\n\n' + chunk) is None
    behind = b'data: {"usage":{"prompt_tokens":4}}\n\n' + chunk * (I.USAGE_LOOK_BACK_LINES + 5)
    assert I.last_usage_in_stream(behind) == {"prompt_tokens": 4}  # past the look back: the whole tail


def test_last_usage_in_streams_of_unusual_shape():
    """Lines ending in CR only, and a chunk's JSON over two data lines: as parsing it all would say."""
    cr_only = b'data: {"usage":{"prompt_tokens":1}}\r\rdata: {"usage":{"prompt_tokens":2}}\r\rdata: [DONE]\r\r'
    assert I.last_usage_in_stream(cr_only) == {"prompt_tokens": 2}
    split = b'data: {"usage":{"prompt_tokens":1}}\n\ndata: {"usage":\ndata: {"prompt_tokens":3}}\n\n'
    assert I.last_usage_in_stream(split) == {"prompt_tokens": 3}


# -- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("status, to_client, openai_type", [
    (400, 400, "invalid_request_error"), (401, 401, "invalid_request_error"),
    (429, 429, "rate_limit_error"), (500, 500, "server_error"), (503, 529, "server_error"),
    (502, 502, "server_error"), (422, 400, "invalid_request_error"), (504, 504, "server_error"),
])
def test_upstream_status_maps_to_client_status(status, to_client, openai_type):
    exc = I.upstream_error(status, b'{"error":{"message":"boom"}}')
    assert exc.status == to_client and exc.openai_type == openai_type
    assert str(exc).startswith("upstream %d: boom" % status)
    assert isinstance(exc, I.Iflow2apiError)


def test_iflow_error_inside_200_body_is_an_auth_error():
    exc = I.upstream_error(200, {"status": "434", "msg": "Invalid apiKey"})
    assert exc.status == 401 and "Invalid apiKey" in str(exc)


@pytest.mark.parametrize("body, param", [
    ([], None), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"model": 5, "messages": [{"role": "user"}]}, "model"),
    ({"messages": [{"role": "user"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user"}], "max_tokens": "10"}, "max_tokens"),
    ({"messages": [{"role": "user"}], "temperature": "hot"}, "temperature"),
    ({"messages": ["hi"]}, "messages"),
])
def test_invalid_chat_requests_name_the_field(body, param):
    with pytest.raises(I.InvalidRequestError) as info:
        I.validate_chat_request(body)
    assert getattr(info.value, "param", None) == param


# -- config -------------------------------------------------------------------------------

def test_precedence_cli_over_env_over_file_over_default():
    merged, warnings = I.resolve_config({"port": 1111, "host": "10.0.0.1", "concurrency": 3},
                                        {"IFLOW2API_PORT": "2222", "IFLOW2API_CONCURRENCY": "7"},
                                        {"port": 3333, "host": None})
    assert merged["port"] == 3333 and merged["concurrency"] == 7 and merged["host"] == "10.0.0.1"
    assert merged["preserve_reasoning_content"] is False and not warnings


def test_original_keys_are_read_and_bad_values_fall_back_with_a_warning():
    merged, warnings = I.resolve_config({"api_concurrency": 4, "port": "abc", "theme_mode": "dark",
                                         "unknown_key": 1}, {}, {})
    assert merged["concurrency"] == 4 and merged["port"] == 28000
    assert merged["theme_mode"] == "dark" and merged["unknown_key"] == 1
    assert any("port" in w for w in warnings)


def test_config_write_is_atomic_and_private(tmp_path):
    path = str(tmp_path / "sub" / "config.json")
    config = I.Config(path=path, env={})
    config.update({"port": 28001, "preserve_reasoning_content": True})
    assert json.load(open(path)) == {"port": 28001, "preserve_reasoning_content": True}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [n for n in os.listdir(tmp_path / "sub") if n.endswith(".tmp")]
    with pytest.raises(ValueError):
        config.update({"port": "not a port"})
    assert json.load(open(path))["port"] == 28001


def test_corrupt_config_is_kept_as_bak_and_reported(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    config = I.Config(path=str(path), env={})
    assert config["port"] == 28000
    assert (tmp_path / "config.json.bak").read_text() == "{not json"
    assert any("not valid JSON" in w for w in config.warnings)


@pytest.mark.parametrize("key, value, says", [
    ("default_model", "glm\ud800", "lone surrogate"),
    ("model_map", {"opus": "x\udfff"}, "lone surrogate"),
    ("upstream_connect_timeout_s", float("inf"), "finite"),
    ("upstream_read_timeout_s", "nan", "finite"),
    ("port", 1e300, "0 to 65535"),
    ("port", 70000, "0 to 65535"),
    ("concurrency", 2.5, "whole number"),
    ("upstream_proxy", "notaurl", "socks5://"),
    ("upstream_proxy", "ftp://127.0.0.1:21", "socks5://"),
    ("upstream_proxy", "http://127.0.0.1:notaport", "socks5://"),
    ("oauth_token_url", "http://evil.example/token", "https://"),
    ("base_url", "http://10.0.0.1/v1", "https://"),
    ("theme_mode", "purple", "dark"),
    ("language", "fr", "en"),
    ("close_action", "explode", "quit"),
    ("log_level", "LOUD", "DEBUG")])
def test_bad_values_are_refused_before_anything_changes(tmp_path, key, value, says):
    path = tmp_path / "config.json"
    config = I.Config(path=str(path), env={})
    config.update({"port": 28001})
    before = path.read_bytes()
    with pytest.raises(I.ConfigError) as info:
        config.update({"concurrency": 5, key: value})
    assert says in str(info.value) and key in str(info.value)
    assert path.read_bytes() == before and config["concurrency"] == 64  # nothing half-applied
    config.update({"concurrency": 6})  # and later saves still work
    assert json.loads(path.read_text())["concurrency"] == 6


@pytest.mark.parametrize("key, value", [("oauth_token_url", "http://127.0.0.1:9/token"),
                                        ("oauth_token_url", "https://login.example/token"),
                                        ("upstream_proxy", "socks5h://u:p@127.0.0.1:1080"),
                                        ("base_url", "http://localhost:8000/v1")])
def test_good_urls_are_accepted(tmp_path, key, value):
    config = I.Config(path=str(tmp_path / "config.json"), env={})
    config.update({key: value})
    assert config[key] == value


def test_values_that_would_break_the_server_fall_back_when_read_from_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"upstream_proxy": "notaurl", "upstream_connect_timeout_s": 1e999}))
    config = I.Config(path=str(path), env={})
    assert config["upstream_proxy"] == "" and config["upstream_connect_timeout_s"] == 10.0
    assert len(config.warnings) == 2


def test_a_write_that_fails_changes_nothing_in_memory(tmp_path, monkeypatch):
    config = I.Config(path=str(tmp_path / "config.json"), env={})
    config.update({"concurrency": 5})

    def disk_full(path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(I, "write_json_atomic", disk_full)
    with pytest.raises(OSError):
        config.update({"concurrency": 9})
    assert config["concurrency"] == 5


def test_a_change_made_by_another_process_is_merged_not_undone(tmp_path):
    path = tmp_path / "config.json"
    server = I.Config(path=str(path), env={})
    server.update({"concurrency": 5})
    cli = I.Config(path=str(path), env={})  # `iflow2api config port 28005` while the server runs
    cli.update({"port": 28005})
    server.update({"default_model": "kimi-k2"})  # the server's next save (admin)
    saved = json.loads(path.read_text())
    assert saved == {"concurrency": 5, "port": 28005, "default_model": "kimi-k2"}
    assert server["port"] == 28005


def test_each_corruption_keeps_its_own_backup(tmp_path):
    path = tmp_path / "config.json"
    for n in range(I.BACKUPS_KEPT + 2):
        path.write_text("{broken %d" % n)
        I.Config(path=str(path), env={})
    kept = sorted(p.name for p in tmp_path.iterdir() if ".bak" in p.name)
    assert len(kept) == I.BACKUPS_KEPT
    assert (tmp_path / "config.json.bak").read_text() == "{broken %d" % (I.BACKUPS_KEPT + 1)
    assert (tmp_path / "config.json.bak.1").read_text() == "{broken %d" % I.BACKUPS_KEPT


def test_stale_temp_files_are_removed_at_start_and_fresh_ones_kept(tmp_path):
    stale = tmp_path / "config.json.123.456.tmp"
    fresh = tmp_path / "config.json.789.1.tmp"
    stale.write_text("{}")
    fresh.write_text("{}")
    os.utime(stale, (1, 1))
    I.Config(path=str(tmp_path / "config.json"), env={})
    assert not stale.exists() and fresh.exists()


def test_proxy_password_and_provider_headers_are_sealed_at_rest_and_masked(tmp_path):
    path = tmp_path / "config.json"
    config = I.Config(path=str(path), env={})
    config.update({"upstream_proxy": "http://user:proxy-pass-123456@127.0.0.1:3128",
                   "providers": {"p": {"base_url": "https://p.example/v1",
                                       "headers": {"X-Secret": "header-secret-123456"}}}})
    raw = path.read_text()
    assert "proxy-pass-123456" not in raw and "header-secret-123456" not in raw
    again = I.Config(path=str(path), env={})
    assert again["upstream_proxy"] == "http://user:proxy-pass-123456@127.0.0.1:3128"
    assert again["providers"]["p"]["headers"]["X-Secret"] == "header-secret-123456"
    shown = json.dumps(I.Service(again).config_get())
    assert "proxy-pass-123456" not in shown and "header-secret-123456" not in shown
    assert "http://user:***@127.0.0.1:3128" in shown


def test_credentials_follow_settings_json_changes(tmp_path):
    settings = tmp_path / "settings.json"
    config = I.Config(path=str(tmp_path / "c.json"), env={})
    creds = I.IFlowCredentials(config, str(settings))
    assert creds.api_key == "" and creds.base_url == I.IFLOW_BASE_URL
    settings.write_text(json.dumps({"apiKey": "sk-one-11111111", "baseUrl": "http://x/v1/",
                                    "selectedAuthType": "oauth-iflow"}))
    assert creds.api_key == "sk-one-11111111" and creds.base_url == "http://x/v1"
    assert creds.auth_type == "oauth-iflow"
    settings.write_text(json.dumps({"searchApiKey": "sk-two-2222222222"}))
    assert creds.api_key == "sk-two-2222222222"


def test_a_broken_account_entry_or_settings_value_is_skipped_not_a_failure_per_request(tmp_path, caplog):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"apiKey": "sk-primary-1111111", "baseUrl": 5}))  # a hand edit
    config = I.Config(path=str(tmp_path / "c.json"), env={}, data={"accounts": [
        {"id": "bad", "api_key": "sk-bad-22222222", "base_url": 5},
        {"id": "good", "api_key": "sk-good-3333333", "base_url": "http://127.0.0.1:9/v1"}]})
    pool = I.AccountPool(config, I.IFlowCredentials(config, str(settings)))
    with caplog.at_level(logging.WARNING, logger="iflow2api"):
        for _ in range(2):
            assert [(a.id, a.base_url) for a in pool.accounts()] == [
                (I.Account.PRIMARY, I.IFLOW_BASE_URL), ("good", "http://127.0.0.1:9/v1")]
    assert sum("skipped" in r.getMessage() and "bad" in r.getMessage() for r in caplog.records) == 1  # once


class _SourcesInTurn(I.AccountSet):
    """An account set whose sources change between the look outside the lock and the one inside."""

    def __init__(self, *sources):
        super().__init__()
        self.sources, self.built = list(sources), []

    def _sources(self):
        return self.sources.pop(0) if len(self.sources) > 1 else self.sources[0]

    def _rebuild(self, sources):
        self.built.append(sources)
        if sources == ("broken",):
            raise ValueError("cannot build")
        self._accounts = {name: I.Account(name) for name in sources}


def test_the_account_list_is_built_from_what_the_sources_say_under_the_lock():
    # the first look (outside the lock) saw an older file; another thread may have built the
    # newer one meanwhile: the list must never go back to the older one
    accounts = _SourcesInTurn(("old",), ("new",))
    assert [a.id for a in accounts.accounts()] == ["new"] and accounts.built == [("new",)]


def test_an_account_list_that_cannot_be_built_fails_once_and_the_last_one_stays():
    accounts = _SourcesInTurn(("a",), ("a",), ("broken",))
    assert [a.id for a in accounts.accounts()] == ["a"]
    with pytest.raises(ValueError):
        accounts.accounts()
    assert [a.id for a in accounts.accounts()] == ["a"]  # not rebuilt (and failed) on every call
    assert accounts.built == [("a",), ("broken",)]


# -- redaction ----------------------------------------------------------------------------

def test_secrets_never_reach_log_handlers(caplog):
    I.register_secret("sk-very-secret-value-42")
    logger = I.get_logger("test")
    with caplog.at_level(logging.INFO, logger="iflow2api"):
        logger.info("key %s and header Authorization: Bearer abcdef123456 json %s",
                    "sk-very-secret-value-42", '{"apiKey": "zzzz-9999-yyyy"}')
    text = caplog.text
    assert "sk-very-secret-value-42" not in text and "abcdef123456" not in text
    assert "zzzz-9999-yyyy" not in text and "***" in text


def test_mask_secret_shows_only_ends():
    assert I.mask_secret("sk-1234567890abcdef") == "sk-...cdef"
    assert I.mask_secret("short") == "***"


# -- launchers ------------------------------------------------------------------------------

def test_claude_launch_environment_points_at_the_server():
    argv, env = I.launch_command("claude", "/bin/claude", "http://127.0.0.1:5", "k-1", "p/m", ["-p", "hi"],
                                 {"ANTHROPIC_AUTH_TOKEN": "old", "KEEP": "1"})
    assert argv == ["/bin/claude", "-p", "hi"]
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:5" and env["ANTHROPIC_API_KEY"] == "k-1"
    assert env["ANTHROPIC_MODEL"] == "p/m" and env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert "ANTHROPIC_AUTH_TOKEN" not in env and env["KEEP"] == "1"


def test_codex_launch_uses_overrides_not_the_users_config():
    argv, env = I.launch_command("codex", "/bin/codex", "http://127.0.0.1:5", "k-1", "glm-5", ["exec", "hi"], {})
    assert argv[0] == "/bin/codex" and argv[-2:] == ["exec", "hi"]
    pairs = dict(argv[i + 1].split("=", 1) for i in range(1, len(argv) - 2, 2))
    assert all(argv[i] == "-c" for i in range(1, len(argv) - 2, 2))
    assert pairs["model_providers.iflow2api.base_url"] == '"http://127.0.0.1:5/v1"'
    assert pairs["model_providers.iflow2api.wire_api"] == '"responses"'
    assert pairs["model"] == '"glm-5"' and pairs["model_provider"] == '"iflow2api"'
    assert env["IFLOW2API_CODEX_KEY"] == "k-1"


@pytest.mark.parametrize("argv, model, rest", [
    (["--model", "p/m", "-p", "x"], "p/m", ["-p", "x"]), (["--model=p/m", "exec"], "p/m", ["exec"]),
    (["exec", "--model", "x"], None, ["exec", "--model", "x"]), ([], None, [])])
def test_launcher_takes_only_a_leading_model_option(argv, model, rest):
    assert I._split_model_option(argv) == (model, rest)


# -- the router -----------------------------------------------------------------------------------

def _router():
    r = I.Router()
    r.add("GET", "/v1/models", "list")
    r.add("POST", "/v1/messages", "messages", "anthropic")
    r.add("GET DELETE", "/v1/responses/{response_id}", "response")
    r.add("GET", "/v1/models/{model_id:.+}", "model")
    return r


def test_router_matches_exact_paths_patterns_and_head_as_get():
    r = _router()
    assert r.match("GET", "/v1/models") == ("list", {}, "openai")
    assert r.match("HEAD", "/v1/models") == ("list", {}, "openai")
    assert r.match("POST", "/v1/messages") == ("messages", {}, "anthropic")
    assert r.match("DELETE", "/v1/responses/resp_1") == ("response", {"response_id": "resp_1"}, "openai")
    assert r.match("HEAD", "/v1/models/p/m") == ("model", {"model_id": "p/m"}, "openai")


@pytest.mark.parametrize("method, path, error", [
    ("GET", "/v1/nothing", I.NotFoundError), ("POST", "/v1/models", I.MethodNotAllowedError),
    ("GET", "/v1/messages", I.MethodNotAllowedError), ("POST", "/v1/responses/x", I.MethodNotAllowedError),
    ("GET", "/v1/responses/x/y", I.NotFoundError)])
def test_router_tells_an_unknown_path_from_a_wrong_method(method, path, error):
    with pytest.raises(error):
        _router().match(method, path)


def test_router_lists_its_routes_as_registered():
    assert set(_router().routes()) == {("GET", "/v1/models"), ("POST", "/v1/messages"),
                                       ("GET", "/v1/responses/{response_id}"),
                                       ("DELETE", "/v1/responses/{response_id}"),
                                       ("GET", "/v1/models/{model_id:.+}")}


def test_chunked_decoder_fed_a_byte_at_a_time_gives_the_body():
    wire = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    decoder = I.ChunkedDecoder(max_bytes=100)
    body = b"".join(decoder.feed(wire[i:i + 1]) for i in range(len(wire)))
    assert body == b"hello world" and decoder.done


def test_launched_clients_send_a_configured_key_when_there_is_one(tmp_path):
    def key_for(**values):
        return I.launcher_key(I.Config(path=str(tmp_path / "c.json"), env={}, cli=values))
    assert key_for() == "iflow2api"
    assert key_for(custom_api_key="original-key-0123") == "original-key-0123"
    assert key_for(api_keys=["first-key-0123"], custom_api_key="original-key-0123") == "first-key-0123"
    assert key_for(api_keys=["enc:v1:unreadable"], custom_api_key="original-key-0123") == "original-key-0123"


def test_concurrency_limiter_can_grow_and_shrink_while_requests_wait():
    limiter = I.ConcurrencyLimiter(1, 5.0)
    first = limiter.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(limiter.acquire()))
    waiter.start()
    assert wait_until(lambda: limiter.waiting == 1, 2)
    limiter.resize(2, 5.0)  # a larger limit lets the waiting request in at once
    waiter.join(2)
    assert len(got) == 1 and limiter.in_flight == 2 and limiter.waiting == 0
    limiter.resize(1, 0.05)  # smaller: nobody is cut, new requests wait for room
    with pytest.raises(I.RateLimitError):
        limiter.acquire()
    first()
    got[0]()
    assert limiter.in_flight == 0 and limiter.rejected == 1
    limiter.acquire()()  # room again


def test_ids_given_to_a_config_that_cannot_be_written_stay_in_memory(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"accounts": [{"api_key": "sk-hand-written-0123456789"}]}))

    def refuse(*_args):
        raise PermissionError("read-only file system")
    monkeypatch.setattr(I, "write_json_atomic", refuse)
    config = I.Config(path=str(path), env={})
    (entry,) = config["accounts"]
    assert entry["id"].startswith("acct-")  # usable now, saved the next time the file can be written
    assert any("could not be saved" in w and "read-only" in w for w in config.warnings)
    assert "acct-" not in path.read_text()


# -- socket timeouts -----------------------------------------------------------------------

@pytest.mark.parametrize("timeout_s", [0.05, 1e-9])
def test_a_timed_read_times_out_however_short_the_timeout(timeout_s):
    """On Linux the kernel times plain sockets (SO_RCVTIMEO), where zero would mean never."""
    a, b = socket.socketpair()
    with a, b:
        I.set_timeout(a, timeout_s)
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            I.recv_timed(a)
        assert time.monotonic() - started < 2
        b.sendall(b"x")
        assert I.recv_timed(a) == b"x"
        if I.KERNEL_TIMEOUTS:
            assert a.gettimeout() is None  # blocking mode, timed by the kernel: no poll per read


@given(st.lists(st.sampled_from(["Bearer ", "BEARER\t", "api_key", "ApiKey", '"token"', "Password", "x-api-key",
                                 "SECRET", "tokens", "sk-", "SK-", ": ", "=", '"', " ", "abcd1234", "z" * 9, "\u0130",
                                 "\u017f", "\u212a", "pa\u017f\u017fword", "\u017fecret", "\u0131",
                                 "refresh_token", "&", ","]), max_size=12).map("".join))
def test_the_cheap_tests_before_the_secret_patterns_change_nothing(text):
    """Each pattern is skipped when its cheap test fails: the result is the same as running all."""
    slow = text
    for pattern, replacement, _needed in I._SECRET_PATTERNS:
        slow = pattern.sub(replacement, slow)
    with mock.patch.object(I, "_known_secrets", ()):  # what other tests registered
        assert I.redact(text) == slow


# -- the disconnect watcher ----------------------------------------------------------------

@pytest.fixture
def watcher():
    w = I.DisconnectWatcher()
    w.TICK_S, w.QUIET_TICKS = 0.02, 3  # its thread reads both each round
    yield w
    w.close()


def test_the_watcher_calls_back_when_a_watched_client_closes(watcher):
    client, peer = socket.socketpair()
    with client, peer:
        gone = threading.Event()
        watcher.watch(client, gone.set)
        time.sleep(0.1)  # taken up at a tick
        peer.close()
        assert gone.wait(2)


def test_a_sleeping_watcher_wakes_for_a_new_watch(watcher):
    assert wait_until(lambda: watcher._asleep, 2), "the watcher never went to sleep while idle"
    client, peer = socket.socketpair()
    with client, peer:
        gone = threading.Event()
        watcher.watch(client, gone.set)
        assert not watcher._asleep
        peer.close()
        assert gone.wait(2)


def test_an_ended_watch_never_calls_back_and_data_is_not_a_disconnect(watcher):
    ended, ended_peer = socket.socketpair()
    talking, talking_peer = socket.socketpair()
    with ended, ended_peer, talking, talking_peer:
        calls = []
        watcher.watch(ended, lambda: calls.append("ended"))()  # cancelled at once
        watcher.watch(talking, lambda: calls.append("talking"))
        time.sleep(0.1)
        ended_peer.close()
        talking_peer.sendall(b"the next request")  # readable, but not gone
        time.sleep(0.3)
        assert calls == []


def _tcp_pair():
    """A connected pair of TCP sockets on 127.0.0.1 (the server's sockets are TCP: a Unix
    socketpair's send() waits out its timeout differently)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _address = listener.accept()
    return server, client


def test_a_write_to_a_client_that_reads_a_little_now_and_then_times_out():
    """The timeout is for the whole write, not per send() call (each of which moves a few bytes)."""
    writer, reader = _tcp_pair()
    with writer, reader:
        # Small buffers and 8 KiB read every 0.1 s: each send() moves a little within the
        # timeout, so a plain sendall() on these kernel-timed sockets would go on for 50 s.
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        stop = threading.Event()

        def read_slowly():
            while not stop.wait(0.1):
                try:
                    reader.recv(8192)
                except OSError:
                    return
        threading.Thread(target=read_slowly, daemon=True).start()
        I.set_timeout(writer, 0.5)
        started = time.monotonic()
        try:
            with pytest.raises(socket.timeout):
                I.send_all(writer, b"x" * (4 * 1024 * 1024))
            assert time.monotonic() - started < 3
        finally:
            stop.set()
        if I.KERNEL_TIMEOUTS:  # the socket's own timeout is back as it was
            assert writer.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16) == I._timeval(0.5)


def test_a_watch_on_a_reused_fd_number_replaces_the_stale_one(watcher):
    """A watched socket closed without its watch ended: the next socket with its fd number
    is still watched (the thread survives the stale entry)."""
    first, first_peer = socket.socketpair()
    watcher.watch(first, lambda: None)
    time.sleep(0.1)  # registered
    number = first.fileno()
    first.close()
    first_peer.close()
    second, second_peer = socket.socketpair()
    with second, second_peer:
        assert number in (second.fileno(), second_peer.fileno())
        watched = second if second.fileno() == number else second_peer
        other = second_peer if watched is second else second
        gone = threading.Event()
        watcher.watch(watched, gone.set)
        time.sleep(0.1)
        other.close()
        assert gone.wait(2)
        assert watcher._thread.is_alive()


# -- the stderr log handler ------------------------------------------------------------------

def _record(name, level, message):
    return logging.LogRecord(name, level, "(test)", 0, message, None, None)


def _stderr_handler(stream):
    handler = I.StderrHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return handler


def test_each_line_is_written_at_once():
    stream = io.StringIO()
    handler = _stderr_handler(stream)
    handler.handle(_record(I.ACCESS_LOG.name, logging.INFO, "request 0"))
    assert stream.getvalue() == "INFO request 0\n"  # no batch, no flush needed
    handler.handle(_record("iflow2api", logging.WARNING, "listening"))
    assert stream.getvalue().splitlines() == ["INFO request 0", "WARNING listening"]


class _SlowStream(io.StringIO):
    """Hands the GIL over in the middle of every write, as a write to a pipe may."""

    def write(self, text):
        half = len(text) // 2
        super().write(text[:half])
        time.sleep(0.0005)
        return super().write(text[half:])


def test_lines_from_many_threads_come_out_whole_and_in_order():
    stream = _SlowStream()
    handler = _stderr_handler(stream)

    def log_lines(name):
        for n in range(50):
            handler.handle(_record(I.ACCESS_LOG.name, logging.INFO, "%s-%02d" % (name, n)))
    threads = [threading.Thread(target=log_lines, args=("t%d" % t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 400 and all(re.fullmatch(r"INFO t\d-\d\d", line) for line in lines)
    for t in range(8):
        assert [line for line in lines if line.startswith("INFO t%d-" % t)] == ["INFO t%d-%02d" % (t, n) for n in range(50)]


def test_no_stream_is_no_error():
    handler = _stderr_handler(io.StringIO())
    handler.stream = None  # pythonw on Windows starts without stderr
    errors = []
    handler.handleError = errors.append
    handler.handle(_record("iflow2api", logging.ERROR, "nowhere to go"))
    assert errors == []


def test_the_line_formatter_writes_the_time_as_logging_does():
    plain, cached = logging.Formatter("%(asctime)s %(message)s"), I.LineFormatter("%(asctime)s %(message)s")
    short = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    short_cached = I.LineFormatter("%(asctime)s %(message)s", "%H:%M:%S")
    for created in (1700000000.0, 1700000000.25, 1700000000.999, 1700000001.5, 1700000000.5):
        record = _record("iflow2api", logging.INFO, "m")
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        assert cached.format(record) == plain.format(record)
        assert short_cached.format(record) == short.format(record)


def test_random_ids_are_24_base62_characters_drawn_evenly():
    ids = [I.new_random_id("msg_") for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"msg_[0-9A-Za-z]{24}", i) for i in ids)
    counts = collections.Counter("".join(i[4:] for i in ids))
    assert len(counts) == 62
    # 480,000 characters, about 7,742 of each: a byte taken modulo 62 would give "0".."7" 25% more
    assert max(counts.values()) < 1.15 * min(counts.values())  # chance alone: under 1.07


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text() | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False), inner, max_size=4),
    max_leaves=20)


@given(_JSON_VALUES)
def test_compact_json_is_json_dumps_with_our_options(value):
    assert I.compact_json(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_compact_json_refuses_what_dumps_refuses():
    for value in ({"a": object()}, {(1, 2): "tuple key"}, [b"bytes"]):
        with pytest.raises(TypeError):
            json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        with pytest.raises(TypeError):
            I.compact_json(value)
