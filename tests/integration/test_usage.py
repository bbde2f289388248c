"""The usage history (issue 17): one SQLite row per API request, written off the request
path, kept within its retention and size, recovered when broken, and reported by
`iflow2api usage`. Real server, real sockets, the official SDKs, the fake upstream."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import anthropic
import openai
import pytest

import iflow2api as I
from fakes import Reply, completion, text_stream
from helpers import SOURCE, cli_env, free_port, http, run_cli, wait_until, write_settings

CHAT = [{"role": "user", "content": "hi"}]


def db_path(service) -> str:
    return service.usage.path


def rows(path, where="1=1") -> list:
    if not os.path.exists(path):
        return []
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM requests WHERE %s ORDER BY id" % where)]
    except sqlite3.DatabaseError:  # not (yet) a usage database: the server is about to move it aside
        return []
    finally:
        db.close()


def rows_when(path, count, timeout=10) -> list:
    """The rows once there are `count` of them (the writer thread writes soon, not at once)."""
    assert wait_until(lambda: len(rows(path)) >= count, timeout), rows(path)
    return rows(path)


@pytest.fixture
def served(start_service, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    service = start_service()
    return service, service.instances["default"].url


def test_each_route_writes_one_row_with_what_happened(served, fake_upstream):
    service, url = served
    oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    oa.chat.completions.create(model="sonnet", messages=CHAT)
    list(oa.chat.completions.create(model="glm-5", messages=CHAT, stream=True,
                                    stream_options={"include_usage": True}))
    anthropic.Anthropic(base_url=url, api_key="x", max_retries=0).messages.create(
        model="claude-sonnet-4-5", max_tokens=20, messages=CHAT)
    oa.responses.create(model="glm-5", input="hi")
    fake_upstream.push(Reply(500, {"error": {"message": "boom"}}))
    with pytest.raises(openai.InternalServerError):
        oa.chat.completions.create(model="glm-5", messages=CHAT)
    http(url, "GET", "/v1/models")  # not an API call that reaches a model: no row
    found = rows_when(db_path(service), 5)
    assert [r["route"] for r in found] == ["openai", "openai", "anthropic", "responses", "openai"]
    first, stream, claude, responses, failed = found
    assert (first["model_asked"], first["model_used"], first["provider"], first["account"]) == \
        ("sonnet", "glm-5", "iflow", "iflow-cli")
    assert first["status"] == 200 and first["input_tokens"] == 12 and first["output_tokens"] == 3
    assert first["latency_ms"] > 0 and first["first_byte_ms"] is None and first["client_key"] is None
    assert stream["first_byte_ms"] is not None and 0 < stream["first_byte_ms"] <= stream["latency_ms"]
    assert claude["model_asked"] == "claude-sonnet-4-5" and claude["model_used"] == "glm-5"
    assert responses["model_asked"] == "glm-5" and responses["status"] == 200
    assert failed["status"] == 500
    assert all(abs(r["at"] - time.time()) < 60 for r in found)
    assert len(rows(db_path(service))) == 5


def test_the_client_key_is_stored_by_id_never_itself(start_service, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    key = "client-key-0123456789abcdef"
    service = start_service(api_keys=[key])
    url = service.instances["default"].url
    openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).chat.completions.create(
        model="glm-5", messages=CHAT)
    (row,) = rows_when(db_path(service), 1)
    assert row["client_key"] == I.client_key_id(key)
    with open(db_path(service), "rb") as f:
        assert key.encode() not in f.read()


def test_fifty_concurrent_streams_lose_no_row(served, fake_upstream):
    service, url = served
    oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    errors = []

    def one():
        try:
            list(oa.chat.completions.create(model="glm-5", messages=CHAT, stream=True))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
    threads = [threading.Thread(target=one) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    found = rows_when(db_path(service), 50)
    assert len(found) == 50 and {r["status"] for r in found} == {200} and service.usage.dropped == 0


def test_retention_and_size_cap(tmp_path):
    store = I.UsageStore(str(tmp_path / "usage.db"), retention_days=1, max_mb=0.2)
    store.PRUNE_EVERY_S = 0  # after every batch, not every 10 minutes
    old, now = time.time() - 3 * 86400, time.time()
    for i in range(10):
        store.record({"at": old, "route": "openai", "status": 200, "model_used": "old"})
    for i in range(3000):
        store.record({"at": now + i / 1000.0, "route": "openai", "status": 200, "model_used": "x" * 100})
    store.close()
    assert len(rows(store.path, "model_used = 'old'")) == 0  # past the retention
    assert os.path.getsize(store.path) <= 0.2 * 1024 * 1024 + 64 * 1024
    kept = rows(store.path)
    assert 0 < len(kept) < 3000 and kept[-1]["at"] == pytest.approx(now + 2.999)  # the newest stayed


def test_a_corrupt_database_is_moved_aside_and_serving_goes_on(served, fake_upstream, caplog):
    service, url = served
    path = db_path(service)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"this is not a database" * 100)
    oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert oa.chat.completions.create(model="glm-5", messages=CHAT).choices[0].message.content == "Hello world"
    assert len(rows_when(path, 1)) == 1
    broken = [n for n in os.listdir(os.path.dirname(path)) if n.startswith("usage.db.broken-")]
    assert broken, os.listdir(os.path.dirname(path))
    assert any("moved aside, starting a new one" in r.getMessage() for r in caplog.records)


def test_migrations_bring_an_empty_database_to_the_current_version(tmp_path):
    path = str(tmp_path / "usage.db")
    sqlite3.connect(path).close()  # version 0, no table
    store = I.UsageStore(path)
    store.record({"at": time.time(), "route": "openai", "status": 200})
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(I.USAGE_MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_kill_9_while_writing_keeps_a_sound_database(home, fake_upstream):
    """A hard kill loses at most the rows still queued: what was written stays readable."""
    write_settings(str(home), fake_upstream.url)
    port = free_port()
    proc = subprocess.Popen([sys.executable, SOURCE, "--port", str(port)], env=cli_env(home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d" % port
    body = json.dumps({"model": "glm-5", "messages": CHAT}).encode()
    try:
        assert wait_until(lambda: _answers(url), 20)
        for _ in range(100):
            assert http(url, "POST", "/v1/chat/completions", body, {"content-type": "application/json"})[0] == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    path = os.path.join(str(home), ".iflow2api", "usage.db")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    written = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    db.close()
    assert 0 < written <= 100
    # A new server goes on appending to the same file.
    store = I.UsageStore(path)
    store.record({"at": time.time(), "route": "openai", "status": 200})
    store.close()
    assert len(rows(path)) == written + 1


def _answers(url) -> bool:
    try:
        return http(url, "GET", "/health", timeout=2)[0] == 200
    except OSError:
        return False


def test_usage_command_prints_a_table_csv_and_groups(home):
    path = os.path.join(str(home), ".iflow2api", "usage.db")
    store = I.UsageStore(path)
    now = time.time()
    for model, provider, tokens, status, latency, at in [
            ("glm-5", "iflow", 100, 200, 120.0, now - 60), ("glm-5", "iflow", 50, 500, 80.0, now - 30),
            ("deepseek-chat", "deepseek", 10, 200, 40.0, now - 10), ("glm-5", "iflow", 999, 200, 1.0, now - 9 * 86400)]:
        store.record({"at": at, "route": "openai", "model_used": model, "provider": provider, "status": status,
                      "input_tokens": tokens, "output_tokens": tokens // 10, "latency_ms": latency})
    store.close()
    table = run_cli(home, "usage")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "REQUESTS", "ERRORS"]
    assert lines[1].split()[:5] == ["glm-5", "2", "1", "150", "15"]  # the 9-day-old row is outside 7d
    assert lines[2].split()[:3] == ["deepseek-chat", "1", "0"]
    assert lines[3].split()[:5] == ["total", "3", "1", "160", "16"]
    by_provider = run_cli(home, "usage", "--by", "provider", "--since", "30d", "--csv")
    assert by_provider.stdout.splitlines() == [
        "provider,requests,errors,input_tokens,output_tokens,reasoning_tokens,p50_ms,p95_ms",
        "iflow,3,1,1149,114,0,80.0,120.0", "deepseek,1,0,10,1,0,40.0,40.0"]
    bad = run_cli(home, "usage", "--since", "last tuesday")
    assert bad.returncode == 1 and "expected 7d, 24h, 30m or a date" in bad.stderr
    empty = run_cli(home, "usage", "--since", "2099-01-01")
    assert empty.returncode == 0 and empty.stdout.startswith("No requests since")


def test_usage_history_can_be_switched_off(start_service, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    service = start_service(usage_history=False)
    assert service.usage is None
    url = service.instances["default"].url
    openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="glm-5", messages=CHAT)
    assert not os.path.exists(os.path.join(str(home), ".iflow2api", "usage.db"))


def test_a_client_keys_daily_token_quota(start_service, fake_upstream, home):
    write_settings(str(home), fake_upstream.url)
    limited, other = "client-key-limited-0123456789", "client-key-other-0123456789ab"
    config = dict(api_keys=[limited, other], daily_token_quota={I.client_key_id(limited): 20, "*": 1000})
    service = start_service(**config)
    url = service.instances["default"].url

    def ask(key):
        return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).chat.completions.create(
            model="glm-5", messages=CHAT)
    ask(limited)  # 15 tokens (the fake's usage: 12 + 3)
    assert wait_until(lambda: service.quota._today().get(I.client_key_id(limited)) == 15, 5)
    ask(limited)  # 15 < 20 when it came: allowed, now 30
    assert wait_until(lambda: service.quota._today().get(I.client_key_id(limited)) == 30, 5)
    with pytest.raises(openai.RateLimitError) as refused:
        ask(limited)
    message = refused.value.body["message"]
    assert "used its daily quota of 20 tokens (30 used)" in message and limited not in message
    assert int(refused.value.response.headers["retry-after"]) > 0
    status, _h, body = http(url, "POST", "/v1/messages", json.dumps(
        {"model": "glm-5", "max_tokens": 5, "messages": CHAT}).encode(),
        {"content-type": "application/json", "x-api-key": limited})
    assert status == 429 and json.loads(body)["error"]["type"] == "rate_limit_error"
    ask(other)  # another key has its own count
    assert len(fake_upstream.chat_requests()) == 3
    # A restart keeps the day's count: it starts from the usage history.
    assert wait_until(lambda: len(rows(db_path(service))) >= 5, 10)  # the refused ones too
    service.stop()
    again = start_service(**config)
    url = again.instances["default"].url
    with pytest.raises(openai.RateLimitError):
        ask(limited)


def test_a_report_on_a_file_the_writer_has_not_set_up_yet_is_empty(tmp_path):
    """The writer makes the file first and its table a moment later: a report in between
    (the admin's dashboard polling) is empty, not an error."""
    import sqlite3
    path = tmp_path / "usage.db"
    sqlite3.connect(str(path)).close()  # the file, no table
    store = I.UsageStore(str(path))
    assert store.report(0, ("model", "day")) == {"model": [], "day": []}
