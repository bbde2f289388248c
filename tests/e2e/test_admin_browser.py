"""The web admin (/admin) and the API docs (/docs, /redoc) in headless Chromium, driven by
Playwright for Python, against the real server in-process with the fake upstream.

Chromium is Debian's /usr/bin/chromium (Playwright's own browser download is not used).
Missing Playwright or Chromium skips these tests locally and fails them under CI.
Each test leaves a screenshot in test-artifacts/ at the repository root. The browser may
only reach 127.0.0.1: every other address is aborted, so nothing leaves the machine.
"""
import datetime
import json
import os
import re
import time

import pytest

import iflow2api
from fakes import Reply, text_stream
from helpers import ROOT, free_port, http, in_ci, port_open, wait_until, write_settings

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the browser fixture
    expect = sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
WAIT_MS = 10000  # every wait in a page is bounded by this
PASSWORD = "browser test password"
CHAT = {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]}
NOT_LOCAL = re.compile(r"^(?!(https?|wss?)://(127\.0\.0\.1|localhost)[:/])[a-z-]+://")

if expect is not None:
    expect.set_options(timeout=WAIT_MS)


@pytest.fixture
def adapter():
    """One HTTP adapter is enough here (the API tests cover both)."""
    return "h11" if iflow2api.h11 is not None else "stdlib"


def _unavailable(reason):
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        _unavailable("Playwright for Python is not installed (pip install playwright)")
    if not os.path.exists(CHROMIUM):
        _unavailable("%s is missing (apt-get install chromium)" % CHROMIUM)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30000)
        try:
            yield chromium
        finally:
            chromium.close()


class Pages:
    """Opens pages in fresh contexts; remembers them for screenshots and JS errors."""

    def __init__(self, browser):
        self.browser, self.contexts, self.pages, self.errors = browser, [], [], []

    def new(self, **options):
        options.setdefault("viewport", {"width": 1280, "height": 860})
        options.setdefault("locale", "en-US")
        options.setdefault("color_scheme", "light")
        context = self.browser.new_context(**options)
        context.set_default_timeout(WAIT_MS)
        context.set_default_navigation_timeout(WAIT_MS)
        context.route(NOT_LOCAL, lambda route: route.abort())
        page = context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.contexts.append(context)
        self.pages.append(page)
        return page

    def close(self, name):
        os.makedirs(ARTIFACTS, exist_ok=True)
        for i, page in enumerate(self.pages):
            path = os.path.join(ARTIFACTS, "%s%s.png" % (name, "" if i == 0 else "-%d" % i))
            try:
                page.screenshot(path=path, full_page=True, timeout=WAIT_MS)
            except Exception:  # a screenshot must not hide the test's own result
                pass
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(browser, request):
    opened = Pages(browser)
    yield opened
    opened.close(re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name))


def screenshot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, name + ".png"), full_page=True)


def screenshot_every_look(page, name, check=None):
    """Screenshots <name>-<width>-<lang>-<theme> at 1280 and 375 px, in English and Chinese,
    light and dark; none may scroll sideways. check(width, lang) runs before each one.
    Leaves the page in English, light. The page is scrolled to the top and a toast from an
    earlier step is hidden first (it would show in every look, in the language it was said in)."""
    page.evaluate("() => { window.scrollTo(0, 0); document.querySelector('#toast').hidden = true; }")
    for viewport in ({"width": 1280, "height": 860}, {"width": 375, "height": 740}):
        page.set_viewport_size(viewport)
        for lang in ("en", "zh"):
            page.select_option("#lang-select", lang)
            for theme in ("light", "dark"):
                page.select_option("#theme-select", theme)
                expect(page.locator("html")).to_have_attribute("data-theme", theme)
                scroll_width = page.evaluate("() => document.documentElement.scrollWidth")
                assert scroll_width <= viewport["width"], (viewport, lang, theme, scroll_width)
                if check is not None:
                    check(viewport["width"], lang)
                screenshot(page, "%s-%d-%s-%s" % (name, viewport["width"], lang, theme))
    page.select_option("#lang-select", "en")
    page.select_option("#theme-select", "light")


# -- helpers over HTTP ------------------------------------------------------------------

def set_password(url, password=PASSWORD):
    status, _h, body = http(url, "POST", "/admin/api/setup", {"password": password})
    assert status == 200, body


def open_admin(page, url):
    """Load /admin and wait for its first screen (setup, login or app); the page must show."""
    page.goto(url + "/admin")
    page.wait_for_function("() => ['setup', 'login', 'app'].indexOf(document.body.dataset.screen) >= 0",
                           timeout=WAIT_MS)
    assert not page.evaluate("document.body.hidden"), (
        "the whole admin page is hidden: <body hidden> (showScreen() in static/admin/app.js)")


def sign_in(page, url, password=PASSWORD):
    open_admin(page, url)
    expect(page.locator("#screen-login")).to_be_visible()
    page.fill("#login-password", password)
    page.click("#login-submit")
    expect(page.locator("#screen-app")).to_be_visible()


def open_tab(page, name):
    page.click("[data-tab=%s]" % name)
    expect(page.locator("[data-panel=%s]" % name)).to_be_visible()


def signed_in_page(server, pages, tab=None):
    """A new page signed in to the admin of a server without a password yet (set here), on tab."""
    set_password(server.url)
    page = pages.new()
    sign_in(page, server.url)
    if tab:
        open_tab(page, tab)
    return page


def send_and_watch_it_stream(page):
    """Send the playground form: text shows while the answer still streams, then it ends."""
    page.click("#pg-send")
    page.wait_for_function("() => { const o = document.querySelector('#pg-output');"
                           " return o.dataset.state === 'streaming' && o.textContent.length > 0; }",
                           timeout=WAIT_MS)
    expect(page.locator("#pg-output")).to_have_attribute("data-state", "done")


def no_page_errors(pages):
    assert pages.errors == [], pages.errors


# -- the tests ---------------------------------------------------------------------------

def test_first_run_password_setup_then_the_dashboard(server, pages):
    page = pages.new()
    open_admin(page, server.url)
    expect(page.locator("#screen-setup")).to_be_visible()
    expect(page.locator("#screen-login")).to_be_hidden()
    expect(page.locator("#screen-app")).to_be_hidden()
    expect(page.locator("#logout")).to_be_hidden()

    page.fill("#setup-password", "short")
    page.click("#setup-submit")
    expect(page.locator("#setup-error")).not_to_be_empty()
    expect(page.locator("#screen-setup")).to_be_visible()

    page.fill("#setup-password", PASSWORD)
    page.click("#setup-submit")
    expect(page.locator("#screen-app")).to_be_visible()
    expect(page.locator("[data-tab=dashboard]")).to_have_attribute("aria-selected", "true")
    expect(page.locator("[data-panel=dashboard]")).to_be_visible()
    expect(page.locator("[data-stat=version]")).to_have_attribute("data-value", iflow2api.__version__)
    expect(page.locator("[data-stat=status]")).to_have_attribute("data-value", "running")
    expect(page.locator("[data-stat=requests]")).to_have_attribute("data-value", "0")
    expect(page.locator("[data-stat=uptime]")).not_to_have_attribute("data-value", "")
    expect(page.locator("#logout")).to_be_visible()

    # The session cookie is out of the page's reach and strict about sites.
    assert "iflow2api_admin" not in page.evaluate("document.cookie")
    cookie = [c for c in page.context.cookies() if c["name"] == "iflow2api_admin"]
    assert cookie and cookie[0]["httpOnly"] and cookie[0]["sameSite"] == "Strict"
    with open(server.config.path, encoding="utf-8") as f:
        saved = f.read()
    assert PASSWORD not in saved and "admin_password_hash" in saved
    # A second browser now gets the sign-in form, not the setup.
    other = pages.new()
    open_admin(other, server.url)
    expect(other.locator("#screen-login")).to_be_visible()
    expect(other.locator("#screen-setup")).to_be_hidden()
    no_page_errors(pages)


