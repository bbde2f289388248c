"""The desktop window under Xvfb, driven through its widgets: start/stop the server
and prove it over HTTP, log in with an API key, add a provider from a preset, route
Claude Code's background (haiku) calls to it by a scenario route, change the port and restart, switch language and theme, the tray icon (pystray's X11
backend docked in a fake system tray) and its menu, a second launch focusing the
first, and screenshots of every page (light/dark, English/Chinese, 1x and 2x) saved
under test-artifacts/gui/ and checked for content.

Xvfb is started here on a free display. Locally a missing Xvfb/tkinter/pystray skips
with a reason; under CI (CI=true) it fails."""
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import iflow2api
import iflow2api_gui as gui
from helpers import FAKE_KEY, ROOT, free_port, http, in_ci, port_open, write_settings, wait_until

ARTIFACTS = os.path.join(ROOT, "test-artifacts", "gui")


def missing(what: str):
    if in_ci():
        pytest.fail("%s must be installed in CI" % what)
    pytest.skip("%s not installed" % what)


def start_xvfb(size: str):
    """(display, process) of a private X display of the given size ("1920x1200"); Xvfb
    picks a free number and tells us through -displayfd."""
    if gui.tk is None:
        missing("tkinter (python3-tk)")
    binary = shutil.which("Xvfb")
    if binary is None:
        missing("Xvfb (Debian xvfb)")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([binary, "-displayfd", str(write_fd), "-screen", "0", size + "x24", "-nolisten",
                             "tcp"], pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()
    assert number, "Xvfb did not start"
    return ":" + number, proc


@pytest.fixture(scope="module")
def xvfb():
    """The tests' X display, a large one, in DISPLAY."""
    display, proc = start_xvfb("1920x1200")
    saved = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = display
    yield display
    if saved is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = saved
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def screens(xvfb):
    """screens(size): one more display of that size ("1366x768") per size asked for; DISPLAY
    stays the large one."""
    started = {}

    def screen(size: str) -> str:
        if size not in started:
            started[size] = start_xvfb(size)
        return started[size][0]
    yield screen
    for _display, proc in started.values():
        proc.terminate()
        proc.wait(10)


def chat(url: str, model: str = "glm-5"):
    """(status, parsed answer) of a chat completion; an error's body stays bytes."""
    status, _h, body = http(url, "POST", "/v1/chat/completions",
                            {"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return status, (json.loads(body) if status < 400 else body)


def header(recorded, name: str) -> str:
    return {k.lower(): v for k, v in dict(recorded.headers).items()}.get(name, "")


def pump_until(app, condition, timeout_s: float = 10.0):
    """Like helpers.wait_until, but runs the Tk event loop between checks (the window's work)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        app.settle()
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met within %.0f s" % timeout_s)


@pytest.fixture
def make_app(xvfb, home):
    """Build the real window on a temp HOME (config with a free port); all closed at the end."""
    apps = []

    def make(tray=False, scaling=None, config=None, display=None):
        settings = {"port": free_port(), "host": "127.0.0.1", "language": "en"}  # not the machine's locale
        settings.update(config or {})
        os.makedirs(os.path.join(str(home), ".iflow2api"), exist_ok=True)
        with open(os.path.join(str(home), ".iflow2api", "config.json"), "w") as f:
            json.dump(settings, f)
        service = iflow2api.Service.from_config()
        root = gui.tk.Tk(className="iflow2api", screenName=display)
        if scaling:
            root.tk.call("tk", "scaling", scaling)
        opened = []  # what the window asked the browser to open
        app = gui.App(root, service, tray=tray, prefers_dark=lambda: False, open_url=opened.append, _test=True)
        app.opened = opened
        root.geometry("+200+150")
        app.settle()
        apps.append(app)
        return app

    yield make
    while apps:
        app = apps.pop()
        app.quit()
        app.service.stop(timeout_s=2)
        app.root.destroy()
    app = None
    # Free the window's Tk objects here, on the Tk thread: collected later in a server
    # thread, each would wait 1 s for a main loop that is not running.
    gc.collect()


def start_from_button(app) -> str:
    page = app.status_page
    app.select(page)
    page.start_button.invoke()
    pump_until(app, lambda: page.snapshot and page.snapshot["running"])
    return page.snapshot["url"]


def test_start_and_stop_buttons_run_the_server(make_app, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    app = make_app()
    page = app.status_page
    assert page.stop_button.instate(["disabled"]) and not page.start_button.instate(["disabled"])
    url = start_from_button(app)
    assert http(url, "GET", "/health")[0] == 200
    status, answer = chat(url)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "Hello world"
    pump_until(app, lambda: page.values["requests"].cget("text") not in ("", "0"))
    assert page.start_button.instate(["disabled"]) and app.header_state.cget("text").endswith("Running")
    page.connect_buttons["gui.copyBaseUrl"].invoke()
    assert app.root.clipboard_get() == url + "/v1"
    page.connect_buttons["gui.copyClaude"].invoke()
    assert "ANTHROPIC_BASE_URL=%s\n" % url in app.root.clipboard_get()
    page.stop_button.invoke()
    pump_until(app, lambda: not page.snapshot["running"])
    assert not port_open(int(url.rsplit(":", 1)[1]))


def test_log_in_with_an_api_key_then_serve_with_it(make_app, home, fake_upstream):
    write_settings(str(home), fake_upstream.url, api_key="")  # the iFlow CLI's file, no login yet
    app = make_app()
    pump_until(app, lambda: app.status_page.snapshot is not None)
    assert app.status_page.cta.winfo_manager() == "grid"  # the call to action shows
    app.status_page.sign_in_button.invoke()
    page = app.accounts_page
    assert app.current_page() is page
    asked = []
    app.confirm = lambda key, **values: asked.append(key) or True  # "Save it anyway?" answered yes
    fake_upstream.refused_keys.add(FAKE_KEY)
    page.key_var.set(FAKE_KEY)
    page.add_key_button.invoke()
    pump_until(app, lambda: len(page.tree.get_children()) == 1)
    assert asked == ["gui.keyRefused"]  # refused first, saved only once the user said yes
    fake_upstream.refused_keys.clear()
    row = page.tree.item(page.tree.get_children()[0], "values")
    assert FAKE_KEY not in " ".join(row) and row[2].startswith(FAKE_KEY[:3])
    assert page.key_var.get() == ""
    url = start_from_button(app)
    assert app.status_page.cta.winfo_manager() == ""
    assert chat(url)[0] == 200
    assert header(fake_upstream.chat_requests()[-1], "authorization") == "Bearer " + FAKE_KEY


def test_sign_in_with_iflow_in_the_browser_or_cancel(make_app, home):
    from fake_oauth import FakeOAuth
    oauth = FakeOAuth()
    try:
        app = make_app(config=dict(oauth.urls(), oauth_callback_port=0))
        page = app.accounts_page
        app.select(page)
        page.sign_in_button.invoke()
        pump_until(app, lambda: app.opened)
        assert page.url_var.get() == app.opened[0] and page.login_state.cget("text") == "waiting for the sign-in " \
            "in the other tab…"
        assert not page.cancel_button.instate(["disabled"])
        assert http(app.opened[0])[0] == 200  # the "browser": iFlow redirects back to the callback
        pump_until(app, lambda: page.flow.state == "done")
        pump_until(app, lambda: len(page.tree.get_children()) == 1)
        assert page.login_state.cget("text") == "signed in" and page.cancel_button.instate(["disabled"])
        page.sign_in_button.invoke()
        pump_until(app, lambda: len(app.opened) == 2)
        page.cancel_button.invoke()
        pump_until(app, lambda: page.flow.state == "cancelled")
        assert page.login_state.cget("text") == "cancelled" and page.paste_button.instate(["disabled"])
    finally:
        oauth.close()


def test_add_a_provider_from_a_preset_and_map_claude_tiers(make_app, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    app = make_app()
    page = app.providers_page
    app.select(page)
    pump_until(app, lambda: "vllm" in page.preset_box.cget("values"))
    page.preset_var.set("vllm")
    page.preset_box.event_generate("<<ComboboxSelected>>")
    assert "chat_template_kwargs" in page.notes.cget("text")
    page.key_var.set("sk-vllm-0123456789abcdef")
    page.base_var.set(fake_upstream.url)
    page.save_button.invoke()
    pump_until(app, lambda: page.tree.exists("vllm"))
    name, state, base, keys = page.tree.item("vllm", "values")
    assert (state, base, keys) == ("enabled", fake_upstream.url, "sk-...cdef")
    page.load_models_button.invoke()
    pump_until(app, lambda: "vllm/upstream-only-model" in page.tier_boxes["opus"].cget("values"))
    page.tier_vars["opus"].set("vllm/upstream-only-model")
    page.save_tiers_button.invoke()
    pump_until(app, lambda: page.message.cget("text") == "Model tiers saved.")
    assert app.service.config_get()["model_map"]["opus"] == "vllm/upstream-only-model"
    url = start_from_button(app)
    body = {"model": "claude-opus-4-1", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    assert http(url, "POST", "/v1/messages", body, {"x-api-key": "x"})[0] == 200
    last = fake_upstream.chat_requests()[-1]
    assert json.loads(last.body)["model"] == "upstream-only-model"
    assert header(last, "authorization") == "Bearer sk-vllm-0123456789abcdef"


def test_a_background_scenario_route_set_in_the_window_takes_haiku_requests(make_app, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    app = make_app()
    app.service.provider_add("vllm", api_key="sk-vllm-0123456789abcdef", base_url=fake_upstream.url)
    page = app.providers_page
    app.select(page)
    box = page.scenario_boxes["background"]
    pump_until(app, lambda: "vllm/upstream-only-model" in box.cget("values"))  # loaded when the page showed
    assert page.tokens_var.get() == "60000" and all(not v.get() for v in page.scenario_vars.values())
    config_file = os.path.join(str(home), ".iflow2api", "config.json")

    def saved():
        with open(config_file) as f:
            return json.load(f)

    pick(app, box, "vllm/upstream-only-model")
    page.tokens_var.set("lots")
    page.save_scenarios_button.invoke()
    pump_until(app, lambda: page.scenario_message.cget("text") == "A whole number of tokens, at least 1.")
    assert page.tokens_entry.instate(["invalid"]) and str(page.scenario_message.cget("style")) == "Error.TLabel"
    page.tokens_var.set("0")  # a number, refused by the server's own check: its message shows in place
    page.save_scenarios_button.invoke()
    pump_until(app, lambda: page.scenario_message.cget("text") == "long_context_tokens=0: expected at least 1")
    assert page.tokens_entry.instate(["invalid"])
    screenshot(app, "providers-scenarios-refused-light-en-1x")
    assert "scenario_routes" not in saved()
    page.tokens_var.set("90000")
    page.save_scenarios_button.invoke()
    pump_until(app, lambda: page.scenario_message.cget("text") == "Saved.")
    assert not page.tokens_entry.instate(["invalid"]) and str(page.scenario_message.cget("style")) == "Info.TLabel"
    assert saved()["scenario_routes"] == {"background": "vllm/upstream-only-model"}
    assert saved()["long_context_tokens"] == 90000
    screenshot(app, "providers-scenarios-saved-light-en-1x")
    app.set_language("zh", save=False)  # the message follows the language
    assert page.scenario_message.cget("text") == "\u5df2\u4fdd\u5b58\u3002"
    app.set_language("en", save=False)

    page.scenario_vars["background"].set("")  # not saved: showing the page again loads the config
    app.select(app.settings_page)
    app.select(page)
    pump_until(app, lambda: page.scenario_vars["background"].get() == "vllm/upstream-only-model")
    assert page.tokens_var.get() == "90000"

    url = start_from_button(app)
    body = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    status, _h, answer = http(url, "POST", "/v1/messages", body, {"x-api-key": "x"})
    assert status == 200, answer
    last = fake_upstream.chat_requests()[-1]
    assert json.loads(last.body)["model"] == "upstream-only-model"
    assert header(last, "authorization") == "Bearer sk-vllm-0123456789abcdef"
    body["model"] = "claude-sonnet-4-5"  # not a background call: the tier map's model, at iFlow
    assert http(url, "POST", "/v1/messages", body, {"x-api-key": "x"})[0] == 200
    assert json.loads(fake_upstream.chat_requests()[-1].body)["model"] == "glm-5"


def test_change_the_port_in_settings_and_restart(make_app, home, fake_upstream):
    write_settings(str(home), fake_upstream.url)
    app = make_app()
    old_url = start_from_button(app)
    page = app.settings_page
    app.select(page)
    pump_until(app, lambda: page.vars["port"].get() == old_url.rsplit(":", 1)[1])
    page.vars["port"].set("99999")
    page.save_button.invoke()
    app.settle()
    label, key = page.errors["port"]
    assert key == "gui.err.port" and label.winfo_manager() == "grid"
    assert label.cget("text") == "A number from 1 to 65535."
    assert str(app.service.config_get()["port"]) == old_url.rsplit(":", 1)[1]  # nothing saved
    new_port = free_port()
    page.vars["port"].set(str(new_port))
    page.save_button.invoke()
    pump_until(app, lambda: page.message.cget("text") == "Saved. Restart the server to use the new settings.")
    assert page.errors["port"][0].winfo_manager() == ""
    app.select(app.status_page)
    app.status_page.restart_button.invoke()
    pump_until(app, lambda: app.status_page.snapshot["url"].endswith(":%d" % new_port))
    assert http("http://127.0.0.1:%d" % new_port, "GET", "/health")[0] == 200
    assert not port_open(int(old_url.rsplit(":", 1)[1]))


def luminance(image) -> float:
    from PIL import ImageStat
    return ImageStat.Stat(image.convert("L")).mean[0]


def screenshot(app, name: str):
    """The window as it is on screen, saved under test-artifacts/gui/."""
    from PIL import ImageGrab
    app.root.update()
    x, y, w, h = app.root.winfo_rootx(), app.root.winfo_rooty(), app.root.winfo_width(), app.root.winfo_height()
    image = ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=app.root.winfo_screen())
    os.makedirs(ARTIFACTS, exist_ok=True)
    image.save(os.path.join(ARTIFACTS, name + ".png"))
    return image


def pick(app, box, label: str) -> None:
    """Choose an entry of a combo box as a user would (value, then the selection event)."""
    assert label in box.cget("values"), (label, box.cget("values"))
    box.set(label)
    box.event_generate("<<ComboboxSelected>>")
    app.settle()


def test_language_and_theme_switch_live(make_app, home):
    app = make_app()
    page = app.settings_page
    app.select(page)
    app.settle()
    language_box = page.choices["language"][0]
    theme_box = page.choices["theme_mode"][0]
    pick(app, language_box, "\u4e2d\u6587")
    assert app.notebook.tab(app.status_page.tab, "text") == "\u72b6\u6001"
    assert page.save_button.cget("text") == "\u4fdd\u5b58"
    assert gui.tkfont.nametofont("TkDefaultFont").actual("family") in gui.CJK_FONTS
    pick(app, theme_box, "\u6df1\u8272")
    assert app.theme_name == "dark"
    assert app.style.lookup("TFrame", "background") == gui.PALETTES["dark"]["bg"]
    assert app.style.lookup("Treeview", "fieldbackground") == gui.PALETTES["dark"]["field"]
    assert luminance(screenshot(app, "live-switch-dark-zh")) < 60
    pump_until(app, lambda: not app.pending)
    saved = json.load(open(os.path.join(str(home), ".iflow2api", "config.json")))
    assert saved["language"] == "zh" and saved["theme_mode"] == "dark"
    pick(app, language_box, "English")
    pick(app, theme_box, "Light")
    assert app.notebook.tab(app.status_page.tab, "text") == "Status"
    assert luminance(screenshot(app, "live-switch-light-en")) > 180


def fill_with_data(app, home, fake_upstream) -> None:
    """Some of everything, so that the screenshots show real rows."""
    write_settings(str(home), fake_upstream.url)
    url = start_from_button(app)
    chat(url)
    app.service.provider_add("deepseek", api_key="sk-deepseek-0123456789abcdef")
    app.service.config_set_editable({"scenario_routes": {"background": "deepseek/deepseek-chat",
                                                         "think": "deepseek/deepseek-reasoner"}})
    app.service.create_client_key()
    app.service.add_instance("second", "127.0.0.1", free_port())


@pytest.mark.parametrize("scaling", [None, 2.0], ids=["1x", "2x"])
def test_screenshots_of_every_page_in_both_themes_and_languages(make_app, home, fake_upstream, scaling):
    from PIL import ImageChops
    app = make_app(scaling=scaling)
    fill_with_data(app, home, fake_upstream)
    themes = ("light", "dark")
    languages = ("en", "zh") if scaling is None else ("zh",)
    shots = {}
    for theme in themes:
        app.set_theme(theme, save=False)
        for language in languages:
            app.set_language(language, save=False)
            for page in app.pages:
                app.select(page)
                app.settle()
                time.sleep(0.05)
                name = "%s-%s-%s-%s" % (type(page).__name__.replace("Page", "").lower(), theme, language,
                                        "2x" if scaling else "1x")
                image = shots[name] = screenshot(app, name)
                gray = image.convert("L")
                lo, hi = gray.getextrema()
                assert hi - lo > 100, name + ": blank"
                if theme == "dark":
                    assert luminance(image) < 60, name + ": not dark"
                else:
                    assert luminance(image) > 180, name + ": not light"
    if scaling is None:
        for name in shots:
            if "-en-" in name:
                other = shots[name.replace("-en-", "-zh-")]
                diff = ImageChops.difference(shots[name].convert("L"), other.convert("L")).getbbox()
                assert diff is not None, name + ": Chinese looks like English"
    family = gui.tkfont.nametofont("TkDefaultFont").actual("family")
    assert family in gui.CJK_FONTS, "no CJK font for Chinese (install fonts-wqy-microhei)"
    assert app.root.winfo_width() >= app.root.winfo_reqwidth() - 2  # nothing cut off at the right


@pytest.fixture
def tray_host(xvfb):
    """A system tray on the Xvfb display (set up before the app, so torn down after it)."""
    modules, reason = gui.load_tray_modules()
    if modules is None:
        missing("pystray and pillow (%s)" % reason)
    from gui_fakes import FakeSystemTray
    host = FakeSystemTray(xvfb)
    yield host
    host.close()


def test_tray_icon_docks_and_its_menu_starts_and_stops_the_server(tray_host, make_app, home, fake_upstream):
    xdotool = shutil.which("xdotool")
    if xdotool is None:
        missing("xdotool")
    write_settings(str(home), fake_upstream.url)
    app = make_app(tray=True)
    assert app.tray is not None
    assert tray_host.docked_event.wait(10), "the icon never asked to dock"
    pump_until(app, app.tray.is_docked)
    assert app.tray.icon.title == "iflow2api: stopped"

    def choose(label):
        app.tray_menu = None
        subprocess.check_call([xdotool, "mousemove", "20", "20", "sleep", "0.05", "click", "1"])
        pump_until(app, lambda: app.tray_menu is not None)
        menu = app.tray_menu
        labels = [menu.entrycget(i, "label") for i in range(menu.index("end") + 1)]
        index = labels.index(label)
        menu.invoke(index)
        menu.unpost()

    choose("Start server")
    pump_until(app, lambda: app.status_page.snapshot and app.status_page.snapshot["running"])
    url = app.status_page.snapshot["url"]
    assert http(url, "GET", "/health")[0] == 200
    pump_until(app, lambda: app.tray.icon.title == "iflow2api: running at " + url)
    assert app.tray.icon.icon.getpixel((58, 58))[:3] == (0x16, 0xa3, 0x4a)
    choose("Stop server")
    pump_until(app, lambda: not app.status_page.snapshot["running"])
    assert not port_open(int(url.rsplit(":", 1)[1]))
    app.on_close()  # close_action minimize_to_tray: hidden in the tray
    app.settle()
    assert app.root.state() == "withdrawn"
    choose("Show / hide window")
    assert app.root.state() == "normal"


def test_a_second_launch_brings_the_first_window_to_the_front(make_app, home):
    app = make_app()
    config_dir = os.path.dirname(app.service.status()["config_path"])
    app.single_instance = gui.SingleInstance(config_dir, lambda: app.post("show"))
    assert app.single_instance.acquire()
    app.root.withdraw()
    app.settle()
    assert app.root.state() == "withdrawn"
    started = time.time()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "iflow2api_gui.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, env=dict(os.environ))
    while proc.poll() is None and time.time() - started < 30:
        app.settle()
        time.sleep(0.05)
    out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert (out + err).strip() == "iflow2api: the window is already open; brought it to the front"
    pump_until(app, lambda: app.root.state() == "normal")


def test_a_stale_lock_file_is_taken_over(tmp_path):
    with socket.socket() as s:  # a port nothing listens on any more
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    (tmp_path / "gui.lock").write_text(json.dumps({"port": dead_port, "token": "old", "pid": 1}))
    shown = []
    first = gui.SingleInstance(str(tmp_path), lambda: shown.append(1))
    assert first.acquire()
    second = gui.SingleInstance(str(tmp_path), lambda: shown.append(2))
    assert second.acquire() is False
    assert wait_until(lambda: shown == [1], 5)  # the first hears the second on its own thread
    first.release()
    assert not (tmp_path / "gui.lock").exists()
    assert gui.SingleInstance(str(tmp_path), lambda: None).acquire()


def in_view(area, widget) -> bool:
    """Whether widget is wholly inside the visible part of a page's scroll area."""
    top, bottom = area.canvas.winfo_rooty(), area.canvas.winfo_rooty() + area.canvas.winfo_height()
    return top <= widget.winfo_rooty() and widget.winfo_rooty() + widget.winfo_height() <= bottom


def a_label(widget):
    """The first label with text inside widget."""
    for child in widget.winfo_children():
        if child.winfo_class() == "TLabel" and child.cget("text"):
            return child
        found = a_label(child)
        if found is not None:
            return found
    return None


def wheel_down(app, widget, clicks: int) -> None:
    """Turn the mouse wheel over widget, as a user does (xdotool: real X input events)."""
    xdotool = shutil.which("xdotool")
    if xdotool is None:
        missing("xdotool (Debian xdotool)")
    x, y = widget.winfo_rootx() + 5, widget.winfo_rooty() + 5
    env = dict(os.environ, DISPLAY=app.root.winfo_screen())
    subprocess.run([xdotool, "mousemove", str(x), str(y)], env=env, check=True)
    for _ in range(clicks):
        subprocess.run([xdotool, "click", "5"], env=env, check=True)
        app.settle()


@pytest.mark.parametrize("size,scale", [("1366x768", 1.0), ("1366x768", 1.25), ("1920x1080", 1.5)],
                         ids=["768-1x", "768-1.25x", "1080-1.5x"])
def test_the_window_fits_a_laptop_screen_and_a_tall_page_scrolls(make_app, screens, home, size, scale):
    """On common laptop screens (1366x768 at 100% and 125%, 1920x1080 at 150%) the window is
    no larger than the screen less room for a task bar; the Providers page, taller than
    that, scrolls with the wheel to its last button, nothing is cut off at the right, and a
    page that fits shows no scroll bar."""
    app = make_app(display=screens(size), scaling=scale * 96 / 72)
    root = app.root
    root.geometry("+0+0")  # on screen whole (there is no window manager to place it)
    app.settle()
    screen_w, screen_h = map(int, size.split("x"))
    assert (root.winfo_screenwidth(), root.winfo_screenheight()) == (screen_w, screen_h)
    assert root.winfo_height() <= screen_h - app.px(gui.SCREEN_MARGIN[1]), root.winfo_height()
    assert root.winfo_width() <= screen_w - app.px(gui.SCREEN_MARGIN[0]), root.winfo_width()
    page = app.providers_page
    app.select(page)
    app.settle()
    last = page.save_scenarios_button
    assert page.area.scrolls and page.area.bar.winfo_ismapped(), "the tall page has no scroll bar"
    assert not in_view(page.area, last), "the page fits after all: nothing to scroll"
    for theme in ("light", "dark"):
        app.set_theme(theme, save=False)
        for language in ("en", "zh"):
            app.set_language(language, save=False)
            app.settle()
            page.area.canvas.yview_moveto(0)
            app.settle()
            assert not in_view(page.area, last)
            wheel_down(app, a_label(page.frame), 1)  # over a label: not only the scroll bar scrolls
            assert page.area.canvas.yview()[0] > 0, "the wheel over a label did not scroll the page"
            wheel_down(app, page.area.bar, 15)
            assert in_view(page.area, last), "the wheel did not bring the page's end into view"
            assert page.frame.winfo_reqwidth() <= page.area.canvas.winfo_width(), "cut off at the right"
            suffix = "%s-%s-%s-%sx" % (theme, language, size, scale)
            screenshot(app, "laptop-providers-end-" + suffix)
            app.select(app.log_page)
            app.settle()
            assert not app.log_page.area.scrolls and not app.log_page.area.bar.winfo_ismapped()
            screenshot(app, "laptop-log-" + suffix)
            app.select(page)
            app.settle()


def test_a_page_that_grows_after_it_was_laid_out_gets_its_scroll_bar(make_app, screens, home):
    """The update notice comes after start-up, when the Status page was laid out already; on
    a short screen the page must then scroll down to it (the window's tick fits it again)."""
    app = make_app(display=screens("1366x768"), scaling=1.25 * 96 / 72)
    app.root.geometry("+0+0")
    app.select(app.status_page)
    app.settle()
    area = app.status_page.area
    assert not area.scrolls, "the test needs a Status page that fits at first"
    app.service.backend.update.notice = lambda: {"latest": "99.0.0", "current": iflow2api.__version__,
                                                 "url": "http://127.0.0.1:9/release"}
    pump_until(app, lambda: area.scrolls and area.bar.winfo_ismapped(), timeout_s=10)
    button = next(w for w in app.status_page.update_box.winfo_children() if w.winfo_class() == "TButton")
    wheel_down(app, area.bar, 10)
    assert in_view(area, button), "the update notice's button cannot be reached"
    screenshot(app, "laptop-status-update-light-en-1366x768-1.25x")
