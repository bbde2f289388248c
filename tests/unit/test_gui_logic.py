"""The desktop app's logic without a display: strings, theme detection, formatting,
validation, view models over a real (never started) Service, autostart files under
a temp HOME, the tray adapter over a fake pystray."""
import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, strategies as st

import iflow2api
import iflow2api_gui as gui
from gui_fakes import FakeLoginService, FakePystray, FakeRegistry
from helpers import FAKE_KEY, in_ci

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def service(home):
    svc = iflow2api.Service.from_config()
    yield svc
    svc.stop()


def saved_config(home) -> dict:
    path = os.path.join(str(home), ".iflow2api", "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


# -- strings ----------------------------------------------------------------------

def test_admin_strings_are_parsed_from_the_admin_catalogue():
    js = ("const STRINGS = {\n    en: {\n      'a.b': 'It\\'s {n}',\n      'c': 'x',\n    },\n"
          "    zh: {\n      'a.b': '\u4e2d {n}',\n    },\n};\n")
    assert gui.parse_admin_strings(js) == {"en": {"a.b": "It's {n}", "c": "x"}, "zh": {"a.b": "\u4e2d {n}"}}


def test_every_string_the_window_uses_exists_in_english_and_chinese():
    catalogue = gui.Catalogue()
    source = open(os.path.join(ROOT, "iflow2api_gui.py"), encoding="utf-8").read()
    used = set(re.findall(r'"((?:gui|tab|action|copy|col|state|stat|unit|inst|acc|oauth|prov|keys|theme)'
                          r'\.[A-Za-z.]+)"', source))
    used -= {"gui.lock"}  # the single-instance file name, not a string key
    assert len(used) > 80
    for language in ("en", "zh"):
        missing = sorted(k for k in used if k not in catalogue.strings[language])
        assert not missing, (language, missing)


def test_shared_texts_come_from_the_web_admin_catalogue():
    catalogue = gui.Catalogue("zh")
    assert catalogue.t("action.start") == "\u542f\u52a8"  # the admin's own Chinese text
    assert catalogue.t("acc.added", id="x1") == "\u8d26\u53f7 x1 \u5df2\u6dfb\u52a0\u3002"


def test_missing_translation_falls_back_to_english_then_to_the_key():
    catalogue = gui.Catalogue("zh", admin_strings={"en": {"only.en": "Only {what}"}, "zh": {}})
    assert catalogue.t("only.en", what="English") == "Only English"
    assert catalogue.t("no.such.key") == "no.such.key"


@pytest.mark.parametrize("env, locale_name, windows_id, expected", [
    ({"LANG": "zh_CN.UTF-8"}, "", None, "zh"),
    ({"LANG": "en_US.UTF-8"}, "zh_CN", None, "en"),
    ({"LANG": "C.UTF-8"}, "zh_TW", None, "zh"),
    ({}, "de_DE", None, "en"),
    ({}, "", 0x0804, "zh"),   # Windows: Chinese (PRC)
    ({}, "", 0x0409, "en"),   # Windows: English (US)
])
def test_default_language_follows_the_os(env, locale_name, windows_id, expected):
    assert gui.default_language(env, locale_name, windows_id) == expected


# -- theme and fonts ------------------------------------------------------------------

@pytest.mark.parametrize("value, dark", [(0, True), (1, False)])
def test_windows_theme_is_read_from_apps_use_light_theme(value, dark):
    registry = FakeRegistry({gui._PERSONALIZE_KEY: {"AppsUseLightTheme": (value, FakeRegistry.REG_DWORD)}})
    assert gui.system_prefers_dark("win32", registry=registry) is dark


def test_windows_without_the_setting_is_light():
    assert gui.system_prefers_dark("win32", registry=FakeRegistry()) is False


@pytest.mark.parametrize("platform, output, dark", [
    ("darwin", "Dark\n", True), ("darwin", "", False),
    ("linux", "'prefer-dark'\n", True), ("linux", "'default'\n", False), ("linux", "", False),
])
def test_macos_and_gnome_theme_come_from_their_settings_tools(platform, output, dark):
    asked = []

    def run(args):
        asked.append(args[0])
        return output
    assert gui.system_prefers_dark(platform, run=run) is dark
    assert asked == ["defaults" if platform == "darwin" else "gsettings"]


def test_a_missing_settings_tool_means_light():
    def run(args):
        raise FileNotFoundError(args[0])
    assert gui.system_prefers_dark("linux", run=run) is False


def test_theme_mode_resolves_system_only_by_asking():
    def never():
        raise AssertionError("asked")
    assert gui.resolve_theme("dark", never) == "dark"
    assert gui.resolve_theme("light", never) == "light"
    assert gui.resolve_theme("system", lambda: True) == "dark"
    assert gui.resolve_theme("system", lambda: False) == "light"


def test_chinese_picks_an_installed_cjk_font_and_english_a_native_one():
    families = ["DejaVu Sans", "WenQuanYi Micro Hei", "Segoe UI"]
    assert gui.pick_font_family("zh", families, "fallback", "linux") == "WenQuanYi Micro Hei"
    assert gui.pick_font_family("en", families, "fallback", "linux") == "DejaVu Sans"
    assert gui.pick_font_family("en", families, "fallback", "win32") == "Segoe UI"
    assert gui.pick_font_family("zh", ["Microsoft YaHei UI", "WenQuanYi Micro Hei"], "x", "win32") == \
        "Microsoft YaHei UI"
    assert gui.pick_font_family("zh", ["DejaVu Sans"], "fallback", "linux") == "fallback"


def test_dark_palette_is_dark_everywhere():
    def luminance(color):
        r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    for name in ("bg", "surface", "surface2", "field"):
        assert luminance(gui.PALETTES["dark"][name]) < 60
        assert luminance(gui.PALETTES["light"][name]) > 200


# -- formatting and validation -------------------------------------------------------------

def test_uptime_shows_the_two_largest_units():
    t = gui.Catalogue("en").t
    assert gui.format_uptime(None, t) == "-"
    assert gui.format_uptime(7, t) == "7s"
    assert gui.format_uptime(125, t) == "2m 5s"
    assert gui.format_uptime(3 * 3600 + 60 + 9, t) == "3h 1m"
    assert gui.format_uptime(2 * 86400 + 3600, t) == "2d 1h"
    assert gui.format_uptime(86400, t) == "1d 0h"
    assert gui.format_uptime(61, gui.Catalogue("zh").t) == "1\u5206 1\u79d2"


def test_long_values_are_shortened_in_the_middle():
    assert gui.shorten("primary (ok)", 36) == "primary (ok)"
    cut = gui.shorten("iFlow CLI (/tmp/a/very/long/path/to/settings.json) (ok)", 20)
    assert len(cut) == 20 and cut.startswith("iFlow CLI") and cut.endswith("(ok)") and "\u2026" in cut


def test_client_url_uses_loopback_for_wildcard_binds():
    assert gui.client_url("127.0.0.1", 28000) == "http://127.0.0.1:28000"
    assert gui.client_url("0.0.0.0", 28001) == "http://127.0.0.1:28001"
    assert gui.client_url("::", 5) == "http://[::1]:5"
    assert gui.client_url("192.168.1.9", 7) == "http://192.168.1.9:7"


def test_client_snippets():
    url = "http://127.0.0.1:28000"
    assert gui.openai_base_url(url + "/") == url + "/v1"
    posix = gui.claude_code_setup(url, False, "linux")
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:28000\n" in posix
    assert "export ANTHROPIC_API_KEY=anything\n" in posix
    windows = gui.claude_code_setup(url, True, "win32")
    assert '$env:ANTHROPIC_BASE_URL = "http://127.0.0.1:28000"' in windows
    assert "<your client API key>" in windows
    codex = gui.codex_config(url, "kimi-k2")
    assert 'model = "kimi-k2"' in codex and 'base_url = "http://127.0.0.1:28000/v1"' in codex
    assert 'wire_api = "responses"' in codex


# A valid Settings form; each test changes one field.
SETTINGS_FORM = {"host": "127.0.0.1", "port": "28000", "concurrency": "64", "upstream_proxy_enabled": False,
                 "upstream_proxy": "", "preserve_reasoning_content": False, "theme_mode": "system",
                 "language": "en", "start_minimized": False, "close_action": "quit", "auto_start": False,
                 "auto_run_server": False}


@pytest.mark.parametrize("text, ok", [("127.0.0.1", True), ("::1", True), ("0.0.0.0", True),
                                      ("my-host.local", True), ("", False), ("a b", False), ("-x", False),
                                      ("999.1.1.1", False)])
def test_settings_check_hosts_with_the_servers_own_rule(text, ok):
    _values, errors = gui.SettingsModel.validate(dict(SETTINGS_FORM, host=text))
    assert ("host" not in errors) is ok and iflow2api.is_host(text) is ok


@pytest.mark.parametrize("text, ok", [("1", True), ("65535", True), (" 8080 ", True), ("0", False),
                                      ("65536", False), ("-1", False), ("80a", False), ("", False)])
def test_port_validation(text, ok):
    if ok:
        assert gui.parse_port(text) == int(text)
    else:
        with pytest.raises(ValueError):
            gui.parse_port(text)


@pytest.mark.parametrize("text, ok", [("http://127.0.0.1:8080", True), ("socks5h://u:p@proxy:1080", True),
                                      ("ftp://x:1", False), ("127.0.0.1:8080", False), ("http://h:port", False)])
def test_settings_check_proxies_with_the_servers_own_rule(text, ok):
    _values, errors = gui.SettingsModel.validate(dict(SETTINGS_FORM, upstream_proxy=text))
    assert ("upstream_proxy" not in errors) is ok and iflow2api.is_proxy_url(text) is ok


def test_log_filter_keeps_tracebacks_with_their_record():
    lines = ["2024-01-01 10:00:00,000 DEBUG iflow2api: a", "2024-01-01 10:00:00,001 INFO iflow2api: b",
             "2024-01-01 10:00:00,002 ERROR iflow2api: c", "Traceback (most recent call last):",
             "2024-01-01 10:00:00,003 INFO iflow2api: ERROR in the message does not count"]
    assert gui.filter_log_lines(lines, "") == lines
    assert gui.filter_log_lines(lines, "INFO") == lines[1:]
    assert gui.filter_log_lines(lines, "ERROR") == lines[2:4]


# -- view models ------------------------------------------------------------------------------

def test_settings_reject_every_bad_field_and_save_nothing(service, home):
    model = gui.SettingsModel(service)
    form = model.load()
    assert form["port"] == str(iflow2api.DEFAULT_PORT) and form["host"] == "127.0.0.1"
    form.update(port="70000", host="bad host", concurrency="0", upstream_proxy_enabled=True, upstream_proxy="",
                theme_mode="purple", start_minimized=True)
    result = model.save(form)
    assert result["errors"] == {"port": "gui.err.port", "host": "gui.err.host", "concurrency": "gui.err.concurrency",
                                "upstream_proxy": "gui.err.proxy", "theme_mode": "gui.err.choice"}
    assert saved_config(home) == {}  # not even the valid start_minimized
    assert service.config_get()["start_minimized"] is False


def test_settings_save_changed_keys_and_say_when_a_restart_is_needed(service, home):
    model = gui.SettingsModel(service)
    form = model.load()
    form.update(close_action="quit", start_minimized=True)
    assert model.save(form) == {"errors": {}, "changed": ["close_action", "start_minimized"], "restart": False}
    form.update(port="28123", upstream_proxy_enabled=True, upstream_proxy="socks5://127.0.0.1:1080")
    result = model.save(form)
    assert result["restart"] is True
    assert result["changed"] == ["port", "upstream_proxy", "upstream_proxy_enabled"]
    saved = saved_config(home)
    assert saved["port"] == 28123 and saved["close_action"] == "quit" and saved["start_minimized"] is True
    assert model.save(form)["changed"] == []
    form.update(upstream_proxy="socks5://127.0.0.1:1081")
    assert model.save(form) == {"errors": {}, "changed": ["upstream_proxy"], "restart": False}  # applies at once


def test_settings_autostart_goes_through_the_adapter(service, home, tmp_path):
    adapter = gui.LinuxAutostart(["/usr/bin/python3", "/opt/iflow2api_gui.py", "--autostart"], home=str(tmp_path),
                                 env={})
    model = gui.SettingsModel(service, adapter)
    form = model.load()
    assert form["auto_start"] is False
    form["auto_start"] = True
    assert model.save(form)["changed"] == ["auto_start"]
    assert adapter.is_enabled() and saved_config(home)["auto_start"] is True
    os.remove(adapter.path)  # removed behind our back: the form shows what the OS will do
    assert model.load()["auto_start"] is False


def test_theme_and_language_save_at_once_but_only_known_values(service, home):
    model = gui.SettingsModel(service)
    model.set_now("theme_mode", "dark")
    model.set_now("language", "en")
    assert saved_config(home)["theme_mode"] == "dark" and saved_config(home)["language"] == "en"
    with pytest.raises(ValueError):
        model.set_now("language", "fr")


def test_accounts_model_adds_an_api_key_and_lists_it_masked(service, home, fake_upstream):
    service.config.update({"base_url": fake_upstream.url})  # where the key is checked
    model = gui.AccountsModel(service)
    assert model.accounts() == []
    with pytest.raises(ValueError, match="acc.needKey"):
        model.add_api_key("  ")
    fake_upstream.refused_keys.add(FAKE_KEY)
    with pytest.raises(iflow2api.KeyRefusedError):
        model.add_api_key(FAKE_KEY)
    assert model.accounts() == []
    fake_upstream.refused_keys.clear()
    saved = model.add_api_key(" %s " % FAKE_KEY)
    assert saved["check"] == "ok"
    account_id = saved["id"]
    listed = model.accounts()
    assert [a["id"] for a in listed] == [account_id]
    assert FAKE_KEY not in json.dumps(listed)
    with open(os.path.join(str(home), ".iflow", "settings.json")) as f:
        assert json.load(f)["apiKey"] == FAKE_KEY
    assert model.remove(account_id) is True
    assert model.accounts() == []


def test_providers_model_adds_a_preset_with_a_key_and_maps_claude_tiers(service, home):
    model = gui.ProvidersModel(service)
    providers = model.providers()
    assert "deepseek" in model.preset_names(providers) and "iflow" not in model.preset_names(providers)
    with pytest.raises(ValueError, match="gui.needPreset"):
        model.add("")
    added = model.add("deepseek", "sk-deepseek-0123456789abcdef", make_default=True)
    assert added["configured"] and added["default"] and added["keys"] == ["sk-...cdef"]
    assert model.state_key(added) == "prov.default"
    assert model.save_tiers({"opus": "deepseek/deepseek-reasoner", "sonnet": " glm-5 ", "haiku": ""}) == \
        {"haiku": "gui.err.choice"}
    assert service.config_get()["model_map"]["opus"] == "glm-5"  # nothing saved
    assert model.save_tiers({"opus": "deepseek/deepseek-reasoner", "sonnet": "glm-5", "haiku": "glm-4.6"}) == {}
    assert model.tiers() == {"opus": "deepseek/deepseek-reasoner", "sonnet": "glm-5", "haiku": "glm-4.6"}
    assert model.remove("deepseek") is True


@pytest.mark.parametrize("routes, tokens, changes, errors", [
    ({"background": " vllm/bg-model ", "think": "", "image": "   ", "long_context": "qwen/qwen-long"}, " 80000 ",
     {"scenario_routes": {"background": "vllm/bg-model", "long_context": "qwen/qwen-long"},
      "long_context_tokens": 80000}, {}),
    ({}, "60000", {"scenario_routes": {}, "long_context_tokens": 60000}, {}),  # every row empty: nothing routed
    ({"default": "glm-5", "web_search": "x/y"}, "0", {"scenario_routes": {"default": "glm-5"},
                                                      "long_context_tokens": 0}, {}),  # the range: the server's
    ({"background": "bg"}, "lots", {"scenario_routes": {"background": "bg"}},
     {"long_context_tokens": "gui.err.wholeNumber"}),
    ({}, "1.5", {"scenario_routes": {}}, {"long_context_tokens": "gui.err.wholeNumber"}),
    ({}, "-3", {"scenario_routes": {}}, {"long_context_tokens": "gui.err.wholeNumber"}),
    ({}, "", {"scenario_routes": {}}, {"long_context_tokens": "gui.err.wholeNumber"}),
    ({"think": "deepseek reasoner"}, "60000", {"scenario_routes": {}, "long_context_tokens": 60000},
     {"think": "gui.err.modelId"}),
])
def test_scenario_form_becomes_config_changes(routes, tokens, changes, errors):
    assert gui.ProvidersModel.scenario_changes(routes, tokens) == (changes, errors)
    catalogue = gui.Catalogue()
    for key in errors.values():
        for language in ("en", "zh"):
            assert key in catalogue.strings[language]


def test_scenario_rows_are_the_servers_scenarios_in_its_order_with_texts():
    assert gui.SCENARIOS == iflow2api.SCENARIOS
    catalogue = gui.Catalogue()
    for scenario in gui.SCENARIOS:
        for key in gui.SCENARIO_TEXTS[scenario]:
            for language in ("en", "zh"):
                assert catalogue.strings[language].get(key), (language, key)


def test_saved_scenario_routes_reach_the_config_file_and_route_a_haiku_request(home, fake_upstream):
    from helpers import http, write_settings
    write_settings(str(home), fake_upstream.url)  # iFlow (the default provider) answers at the fake upstream
    service = iflow2api.Service.from_config()
    try:
        model = gui.ProvidersModel(service)
        model.add("vllm", "sk-vllm-0123456789abcdef", base_url=fake_upstream.url)
        form = model.scenarios()
        assert form == {"routes": {s: "" for s in iflow2api.SCENARIOS},
                        "long_context_tokens": str(iflow2api.DEFAULT_CONFIG["long_context_tokens"])}
        assert "vllm/upstream-only-model" in model.models()
        routes = dict(form["routes"], background=" vllm/upstream-only-model ")
        assert model.save_scenarios(routes, "lots") == {"errors": {"long_context_tokens": "gui.err.wholeNumber"}}
        refused = model.save_scenarios(routes, "0")  # a whole number, but the server wants at least 1
        assert refused == {"refused": "long_context_tokens=0: expected at least 1", "field": "long_context_tokens"}
        assert "scenario_routes" not in saved_config(home)  # nothing saved: all or nothing
        assert model.save_scenarios(routes, "60000") == {"changed": ["scenario_routes"]}
        saved = saved_config(home)
        assert saved["scenario_routes"] == {"background": "vllm/upstream-only-model"}
        assert "long_context_tokens" not in saved  # unchanged: left to the default
        assert model.scenarios()["routes"]["background"] == "vllm/upstream-only-model"

        url = service.start(port=0).url
        for name, upstream_model, key in (("claude-haiku-4-5", "upstream-only-model", "sk-vllm-0123456789abcdef"),
                                          ("claude-sonnet-4-5", "glm-5", FAKE_KEY)):
            body = {"model": name, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
            status, _h, answer = http(url, "POST", "/v1/messages", body, {"x-api-key": "x"})
            assert status == 200, answer
            asked = fake_upstream.chat_requests()[-1]
            assert json.loads(asked.body)["model"] == upstream_model
            assert {k.lower(): v for k, v in asked.headers.items()}["authorization"] == "Bearer " + key

        assert model.save_scenarios(dict(routes, background=""), "80000") == \
            {"changed": ["long_context_tokens", "scenario_routes"]}
        saved = saved_config(home)
        assert saved["scenario_routes"] == {} and saved["long_context_tokens"] == 80000
    finally:
        service.stop()


def test_instances_model_validates_before_asking_the_service(service):
    model = gui.InstancesModel(service)
    assert model.validate("second", "127.0.0.1", "28001") == {}
    assert model.validate("default", "", "x") == {"name": "inst.needName", "port": "inst.badPort"}
    assert model.validate("a b", "bad host", "0") == {"name": "inst.needName", "host": "gui.err.host",
                                                       "port": "inst.badPort"}
    rows = model.instances()
    assert rows[0]["name"] == "default" and rows[0]["running"] is False


def test_status_model_when_stopped_without_credentials(service):
    snap = gui.StatusModel(service).snapshot()
    assert snap["running"] is False and snap["has_credentials"] is False
    assert snap["url"] == "http://127.0.0.1:%d" % iflow2api.DEFAULT_PORT
    assert snap["uptime_s"] is None and snap["provider"] == "iflow"


def test_login_flow_browser_redirect_ends_done():
    svc = FakeLoginService()
    flow = gui.LoginFlow(svc, add=True)
    assert flow.start() == svc.session.url and flow.state == "waiting"
    svc.session.outcome = ("code", "code-1")
    svc.session.arrived.set()
    assert flow.wait(5) == "done" and flow.account == "acct-code-1"
    assert svc.finished == [("code-1", True)]


def test_login_flow_paste_wins_and_the_waiting_thread_ends_quietly():
    svc = FakeLoginService()
    flow = gui.LoginFlow(svc)
    flow.start()
    waiter = threading.Thread(target=flow.wait, args=(5,))
    waiter.start()
    with pytest.raises(ValueError, match="acc.needPaste"):
        flow.paste(" ")
    assert flow.paste("code-2") == "done"
    waiter.join(5)
    assert flow.state == "done" and flow.account == "acct-code-2"


def test_login_flow_bad_paste_is_an_error_with_the_reason():
    flow = gui.LoginFlow(FakeLoginService())
    flow.start()
    assert flow.paste("http://localhost/?code=x&state=other") == "error"
    assert flow.message == "state mismatch"


def test_login_flow_cancel_frees_the_session_and_is_not_an_error():
    svc = FakeLoginService()
    flow = gui.LoginFlow(svc)
    flow.start()
    waiter = threading.Thread(target=flow.wait, args=(5,))
    waiter.start()
    flow.cancel()
    waiter.join(5)
    assert svc.session.closed and flow.state == "cancelled" and flow.message == ""


# -- autostart --------------------------------------------------------------------------------

TRICKY = ["/opt/My Apps/python3", "/home/u/it's \"here\"/iflow2api_gui.py", "--autostart", "100%", "a\\b$c`d"]


def test_launch_command_for_each_way_of_starting():
    exists = {"C:\\Py\\pythonw.exe"}.__contains__
    assert gui.launch_command("/x/iflow2api_gui.py", "/usr/bin/python3", "linux") == \
        ["/usr/bin/python3", "/x/iflow2api_gui.py", "--autostart"]
    assert gui.launch_command("/x/iflow2api.py", "/usr/bin/python3", "linux") == \
        ["/usr/bin/python3", "/x/iflow2api.py", "gui", "--autostart"]
    assert gui.launch_command("/d/iflow2api.pyz", "/usr/bin/python3", "darwin") == \
        ["/usr/bin/python3", "/d/iflow2api.pyz", "gui", "--autostart"]
    assert gui.launch_command("/venv/bin/iflow2api-gui", "/venv/bin/python", "linux") == \
        ["/venv/bin/iflow2api-gui", "--autostart"]
    windows = gui.launch_command("C:\\d\\iflow2api.pyzw", "C:\\Py\\python.exe", "win32", exists=exists)
    assert windows[0].endswith("pythonw.exe") and windows[2:] == ["gui", "--autostart"]


def test_windows_autostart_round_trips_through_the_run_key():
    registry = FakeRegistry()
    adapter = gui.WindowsAutostart(["C:\\Program Files\\Py\\pythonw.exe", "C:\\a b\\iflow2api.pyzw", "gui",
                                    "--autostart"], registry)
    assert adapter.is_enabled() is False
    adapter.disable()  # nothing to remove: fine
    adapter.enable()
    value, kind = registry.keys[gui.WindowsAutostart.KEY]["iflow2api"]
    assert kind == FakeRegistry.REG_SZ
    assert value == '"C:\\Program Files\\Py\\pythonw.exe" "C:\\a b\\iflow2api.pyzw" gui --autostart'
    assert adapter.is_enabled() and adapter.registered_command() == value
    adapter.disable()
    assert adapter.is_enabled() is False


def test_macos_autostart_writes_a_launch_agent_plist(tmp_path):
    adapter = gui.MacAutostart(TRICKY, home=str(tmp_path))
    assert adapter.is_enabled() is False
    adapter.enable()
    assert adapter.path == str(tmp_path / "Library" / "LaunchAgents" / "com.iflow2api.gui.plist")
    with open(adapter.path, "rb") as f:
        data = plistlib.load(f)
    assert data == {"Label": "com.iflow2api.gui", "ProgramArguments": TRICKY, "RunAtLoad": True,
                    "ProcessType": "Interactive"}
    assert adapter.registered_command() == TRICKY
    adapter.disable()
    assert adapter.is_enabled() is False and not os.path.exists(adapter.path)


def test_linux_autostart_writes_a_valid_xdg_desktop_entry(tmp_path):
    adapter = gui.LinuxAutostart(TRICKY, home=str(tmp_path), env={})
    adapter.enable()
    assert adapter.path == str(tmp_path / ".config" / "autostart" / "iflow2api.desktop")
    assert adapter.registered_command() == TRICKY
    validator = shutil.which("desktop-file-validate")
    if validator is None:
        if in_ci():
            pytest.fail("desktop-file-validate (Debian desktop-file-utils) must be installed in CI")
        pytest.skip("desktop-file-validate not installed (apt install desktop-file-utils)")
    done = subprocess.run([validator, adapter.path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout
    adapter.disable()
    assert adapter.is_enabled() is False


def test_linux_autostart_honours_xdg_config_home_and_disabled_entries(tmp_path):
    adapter = gui.LinuxAutostart(["/bin/x"], home="/nonexistent", env={"XDG_CONFIG_HOME": str(tmp_path)})
    adapter.enable()
    assert adapter.path == str(tmp_path / "autostart" / "iflow2api.desktop")
    with open(adapter.path, "a") as f:
        f.write("Hidden=true\n")
    assert adapter.is_enabled() is False


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1), min_size=1,
                max_size=5))
def test_desktop_exec_quoting_round_trips(args):
    assert gui.parse_desktop_exec(gui.desktop_exec(args)) == args


# -- tray adapter -----------------------------------------------------------------------------

def tray_modules():
    pil = pytest.importorskip("PIL") if not in_ci() else __import__("PIL")
    from PIL import Image, ImageDraw
    assert pil
    return Image, ImageDraw


def icon_png() -> bytes:
    with open(os.path.join(ROOT, "static", "icon.png"), "rb") as f:
        return f.read()


def test_tray_menu_follows_the_server_state_and_posts_actions():
    Image, ImageDraw = tray_modules()
    fake, posted = FakePystray(has_menu=True), []
    tray = gui.TrayIcon((fake, Image, ImageDraw), icon_png(), posted.append, gui.Catalogue("en").t)
    tray.start()
    icon = fake.icons[0]
    assert icon.ready.wait(5) and icon.visible and icon.title == "iflow2api: stopped"
    assert [item.text for item in icon.menu.items] == ["Show / hide window", "Start server", "Open web admin",
                                                       "Copy OpenAI base URL", "Quit"]
    icon.menu.items[1](icon)
    tray.update(True, "http://127.0.0.1:28000")
    assert icon.title == "iflow2api: running at http://127.0.0.1:28000"
    assert icon.menu.items[1].text == "Stop server"
    icon.menu.items[1](icon)
    icon()  # a click runs the default item: show / hide
    assert posted == ["start", "stop", "toggle"]
    assert icon.icon.getpixel((58, 58))[:3] == (0x16, 0xa3, 0x4a)  # green dot
    tray.update(False, "")
    assert icon.icon.getpixel((58, 58))[:3] == (0x9c, 0xa3, 0xaf)  # grey dot
    tray.stop()
    assert icon.stopped and tray.is_docked() is False


def test_tray_without_menus_asks_the_window_for_its_popup():
    Image, ImageDraw = tray_modules()
    fake, posted = FakePystray(has_menu=False), []
    tray = gui.TrayIcon((fake, Image, ImageDraw), icon_png(), posted.append, gui.Catalogue("zh").t)
    tray.start()
    assert fake.icons[0].ready.wait(5)
    fake.icons[0]()
    assert posted == ["popup"]
    assert [a for _label, a in tray.menu_entries()] == ["toggle", "start", "admin", "copy_url", "quit"]
    assert tray.menu_entries()[4][0] == "\u9000\u51fa"


# -- no tkinter, no display ------------------------------------------------------------------

def test_display_problem_names_what_to_do():
    assert gui.display_problem(None, {"DISPLAY": ":0"}, "linux") == gui.NO_TKINTER
    assert "python3 iflow2api.py" in gui.NO_TKINTER and "python3-tk" in gui.NO_TKINTER
    assert "DISPLAY" in gui.display_problem(object(), {}, "linux")
    assert gui.display_problem(object(), {"WAYLAND_DISPLAY": "wayland-0"}, "linux") == ""
    assert gui.display_problem(object(), {}, "win32") == ""


@pytest.mark.parametrize("block_tkinter", [True, False])
def test_gui_without_tkinter_or_display_prints_one_line_and_exits_2(home, block_tkinter):
    code = ("import sys; sys.path.insert(0, %r)\n" % ROOT
            + ("sys.modules['tkinter'] = None\n" if block_tkinter else "")
            + "import iflow2api_gui\nsys.exit(iflow2api_gui.main([]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=60)
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert "python3 iflow2api.py" in lines[0]
    assert ("tkinter" if block_tkinter else "DISPLAY") in lines[0]


def test_status_snapshot_carries_the_update_notice_and_says_it_in_both_languages(service):
    assert gui.StatusModel(service).snapshot()["update"] is None
    service.backend.update.latest = "9.1.0"
    for name in ("CI", "PYTEST_CURRENT_TEST"):
        service.config.env.pop(name, None)
    update = gui.StatusModel(service).snapshot()["update"]
    assert update["latest"] == "9.1.0" and update["current"] == iflow2api.__version__
    strings = gui.Catalogue()
    for language in ("en", "zh"):
        strings.language = language
        text = strings.t("gui.updateAvailable", latest="9.1.0", current="0.1.0")
        assert "9.1.0" in text and "0.1.0" in text


def test_status_shows_todays_totals_from_the_usage_history(service, home):
    model = gui.StatusModel(service)
    assert model.snapshot()["today"] == {"requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0}
    now = time.time()
    for status, tokens, at in ((200, 10, now), (500, 5, now), (200, 1000, now - 3 * 86400)):  # the last: not today
        service.usage.record({"at": at, "route": "openai", "status": status, "input_tokens": tokens,
                              "output_tokens": tokens * 2})
    service.usage.close()
    assert model.snapshot()["today"] == {"requests": 2, "errors": 1, "input_tokens": 15, "output_tokens": 30}
    service.usage = None  # usage_history off
    assert model.snapshot()["today"] is None


def test_the_window_is_its_natural_size_when_the_screen_has_room():
    assert gui.window_size((994, 749), (1920, 1200), (32, 96), 16) == (994, 749)


def test_a_window_taller_than_the_screen_is_cut_and_gains_room_for_a_scroll_bar():
    # 1366x768 less a task bar and a title bar: the pages scroll instead
    assert gui.window_size((994, 749), (1366, 768), (32, 96), 16) == (1010, 672)


def test_the_window_is_never_wider_than_the_screen():
    assert gui.window_size((1300, 904), (1024, 768), (32, 96), 16) == (992, 672)
    assert gui.window_size((900, 500), (800, 600), (32, 96), 16) == (768, 500)