def test_login_after_logout(server, pages):
    set_password(server.url)
    page = pages.new()
    open_admin(page, server.url)
    expect(page.locator("#screen-login")).to_be_visible()
    # A forgotten password is reset on the server's machine: the form says how.
    forgot = page.locator("#login-forgot")
    expect(forgot).to_contain_text("iflow2api admin-password")
    expect(forgot).to_contain_text("server's machine")

    def says_how(width, lang):
        expect(forgot).to_contain_text("服务器本机" if lang == "zh" else "Forgot the password?")
        box = page.locator("#login-forgot code").bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, box

    screenshot_every_look(page, "sign-in", says_how)
    page.fill("#login-password", "not the password")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_have_text("Wrong password.")
    expect(page.locator("#screen-app")).to_be_hidden()

    page.fill("#login-password", PASSWORD)
    page.click("#login-submit")
    expect(page.locator("#screen-app")).to_be_visible()
    expect(page.locator("#login-error")).to_be_empty()

    page.click("#logout")
    expect(page.locator("#screen-login")).to_be_visible()
    expect(page.locator("#screen-app")).to_be_hidden()
    expect(page.locator("#logout")).to_be_hidden()
    expect(page.locator("#toast")).to_be_visible()
    page.reload()  # the session is gone on the server, not only in the page
    page.wait_for_function("() => document.body.dataset.screen === 'login'", timeout=WAIT_MS)
    expect(page.locator("#screen-login")).to_be_visible()

    sign_in(page, server.url)
    expect(page.locator("[data-stat=status]")).to_have_attribute("data-value", "running")
    no_page_errors(pages)


def test_dashboard_numbers_change_after_api_calls(server, fake_upstream, caplog, pages):
    caplog.set_level("INFO", logger="iflow2api")  # as `iflow2api serve` does: the live log shows requests
    page = signed_in_page(server, pages)
    requests = page.locator("[data-stat=requests]")
    expect(requests).to_have_attribute("data-value", "0")
    expect(page.locator("#log-state")).to_have_attribute("data-state", "live")
    page.evaluate("window.__sameDocument = 'yes'")

    for body in (CHAT, dict(CHAT, stream=True)):
        status, _h, answer = http(server, "POST", "/v1/chat/completions", body)
        assert status == 200, answer
    page.wait_for_function("() => Number(document.querySelector('[data-stat=requests]').dataset.value) >= 2",
                           timeout=WAIT_MS)
    expect(requests).to_have_attribute("data-value", "2")
    expect(requests).to_have_text("2")
    page.wait_for_function("() => Number(document.querySelector('[data-stat=input_tokens]').dataset.value) >= 24",
                           timeout=WAIT_MS)
    expect(page.locator("#table-by-model")).to_contain_text("glm-5")
    expect(page.locator("#log-tail")).to_contain_text("POST /v1/chat/completions")
    assert page.evaluate("window.__sameDocument") == "yes", "the numbers changed without a reload"
    no_page_errors(pages)


def test_start_and_stop_an_instance(server, pages):
    page = signed_in_page(server, pages, "instances")
    expect(page.locator("tr[data-instance=default]")).to_have_attribute("data-running", "true")

    port = free_port()
    page.fill("#instance-name", "extra")
    page.fill("#instance-host", "127.0.0.1")
    page.fill("#instance-port", str(port))
    page.click("#instance-add")
    row = page.locator("tr[data-instance=extra]")
    expect(row).to_have_attribute("data-running", "true")
    expect(row).to_contain_text("127.0.0.1:%d" % port)
    assert http("http://127.0.0.1:%d" % port, "GET", "/health")[0] == 200

    row.locator("[data-action=stop]").click()
    expect(row).to_have_attribute("data-running", "false")
    assert wait_until(lambda: not port_open(port)), "port %d to close" % port
    expect(row.locator("[data-action=start]")).to_be_visible()
    expect(page.locator("tr[data-instance=default]")).to_have_attribute("data-running", "true")

    row.locator("[data-action=start]").click()
    expect(row).to_have_attribute("data-running", "true")
    assert http("http://127.0.0.1:%d" % port, "GET", "/health")[0] == 200

    row.locator("[data-action=remove]").click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.click("#confirm-yes")
    expect(row).to_have_count(0)
    assert wait_until(lambda: not port_open(port)), "port %d to close after remove" % port
    no_page_errors(pages)


