"""The command line as a user meets it: one validator per config key (`config KEY VALUE`,
`--port`, `--host`), unknown keys with a hint, the proxy cross-key check, prompts that end
cleanly on Ctrl-C or end of input, global options before the command, and the help texts.
Real subprocesses with a temp HOME (helpers.run_cli); nothing leaves 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

import iflow2api as I
from helpers import SOURCE, cli_env, run_cli, wait_until


def config_path(home):
    return os.path.join(str(home), ".iflow2api", "config.json")


def write_config(home, data):
    os.makedirs(os.path.dirname(config_path(home)), exist_ok=True)
    with open(config_path(home), "w") as f:
        json.dump(data, f)


def read_config(home):
    with open(config_path(home)) as f:
        return json.load(f)


def one_line_error(result, code=1):
    """The error a failed command printed: exactly one non-empty line, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("iflow2api: "), result.stderr
    return lines[0]


# -- config KEY VALUE: one validator, nothing half-saved --------------------------------------------

@pytest.mark.parametrize("key, value, says", [
    ("concurrency", "abc", "whole number"),
    ("concurrency", "0", "at least 1"),
    ("port", "70000", "0 to 65535"),
    ("base_url", "127.0.0.1:8000", "https://"),
    ("upstream_proxy", "ftp://127.0.0.1:21", "socks5://"),
    ("theme_mode", "purple", '"dark"'),
    ("log_level", "LOUD", "WARNING"),
    ("host", "999.1.1.1", "IP address or host name"),
    ("upstream_read_timeout_s", "soon", "a number"),
])
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_allowed(tmp_path, key, value, says):
    write_config(tmp_path, {"port": 1234, "kept_from_the_original": True})
    before = open(config_path(tmp_path), "rb").read()
    line = one_line_error(run_cli(tmp_path, "config", key, value))
    assert key in line and value in line and says in line, line
    assert open(config_path(tmp_path), "rb").read() == before  # nothing saved


def test_unknown_keys_are_refused_with_the_nearest_one(tmp_path):
    line = one_line_error(run_cli(tmp_path, "config", "concurency", "5"))
    assert "unknown key 'concurency'; did you mean 'concurrency'?" in line
    assert not os.path.exists(config_path(tmp_path))
    line = one_line_error(run_cli(tmp_path, "config", "concurency"))  # reading one too
    assert "did you mean 'concurrency'?" in line
    line = one_line_error(run_cli(tmp_path, "config", "zzzzzzzz", "1"))
    assert "unknown key 'zzzzzzzz'" in line and "config --help" in line


def test_unknown_keys_in_the_file_are_read_and_kept(tmp_path):
    write_config(tmp_path, {"api_concurrency": 3, "window_geometry": "800x600"})
    assert run_cli(tmp_path, "config", "concurrency").stdout.strip() == "3"  # the original's name
    assert run_cli(tmp_path, "config", "window_geometry").stdout.strip() == '"800x600"'
    result = run_cli(tmp_path, "config", "port", "28001")
    assert result.returncode == 0, result.stderr
    assert read_config(tmp_path) == {"api_concurrency": 3, "window_geometry": "800x600", "port": 28001}


def test_a_good_value_is_saved_with_its_type(tmp_path):
    result = run_cli(tmp_path, "config", "concurrency", "8")
    assert result.returncode == 0, result.stderr
    assert "concurrency = 8" in result.stdout and read_config(tmp_path) == {"concurrency": 8}


def test_unknown_keys_are_refused_the_same_way_by_config_update_and_the_admin(home):
    config = I.Config()
    with pytest.raises(I.ConfigError, match=r"unknown key 'concurency'; did you mean 'concurrency'\?"):
        config.update({"port": 28001, "concurency": 5})
    assert not os.path.exists(config.path)  # the good key was not saved either
    service = I.Service(config)
    try:
        with pytest.raises(I.ConfigError, match=r"did you mean 'default_model'\?"):
            service.config_set_editable({"default_modle": "glm-5"})
    finally:
        service.stop()


# -- upstream_proxy_enabled needs upstream_proxy ---------------------------------------------------