def test_config_change_persists_across_restart(start_service, fake_upstream, home, pages):
    write_settings(str(home), fake_upstream.url)
    first = start_service()
    url = first.instances["default"].url
    set_password(url)
    page = pages.new()
    sign_in(page, url)
    open_tab(page, "config")
    timeout_field = page.locator("[data-config-key=queue_timeout_s]")
    reasoning_box = page.locator("[data-config-key=preserve_reasoning_content]")
    expect(timeout_field).to_have_value("30")
    expect(reasoning_box).not_to_be_checked()
    timeout_field.fill("12.5")
    reasoning_box.check()
    page.click("#config-save")
    expect(page.locator("#toast")).to_contain_text("queue_timeout_s")
    expect(page.locator("#toast")).to_have_attribute("data-kind", "ok")
    with open(first.config.path, encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["queue_timeout_s"] == 12.5 and saved["preserve_reasoning_content"] is True

    first.stop()
    second = start_service()  # a new Service on the same HOME and config file
    url = second.instances["default"].url
    sign_in(page, url)  # sessions do not outlive the process: sign in again
    open_tab(page, "config")
    expect(page.locator("[data-config-key=queue_timeout_s]")).to_have_value("12.5")
    expect(page.locator("[data-config-key=preserve_reasoning_content]")).to_be_checked()
    assert second.config["queue_timeout_s"] == 12.5 and second.config["preserve_reasoning_content"] is True
    no_page_errors(pages)


def test_playground_streams_an_answer_from_the_fake_upstream(server, fake_upstream, pages):
    fake_upstream.push(Reply(stream=text_stream(["Streamed ", "from ", "the fake upstream."]), piece_delay_s=0.25))
    page = signed_in_page(server, pages, "playground")
    expect(page.locator("#pg-model option[value='glm-5']")).to_have_count(1)
    page.select_option("#pg-model", "glm-5")
    page.fill("#pg-prompt", "Say something streamed")
    output = page.locator("#pg-output")
    expect(output).to_have_attribute("data-state", "idle")

    send_and_watch_it_stream(page)
    expect(output).to_have_text("Streamed from the fake upstream.")
    sent = json.loads(fake_upstream.chat_requests()[-1].body)
    assert sent["messages"][-1]["content"] == "Say something streamed" and sent["stream"] is True

    curl = page.locator("#pg-curl").inner_text()
    assert curl.startswith("curl -N " + server.url + "/v1/chat/completions"), curl
    assert "Say something streamed" in curl and '"model":"glm-5"' in curl and '"stream":true' in curl
    assert "content-type: application/json" in curl
    no_page_errors(pages)


def test_playground_can_use_the_responses_api(server, fake_upstream, pages):
    fake_upstream.push(Reply(stream=text_stream(["Answered ", "through ", "Responses."], reasoning=["Thinking it over."]),
                             piece_delay_s=0.2))
    page = signed_in_page(server, pages, "playground")
    expect(page.locator("#pg-api")).to_have_value("chat")
    expect(page.locator("#pg-model option[value='glm-5']")).to_have_count(1)
    page.select_option("#pg-model", "glm-5")
    page.select_option("#pg-api", "responses")
    page.fill("#pg-system", "Answer briefly")
    page.fill("#pg-prompt", "Say something via Responses")
    curl = page.locator("#pg-curl")
    expect(curl).to_contain_text("curl -N " + server.url + "/v1/responses")

    output = page.locator("#pg-output")
    send_and_watch_it_stream(page)
    expect(output).to_have_text("Answered through Responses.")
    expect(page.locator("#pg-reasoning-box")).to_be_visible()
    expect(page.locator("#pg-reasoning")).to_have_text("Thinking it over.")
    expect(page.locator("#pg-meta")).to_contain_text("3 output tokens")
    sent = json.loads(fake_upstream.chat_requests()[-1].body)
    assert sent["messages"][0] == {"role": "system", "content": "Answer briefly"}, sent["messages"]
    assert sent["messages"][-1]["content"] == "Say something via Responses" and sent["stream"] is True

    text = curl.inner_text()
    assert text.startswith("curl -N " + server.url + "/v1/responses"), text
    body = json.loads(text.split("-d '", 1)[1].rsplit("'", 1)[0])
    assert body == {"model": "glm-5", "instructions": "Answer briefly", "input": "Say something via Responses",
                    "stream": True}, body

    # The upstream hangs up mid-answer: the stream ends in response.failed, shown as an error.
    fake_upstream.push(Reply(stream=text_stream(["a"] * 20), drop_after=6))
    page.click("#pg-send")
    expect(output).to_have_attribute("data-state", "error")
    expect(output).to_have_class(re.compile(r"\bbad-text\b"))
    expect(output).to_contain_text("a")
    expect(page.locator("#pg-meta")).to_have_text("Failed.")
    expect(page.locator("#toast")).to_have_attribute("data-kind", "error")
    expect(page.locator("#toast")).to_contain_text("upstream")

    page.reload()  # the choice is remembered
    expect(page.locator("#screen-app")).to_be_visible()
    open_tab(page, "playground")
    expect(page.locator("#pg-api")).to_have_value("responses")
    expect(page.locator("#pg-curl")).to_contain_text("/v1/responses")

    # The answered form in both themes, languages and widths.
    fake_upstream.push(Reply(stream=text_stream(["Answered ", "through ", "Responses."], reasoning=["Thinking."])))
    expect(page.locator("#pg-model option[value='glm-5']")).to_have_count(1)
    page.select_option("#pg-model", "glm-5")
    page.fill("#pg-system", "Answer briefly")
    page.fill("#pg-prompt", "Say something via Responses")
    page.click("#pg-send")
    expect(output).to_have_attribute("data-state", "done")

    def same_row(width, lang):  # texts in the language; API, model and Reload line up (one row when wide)
        expect(page.locator("#pg-api option[value=chat]")).to_have_text(
            "Chat completions" if lang == "en" else re.compile(r"[\u4e00-\u9fff]"))
        expect(page.locator("#pg-meta")).to_contain_text("ms total" if lang == "en" else "毫秒")
        boxes = [page.locator(sel).bounding_box() for sel in ("#pg-api", "#pg-model", "#pg-models-reload")]
        assert all(b and b["x"] >= 0 and b["x"] + b["width"] <= width for b in boxes), boxes
        if width > 640:
            assert len({round(b["y"]) for b in boxes}) == 1 and len({round(b["height"]) for b in boxes}) == 1, boxes

    screenshot_every_look(page, "playground-responses", same_row)
    no_page_errors(pages)


def test_language_switch_to_chinese(server, pages):
    page = signed_in_page(server, pages)
    html = page.locator("html")
    expect(html).to_have_attribute("lang", "en")
    expect(page.locator("[data-tab=dashboard]")).to_have_text("Dashboard")
    expect(page.locator("#logout")).to_have_text("Log out")

    page.select_option("#lang-select", "zh")
    expect(html).to_have_attribute("lang", re.compile(r"^zh"))
    expect(page.locator("[data-tab=dashboard]")).to_have_text("仪表盘")
    expect(page.locator("[data-tab=config]")).to_have_text("配置")
    expect(page.locator("#logout")).to_have_text("退出登录")
    assert re.search(r"[\u4e00-\u9fff]", page.title())
    expect(page.locator("[data-stat=status]")).to_have_text(re.compile(r"[\u4e00-\u9fff]"))

    page.reload()  # remembered
    expect(page.locator("#screen-app")).to_be_visible()
    expect(html).to_have_attribute("lang", re.compile(r"^zh"))
    expect(page.locator("[data-tab=dashboard]")).to_have_text("仪表盘")
    page.select_option("#lang-select", "en")
    expect(page.locator("[data-tab=dashboard]")).to_have_text("Dashboard")
    no_page_errors(pages)


def test_theme_switch_to_dark_and_following_the_system(server, pages):
    set_password(server.url)
    page = pages.new(color_scheme="light")
    sign_in(page, server.url)
    html = page.locator("html")
    background = "() => getComputedStyle(document.body).backgroundColor"
    expect(html).to_have_attribute("data-theme", "light")
    expect(page.locator("#theme-select")).to_have_value("system")
    light = page.evaluate(background)

    page.select_option("#theme-select", "dark")
    expect(html).to_have_attribute("data-theme", "dark")
    assert page.evaluate(background) != light, "the dark theme changes the page colours"
    page.reload()
    expect(page.locator("#screen-app")).to_be_visible()
    expect(html).to_have_attribute("data-theme", "dark")

    page.select_option("#theme-select", "light")
    expect(html).to_have_attribute("data-theme", "light")
    page.select_option("#theme-select", "system")
    page.emulate_media(color_scheme="dark")
    expect(html).to_have_attribute("data-theme", "dark")
    page.emulate_media(color_scheme="light")
    expect(html).to_have_attribute("data-theme", "light")
    no_page_errors(pages)


def test_phone_width_has_no_horizontal_overflow(server, pages):
    page = pages.new(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    width = "() => document.documentElement.scrollWidth"
    open_admin(page, server.url)
    expect(page.locator("#screen-setup")).to_be_visible()
    assert page.evaluate(width) <= 375
    page.fill("#setup-password", PASSWORD)
    page.click("#setup-submit")
    expect(page.locator("#screen-app")).to_be_visible()
    for tab in ("dashboard", "instances", "accounts", "providers", "keys", "config", "playground"):
        open_tab(page, tab)
        page.wait_for_timeout(100)  # tables fill in after their fetch
        assert page.evaluate(width) <= 375, (tab, page.evaluate(width))
    open_tab(page, "dashboard")
    box = page.locator("[data-stat=requests]").bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375
    no_page_errors(pages)


def test_update_notice_shows_and_stays_dismissed_per_version(server, pages):
    """The status answer's "update" field shows a banner; dismissing it holds for that version."""
    reported = {"latest": "1.2.3", "current": "0.1.0", "url": "https://example.org/iflow2api/releases/v1.2.3"}
    served = []

    def add_update(route):  # the real status answer plus the field a newer release would add
        response = route.fetch()
        data = response.json()
        data["update"] = dict(reported)
        served.append(data["update"]["latest"])
        route.fulfill(response=response, json=data)

    set_password(server.url)
    page = pages.new()
    page.route("**/admin/api/status", add_update)
    sign_in(page, server.url)
    notice = page.locator("#update-notice")
    expect(notice).to_be_visible()
    expect(page.locator("#update-text")).to_have_text("iflow2api 1.2.3 is available (you have 0.1.0)")
    link = page.locator("#update-link")
    expect(link).to_have_attribute("href", reported["url"])
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer")

    def notice_fits(width, lang):
        if lang == "zh":
            expect(page.locator("#update-text")).to_have_text("iflow2api 1.2.3 已发布（当前版本 0.1.0）")
            expect(link).to_have_text("发布说明")
        box = notice.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, box

    screenshot_every_look(page, "update-notice", notice_fits)

    page.click("#update-dismiss")
    expect(notice).to_be_hidden()
    before = len(served)
    page.reload()
    expect(page.locator("#screen-app")).to_be_visible()
    expect(page.locator("[data-stat=status]")).to_have_attribute("data-value", "running")
    assert len(served) > before, "the status answer after the reload carried the update"
    expect(notice).to_be_hidden()

    reported["latest"] = "1.2.4"  # a newer release than the dismissed one shows again
    page.reload()
    expect(notice).to_be_visible()
    expect(page.locator("#update-text")).to_have_text("iflow2api 1.2.4 is available (you have 0.1.0)")
    no_page_errors(pages)


def test_docs_and_redoc_show_the_endpoints_when_the_cdn_is_unreachable(server, pages):
    page = pages.new()
    blocked = []

    def abort(route):
        blocked.append(route.request.url)
        route.abort()
    page.route("**/cdn.jsdelivr.net/**", abort)
    for path in ("/docs", "/redoc"):
        page.goto(server.url + path)
        fallback = page.locator("#fallback")
        expect(fallback).to_be_visible()
        expect(fallback).to_have_attribute("data-state", "ready")
        for endpoint in ("/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/models",
                         "/v1/models/{model_id}", "/health"):
            expect(fallback.locator("section.operation[data-path='%s']" % endpoint)).to_have_count(1)
        expect(fallback).to_contain_text("/v1/chat/completions")
        expect(fallback).to_contain_text("ChatCompletionRequest")
        expect(page.locator("#docs-status")).to_contain_text("/openapi.json")
        screenshot(page, "docs-fallback" + path.replace("/", "-"))
    assert any("swagger-ui" in u for u in blocked) and any("redoc" in u for u in blocked), blocked
    no_page_errors(pages)


def test_another_site_cannot_choose_the_admin_password(server, fake_upstream, pages):
    page = pages.new()
    page.goto(fake_upstream.url + "/somewhere")  # any page of another origin on this machine
    page.evaluate("""(url) => fetch(url + '/admin/api/setup', {method: 'POST', mode: 'no-cors',
        headers: {'Content-Type': 'text/plain'}, body: JSON.stringify({password: 'chosen-by-another-site'})})
        .then(() => true, () => false)""", server.url)
    status, _h, body = http(server, "GET", "/admin/api/session")
    assert status == 200
    assert json.loads(body)["needs_setup"] is True, "another site set the admin password"


# The pinned viewer files from npm (tests/run.py unpacks them here); the CDN itself is not reachable.
VIEWERS_DIR = os.path.join(ROOT, ".cache", "docs-viewers")
VIEWER_FILES = {
    "swagger-ui-dist@5.35.0/swagger-ui-bundle.js": ("swagger-ui-dist-5.35.0/swagger-ui-bundle.js", "application/javascript"),
    "swagger-ui-dist@5.35.0/swagger-ui.css": ("swagger-ui-dist-5.35.0/swagger-ui.css", "text/css"),
    "redoc@2.5.4/bundles/redoc.standalone.js": ("redoc-2.5.4/bundles/redoc.standalone.js", "application/javascript"),
}


def _serve_viewers(page, tamper=False):
    """Answer the CDN requests with the real npm files (or a changed copy), with CORS as jsDelivr does."""
    def fulfil(route):
        name = route.request.url.split("/npm/", 1)[1]
        path, content_type = VIEWER_FILES[name]
        with open(os.path.join(VIEWERS_DIR, path), "rb") as f:
            data = f.read()
        route.fulfill(status=200, body=data + (b"\n/* changed */" if tamper else b""),
                      headers={"content-type": content_type, "access-control-allow-origin": "*"})
    page.route("**/cdn.jsdelivr.net/npm/**", fulfil)


def test_docs_viewers_are_pinned_by_integrity_and_policy(server, pages):
    if not os.path.isdir(VIEWERS_DIR):
        _unavailable("the docs viewer files from npm (tests/run.py fetches them)")
    policy = http(server, "GET", "/docs")[1]["content-security-policy"]
    for url in iflow2api.DOCS_CDN_FILES:
        assert url in policy and url.split("/npm/", 1)[1] in VIEWER_FILES
    page = pages.new()
    _serve_viewers(page)
    page.goto(server.url + "/docs")
    expect(page.locator("#swagger-ui .opblock").first).to_be_visible(timeout=15000)
    expect(page.locator("#fallback")).to_be_hidden()
    page = pages.new()
    _serve_viewers(page)
    page.goto(server.url + "/redoc")
    expect(page.locator("#redoc-container").get_by_text("/v1/chat/completions").first).to_be_attached(timeout=15000)
    expect(page.locator("#fallback")).to_be_hidden()
    screenshot(page, "redoc-pinned")
    page = pages.new()  # a changed file (a compromised CDN) is refused: the fallback shows instead
    _serve_viewers(page, tamper=True)
    page.goto(server.url + "/docs")
    expect(page.locator("#fallback")).to_have_attribute("data-state", "ready")
    assert page.evaluate("typeof window.SwaggerUIBundle") == "undefined"


# -- issue 14: an admin that never strands its user ----------------------------------------

# An element's text lies on one line (a Range gives one box per line it covers).
ONE_LINE = "e => { const r = document.createRange(); r.selectNodeContents(e); return r.getClientRects().length === 1; }"


def rows_of(page, selector):
    """The boxes of the elements matching selector, grouped into rows by their top edge."""
    rows = {}
    for box in page.evaluate("(sel) => Array.from(document.querySelectorAll(sel)).map(e => {"
                             " const r = e.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; })",
                             selector):
        rows.setdefault(round(box["y"]), []).append(box)
    return [rows[y] for y in sorted(rows)]


def test_an_upstream_401_in_the_playground_is_shown_and_only_the_session_end_signs_out(server, fake_upstream, pages):
    fake_upstream.push(Reply(401, {"error": {"message": "Invalid API key (from the fake upstream)",
                                             "type": "invalid_request_error"}}))
    page = signed_in_page(server, pages, "playground")
    expect(page.locator("#pg-model option[value='glm-5']")).to_have_count(1)
    page.fill("#pg-prompt", "hello")
    page.click("#pg-send")
    output = page.locator("#pg-output")
    expect(output).to_have_attribute("data-state", "error")
    expect(output).not_to_be_empty()
    expect(page.locator("#toast")).to_have_attribute("data-kind", "error")
    page.wait_for_timeout(300)
    expect(page.locator("#screen-app")).to_be_visible()  # still signed in
    expect(page.locator("#screen-login")).to_be_hidden()
    expect(page.locator("#toast")).not_to_contain_text("session ended")

    # The admin's own session ends (the cookie is gone): the next request signs the page out.
    page.context.clear_cookies()
    page.click("[data-tab=dashboard]")
    expect(page.locator("#screen-login")).to_be_visible()
    expect(page.locator("#toast")).to_have_text("Your session ended. Please sign in again.")
    no_page_errors(pages)


def test_the_instance_serving_the_page_asks_before_it_stops_and_says_how_to_come_back(server, pages):
    page = signed_in_page(server, pages, "instances")
    home_row = page.locator("tr[data-instance=default]")
    expect(home_row).to_have_attribute("data-this-page", "true")
    expect(home_row.locator("[data-col=name] .badge")).to_have_text("this page")

    # Alone, stopping it asks and tells to run iflow2api again; cancelling keeps it.
    home_row.locator("[data-action=stop]").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("It serves this page")
    expect(page.locator("#confirm-text")).to_contain_text("run iflow2api again")
    screenshot(page, "instance-this-page-confirm")
    page.click("#confirm-no")
    expect(dialog).to_be_hidden()
    expect(home_row).to_have_attribute("data-running", "true")
    assert http(server, "GET", "/health")[0] == 200

    port = free_port()
    page.fill("#instance-name", "extra")
    page.fill("#instance-port", str(port))
    page.click("#instance-add")
    extra_url = "http://127.0.0.1:%d" % port
    expect(page.locator("tr[data-instance=extra]")).to_have_attribute("data-running", "true")
    expect(page.locator("tr[data-instance=extra]")).to_have_attribute("data-this-page", "false")
    # Another instance needs no such question (nothing of this page goes away).
    page.locator("tr[data-instance=extra] [data-action=stop]").click()
    expect(page.locator("tr[data-instance=extra]")).to_have_attribute("data-running", "false")
    expect(dialog).to_be_hidden()
    page.locator("tr[data-instance=extra] [data-action=start]").click()
    expect(page.locator("tr[data-instance=extra]")).to_have_attribute("data-running", "true")

    # The page served by "extra" (the same browser is signed in there too) stops its own instance.
    other = pages.new()
    sign_in(other, extra_url)
    open_tab(other, "instances")
    own = other.locator("tr[data-instance=extra]")
    expect(own).to_have_attribute("data-this-page", "true")
    expect(other.locator("tr[data-instance=default]")).to_have_attribute("data-this-page", "false")
    own.locator("[data-action=stop]").click()
    expect(other.locator("#confirm-text")).to_contain_text(server.url + "/admin")  # the way back
    other.click("#confirm-yes")
    expect(other.locator("#screen-loading")).to_be_visible()
    expect(other.locator("#loading-text")).to_contain_text('"extra" that served this page was stopped')
    expect(other.locator("#loading-text a")).to_have_attribute("href", server.url + "/admin")
    expect(other.locator("#loading-retry")).to_be_visible()
    assert wait_until(lambda: not port_open(port)), "port %d to close" % port
    screenshot(other, "instance-this-page-stopped")
    assert http(server, "GET", "/health")[0] == 200  # the other instance serves on
    no_page_errors(pages)


def test_without_credentials_every_tab_says_so_and_the_status_is_amber(start_server, fake_upstream, home, pages):
    url = start_server().url  # no ~/.iflow/settings.json, no accounts, no providers
    set_password(url)
    page = pages.new()
    sign_in(page, url)
    banner = page.locator("#credentials-banner")
    status = page.locator("[data-stat=status]")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("iflow2api login")
    expect(status).to_have_attribute("data-value", "not-logged-in")
    expect(status).to_have_text("Running — not logged in")
    expect(status).to_have_class(re.compile(r"\bwarn-text\b"))

    def amber(width, lang):  # the warning colour of the theme, not green
        colours = page.evaluate("""() => { const s = document.querySelector('[data-stat=status]');
            const probe = document.createElement('span'); probe.style.color = 'var(--warn)'; document.body.appendChild(probe);
            const warn = getComputedStyle(probe).color; probe.remove(); return [getComputedStyle(s).color, warn]; }""")
        assert colours[0] == colours[1], colours
        expect(status).to_have_text("Running — not logged in" if lang == "en" else "运行中 — 未登录")
        expect(page.locator("[data-testid=credentials-login]")).to_have_text(
            "Sign in or add a key" if lang == "en" else "登录或添加密钥")
        box = banner.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, box

    screenshot_every_look(page, "dashboard-no-credentials", amber)
    for tab in ("instances", "accounts", "providers", "keys", "config", "playground"):
        open_tab(page, tab)
        expect(banner).to_be_visible()
    page.click("[data-testid=credentials-providers]")
    expect(page.locator("[data-panel=providers]")).to_be_visible()
    page.click("[data-testid=credentials-login]")
    expect(page.locator("[data-panel=accounts]")).to_be_visible()

    # Credentials appear (an iFlow login written by the CLI): the banner goes, the status turns green.
    write_settings(str(home), fake_upstream.url)
    open_tab(page, "dashboard")
    expect(status).to_have_attribute("data-value", "running")
    expect(status).to_have_class(re.compile(r"\bok-text\b"))
    expect(banner).to_be_hidden()
    no_page_errors(pages)


def test_dashboard_cards_top_bar_and_tables_fit_every_width(server, pages):
    page = signed_in_page(server, pages)
    expect(page.locator("[data-stat=status]")).to_have_attribute("data-value", "running")
    expect(page.locator("#credentials-banner")).to_be_hidden()

    def even(width, lang):
        rows = rows_of(page, ".stats > .stat")
        # every row is filled edge to edge: no lone card beside an empty space
        assert all(abs(r[0]["x"] - rows[0][0]["x"]) < 1 and abs(r[-1]["x"] + r[-1]["w"] - rows[0][-1]["x"] - rows[0][-1]["w"]) < 1
                   for r in rows), rows
        assert all(b["x"] >= 0 and b["x"] + b["w"] <= width for r in rows for b in r)
        if width == 1280:
            assert len(rows) <= 2, [len(r) for r in rows]
        # the top bar: at most two rows of brand and controls
        centres = sorted(b["y"] + b["h"] / 2 for r in rows_of(
            page, ".topbar .brand, .topbar .top-controls > :not(.sr-only):not([hidden])") for b in r)
        lines = 1 + sum(1 for a, b in zip(centres, centres[1:]) if b - a > 10)
        assert lines <= 2, (width, lang, centres)

    screenshot_every_look(page, "dashboard", even)

    # On a phone a wide table scrolls sideways, and the side with more to see fades out.
    page.set_viewport_size({"width": 375, "height": 740})
    open_tab(page, "providers")
    wrap = page.locator("#panel-providers .table-wrap")
    expect(page.locator("tr[data-provider=deepseek]")).to_have_count(1)
    expect(wrap).to_have_attribute("data-more", "right")
    assert page.evaluate("() => { const w = document.querySelector('#panel-providers .table-wrap');"
                         " return w.scrollWidth > w.clientWidth && getComputedStyle(w).maskImage !== 'none'; }")
    wrap.evaluate("w => { w.scrollLeft = w.scrollWidth; }")
    expect(wrap).to_have_attribute("data-more", "left")
    wrap.evaluate("w => { w.scrollLeft = 40; }")
    expect(wrap).to_have_attribute("data-more", "left right")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    page.set_viewport_size({"width": 1280, "height": 860})  # wide enough: no cue
    expect(wrap).to_have_attribute("data-more", "")
    no_page_errors(pages)


def test_creating_the_first_client_key_warns_about_local_clients(server, pages):
    page = signed_in_page(server, pages, "keys")
    expect(page.locator("#keys-table tr.empty")).to_be_visible()
    page.click("#key-create")
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("Claude Code")
    expect(page.locator("#confirm-text")).to_contain_text("this machine")
    page.click("#confirm-no")
    expect(dialog).to_be_hidden()
    expect(page.locator("#key-created")).to_be_hidden()
    assert server.config.get("api_keys") == [], "cancelled: no key"

    page.click("#key-create")
    page.click("#confirm-yes")
    expect(page.locator("#key-created")).to_be_visible()
    assert page.locator("#key-created-value").input_value().startswith("sk-")
    page.click("#key-created-close")
    expect(page.locator("#keys-table tbody tr[data-key]")).to_have_count(1)
    page.click("#key-create")  # not the first: no question
    expect(page.locator("#key-created")).to_be_visible()
    expect(dialog).to_be_hidden()
    page.click("#key-created-close")
    expect(page.locator("#keys-table tbody tr[data-key]")).to_have_count(2)
    assert page.locator("#keys-table [data-col=masked]").first.evaluate("c => getComputedStyle(c).whiteSpace") == "nowrap"

    def one_line_keys(width, lang):
        expect(page.locator("#key-create")).to_have_text("Create key" if lang == "en" else "创建密钥")
        for cell in page.locator("#keys-table [data-col=masked]").all():
            assert cell.evaluate(ONE_LINE), cell.inner_text()

    screenshot_every_look(page, "keys", one_line_keys)
    no_page_errors(pages)


def test_providers_presets_add_and_everything_translated(server, pages):
    page = signed_in_page(server, pages, "providers")
    deepseek = page.locator("tr[data-provider=deepseek]")
    expect(deepseek.locator("[data-action=add]")).to_be_visible()
    expect(page.locator("tr[data-provider=iflow] [data-action=add]")).to_be_hidden()
    deepseek.locator("[data-action=add]").click()
    expect(page.locator("#provider-preset")).to_have_value("deepseek")
    expect(page.locator("#provider-name")).to_have_value("deepseek")
    expect(page.locator("#provider-base-url")).to_have_value("https://api.deepseek.com/v1")
    expect(page.locator("#provider-notes")).to_contain_text("deepseek-reasoner")
    expect(page.locator("#provider-key")).to_be_focused()
    # The preset select fills the same way; a typed name stays.
    page.fill("#provider-name", "my-qwen")
    page.select_option("#provider-preset", "qwen")
    expect(page.locator("#provider-name")).to_have_value("my-qwen")
    expect(page.locator("#provider-base-url")).to_have_value("https://dashscope.aliyuncs.com/compatible-mode/v1")
    expect(page.locator("#provider-notes")).to_contain_text("DashScope")

    page.fill("#provider-key", "sk-qwen-0123456789abcdefghijklmnopqrstuvwxyz")
    page.click("#provider-add")
    expect(page.locator("#toast")).to_contain_text("my-qwen")
    row = page.locator("tr[data-provider=my-qwen]")
    expect(row.locator("[data-col=keys] .token")).to_have_count(1)
    saved = server.config.get("providers")["my-qwen"]
    assert saved.get("preset") == "qwen" and "base_url" not in saved, saved  # the preset's own URL follows it
    expect(row.locator("[data-col=notes]")).to_contain_text("DashScope")

    page.select_option("#lang-select", "zh")
    expect(page.locator("#provider-notes")).to_contain_text("通义千问")
    expect(row.locator("[data-col=notes]")).to_contain_text("通义千问")
    expect(deepseek.locator("[data-col=notes]")).to_contain_text("思考")
    expect(deepseek.locator("[data-action=add]")).to_have_text("添加")
    page.select_option("#lang-select", "en")

    def keys_on_one_line(width, lang):
        for token in page.locator("#providers-table [data-col=keys] .token").all():
            assert token.evaluate("t => getComputedStyle(t).whiteSpace === 'nowrap'") and token.evaluate(ONE_LINE)
        notes = deepseek.locator("[data-col=notes]")
        expect(notes).to_contain_text("deepseek-reasoner" if lang == "en" else "思考过程")

    screenshot_every_look(page, "providers", keys_on_one_line)
    no_page_errors(pages)


def test_adding_an_account_key_checks_it_with_the_provider(server, fake_upstream, pages):
    refused = "sk-refused-0123456789abcdefghijkl"
    fake_upstream.refused_keys.add(refused)
    page = signed_in_page(server, pages, "accounts")
    page.check("#account-add-extra")
    page.fill("#account-key", refused)
    page.click("#account-add")
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("refused")
    expect(page.locator("#confirm-text")).to_contain_text("Save it anyway?")
    page.click("#confirm-no")
    expect(page.locator("#toast")).to_have_text("The key was not saved.")
    assert server.config.get("accounts") == []

    page.click("#account-add")  # this time: save it anyway
    page.click("#confirm-yes")
    expect(page.locator("#toast")).to_contain_text("added")
    assert [a["api_key"] for a in server.config.get("accounts")] == [refused]
    expect(page.locator("#account-key")).to_have_value("")

    fake_upstream.models_status = 503  # the provider cannot say: saved, with a notice
    page.fill("#account-key", "sk-unchecked-0123456789abcdefghij")
    page.click("#account-add")
    expect(page.locator("#toast")).to_contain_text("could not be reached")
    expect(page.locator("#toast")).to_have_attribute("data-kind", "warn")
    expect(dialog).to_be_hidden()
    assert len(server.config.get("accounts")) == 2

    fake_upstream.models_status = 200
    page.fill("#account-key", "sk-good-0123456789abcdefghijklmn")
    page.click("#account-add")
    expect(page.locator("#toast")).to_contain_text("the provider accepted the key")
    assert len(server.config.get("accounts")) == 3
    no_page_errors(pages)


def test_the_playground_preselects_the_configured_default_model(start_server, fake_upstream, home, pages):
    write_settings(str(home), fake_upstream.url)
    url = start_server(default_model="upstream-only-model").url
    set_password(url)
    page = pages.new()
    sign_in(page, url)
    open_tab(page, "playground")
    expect(page.locator("#pg-model option[value='glm-5']")).to_have_count(1)
    expect(page.locator("#pg-model")).to_have_value("upstream-only-model")
    expect(page.locator("#pg-curl")).to_contain_text('"model":"upstream-only-model"')
    page.select_option("#pg-model", "glm-5")  # a choice made here holds on Reload
    page.click("#pg-models-reload")
    page.wait_for_timeout(200)
    expect(page.locator("#pg-model")).to_have_value("glm-5")
    no_page_errors(pages)


def test_config_page_groups_typed_controls_hints_and_field_errors(server, pages):
    page = signed_in_page(server, pages, "config")
    form = page.locator("#config-form")
    groups = form.locator("details.config-group")
    expect(groups).to_have_count(6)
    assert [g.get_attribute("data-group") for g in groups.all()] == [
        "server", "upstream", "models", "accounts", "desktop", "advanced"]
    assert [g.locator("summary").inner_text() for g in groups.all()] == [
        "Server", "Upstream and proxy", "Models and routing", "Accounts and security", "Desktop", "Advanced"]
    advanced = form.locator("details[data-group=advanced]")
    assert advanced.evaluate("d => !d.open") and groups.first.evaluate("d => d.open")
    expect(advanced.locator("[data-field=oauth_token_url]")).to_be_hidden()
    expect(form.locator("details[data-group=server] [data-field=port]")).to_be_visible()

    # one control per type, as the schema says
    schema = page.evaluate("() => fetch('/admin/api/config').then(r => r.json())")
    for key in schema["editable"]:
        entry, field = schema["schema"][key], form.locator("[data-field=%s]" % key)
        control = field.locator("[data-config-key]")
        tag = control.evaluate("c => c.tagName.toLowerCase() + ':' + (c.type || '')")
        expected = ("select:select-one" if entry.get("choices") else
                    {"bool": "input:checkbox", "int": "input:number", "float": "input:number",
                     "object": "textarea:textarea"}.get(entry["type"], "input:text"))
        assert tag == expected, (key, entry, tag)
        assert field.evaluate("(f, g) => f.closest('details').dataset.group === g", entry["group"]), key
        for bound in ("min", "max"):
            if bound in entry:
                assert float(control.get_attribute(bound)) == entry[bound], (key, bound)
        expect(field.locator("[data-restart]")).to_have_count(1 if entry["restart"] else 0)
    assert any(e["restart"] for e in schema["schema"].values())
    expect(form.locator("[data-field=port] [data-restart]")).to_have_text("needs restart")
    expect(form.locator("[data-config-key=log_level] option")).to_have_count(4)
    expect(form.locator("[data-config-key=preserve_reasoning_content]")).to_have_attribute("role", "switch")
    # a description for every editable key, in both languages
    missing = page.evaluate("""(keys) => keys.filter(k => !I18n.strings.en['cfg.hint.' + k] || !I18n.strings.zh['cfg.hint.' + k]
        || I18n.strings.en['cfg.hint.' + k] === I18n.strings.zh['cfg.hint.' + k])""", schema["editable"])
    assert missing == [], missing
    expect(form.locator("[data-field=concurrency] #cfg-concurrency-hint")).to_contain_text("at once")

    # a refused value: its field is marked with the server's message, nothing is saved
    before = dict(server.config.values)
    page.fill("[data-config-key=concurrency]", "7")
    page.fill("[data-config-key=port]", "70000")
    page.click("#config-save")
    port = page.locator("[data-config-key=port]")
    expect(port).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#cfg-port-error")).to_be_visible()
    expect(page.locator("#cfg-port-error")).to_contain_text("65535")
    assert port.evaluate("i => getComputedStyle(i).borderTopColor") != page.locator(
        "[data-config-key=concurrency]").evaluate("i => getComputedStyle(i).borderTopColor")
    expect(page.locator("[data-config-key=concurrency]")).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator("#toast")).not_to_have_attribute("data-kind", "ok")
    assert server.config["concurrency"] == before["concurrency"] and server.config["port"] == before["port"]
    screenshot(page, "config-field-error")
    # a number that is not one is refused in the page, under its field
    page.fill("[data-config-key=port]", str(before["port"]))
    page.fill("[data-config-key=concurrency]", "2.5")
    page.click("#config-save")
    expect(page.locator("#cfg-concurrency-error")).to_have_text("Enter a whole number.")
    expect(port).not_to_have_attribute("aria-invalid", "true")

    # lists are comma separated; only changed keys go out; the saved keys clear the marks
    page.fill("[data-config-key=concurrency]", "7")
    page.fill("[data-config-key=cors_allow_origins]", "http://a.example, http://b.example")
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "PUT" else None)
    page.click("#config-save")
    expect(page.locator("#toast")).to_have_attribute("data-kind", "ok")
    expect(page.locator("#cfg-concurrency-error")).to_be_hidden()
    assert sent[-1]["changes"] == {"concurrency": 7, "cors_allow_origins": ["http://a.example", "http://b.example"]}, sent
    assert server.config["cors_allow_origins"] == ["http://a.example", "http://b.example"]
    expect(page.locator("[data-config-key=cors_allow_origins]")).to_have_value("http://a.example, http://b.example")

    # a key that redirects credentials asks for the admin password as soon as it changes
    expect(page.locator("#config-confirm")).to_be_hidden()
    page.fill("[data-config-key=upstream_proxy]", "http://127.0.0.1:9")
    expect(page.locator("#config-confirm")).to_be_visible()
    page.fill("#config-password", PASSWORD)
    page.click("#config-save")
    expect(page.locator("#toast")).to_contain_text("upstream_proxy")
    expect(page.locator("#toast")).to_have_attribute("data-kind", "ok")
    assert server.config["upstream_proxy"] == "http://127.0.0.1:9"
    expect(page.locator("#config-confirm")).to_be_hidden()
    page.select_option("[data-config-key=close_action]", "quit")  # a key that waits for a restart says so
    page.click("#config-save")
    expect(page.locator("#toast")).to_have_text("Saved: close_action. Restart iflow2api to apply: close_action.")
    page.click("#config-reload")

    def described(width, lang):
        expect(form.locator("details[data-group=upstream] > summary")).to_have_text(
            "Upstream and proxy" if lang == "en" else "上游与代理")
        expect(page.locator("#cfg-port-hint")).to_contain_text("Port" if lang == "en" else "端口")
        boxes = [page.locator(s).bounding_box() for s in ("[data-config-key=port]", "[data-config-key=model_map]")]
        assert all(b and b["x"] >= 0 and b["x"] + b["width"] <= width for b in boxes), boxes

    screenshot_every_look(page, "config", described)
    advanced.locator("summary").click()
    expect(advanced.locator("[data-field=oauth_token_url]")).to_be_visible()
    no_page_errors(pages)