def test_proxy_enabled_without_a_proxy_is_refused_on_every_update_path(tmp_path):
    line = one_line_error(run_cli(tmp_path, "config", "upstream_proxy_enabled", "true"))
    assert "upstream_proxy_enabled=true needs upstream_proxy" in line
    assert not os.path.exists(config_path(tmp_path))
    assert run_cli(tmp_path, "config", "upstream_proxy", "http://127.0.0.1:7890").returncode == 0
    assert run_cli(tmp_path, "config", "upstream_proxy_enabled", "true").returncode == 0
    line = one_line_error(run_cli(tmp_path, "config", "upstream_proxy", ""))  # emptied while on
    assert "upstream_proxy" in line
    assert read_config(tmp_path)["upstream_proxy_enabled"] is True


def test_a_file_with_the_proxy_enabled_but_empty_loads_with_a_warning(tmp_path):
    write_config(tmp_path, {"upstream_proxy_enabled": True, "upstream_proxy": ""})
    result = run_cli(tmp_path, "config", "upstream_proxy_enabled")
    assert result.returncode == 0 and result.stdout.strip() == "true"
    assert "needs upstream_proxy" in result.stderr and "no proxy is used" in result.stderr
    config = I.Config(path=config_path(tmp_path), env={})
    changes = {"upstream_proxy_enabled": True, "upstream_proxy": "socks5://127.0.0.1:1080"}
    config.update(changes)  # both together is fine
    assert {k: I.Config(path=config_path(tmp_path), env={})[k] for k in changes} == changes


# -- --port and --host, before anything starts -------------------------------------------------------

@pytest.mark.parametrize("port", ["70000", "-1", "abc"])
def test_a_bad_port_is_one_line_before_anything_starts(tmp_path, port):
    line = one_line_error(run_cli(tmp_path, "--port", port, timeout=10), code=2)
    assert "--port" in line and port in line and ("0 to 65535" in line or "whole number" in line)
    assert not os.path.exists(os.path.join(str(tmp_path), ".iflow2api"))


@pytest.mark.parametrize("host", ["999.1.1.1", "bad host", "127.0.0.1:8000"])
def test_a_malformed_host_is_an_error_about_the_host(tmp_path, host):
    line = one_line_error(run_cli(tmp_path, "serve", "--host", host, "--port", "0", timeout=10), code=2)
    assert "--host" in line and host in line and "IP address or host name" in line
    assert "port" not in line.split(":", 2)[-1].replace("--port", "")  # about the host, not the port


def test_an_address_of_another_machine_is_an_error_about_the_host(tmp_path):
    # 192.0.2.1 is TEST-NET-1: never this machine's; binding it fails locally, nothing is sent
    line = one_line_error(run_cli(tmp_path, "--host", "192.0.2.1", "--port", "0", timeout=20))
    assert "host '192.0.2.1'" in line and "not an address of this machine" in line
    assert not os.path.exists(config_path(tmp_path))  # no client key generated for it


def test_a_host_name_that_does_not_resolve_is_named(monkeypatch):
    def no_such_name(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(I.socket, "getaddrinfo", no_such_name)  # no real lookup
    problem = I.bind_host_problem("no-such-host.example")
    assert "host 'no-such-host.example'" in problem and "does not resolve" in problem


def test_loopback_hosts_are_fine():
    assert I.bind_host_problem("127.0.0.1") is None


# -- prompts: end of input and Ctrl-C ---------------------------------------------------------------

PROMPTS = [
    (("login", "--api-key"), "iFlow API key"),
    (("login", "--headless"), "Paste that page's address"),
    (("admin-password",), "New admin password"),
    (("admin-password", "--stdin"), None),
]


@pytest.mark.parametrize("args, prompt", PROMPTS)
def test_end_of_input_at_a_prompt_is_one_line_and_exit_1(tmp_path, args, prompt):
    result = run_cli(tmp_path, *args, stdin="")
    line = one_line_error(result, code=1)
    assert "end of input" in line and "nothing changed" in line
    if prompt:
        assert prompt in result.stdout
    assert not os.path.exists(config_path(tmp_path))
    assert not os.path.exists(os.path.join(str(tmp_path), ".iflow", "settings.json"))


def test_the_second_password_prompt_ends_cleanly_too(tmp_path):
    line = one_line_error(run_cli(tmp_path, "admin-password", stdin="a good password\n"))
    assert "end of input" in line and not os.path.exists(config_path(tmp_path))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a subprocess is POSIX")
@pytest.mark.parametrize("args, prompt", [p for p in PROMPTS if p[1]])
def test_ctrl_c_at_a_prompt_is_one_line_and_exit_130(tmp_path, args, prompt):
    proc = subprocess.Popen([sys.executable, SOURCE] + list(args), env=cli_env(tmp_path),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), b"")), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: prompt.encode() in b"".join(out), timeout_s=20), b"".join(out)
        proc.send_signal(signal.SIGINT)
        stderr = proc.stderr.read().decode()
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stderr.close()
    reader.join(5)
    proc.stdout.close()
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.strip()] == ["iflow2api: cancelled; nothing changed"]
    assert not os.path.exists(config_path(tmp_path))


# -- options, help and the commands around them -------------------------------------------------------

def test_global_options_may_come_before_the_command(tmp_path):
    result = run_cli(tmp_path, "--log-level", "DEBUG", "version")
    assert result.returncode == 0 and result.stdout.strip() == "iflow2api " + I.__version__
    other = os.path.join(str(tmp_path), "other.json")
    with open(other, "w") as f:
        json.dump({"port": 1234}, f)
    for args in (("--config", other, "config", "port"), ("config", "port", "--config", other),
                 ("--config=" + other, "--log-level", "ERROR", "config", "port")):
        result = run_cli(tmp_path, *args)
        assert result.returncode == 0 and result.stdout.strip() == "1234", (args, result.stderr)


def test_an_unknown_command_is_named(tmp_path):
    result = run_cli(tmp_path, "frobnicate")
    assert result.returncode == 2 and "invalid choice: 'frobnicate'" in result.stderr


@pytest.mark.parametrize("args", [("--version",), ("serve", "--version"), ("models", "--version")])
def test_version_flags(tmp_path, args):
    result = run_cli(tmp_path, *args)
    assert result.returncode == 0 and result.stdout.strip() == "iflow2api " + I.__version__


def test_models_help_describes_the_command_without_server_options(tmp_path):
    result = run_cli(tmp_path, "models", "--help")
    assert result.returncode == 0 and "model ids" in result.stdout
    assert "--host" not in result.stdout and "--port" not in result.stdout


def test_config_help_lists_every_key_with_one_line(tmp_path):
    result = run_cli(tmp_path, "config", "--help")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for key in I.DEFAULT_CONFIG:
        line = next((l for l in lines if l.split()[:1] == [key]), None)
        assert line and len(line.split()) > 1, "config --help lacks a line for %s" % key


def test_every_config_key_has_a_one_line_description():
    assert set(I.CONFIG_HELP) == set(I.DEFAULT_CONFIG)
    for key, text in I.CONFIG_HELP.items():
        assert text.strip() and "\n" not in text and len(text) <= 90, key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a missing display is an X11/Wayland case")
def test_gui_without_a_display_is_one_line(tmp_path):
    result = run_cli(tmp_path, "gui", env={"DISPLAY": "", "WAYLAND_DISPLAY": ""})
    line = one_line_error(result, code=2)
    assert "iflow2api" in line


def test_config_echoes_a_secret_masked(tmp_path):
    run = run_cli(tmp_path, "config", "custom_api_key", "sk-client-key-0123456789")
    assert run.returncode == 0 and "sk-client-key-0123456789" not in run.stdout + run.stderr
    run = run_cli(tmp_path, "config", "upstream_proxy", "http://user:proxy-pass-123456@127.0.0.1:3128")
    assert run.returncode == 0 and "proxy-pass-123456" not in run.stdout + run.stderr
    assert "http://user:***@127.0.0.1:3128" in run.stdout


# -- a running server follows `iflow2api config` (issue 14) -----------------------------------

def _health(url):
    from helpers import http
    return json.loads(http(url, "GET", "/health")[2])


@pytest.fixture
def running(start_service, fake_upstream, home, monkeypatch):
    """A served Service whose config file and port the CLI finds (IFLOW2API_PORT), checking
    its file every 0.1 s instead of every 2 s so the test is short."""
    from helpers import free_port, write_settings
    write_settings(str(home), fake_upstream.url)
    monkeypatch.setattr(I.Service, "CONFIG_CHECK_S", 0.1)
    port = free_port()
    service = start_service(port=port)
    return service, {"IFLOW2API_PORT": str(port)}