# -- issue 17: the usage history on the dashboard, drawn as inline SVG -------------------------

# Per day of a chart: [key, requests, sum of its bar heights] (today last).
DAY_BARS = """(chart) => Array.from(document.querySelectorAll('[data-chart=' + chart + '] g.day')).map(g =>
    [g.dataset.day, Number(g.dataset.requests || 0),
     Array.from(g.querySelectorAll('rect.bar')).reduce((sum, r) => sum + Number(r.getAttribute('height')), 0)])"""


def page_usage(page, since="7d"):
    """GET /admin/api/usage with the signed-in page's session (marked "by=test": not the page's own asking)."""
    return page.evaluate("(s) => fetch('/admin/api/usage?since=' + s + '&by=test', {cache: 'no-store'}).then(r => r.json())",
                         since)


def days_between(since):
    """The local dates from the day of `since` (unix seconds) to today, as the charts show them."""
    day, today, days = datetime.date.fromtimestamp(since), datetime.date.today(), []
    while day <= today:
        days.append(day.isoformat())
        day += datetime.timedelta(days=1)
    return days


def record_past(service, days_ago, model, status=200, tokens=(100, 40), latency_ms=800.0):
    """A row of an earlier day, through the server's own usage writer (requests made today cannot be)."""
    service.usage.record({"at": time.time() - days_ago * 86400, "route": "openai", "provider": "iflow",
                          "model_asked": model, "model_used": model, "status": status, "input_tokens": tokens[0],
                          "output_tokens": tokens[1], "reasoning_tokens": 0, "latency_ms": latency_ms})