def test_a_running_server_follows_config_changes_and_says_which_wait_for_a_restart(running, home, caplog):
    service, env = running
    url = service.instances["default"].url
    assert _health(url)["concurrency"]["limit"] == 64
    out = run_cli(home, "config", "concurrency", "3", env=env)
    assert out.returncode == 0, out.stderr
    assert "The server running at %s applies it within 2 s." % url in out.stdout
    assert wait_until(lambda: _health(url)["concurrency"]["limit"] == 3, 5)
    assert run_cli(home, "config", "max_body_bytes", "100", env=env).returncode == 0
    assert wait_until(lambda: service.instances["default"].server.limits.max_body_bytes == 100, 5)
    from helpers import http
    assert http(url, "POST", "/v1/chat/completions", b"x" * 200, {"content-type": "application/json"})[0] == 413
    assert run_cli(home, "config", "upstream_read_timeout_s", "7", env=env).returncode == 0
    assert wait_until(lambda: service.backend.pool.read_timeout_s == 7.0, 5)

    with caplog.at_level("INFO", logger="iflow2api"):
        assert run_cli(home, "config", "theme_mode", "dark", env=env).returncode == 0
        assert wait_until(lambda: any(r.getMessage() == "config file changed: theme_mode; after a restart: "
                                      "theme_mode" for r in caplog.records), 5)
    out = run_cli(home, "config", "host", "localhost", env=env)
    assert "The server running at %s keeps its old host until it is restarted." % url in out.stdout
    assert service.instances["default"].url == url  # still where it was


def test_accounts_shows_the_live_state_of_a_running_server(running, home, fake_upstream):
    from fakes import Reply
    from helpers import http
    service, env = running
    fake_upstream.push(Reply(429, {"error": {"message": "slow down"}}, headers={"retry-after": "30"}))
    body = json.dumps({"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert http(service.instances["default"].url, "POST", "/v1/chat/completions", body,
                {"content-type": "application/json"})[0] == 429
    listed = json.loads(run_cli(home, "accounts", "--json", env=env).stdout)
    assert listed[0]["id"] == "iflow-cli" and listed[0]["status"] == "cooling_down", listed
    assert listed[0]["cooldown_s"] > 0 and listed[0]["errors"] == 1
    table = run_cli(home, "accounts", env=env).stdout
    assert "cooling_down" in table
    # Without a server, the files alone: nothing is cooling down.
    alone = json.loads(run_cli(home, "accounts", "--json", env={"IFLOW2API_PORT": "9"}).stdout)
    assert alone[0]["status"] == "ok"


def test_hand_written_entries_without_an_id_or_name_get_one(home, fake_upstream):
    write_config(home, {"accounts": [{"api_key": "sk-hand-written-0123456789", "base_url": fake_upstream.url}],
                        "instances": [{"port": 28777}]})
    listed = json.loads(run_cli(home, "accounts", "--json").stdout)
    (account,) = listed
    assert account["id"].startswith("acct-") and account["api_key"] == I.mask_secret("sk-hand-written-0123456789")
    saved = read_config(home)
    assert saved["accounts"][0]["id"] == account["id"] and saved["instances"][0]["name"] == "port-28777"
    assert "sk-hand-written" not in json.dumps(saved)  # the rewrite sealed the key
    assert json.loads(run_cli(home, "accounts", "--json").stdout)[0]["id"] == account["id"]  # stable


# -- run as a script, the server restarts as an import (issue 16: memory) -------------------

def test_a_server_run_as_a_script_restarts_itself_as_an_import(home):
    from helpers import free_port, http, stop_process
    port = free_port()

    def answers():
        try:
            return http("http://127.0.0.1:%d" % port, "GET", "/health", timeout=2)[0] == 200
        except OSError:
            return False
    proc = subprocess.Popen([sys.executable, SOURCE, "--port", str(port)], env=cli_env(home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(answers, 20)
        with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
            argv = f.read().split(b"\0")
        # The same process (pid), now running this file as an import, with the interpreter's
        # options (-B here, from PYTHONDONTWRITEBYTECODE) and the arguments kept.
        at = argv.index(b"-c")
        assert b"spec_from_file_location" in argv[at + 1], argv
        assert argv[at + 2] == os.path.abspath(SOURCE).encode() and argv[at + 3:at + 5] == [b"--port", str(port).encode()]
    finally:
        stop_process(proc)
    assert proc.returncode == 0, proc.stderr.read()


def test_one_shot_commands_are_known_commands():
    assert I._ONE_SHOT_ARGS - {"-h", "--help", "--version"} <= set(I.COMMANDS)
    assert not {"serve", "gui", "claude", "codex"} & I._ONE_SHOT_ARGS  # these live long: worth the restart