def test_dashboard_usage_history_charts(start_service, fake_upstream, home, pages):
    write_settings(str(home), fake_upstream.url)
    service = start_service()
    url = service.instances["default"].url
    set_password(url)
    page = pages.new()
    usage_asked = []
    page.on("request", lambda r: usage_asked.append(r.url.split("?", 1)[1])
            if "/admin/api/usage" in r.url and "by=test" not in r.url else None)
    sign_in(page, url)
    card = page.locator("#usage-card")
    # Nothing yet: the empty state, no charts; 7 days is the default range.
    expect(card).to_have_attribute("data-state", "empty")
    expect(card).to_have_attribute("data-range", "7d")
    expect(page.locator("#usage-note-text")).to_have_text("No requests in this range.")
    expect(page.locator("#usage-open-config")).to_be_hidden()
    expect(page.locator("#usage-charts")).to_be_hidden()
    expect(page.locator("#usage-range [data-range='7d']")).to_have_attribute("aria-pressed", "true")
    assert usage_asked == ["since=7d"], usage_asked
    screenshot(page, "dashboard-usage-empty")

    # Earlier days through the usage writer, then real requests through the server today:
    # 4 glm-5 (one streamed, one failing upstream) and 1 kimi-k2.
    record_past(service, 2, "glm-5")
    record_past(service, 5, "glm-5", latency_ms=1500.0)
    record_past(service, 5, "glm-5", status=502, tokens=(100, 0))
    chat = {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]}
    for body in (chat, dict(chat, stream=True), chat, dict(chat, model="kimi-k2")):
        status, _h, answer = http(url, "POST", "/v1/chat/completions", body)
        assert status == 200, answer
    fake_upstream.push(Reply(500, {"error": {"message": "boom"}}))
    assert http(url, "POST", "/v1/chat/completions", chat)[0] == 500
    today = datetime.date.today().isoformat()
    assert wait_until(lambda: sum(d["requests"] for d in page_usage(page)["days"]) == 8), page_usage(page)
    report = page_usage(page)
    assert report["enabled"] is True and report["days"][-1]["key"] == today, report["days"]
    assert report["days"][-1]["requests"] == 5 and report["days"][-1]["errors"] == 1, report["days"]

    # The dashboard's own polling draws them (no reload, no range change).
    expect(card).to_have_attribute("data-state", "ready")
    page.wait_for_function("() => { const g = document.querySelector('[data-chart=requests] g.day:last-of-type');"
                           " return g && g.dataset.requests === '5'; }", timeout=WAIT_MS)
    expect(page.locator("#usage-note")).to_be_hidden()
    expect(page.locator("#usage-total")).to_contain_text("Requests: 8")
    expect(page.locator("#usage-total")).to_contain_text("Errors: 2")

    # Requests per day: one column per day from `since` to today, the gaps as zeros; heights
    # in proportion (today 5, two days ago 1, five days ago 2 with 1 error), errors stacked in red.
    bars = page.evaluate(DAY_BARS, "requests")
    expected_days = days_between(report["since"])
    assert [b[0] for b in bars] == expected_days, (bars, expected_days)
    assert len(bars) in (8, 9)  # 7 days back from now: the partial first day too
    counts = {b[0]: b[1] for b in bars}
    day = lambda n: (datetime.date.today() - datetime.timedelta(days=n)).isoformat()  # noqa: E731
    assert counts == dict({k: 0 for k in expected_days}, **{today: 5, day(2): 1, day(5): 2}), counts
    heights = [b[2] for b in bars]
    assert max(heights) == heights[-1] > 0, bars
    assert abs(heights[expected_days.index(day(2))] * 5 - heights[-1]) < 1, bars
    assert abs(heights[expected_days.index(day(5))] * 5 - heights[-1] * 2) < 1, bars
    assert all(h == 0 for b, h in zip(bars, heights) if b[1] == 0), bars
    requests_chart = page.locator("[data-chart=requests]")
    expect(requests_chart.locator("g.day[data-day='%s'] rect.s-errors" % today)).to_have_count(1)
    expect(requests_chart.locator("g.day[data-day='%s'] rect.s-errors" % day(2))).to_have_count(0)
    expect(requests_chart.locator("g.day[data-day='%s'] > title" % today)).to_contain_text("Requests: 5")
    expect(requests_chart.locator("g.day[data-day='%s'] > title" % today)).to_contain_text("Errors: 1")
    ticks = requests_chart.locator("text.tick:not(.day-label)").all_text_contents()
    assert ticks[0] == "0" and 3 <= len(ticks) <= 6 and all(t.isdigit() for t in ticks), ticks
    assert requests_chart.locator("text.day-label[data-day='%s']" % today).text_content() == page.evaluate(
        "(k) => new Date(k + 'T12:00').toLocaleDateString('en', {month: 'short', day: 'numeric'})", today)

    # Tokens per day: input and output stacked, as the history counts them.
    tokens = page.locator("[data-chart=tokens] g.day[data-day='%s']" % today)
    expect(tokens).to_have_attribute("data-input", str(report["days"][-1]["input_tokens"]))
    expect(tokens).to_have_attribute("data-output", str(report["days"][-1]["output_tokens"]))
    expect(tokens.locator("rect.s-input")).to_have_count(1)
    expect(tokens.locator("rect.s-output")).to_have_count(1)
    # Latency: a p50 and a p95 line, a dot each on the three days with requests; five days ago is the slowest.
    latency = page.locator("[data-chart=latency]")
    expect(latency.locator("path.line.s-p50")).to_have_count(1)
    expect(latency.locator("path.line.s-p95")).to_have_count(1)
    expect(latency.locator("circle.dot.s-p50")).to_have_count(3)
    p95_y = {d: float(latency.locator("g.day[data-day='%s'] circle.s-p95" % d).get_attribute("cy"))
             for d in (today, day(2), day(5))}
    assert p95_y[day(5)] < p95_y[day(2)] < p95_y[today], p95_y  # higher on the screen: a smaller y
    expect(latency.locator("g.day[data-day='%s'] > title" % day(5))).to_contain_text("1.5 s")

    # By model and by provider: a bar per name, most requests first, with its counts in the label.
    models = page.locator("[data-chart=models] g.item")
    expect(models).to_have_count(2)
    assert [m.get_attribute("data-key") for m in models.all()] == ["glm-5", "kimi-k2"]
    glm = page.locator("[data-chart=models] g.item[data-key='glm-5']")
    expect(glm).to_have_attribute("data-requests", "7")
    expect(glm.locator("text.label")).to_have_text("glm-5")
    expect(glm.locator("text.value")).to_have_text(re.compile(r"^7 req · \d+(\.\d)?k? tokens$"))
    expect(page.locator("[data-chart=models] g.item[data-key='kimi-k2'] text.value")).to_contain_text("1 req")
    widths = [float(page.locator("[data-chart=models] g.item[data-key='%s'] rect.s-requests" % k).get_attribute("width"))
              for k in ("glm-5", "kimi-k2")]
    assert widths[0] > widths[1] * 3, widths  # 6 (of 7, one an error) against 1
    expect(glm.locator("rect.s-errors")).to_have_count(1)
    expect(page.locator("[data-chart=providers] g.item[data-key=iflow]")).to_have_attribute("data-requests", "8")

    # Quiet server: the history is not asked again on every poll (only after new requests).
    page.wait_for_timeout(3000)  # a new count is asked about twice (its rows are written a moment later): polls 2 s apart
    asked = len(usage_asked)
    page.wait_for_timeout(4500)  # two polls
    assert len(usage_asked) == asked, usage_asked[asked:]

    # The range switch asks again and draws the answer: 24 h is yesterday and today only.
    page.click("#usage-range [data-range='24h']")
    expect(card).to_have_attribute("data-range", "24h")
    expect(card).to_have_attribute("data-state", "ready")
    assert usage_asked[-1] == "since=24h", usage_asked
    expect(page.locator("#usage-range [data-range='24h']")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#usage-range [data-range='7d']")).to_have_attribute("aria-pressed", "false")
    bars = page.evaluate(DAY_BARS, "requests")
    assert [b[0] for b in bars] == days_between(page_usage(page, "24h")["since"]) and bars[-1][1] == 5, bars
    expect(glm).to_have_attribute("data-requests", "4")  # the older rows are out of range
    expect(page.locator("#usage-total")).to_contain_text("Requests: 5")
    screenshot(page, "dashboard-usage-24h")
    page.click("#usage-range [data-range='30d']")
    expect(card).to_have_attribute("data-range", "30d")
    assert usage_asked[-1] == "since=30d", usage_asked
    expect(page.locator("[data-chart=requests] g.day")).to_have_count(31)
    expect(glm).to_have_attribute("data-requests", "7")
    page.reload()  # the range is remembered
    expect(card).to_have_attribute("data-range", "30d")
    expect(card).to_have_attribute("data-state", "ready")
    page.click("#usage-range [data-range='7d']")
    expect(card).to_have_attribute("data-range", "7d")

    def charts_fit(width, lang):
        expect(page.locator("[data-chart=requests] figcaption")).to_have_text(
            "Requests per day" if lang == "en" else "每日请求数")
        expect(page.locator("#usage-total")).to_contain_text("Requests: 8" if lang == "en" else "请求：8")
        expect(glm.locator("text.value")).to_contain_text("7 req" if lang == "en" else "7 次")
        # the charts are drawn at the width they have (the text keeps its size) and stay inside the page;
        # after a resize they are drawn again on the next animation frame: wait for that first
        page.wait_for_function("() => { const c = document.querySelector('#usage-charts');"
                               " return c.offsetWidth > 0 && c.dataset.width === String(c.offsetWidth); }",
                               timeout=WAIT_MS)
        for chart in page.locator("#usage-charts svg.chart-svg").all():
            expect(chart).to_be_visible()
            box = chart.bounding_box()
            view_width = float(chart.get_attribute("viewBox").split()[2])
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, box
            assert abs(view_width - box["width"]) <= 1, (view_width, box)
        # every text in a chart lies inside its chart
        outside = page.evaluate("""() => Array.from(document.querySelectorAll('#usage-charts svg text')).filter(t => {
            const r = t.getBoundingClientRect(), s = t.ownerSVGElement.getBoundingClientRect();
            return r.left < s.left - 0.5 || r.right > s.right + 0.5 || r.top < s.top - 0.5 || r.bottom > s.bottom + 0.5;
        }).map(t => t.textContent)""")
        assert outside == [], outside
        # the day labels do not overlap one another
        labels = sorted(page.evaluate("""() => Array.from(document.querySelectorAll('[data-chart=requests] text.day-label'))
            .map(t => { const r = t.getBoundingClientRect(); return [r.left, r.right]; })"""))
        assert all(a[1] <= b[0] for a, b in zip(labels, labels[1:])), labels
        if lang == "zh":
            expect(page.locator("[data-chart=requests] text.day-label[data-day='%s']" % today)).to_contain_text("日")

    screenshot_every_look(page, "dashboard-usage", charts_fit)
    page.click("#usage-range [data-range='30d']")
    expect(card).to_have_attribute("data-range", "30d")
    page.set_viewport_size({"width": 375, "height": 740})
    charts_fit(375, "en")
    screenshot(page, "dashboard-usage-30d-375")
    page.set_viewport_size({"width": 1280, "height": 860})
    charts_fit(1280, "en")
    no_page_errors(pages)


def test_dashboard_says_when_the_usage_history_is_off(start_server, fake_upstream, home, pages):
    write_settings(str(home), fake_upstream.url)
    url = start_server(usage_history=False).url
    set_password(url)
    assert http(url, "POST", "/v1/chat/completions", CHAT)[0] == 200
    page = pages.new()
    sign_in(page, url)
    card = page.locator("#usage-card")
    expect(card).to_have_attribute("data-state", "off")
    expect(page.locator("#usage-note")).to_contain_text("usage history is off")
    expect(page.locator("#usage-note")).to_contain_text("usage_history")
    expect(page.locator("#usage-charts")).to_be_hidden()
    expect(page.locator("#usage-total")).to_be_hidden()
    expect(page.locator("[data-stat=requests]")).to_have_attribute("data-value", "1")  # the live numbers still count

    def says_off(width, lang):
        expect(page.locator("#usage-note-text")).to_contain_text("usage_history")
        expect(page.locator("#usage-open-config")).to_have_text("Open Config" if lang == "en" else "打开配置")
        box = page.locator("#usage-note").bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, box

    screenshot_every_look(page, "dashboard-usage-off", says_off)
    page.click("#usage-open-config")  # to the key that turns it on
    expect(page.locator("[data-panel=config]")).to_be_visible()
    expect(page.locator("[data-field=usage_history]")).to_be_visible()
    expect(page.locator("[data-config-key=usage_history]")).not_to_be_checked()
    expect(page.locator("[data-field=port]")).to_be_hidden()
    no_page_errors(pages)


def test_usage_charts_with_many_models_big_numbers_and_long_names(server, pages):
    """A busy month (as a routed answer): k/M numbers, 12 models in 8 rows, a long name shortened."""
    now = time.time()
    long_name = "openrouter/anthropic/claude-sonnet-4.5-with-a-very-long-model-name-20260101"

    def row(key, requests, errors=0, tokens_in=0, tokens_out=0, p50=0.0, p95=0.0):
        return {"key": key, "requests": requests, "errors": errors, "input_tokens": tokens_in, "output_tokens": tokens_out,
                "reasoning_tokens": tokens_out // 4, "p50_ms": p50, "p95_ms": p95}

    days = [row((datetime.date.today() - datetime.timedelta(days=n)).isoformat(), 900 + 97 * n, n * 3,
                1200000 + 45000 * n, 300000 + 9000 * n, 1800.0 + 40 * n, 6500.0 - 90 * n)
            for n in range(29, -1, -1) if n % 7 != 3]  # some days without requests
    models = [row(long_name, 9000, 120, 40000000, 9000000, 2100.0, 7400.0)] + [
        row("model-%02d" % i, 3000 - 200 * i, i, 900000, 200000) for i in range(11)]
    answer = {"enabled": True, "since": now - 30 * 86400, "days": days, "models": models,
              "providers": [row("iflow", 20000, 100, 50000000, 10000000), row("-", 12, 12)]}
    set_password(server.url)
    page = pages.new()
    page.route("**/admin/api/usage?*", lambda route: route.fulfill(json=answer))
    sign_in(page, server.url)
    card = page.locator("#usage-card")
    expect(card).to_have_attribute("data-state", "ready")
    expect(page.locator("[data-chart=requests] g.day")).to_have_count(31)
    token_ticks = page.locator("[data-chart=tokens] text.tick:not(.day-label)").all_text_contents()
    assert token_ticks[0] == "0" and all(t.endswith("M") for t in token_ticks[1:]), token_ticks
    request_ticks = page.locator("[data-chart=requests] text.tick:not(.day-label)").all_text_contents()
    assert all(t == "0" or t.endswith("k") for t in request_ticks), request_ticks
    latency_ticks = page.locator("[data-chart=latency] text.tick:not(.day-label)").all_text_contents()
    assert all(t == "0" or t.endswith(" s") for t in latency_ticks), latency_ticks
    expect(page.locator("#usage-total")).to_contain_text(
        "Requests: {:,}".format(sum(d["requests"] for d in days)))

    items = page.locator("[data-chart=models] g.item")
    expect(items).to_have_count(8)
    expect(items.last).to_have_class(re.compile(r"\bothers\b"))
    expect(items.last.locator("text.label")).to_have_text("Others (5)")
    assert items.last.get_attribute("data-requests") == str(sum(m["requests"] for m in models[7:]))
    first = page.locator("[data-chart=models] g.item").first
    expect(first.locator("text.value")).to_have_text("9k req · 49M tokens")
    expect(first.locator("text.label")).to_have_text(re.compile(r"^openrouter/.+…$"))
    expect(first.locator("> title")).to_contain_text(long_name)
    expect(first.locator("> title")).to_contain_text("Input tokens: 40,000,000")
    expect(page.locator("[data-chart=providers] g.item").last.locator("text.label")).to_have_text("(unknown)")

    def fits(width, lang):
        for item in page.locator("#usage-charts g.item").all():  # a name never runs into its numbers
            label, value = item.locator("text.label").bounding_box(), item.locator("text.value").bounding_box()
            assert label["x"] + label["width"] < value["x"], (label, value)
        expect(items.last.locator("text.label")).to_have_text("Others (5)" if lang == "en" else "其他（5 个）")

    screenshot_every_look(page, "dashboard-usage-busy", fits)

    # The history cannot be read: the card says why (no toast at every poll), the rest goes on.
    page.unroute("**/admin/api/usage?*")
    page.route("**/admin/api/usage?*", lambda route: route.fulfill(status=503, json={"error": {
        "message": "cannot read the usage history usage.db: disk I/O error", "code": "unavailable"}}))
    page.click("#usage-range [data-range='24h']")
    expect(card).to_have_attribute("data-state", "error")
    expect(page.locator("#usage-note-text")).to_have_text(
        "Could not read the usage history: cannot read the usage history usage.db: disk I/O error")
    expect(page.locator("#usage-charts")).to_be_hidden()
    expect(page.locator("#toast")).to_be_hidden()
    expect(page.locator("[data-stat=status]")).to_have_attribute("data-value", "running")
    no_page_errors(pages)
