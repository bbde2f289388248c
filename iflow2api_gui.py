#!/usr/bin/env python3
# == 0. Module header ===========================================================
"""iflow2api_gui: the desktop window of iflow2api (tkinter; tray icon with pystray).

Run it:   python3 iflow2api_gui.py [--minimized] [--config FILE]
          python3 iflow2api.py gui          (the same window)
Without tkinter or without a display it prints one line saying how to run the
server headless (`python3 iflow2api.py`) and exits with status 2.

The window drives one `iflow2api.Service` and nothing else: no sockets, no config
files, no translation code here. Service calls run in worker threads and report
back through a queue that the Tk thread empties (Tk is not thread-safe).

Sections (search for "# == N."):
  1. strings: English / Chinese, shared with the web admin (static/admin/i18n.js)
  2. look: palettes, system theme detection, font choice
  3. pure helpers: formatting, client snippets, validation
  4. view models: one per page, state and validation, no tkinter
  5. platform adapters: autostart, single instance, tray icon
  6. views: ttk pages and the main window (Tk thread only)
  7. main(argv)
Tests: tests/unit/test_gui_logic.py (no display), tests/e2e/test_gui.py (Xvfb).
"""
import argparse
import base64
import io
import json
import locale
import logging
import ntpath
import os
import plistlib
import posixpath
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import webbrowser

import iflow2api

# tkinter is optional (headless servers, minimal Pythons): main() explains what to
# install when it is missing. The views below only touch tk/ttk when they are built.
try:
    import tkinter as tk
    from tkinter import font as tkfont
    from tkinter import messagebox, ttk
except ImportError:
    tk = tkfont = messagebox = ttk = None

APP_ID = "com.iflow2api.gui"
_HERE = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("iflow2api.gui")


def read_resource(relpath: str) -> bytes:
    """Bytes of a file shipped next to this module (static/...), from disk or from the zip."""
    path = os.path.join(_HERE, *relpath.split("/"))
    loader = globals().get("__loader__")
    if loader is not None and hasattr(loader, "get_data"):
        return loader.get_data(path)
    with open(path, "rb") as f:  # pragma: no cover - every loader has get_data
        return f.read()


# == 1. Strings ===================================================================
# The web admin's catalogue (static/admin/i18n.js) is read and used where the texts
# are the same; GUI_STRINGS adds what only the window says. Lookup: current
# language, then English, then the key itself (a gap shows, it is never blank).

GUI_STRINGS = {
    "en": {
        "gui.tab.status": "Status",
        "gui.tab.providers": "Providers and models",
        "gui.tab.settings": "Settings",
        "gui.tab.log": "Log",
        "gui.restart": "Restart",
        "gui.address": "Address",
        "gui.tokens": "Tokens in / out",
        "gui.today": "Today",
        "gui.todayValue": "{requests} requests · {tokens_in} / {tokens_out} tokens",
        "gui.noAccount": "none",
        "gui.noCredentials": "No upstream credentials yet: sign in with iFlow or add an API key.",
        "gui.updateAvailable": "iflow2api {latest} is available (you have {current}).",
        "gui.openRelease": "Release page",
        "gui.goSignIn": "Sign in…",
        "gui.connect": "Connect a client",
        "gui.copyBaseUrl": "Copy OpenAI base URL",
        "gui.copyClaude": "Copy Claude Code setup",
        "gui.copyCodex": "Copy Codex config",
        "gui.openAdmin": "Open web admin",
        "gui.openDocs": "Open API docs",
        "gui.starting": "Starting…",
        "gui.stopping": "Stopping…",
        "gui.started": "Server running at {url}",
        "gui.stopped": "Server stopped.",
        "gui.generatedKey": "This address is reachable from the network, so a client API key was made "
                            "(shown once): {key}",
        "gui.oauthCancelled": "cancelled",
        "gui.accountsList": "Accounts",
        "gui.keyRefused": "The iFlow API refused this key, so it was not saved. Save it anyway?",
        "gui.keyUnchecked": "Account {id} added. The iFlow API could not be reached, so the key is not checked yet.",
        "gui.providersList": "Providers",
        "gui.presetNotes": "Notes",
        "gui.baseUrlOptional": "Base URL (optional)",
        "gui.tiers": "Claude model tiers",
        "gui.tiersIntro": "Which model answers when Claude Code asks for each tier.",
        "gui.loadModels": "Load models",
        "gui.modelsLoaded": "{n} models loaded.",
        "gui.tiersSaved": "Model tiers saved.",
        "gui.needPreset": "Pick a preset first.",
        "gui.scenarios": "Scenario routes",
        "gui.scenariosIntro": "The first row that applies to a Claude Code request picks its model; "
                              "empty rows are skipped.",
        "gui.scenario.image": "Image",
        "gui.scenario.imageHint": "Requests that contain images",
        "gui.scenario.longContext": "Long context",
        "gui.scenario.longContextHint": "Prompts above",
        "gui.scenario.longContextUnit": "tokens (estimated)",
        "gui.scenario.background": "Background",
        "gui.scenario.backgroundHint": "Haiku-class calls: titles, summaries, sub-agents",
        "gui.scenario.think": "Think",
        "gui.scenario.thinkHint": "Requests with thinking or a reasoning effort",
        "gui.scenario.default": "Default",
        "gui.scenario.defaultHint": "Every other Claude Code request",
        "gui.err.wholeNumber": "A whole number of tokens, at least 1.",
        "gui.err.modelId": "A model id without spaces, e.g. deepseek/deepseek-chat.",
        "gui.serverGroup": "Server",
        "gui.desktopGroup": "Desktop app",
        "gui.host": "Host",
        "gui.port": "Port",
        "gui.concurrency": "Concurrent upstream calls",
        "gui.proxyEnabled": "Use an upstream proxy",
        "gui.proxy": "Proxy URL",
        "gui.reasoning": "Reasoning",
        "gui.reasoning.strip": "Answer only",
        "gui.reasoning.preserve": "Keep reasoning_content",
        "gui.theme": "Theme",
        "gui.language": "Language",
        "gui.startMinimized": "Start minimised",
        "gui.closeAction": "Closing the window",
        "gui.close.minimize_to_tray": "Keeps running in the tray",
        "gui.close.quit": "Quits the app",
        "gui.autostart": "Start when I log in",
        "gui.autoRun": "Start the server when the app starts",
        "gui.trayMissing": "Tray icon: not available. Install it with: pip install pystray pillow "
                           "(for the Python that runs this app), then restart the app.",
        "gui.trayActive": "Tray icon: active.",
        "gui.saved": "Saved.",
        "gui.savedRestart": "Saved. Restart the server to use the new settings.",
        "gui.fixErrors": "Nothing was saved: fix the fields marked in red.",
        "gui.err.host": "A host name or IP address, without spaces.",
        "gui.err.port": "A number from 1 to 65535.",
        "gui.err.concurrency": "A whole number, at least 1.",
        "gui.err.proxy": "http://, https://, socks5:// or socks5h:// followed by host:port.",
        "gui.err.choice": "Pick one of the choices.",
        "gui.err.autostart": "Could not change autostart: {detail}",
        "gui.hostWarning": "Not 127.0.0.1: the API is reachable from your network and needs client API keys.",
        "gui.logLevel": "Level",
        "gui.logAll": "All",
        "gui.logFollow": "Follow",
        "gui.tray.show": "Show / hide window",
        "gui.tray.start": "Start server",
        "gui.tray.stop": "Stop server",
        "gui.tray.quit": "Quit",
        "gui.tray.tooltipRunning": "iflow2api: running at {url}",
        "gui.tray.tooltipStopped": "iflow2api: stopped",
        "gui.confirmQuit": "Quit iflow2api? The server stops too.",
        "gui.error": "Error: {detail}",
    },
    "zh": {
        "gui.tab.status": "状态",
        "gui.tab.providers": "服务商与模型",
        "gui.tab.settings": "设置",
        "gui.tab.log": "日志",
        "gui.restart": "重启",
        "gui.address": "地址",
        "gui.tokens": "输入 / 输出 token",
        "gui.today": "今日",
        "gui.todayValue": "{requests} 次请求 · {tokens_in} / {tokens_out} token",
        "gui.noAccount": "无",
        "gui.noCredentials": "还没有上游凭据：请用 iFlow 登录或添加 API 密钥。",
        "gui.updateAvailable": "iflow2api {latest} 已发布（当前为 {current}）。",
        "gui.openRelease": "发布页面",
        "gui.goSignIn": "去登录…",
        "gui.connect": "连接客户端",
        "gui.copyBaseUrl": "复制 OpenAI Base URL",
        "gui.copyClaude": "复制 Claude Code 设置",
        "gui.copyCodex": "复制 Codex 配置",
        "gui.openAdmin": "打开网页管理",
        "gui.openDocs": "打开 API 文档",
        "gui.starting": "正在启动…",
        "gui.stopping": "正在停止…",
        "gui.started": "服务运行于 {url}",
        "gui.stopped": "服务已停止。",
        "gui.generatedKey": "该地址可从网络访问，已生成客户端 API 密钥（只显示一次）：{key}",
        "gui.oauthCancelled": "已取消",
        "gui.accountsList": "账号列表",
        "gui.keyRefused": "iFlow API 拒绝了这个密钥，因此没有保存。仍然保存吗？",
        "gui.keyUnchecked": "已添加账号 {id}。无法连接 iFlow API，密钥尚未验证。",
        "gui.providersList": "服务商列表",
        "gui.presetNotes": "说明",
        "gui.baseUrlOptional": "Base URL（可选）",
        "gui.tiers": "Claude 模型档位",
        "gui.tiersIntro": "Claude Code 请求各档位时\n由哪个模型回答。",
        "gui.loadModels": "加载模型",
        "gui.modelsLoaded": "已加载 {n} 个模型。",
        "gui.tiersSaved": "模型档位已保存。",
        "gui.needPreset": "请先选择预设。",
        "gui.scenarios": "场景路由",
        "gui.scenariosIntro": "Claude Code 的请求从上往下匹配，第一个适用的行决定模型；留空的行跳过。",
        "gui.scenario.image": "图片",
        "gui.scenario.imageHint": "包含图片的请求",
        "gui.scenario.longContext": "长上下文",
        "gui.scenario.longContextHint": "提示词超过",
        "gui.scenario.longContextUnit": "token（估算）",
        "gui.scenario.background": "后台",
        "gui.scenario.backgroundHint": "Haiku 档调用：标题、摘要、子代理",
        "gui.scenario.think": "思考",
        "gui.scenario.thinkHint": "开启思考或指定推理强度的请求",
        "gui.scenario.default": "默认",
        "gui.scenario.defaultHint": "Claude Code 的其他请求",
        "gui.err.wholeNumber": "token 数，至少为 1 的整数。",
        "gui.err.modelId": "不含空格的模型 ID，例如 deepseek/deepseek-chat。",
        "gui.serverGroup": "服务",
        "gui.desktopGroup": "桌面应用",
        "gui.host": "主机",
        "gui.port": "端口",
        "gui.concurrency": "上游并发数",
        "gui.proxyEnabled": "使用上游代理",
        "gui.proxy": "代理地址",
        "gui.reasoning": "推理内容",
        "gui.reasoning.strip": "只返回回答",
        "gui.reasoning.preserve": "保留 reasoning_content",
        "gui.theme": "主题",
        "gui.language": "语言",
        "gui.startMinimized": "启动时最小化",
        "gui.closeAction": "关闭窗口时",
        "gui.close.minimize_to_tray": "在托盘中继续运行",
        "gui.close.quit": "退出应用",
        "gui.autostart": "登录时自动启动",
        "gui.autoRun": "应用启动时启动服务",
        "gui.trayMissing": "托盘图标不可用。安装方法：为运行本应用的 Python 执行 pip install pystray pillow，然后重启应用。",
        "gui.trayActive": "托盘图标：已启用。",
        "gui.saved": "已保存。",
        "gui.savedRestart": "已保存。重启服务后新设置生效。",
        "gui.fixErrors": "未保存：请修正标红的字段。",
        "gui.err.host": "主机名或 IP 地址，不能有空格。",
        "gui.err.port": "1 到 65535 之间的数字。",
        "gui.err.concurrency": "至少为 1 的整数。",
        "gui.err.proxy": "以 http://、https://、socks5:// 或 socks5h:// 开头，后跟 主机:端口。",
        "gui.err.choice": "请选择一项。",
        "gui.err.autostart": "无法更改自动启动：{detail}",
        "gui.hostWarning": "不是 127.0.0.1：API 可从网络访问，需要客户端 API 密钥。",
        "gui.logLevel": "级别",
        "gui.logAll": "全部",
        "gui.logFollow": "自动滚动",
        "gui.tray.show": "显示 / 隐藏窗口",
        "gui.tray.start": "启动服务",
        "gui.tray.stop": "停止服务",
        "gui.tray.quit": "退出",
        "gui.tray.tooltipRunning": "iflow2api：运行于 {url}",
        "gui.tray.tooltipStopped": "iflow2api：已停止",
        "gui.confirmQuit": "退出 iflow2api？服务也会停止。",
        "gui.error": "错误：{detail}",
    },
}

LANGUAGES = ("en", "zh")
LANGUAGE_NAMES = {"en": "English", "zh": "中文"}

_JS_LANGUAGE_RE = re.compile(r"^\s*(\w+):\s*\{\s*$")
_JS_ENTRY_RE = re.compile(r"^\s*'((?:[^'\\]|\\.)*)'\s*:\s*'((?:[^'\\]|\\.)*)',?\s*$")


def parse_admin_strings(js_text: str) -> dict:
    """{language: {key: text}} from the admin's i18n.js (one 'key': 'text' per line)."""
    out, current = {}, None
    for line in js_text.splitlines():
        opened = _JS_LANGUAGE_RE.match(line)
        if opened:
            current = out.setdefault(opened.group(1), {})
            continue
        entry = _JS_ENTRY_RE.match(line)
        if entry and current is not None:
            current[_js_unescape(entry.group(1))] = _js_unescape(entry.group(2))
    return out


def _js_unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def load_admin_strings() -> dict:
    try:
        return parse_admin_strings(read_resource("static/admin/i18n.js").decode("utf-8"))
    except (OSError, KeyError, UnicodeDecodeError):  # a build without static/: GUI strings only
        return {}


class Catalogue:
    """Translated strings: t(key, name=value) in the current language."""

    def __init__(self, language: str = "en", admin_strings: dict = None):
        admin = load_admin_strings() if admin_strings is None else admin_strings
        self.strings = {lang: dict(admin.get(lang, {}), **GUI_STRINGS.get(lang, {})) for lang in LANGUAGES}
        self.language = language if language in LANGUAGES else "en"

    def t(self, key: str, **values) -> str:
        text = self.strings[self.language].get(key)
        if text is None:
            text = self.strings["en"].get(key, key)
        return re.sub(r"\{(\w+)\}", lambda m: str(values.get(m.group(1), m.group(0))), text)


def default_language(env=None, locale_name: str = None, windows_language_id: int = None) -> str:
    """"zh" when the OS speaks Chinese (LANG/LC_*, the locale, or the Windows UI language), else "en"."""
    env = os.environ if env is None else env
    names = [env.get(k, "") for k in ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE")]
    names.append(locale_name if locale_name is not None else _locale_name())
    if windows_language_id is not None:  # primary language id 0x04 is Chinese
        return "zh" if windows_language_id & 0x3FF == 0x04 else "en"
    first = next((n for n in names if n and n not in ("C", "POSIX", "C.UTF-8")), "")
    return "zh" if first.lower().startswith("zh") else "en"


def _locale_name() -> str:
    try:
        return locale.getlocale()[0] or ""
    except ValueError:
        return ""


def _windows_language_id():  # pragma: no cover - Windows only
    try:
        import ctypes
        return ctypes.windll.kernel32.GetUserDefaultUILanguage()
    except (AttributeError, OSError):
        return None


# == 2. Look: palettes, system theme, fonts =====================================
# Colours follow the web admin's palette (static/admin/app.css) so both faces of the
# app look alike. Theme detection reads the OS setting through injected readers.

PALETTES = {
    "light": {"bg": "#f5f7fa", "surface": "#ffffff", "surface2": "#eef1f5", "fg": "#1c2330",
              "muted": "#5d6878", "border": "#d7dde5", "accent": "#2563eb", "accent_fg": "#ffffff",
              "accent_soft": "#dbe6fd", "ok": "#15803d", "bad": "#b91c1c", "warn": "#a16207",
              "field": "#ffffff", "disabled": "#9aa4b2"},
    "dark": {"bg": "#0f141b", "surface": "#171e27", "surface2": "#1f2833", "fg": "#e4e9f0",
             "muted": "#98a3b3", "border": "#2d3846", "accent": "#5b8def", "accent_fg": "#0b1220",
             "accent_soft": "#1e3358", "ok": "#4ade80", "bad": "#f87171", "warn": "#fbbf24",
             "field": "#111820", "disabled": "#5d6878"},
}
THEME_MODES = ("system", "light", "dark")
_PERSONALIZE_KEY = r"Software\Microsoft\Windows\CurrentVersion\Themes\Personalize"


def system_prefers_dark(platform: str = sys.platform, registry=None, run=None) -> bool:
    """True when the OS asks for dark apps: Windows AppsUseLightTheme = 0, macOS
    AppleInterfaceStyle = Dark, GNOME color-scheme = prefer-dark; else (unknown) False."""
    try:
        if platform == "win32":
            if registry is None:  # pragma: no cover - Windows only
                import winreg as registry
            with registry.OpenKey(registry.HKEY_CURRENT_USER, _PERSONALIZE_KEY) as key:
                value, _kind = registry.QueryValueEx(key, "AppsUseLightTheme")
            return value == 0
        run = run or _command_output
        if platform == "darwin":
            return run(["defaults", "read", "-g", "AppleInterfaceStyle"]).strip().lower() == "dark"
        return "dark" in run(["gsettings", "get", "org.gnome.desktop.interface", "color-scheme"]).lower()
    except (OSError, ValueError, subprocess.SubprocessError):
        return False


def _command_output(args) -> str:
    """stdout of a short command, "" when it fails (missing tool, non-zero exit)."""
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=3,
                          universal_newlines=True)
    return done.stdout if done.returncode == 0 else ""


def resolve_theme(mode: str, prefers_dark) -> str:
    """"light" or "dark" for a theme_mode; prefers_dark() is asked only for "system"."""
    if mode in ("light", "dark"):
        return mode
    return "dark" if prefers_dark() else "light"


# Fonts with Chinese glyphs, best first (Windows, macOS, then common Linux ones).
CJK_FONTS = ("Microsoft YaHei UI", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB",
             "Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei",
             "Noto Sans SC", "Droid Sans Fallback", "SimHei", "SimSun")
LATIN_FONTS = {"win32": ("Segoe UI",), "darwin": ("SF Pro Text", "Helvetica Neue"),
               "linux": ("Cantarell", "Noto Sans", "DejaVu Sans", "Liberation Sans")}


def pick_font_family(language: str, families, fallback: str, platform: str = sys.platform) -> str:
    """The UI font family: a CJK one for Chinese (when installed), a native one otherwise."""
    available = set(families)
    wanted = CJK_FONTS if language == "zh" else LATIN_FONTS.get(
        "linux" if platform.startswith("linux") else platform, ())
    return next((f for f in wanted if f in available), fallback)


# == 3. Pure helpers: formatting, client snippets, validation ===================

def format_uptime(seconds, t) -> str:
    """'2d 3h', '4h 5m', '6m 7s' or '8s' with the catalogue's unit letters."""
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "unit.d"), (hours, "unit.h"), (minutes, "unit.m"), (secs, "unit.s")]
    first = next((i for i, (n, _u) in enumerate(parts) if n), 3)
    return " ".join("%d%s" % (n, t(u)) for n, u in parts[first:first + 2])


# Room left on the screen around the window, at 96 dpi: the task bar or dock and the title bar.
SCREEN_MARGIN = (32, 96)
MIN_WINDOW_HEIGHT = 360  # at 96 dpi: below this, pages scroll more than they show


def window_size(natural: tuple, screen: tuple, margin: tuple, scrollbar: int) -> tuple:
    """(width, height) of the window: its natural size, but no larger than the screen less the
    margin; when the height is cut, the width gains room for the pages' scroll bar."""
    width, height = natural
    most_w, most_h = (max(1, s - m) for s, m in zip(screen, margin))
    if height > most_h:
        height, width = most_h, width + scrollbar
    return min(width, most_w), height


def format_count(n) -> str:
    return "{:,}".format(int(n or 0))


def client_url(host: str, port) -> str:
    """The URL a client on this machine uses for a server bound to host:port."""
    if host in ("", "0.0.0.0", "::", "localhost", None):
        host = "127.0.0.1" if host != "::" else "::1"
    if ":" in host:
        host = "[%s]" % host
    return "http://%s:%s" % (host, port)


def shorten(text: str, limit: int) -> str:
    """text cut in the middle with an ellipsis when longer than limit (a value must not push
    its neighbours out of the window)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def openai_base_url(url: str) -> str:
    return url.rstrip("/") + "/v1"


def claude_code_setup(url: str, keys_required: bool, platform: str = sys.platform) -> str:
    """Environment lines for Claude Code (PowerShell on Windows, POSIX shells elsewhere)."""
    key = "<your client API key>" if keys_required else "anything"
    pairs = [("ANTHROPIC_BASE_URL", url.rstrip("/")), ("ANTHROPIC_API_KEY", key),
             ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")]
    if platform == "win32":
        return "\n".join('$env:%s = "%s"' % pair for pair in pairs) + "\n"
    return "\n".join("export %s=%s" % pair for pair in pairs) + "\n"


def codex_config(url: str, model: str = "glm-5") -> str:
    """A ~/.codex/config.toml snippet for the Codex CLI (Responses API)."""
    return ('model = "%s"\nmodel_provider = "iflow2api"\n\n[model_providers.iflow2api]\n'
            'name = "iflow2api"\nbase_url = "%s"\nenv_key = "IFLOW2API_KEY"\nwire_api = "responses"\n'
            % (model, openai_base_url(url)))


def parse_port(text) -> int:
    """The port as an int; ValueError unless it is 1-65535."""
    text = str(text).strip()
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("port")
    return int(text)


def is_loopback(host: str) -> bool:
    return host in iflow2api.__dict__.get("LOOPBACK_HOSTS", ("127.0.0.1", "::1", "localhost"))


_LOG_LEVEL_RE = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LEVEL_RANK = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


def filter_log_lines(lines, min_level: str) -> list:
    """Lines at or above min_level ("" = all); continuation lines (tracebacks) follow their record."""
    if not min_level:
        return list(lines)
    floor, keep, out = _LEVEL_RANK[min_level], True, []
    for line in lines:
        found = _LOG_LEVEL_RE.search(line[:40])
        if found:
            keep = _LEVEL_RANK[found.group(1)] >= floor
        if keep:
            out.append(line)
    return out


# == 4. View models ===============================================================
# One class per page: what the page shows and what its buttons do, as plain data
# and Service calls. They never touch tkinter, so tests drive them without a
# display; the views run their methods in worker threads.

def error_text(exc: BaseException) -> str:
    """A short message for an error a Service call raised."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


class StatusModel:
    """The Status page: the default instance, totals, credentials, client snippets."""

    def __init__(self, service, clock=time.time):
        self.service, self.clock = service, clock
        self._started_at = None  # when we saw the default instance start (uptime)

    def snapshot(self) -> dict:
        """Everything the page and the tray show, in one call (worker thread)."""
        dash = self.service.dashboard()
        config = self.service.config_get()
        default = next((i for i in dash["instances"] if i.get("name") == "default"), None)
        running = bool(default and default.get("running"))
        if running and self._started_at is None:
            self._started_at = self.clock()
        elif not running:
            self._started_at = None
        uptime = default.get("uptime_s") if running and default.get("uptime_s") is not None else (
            self.clock() - self._started_at if running else None)
        url = default["url"] if running else client_url(config["host"], config["port"])
        accounts = dash.get("accounts") or []
        first = accounts[0] if accounts else None
        return {"running": running, "url": url, "provider": config.get("default_provider") or "iflow",
                "account": shorten("%s (%s)" % (first["id"], first["status"]), 36) if first else "",
                "accounts_count": len(accounts), "has_credentials": self.service.has_credentials(),
                "requests": dash.get("requests", 0), "errors": dash.get("errors", 0),
                "input_tokens": dash.get("input_tokens", 0), "output_tokens": dash.get("output_tokens", 0),
                "uptime_s": uptime, "keys_required": bool(dash.get("keys_required")),
                "update": dash.get("update"), "today": self._today()}

    def _today(self):
        """Today's totals from the usage history (None when it is off or unreadable)."""
        if self.service.usage is None:
            return None
        try:
            return self.service.usage_today()
        except iflow2api.Iflow2apiError:
            return None

    def start(self) -> dict:
        """Start the default instance; its status (with generated_key once for a remote bind)."""
        instance = self.service.start()
        status = instance.status()
        status["generated_key"] = getattr(instance, "generated_key", "")
        return status

    def stop(self) -> None:
        self.service.stop("default")

    def restart(self) -> dict:
        self.stop()
        return self.start()


class LoginFlow:
    """One iFlow OAuth sign-in: browser redirect or pasted address, cancellable.

    States: idle -> waiting -> done | error | cancelled. start() returns the URL to
    open; wait() blocks (worker thread) until the browser comes back; paste() ends
    it with what the user pasted; cancel() frees the callback port at once."""

    def __init__(self, service, add: bool = False):
        self.service, self.add = service, add
        self.state, self.message, self.account, self.url = "idle", "", None, ""
        self._session, self._pasted = None, False

    def start(self, headless: bool = False) -> str:
        self._session = self.service.login_start(headless=headless)
        self.state, self.url = "waiting", self._session.url
        return self.url

    def wait(self, timeout_s: float = 600.0) -> str:
        try:
            self.account = self.service.login_finish(self._session, timeout_s=timeout_s, add=self.add)
            self.state = "done"
        except Exception as exc:  # the session reports cancel/timeout/refusal as an error
            if self.state == "waiting" and not self._pasted:
                self.state, self.message = "error", error_text(exc)
        return self.state

    def paste(self, text: str) -> str:
        if not (text or "").strip():
            raise ValueError("acc.needPaste")
        self._pasted = True  # the waiting thread now ends quietly
        try:
            self.account = self.service.login_finish(self._session, text.strip(), add=self.add)
            self.state, self.message = "done", ""
        except Exception as exc:
            self.state, self.message = "error", error_text(exc)
        return self.state

    def cancel(self) -> None:
        if self.state == "waiting":
            self.state, self.message = "cancelled", ""
            self._session.close()


class AccountsModel:
    """The Accounts page: list, add an API key, remove."""

    def __init__(self, service):
        self.service = service

    def accounts(self) -> list:
        return self.service.accounts()

    def add_api_key(self, key: str, extra: bool = False, force: bool = False) -> dict:
        """{"id", "check"} (see Service.login_api_key); KeyRefusedError unless force."""
        key = (key or "").strip()
        if not key:
            raise ValueError("acc.needKey")
        return self.service.login_api_key(key, add=extra, force=force)

    def remove(self, account_id: str) -> bool:
        return self.service.logout(account_id)


CLAUDE_TIERS = ("opus", "sonnet", "haiku")
# The scenario routes in the order the server tries them (iflow2api.SCENARIOS), each with
# its name and its explanation in the catalogue.
SCENARIOS = iflow2api.SCENARIOS
SCENARIO_TEXTS = {"image": ("gui.scenario.image", "gui.scenario.imageHint"),
                  "long_context": ("gui.scenario.longContext", "gui.scenario.longContextHint"),
                  "background": ("gui.scenario.background", "gui.scenario.backgroundHint"),
                  "think": ("gui.scenario.think", "gui.scenario.thinkHint"),
                  "default": ("gui.scenario.default", "gui.scenario.defaultHint")}


class ProvidersModel:
    """The Providers page: presets, configured providers, the Claude tier map, the scenario routes."""

    def __init__(self, service):
        self.service = service

    def providers(self) -> list:
        return self.service.providers()

    @staticmethod
    def preset_names(providers: list) -> list:
        return [p["name"] for p in providers if p["name"] != "iflow"]

    @staticmethod
    def state_key(provider: dict) -> str:
        if provider["default"]:
            return "prov.default"
        if provider["enabled"]:
            return "prov.enabled"
        return "prov.isPreset" if not provider["configured"] else "prov.disabled"

    def add(self, preset: str, api_key: str = "", base_url: str = "", make_default: bool = False) -> dict:
        preset = (preset or "").strip()
        if not preset:
            raise ValueError("gui.needPreset")
        return self.service.provider_add(preset, preset=None, api_key=(api_key or "").strip() or None,
                                         base_url=(base_url or "").strip() or None, make_default=make_default)

    def remove(self, name: str) -> bool:
        return self.service.provider_remove(name)

    def make_default(self, name: str) -> None:
        self.service.config_set({"default_provider": name})

    def models(self) -> list:
        """Model ids clients can send, over every enabled provider (may ask the upstream)."""
        return [m["id"] for m in self.service.models()]

    def tiers(self) -> dict:
        model_map = self.service.config_get().get("model_map") or {}
        return {tier: model_map.get(tier, "") for tier in CLAUDE_TIERS}

    def save_tiers(self, tiers: dict) -> dict:
        """Merge opus/sonnet/haiku into model_map; errors {tier: key} and nothing saved on error."""
        errors = {tier: "gui.err.choice" for tier in CLAUDE_TIERS
                  if not (tiers.get(tier) or "").strip() or any(c.isspace() for c in tiers[tier].strip())}
        if errors:
            return errors
        model_map = dict(self.service.config_get().get("model_map") or {})
        model_map.update({tier: tiers[tier].strip() for tier in CLAUDE_TIERS})
        self.service.config_set({"model_map": model_map})
        return {}

    # -- scenario routes (config scenario_routes and long_context_tokens) --
    def scenarios(self) -> dict:
        """The form: {"routes": {scenario: target or ""}, "long_context_tokens": text}."""
        config = self.service.config_get()
        routes = config.get("scenario_routes") or {}
        return {"routes": {s: routes.get(s) or "" for s in SCENARIOS},
                "long_context_tokens": str(config.get("long_context_tokens", ""))}

    @staticmethod
    def scenario_changes(routes: dict, long_context_tokens) -> tuple:
        """(changes, errors) from the form: changes holds scenario_routes (the non-empty rows,
        trimmed) and long_context_tokens (an int); errors {field: message key}, where a field
        is a scenario or "long_context_tokens". The server checks ranges itself."""
        changes, errors, kept = {}, {}, {}
        for scenario in SCENARIOS:
            target = (routes.get(scenario) or "").strip()
            if any(c.isspace() for c in target):
                errors[scenario] = "gui.err.modelId"
            elif target:
                kept[scenario] = target
        changes["scenario_routes"] = kept
        text = str(long_context_tokens if long_context_tokens is not None else "").strip()
        if text.isdigit():
            changes["long_context_tokens"] = int(text)
        else:
            errors["long_context_tokens"] = "gui.err.wholeNumber"
        return changes, errors

    def save_scenarios(self, routes: dict, long_context_tokens) -> dict:
        """Save through the server's validated path. {"errors": {field: key}} when the form is
        wrong; {"refused": server message, "field": config key} when the server said no; else
        {"changed": [keys]}. Nothing is saved unless everything is accepted."""
        changes, errors = self.scenario_changes(routes, long_context_tokens)
        if errors:
            return {"errors": errors}
        current = self.service.config_get()
        changes = {k: v for k, v in changes.items() if current.get(k) != v}
        try:
            if changes:
                self.service.config_set_editable(changes)
        except iflow2api.Iflow2apiError as exc:
            return {"refused": error_text(exc), "field": getattr(exc, "param", None) or ""}
        return {"changed": sorted(changes)}


class InstancesModel:
    """The Instances page: the servers of this process, and the configured ones."""

    def __init__(self, service):
        self.service = service

    def instances(self) -> list:
        """Every instance; "default" is listed even while stopped (Start starts it)."""
        rows = self.service.instance_list()
        if not any(r.get("name") == "default" for r in rows):
            config = self.service.config_get()
            rows.insert(0, {"name": "default", "running": False, "url": "", "host": config["host"],
                            "port": config["port"], "requests": 0, "errors": 0, "in_flight": 0})
        return rows

    @staticmethod
    def validate(name: str, host: str, port: str) -> dict:
        errors = {}
        if not re.match(r"^[A-Za-z0-9_.-]{1,40}$", name or "") or name == "default":
            errors["name"] = "inst.needName"
        if host and not iflow2api.is_host(host):  # the server's own check
            errors["host"] = "gui.err.host"
        try:
            parse_port(port)
        except ValueError:
            errors["port"] = "inst.badPort"
        return errors

    def add(self, name: str, host: str, port: str) -> dict:
        return self.service.add_instance(name.strip(), host.strip() or None, parse_port(port))

    def start(self, name: str) -> dict:
        return self.service.start_instance(name)

    def stop(self, name: str) -> None:
        if name == "default":
            self.service.stop("default")  # synchronous: the list is right at once
        else:
            self.service.stop_instance(name)
            self._wait_stopped(name)

    def remove(self, name: str) -> None:
        self.service.remove_instance(name)
        self._wait_stopped(name)

    def _wait_stopped(self, name: str, timeout_s: float = 5.0) -> None:
        # stop_instance stops in a thread of its own (it may be the instance serving an
        # admin request); wait here, in our worker, so the refreshed list is right.
        deadline = time.time() + timeout_s
        while name in getattr(self.service, "instances", {}) and time.time() < deadline:
            time.sleep(0.05)


# Settings the form edits: key -> kind. Bool keys are check boxes, choices combo boxes.
SETTINGS_FIELDS = {
    "host": "text", "port": "port", "concurrency": "count", "upstream_proxy_enabled": "bool",
    "upstream_proxy": "proxy", "preserve_reasoning_content": "bool", "theme_mode": THEME_MODES,
    "language": LANGUAGES, "start_minimized": "bool", "close_action": ("minimize_to_tray", "quit"),
    "auto_start": "bool", "auto_run_server": "bool",
}
# Changing these needs a server restart (the running instance keeps its socket and limits);
# a proxy change applies at once.
RESTART_KEYS = ("host", "port", "concurrency")


class SettingsModel:
    """The Settings page: a form of strings and bools, validated as a whole.

    save() changes nothing unless every field is valid (the reason per field comes
    back instead); autostart goes through the platform adapter as well as config."""

    def __init__(self, service, autostart=None):
        self.service, self.autostart = service, autostart

    def load(self) -> dict:
        config = self.service.config_get()
        form = {key: config.get(key) for key in SETTINGS_FIELDS}
        form["port"], form["concurrency"] = str(config["port"]), str(config["concurrency"])
        form["upstream_proxy"] = config.get("upstream_proxy") or ""
        if self.autostart is not None:  # what the OS will really do wins over the saved flag
            try:
                form["auto_start"] = self.autostart.is_enabled()
            except OSError:
                pass
        return form

    @staticmethod
    def validate(form: dict) -> tuple:
        """(values, errors): typed values for config, and {field: message key} problems."""
        values, errors = {}, {}
        for key, kind in SETTINGS_FIELDS.items():
            raw = form.get(key)
            if kind == "bool":
                values[key] = bool(raw)
            elif isinstance(kind, tuple):
                if raw in kind:
                    values[key] = raw
                else:
                    errors[key] = "gui.err.choice"
            elif kind == "text":
                text = (raw or "").strip()
                if iflow2api.is_host(text):  # the same check as the CLI and the config file
                    values[key] = text
                else:
                    errors[key] = "gui.err.host"
            elif kind == "port":
                try:
                    values[key] = parse_port(raw)
                except ValueError:
                    errors[key] = "gui.err.port"
            elif kind == "count":
                text = str(raw or "").strip()
                if text.isdigit() and int(text) >= 1:
                    values[key] = int(text)
                else:
                    errors[key] = "gui.err.concurrency"
            elif kind == "proxy":
                text = (raw or "").strip()
                if text and not iflow2api.is_proxy_url(text) or (not text and form.get("upstream_proxy_enabled")):
                    errors[key] = "gui.err.proxy"
                else:
                    values[key] = text
        return values, errors

    def save(self, form: dict) -> dict:
        """{"errors": {...}} or {"changed": [keys], "restart": bool}."""
        values, errors = self.validate(form)
        if errors:
            return {"errors": errors}
        current = self.service.config_get()
        changes = {k: v for k, v in values.items() if current.get(k) != v}
        if "auto_start" in changes or (self.autostart is not None and values["auto_start"] != self._os_autostart()):
            self.apply_autostart(values["auto_start"])
            changes["auto_start"] = values["auto_start"]
        if changes:
            self.service.config_set(changes)
        return {"errors": {}, "changed": sorted(changes),
                "restart": any(k in changes for k in RESTART_KEYS)}

    def _os_autostart(self) -> bool:
        try:
            return self.autostart.is_enabled()
        except OSError:
            return False

    def apply_autostart(self, enabled: bool) -> None:
        if self.autostart is None:
            return
        if enabled:
            self.autostart.enable()
        else:
            self.autostart.disable()

    def set_now(self, key: str, value) -> None:
        """Save one key at once (theme and language switch live)."""
        if value not in SETTINGS_FIELDS[key]:
            raise ValueError("gui.err.choice")
        self.service.config_set({key: value})

    # -- client API keys --
    def client_keys(self) -> list:
        return self.service.client_keys()

    def create_client_key(self) -> dict:
        return self.service.create_client_key()

    def revoke_client_key(self, key_id: str) -> bool:
        return self.service.revoke_client_key(key_id)


class LogModel:
    """The Log page: recent server log lines, filtered by level."""

    def __init__(self, service):
        self.service = service
        self.level = ""

    def lines(self, count: int = 500) -> list:
        return filter_log_lines(self.service.recent_logs(count), self.level)


# == 5. Platform adapters: autostart, single instance, tray =======================
# Thin classes with the OS behind an injected seam (registry object, home folder),
# so tests run every branch on any OS.

def launch_command(script: str, executable: str, platform: str = sys.platform, exists=os.path.exists) -> list:
    """The command that starts this GUI at login (minimised, server running)."""
    paths = ntpath if platform == "win32" else posixpath  # the target's rules, whatever runs this
    if platform == "win32":  # pythonw: no console window at login
        windowed = paths.join(paths.dirname(executable), "pythonw.exe")
        executable = windowed if exists(windowed) else executable
    script = paths.abspath(script)
    name = paths.basename(script).lower()
    if name.startswith("iflow2api_gui") and name.endswith(".py"):
        return [executable, script, "--autostart"]
    if name.endswith((".py", ".pyz", ".pyzw")):  # iflow2api.py or the built file: its gui command
        return [executable, script, "gui", "--autostart"]
    return [script, "--autostart"]  # a console script such as iflow2api-gui


class WindowsAutostart:
    """HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run\\iflow2api (winreg or a fake)."""

    KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
    VALUE = "iflow2api"

    def __init__(self, command: list, registry=None):
        if registry is None:  # pragma: no cover - Windows only
            import winreg as registry
        self.command, self.registry = command, registry

    def enable(self) -> None:
        reg = self.registry
        with reg.CreateKey(reg.HKEY_CURRENT_USER, self.KEY) as key:
            reg.SetValueEx(key, self.VALUE, 0, reg.REG_SZ, subprocess.list2cmdline(self.command))

    def disable(self) -> None:
        reg = self.registry
        try:
            with reg.OpenKey(reg.HKEY_CURRENT_USER, self.KEY, 0, reg.KEY_SET_VALUE) as key:
                reg.DeleteValue(key, self.VALUE)
        except FileNotFoundError:
            pass

    def registered_command(self) -> str:
        reg = self.registry
        try:
            with reg.OpenKey(reg.HKEY_CURRENT_USER, self.KEY) as key:
                return reg.QueryValueEx(key, self.VALUE)[0]
        except FileNotFoundError:
            return ""

    def is_enabled(self) -> bool:
        return bool(self.registered_command())


class MacAutostart:
    """~/Library/LaunchAgents/com.iflow2api.gui.plist, run at load."""

    def __init__(self, command: list, home: str = None):
        self.command = command
        self.path = os.path.join(home or os.path.expanduser("~"), "Library", "LaunchAgents", APP_ID + ".plist")

    def enable(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        data = {"Label": APP_ID, "ProgramArguments": list(self.command), "RunAtLoad": True,
                "ProcessType": "Interactive"}
        with open(self.path, "wb") as f:
            plistlib.dump(data, f)

    def disable(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)

    def registered_command(self) -> list:
        try:
            with open(self.path, "rb") as f:
                data = plistlib.load(f)
        except (OSError, plistlib.InvalidFileException, ValueError):
            return []
        return list(data.get("ProgramArguments") or []) if data.get("Label") == APP_ID else []

    def is_enabled(self) -> bool:
        return bool(self.registered_command())


_DESKTOP_RESERVED = re.compile(r"[\s\"'\\><~|&;$*?#()`]")


def desktop_exec(args) -> str:
    """An Exec= value for a .desktop file (XDG quoting, then the string escape of backslash)."""
    out = []
    for arg in args:
        arg = arg.replace("%", "%%")
        if arg and not _DESKTOP_RESERVED.search(arg):
            out.append(arg)
        else:
            out.append('"' + re.sub(r'(["`$\\])', r"\\\1", arg) + '"')
    return " ".join(out).replace("\\", "\\\\")


def parse_desktop_exec(value: str) -> list:
    """The arguments of an Exec= value written by desktop_exec (the inverse)."""
    text = value.replace("\\\\", "\\")
    args, current, quoted, escaped, started = [], [], False, False, False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted, started = not quoted, True
        elif ch == " " and not quoted:
            if started:
                args.append("".join(current))
            current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        args.append("".join(current))
    return [a.replace("%%", "%") for a in args]


class LinuxAutostart:
    """$XDG_CONFIG_HOME/autostart/iflow2api.desktop (XDG autostart, any desktop)."""

    def __init__(self, command: list, home: str = None, env=None):
        env = os.environ if env is None else env
        config_home = env.get("XDG_CONFIG_HOME") or os.path.join(home or os.path.expanduser("~"), ".config")
        self.command = command
        self.path = os.path.join(config_home, "autostart", "iflow2api.desktop")

    def entry_text(self) -> str:
        return ("[Desktop Entry]\nType=Application\nName=iflow2api\n"
                "Comment=Local OpenAI and Anthropic API bridge\n"
                "Exec=%s\nTerminal=false\nX-GNOME-Autostart-enabled=true\n" % desktop_exec(self.command))

    def enable(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(self.entry_text())

    def disable(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)

    def registered_command(self) -> list:
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        fields = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
        if fields.get("Hidden", "").lower() == "true" or fields.get("X-GNOME-Autostart-enabled") == "false":
            return []
        return parse_desktop_exec(fields.get("Exec", ""))

    def is_enabled(self) -> bool:
        return bool(self.registered_command())


def autostart_for(platform: str = sys.platform, command: list = None, home: str = None, registry=None, env=None):
    """The autostart adapter of this OS (None where there is none)."""
    command = command or launch_command(sys.argv[0] or __file__, sys.executable, platform)
    if platform == "win32":
        return WindowsAutostart(command, registry)
    if platform == "darwin":
        return MacAutostart(command, home)
    if platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        return LinuxAutostart(command, home, env)
    return None


class SingleInstance:
    """One window per user and config folder.

    The first launch listens on a loopback port and writes {port, token, pid} to
    <config dir>/gui.lock; a later launch reads it, connects, sends the token and
    exits when the first one answers "ok" (it then shows its window). A lock file
    whose owner does not answer is stale (crash) and is taken over."""

    def __init__(self, directory: str, on_show):
        self.path = os.path.join(directory, "gui.lock")
        self.on_show = on_show
        self.token = base64.urlsafe_b64encode(os.urandom(18)).decode("ascii")
        self._listener = None

    def acquire(self) -> bool:
        """True when this process is the one; False after asking the first one to show itself."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        for _attempt in range(3):
            owner = self._read()
            if owner and self.notify(owner):
                return False
            if owner is not None:
                self._remove_stale()
            if self._claim():
                return True
        return True  # could not claim the file (odd file system): run anyway, unguarded

    def notify(self, owner: dict, timeout_s: float = 2.0) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", int(owner["port"])), timeout=timeout_s) as conn:
                conn.sendall(("show %s\n" % owner["token"]).encode("ascii"))
                return conn.makefile("rb").readline().strip() == b"ok"
        except (OSError, KeyError, ValueError, TypeError):
            return False

    def release(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            owner = self._read()
            if owner and owner.get("token") == self.token:
                try:
                    os.remove(self.path)
                except OSError:
                    pass

    def _read(self):
        """The owner record; {} while another launch is writing it; None when there is no file."""
        for _ in range(10):
            try:
                with open(self.path, encoding="utf-8") as f:
                    return json.loads(f.read())
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                time.sleep(0.05)  # being written right now
        return {}

    def _remove_stale(self) -> None:
        try:
            os.remove(self.path)
        except OSError:
            pass

    def _claim(self) -> bool:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another launch won the race: ask it instead
            listener.close()
            return False
        record = {"port": listener.getsockname()[1], "token": self.token, "pid": os.getpid()}
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
        self._listener = listener
        threading.Thread(target=self._serve, args=(listener,), name="iflow2api-gui-single", daemon=True).start()
        return True

    def _serve(self, listener) -> None:
        while True:
            try:
                conn, _addr = listener.accept()
            except OSError:  # closed by release()
                return
            with conn:
                try:
                    conn.settimeout(2.0)
                    line = conn.makefile("rb").readline().decode("ascii", "replace").split()
                    if line == ["show", self.token]:
                        conn.sendall(b"ok\n")
                        self.on_show()
                    else:
                        conn.sendall(b"no\n")
                except OSError:
                    pass


def load_tray_modules():
    """(pystray, PIL.Image, PIL.ImageDraw), or None with the reason, imported only now:
    pystray connects to the display when imported, and needs the display that Tk got."""
    # pystray logs a traceback whenever no tray is there to dock in; keep it off stderr.
    logging.getLogger("pystray").addHandler(logging.NullHandler())
    try:
        import pystray
        from PIL import Image, ImageDraw
        return (pystray, Image, ImageDraw), ""
    except Exception as exc:  # ImportError, or a backend that cannot start (no X, no DBus...)
        return None, "%s: %s" % (exc.__class__.__name__, exc)


def tray_image(Image, ImageDraw, icon_png: bytes, running: bool, size: int = 64):
    """The app icon with a status dot: green when the server runs, grey when stopped."""
    base = Image.open(io.BytesIO(icon_png)).convert("RGBA").resize((size, size), Image.LANCZOS)
    draw = ImageDraw.Draw(base)
    r = size // 5
    cx = cy = size - r - 1
    draw.ellipse([cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2], fill="#ffffff")
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill="#16a34a" if running else "#9ca3af")
    return base


class TrayIcon:
    """The tray icon (pystray). Menu callbacks run in pystray's thread, so each one
    only posts a named action; the window runs it on the Tk thread.

    Backends without menus (plain X11) call the default item on a click: there the
    default item asks the window to pop up the same menu itself."""

    ACTIONS = ("toggle", "start", "stop", "admin", "copy_url", "quit")

    def __init__(self, modules, icon_png: bytes, post, t):
        self.pystray, self.Image, self.ImageDraw = modules
        self.icon_png, self.post, self.t = icon_png, post, t
        self.running, self.url = False, ""
        self.icon = None
        self._lock = threading.Lock()  # update() runs in worker threads

    @property
    def has_menu(self) -> bool:
        return bool(getattr(self.pystray.Icon, "HAS_MENU", True))

    def menu_entries(self) -> list:
        """(label, action) of the menu, in order (also used for the window's own popup)."""
        return [(self.t("gui.tray.show"), "toggle"),
                (self.t("gui.tray.stop") if self.running else self.t("gui.tray.start"),
                 "stop" if self.running else "start"),
                (self.t("gui.openAdmin"), "admin"), (self.t("gui.copyBaseUrl"), "copy_url"),
                (self.t("gui.tray.quit"), "quit")]

    def _menu(self):
        item, menu = self.pystray.MenuItem, self.pystray.Menu
        if not self.has_menu:
            return menu(item("iflow2api", lambda icon, it: self.post("popup"), default=True))
        entries = []
        for index in range(5):
            entries.append(item(lambda it, i=index: self.menu_entries()[i][0],
                                lambda icon, it, i=index: self.post(self.menu_entries()[i][1]),
                                default=index == 0))
        return menu(*entries)

    def start(self) -> None:
        self.icon = self.pystray.Icon("iflow2api", self._image(), self.tooltip(), menu=self._menu())
        if sys.platform == "darwin":  # AppKit: the icon joins the main loop that Tk runs
            self.icon.run_detached(setup=self._setup)
        else:
            # Own loop in a daemon thread: the GTK backends need their loop running (Tk
            # does not run GLib's), and pystray 0.19's X11 run_detached leaves a second
            # setup thread waiting for ever, which keeps the process from exiting.
            threading.Thread(target=self.icon.run, kwargs={"setup": self._setup}, name="iflow2api-tray",
                             daemon=True).start()

    def _setup(self, icon) -> None:
        icon.visible = True
        window, display = getattr(icon, "_window", None), getattr(icon, "_display", None)
        if not self.has_menu and window is not None and display is not None:
            # pystray 0.19's X11 icon window does not select button presses, so a click
            # never reached it; ask for them, so that a click opens our menu.
            try:
                from Xlib import X
                window.change_attributes(event_mask=X.ExposureMask | X.StructureNotifyMask | X.ButtonPressMask)
                display.flush()
            except Exception as exc:  # an older or newer pystray: no click, the window still works
                log.info("tray: clicks not enabled (%s)", exc)

    def is_docked(self) -> bool:
        """False when the X11 backend found no tray to sit in (hiding the window would lose it)."""
        if self.icon is None:
            return False
        return self.has_menu or bool(getattr(self.icon, "_systray_manager", True))

    def _alive(self) -> bool:
        # pystray's X11 backend hands every change to its own thread and waits for it
        # without a timeout: once that thread is gone (the tray host vanished), never ask.
        thread = getattr(self.icon, "_thread", None)
        return self.icon is not None and (thread is None or thread.is_alive())

    def update(self, running: bool, url: str) -> None:
        """Show the server state (icon, tooltip, menu); worker threads call it (see _alive)."""
        with self._lock:
            if (running, url) == (self.running, self.url):
                return
            self.running, self.url = running, url
            if self._alive():
                self.icon.icon = self._image()
                self._apply_texts()

    def refresh_texts(self) -> None:
        with self._lock:
            if self._alive():
                self._apply_texts()

    def _apply_texts(self) -> None:
        try:
            self.icon.title = self.tooltip()
        except UnicodeError:  # X11 window names are Latin-1: no Chinese tooltip there
            self.icon.title = "iflow2api"
        if self.has_menu:
            self.icon.update_menu()

    def tooltip(self) -> str:
        if self.running:
            return self.t("gui.tray.tooltipRunning", url=self.url)
        return self.t("gui.tray.tooltipStopped")

    def stop(self) -> None:
        icon, self.icon = self.icon, None
        if icon is None:
            return

        def stop_icon():
            try:
                icon.stop()
            except Exception:  # the backend may already be gone at exit
                pass
        # Never let a stuck tray backend keep the app from quitting.
        stopper = threading.Thread(target=stop_icon, name="iflow2api-tray-stop", daemon=True)
        stopper.start()
        stopper.join(2.0)

    def _image(self):
        return tray_image(self.Image, self.ImageDraw, self.icon_png, self.running)


# == 6. Views =====================================================================
# ttk pages over the view models; Tk thread only. Work goes to worker threads via
# App.run(); their results and every event from other threads (tray menu, second
# launch) come back through App.inbox, which the Tk thread empties every 100 ms
# while work is pending and every 400 ms when idle (no busy loop).

def configured_keys(service) -> set:
    """Config keys the user has set (file layer), e.g. to tell "language" chosen from defaulted."""
    return set(service.config_keys_set())


class ScrollArea:
    """Content that scrolls up and down when the window is shorter than it, so the window
    never has to be taller than the screen (1366x768 laptops, 1920x1080 at 150%). The
    scroll bar shows only while it is needed; when the window is taller than the content,
    the content is stretched to fill it, as a plain frame would be."""

    OWN_WHEEL = ("Text", "Treeview", "Listbox")  # lists that scroll themselves with the wheel

    def __init__(self, parent, padding):
        self.outer = ttk.Frame(parent)
        self.outer.rowconfigure(0, weight=1)
        self.outer.columnconfigure(0, weight=1)
        self.canvas = tk.Canvas(self.outer, highlightthickness=0, borderwidth=0)
        self.canvas.grid(row=0, column=0, sticky="nsew")
        self.bar = ttk.Scrollbar(self.outer, orient="vertical", command=self.canvas.yview)
        self.canvas.configure(yscrollcommand=self.bar.set)
        self.inner = ttk.Frame(self.canvas, padding=padding)
        self._item = self.canvas.create_window(0, 0, window=self.inner, anchor="nw")
        self.scrolls = False
        self._laid_out = None  # (width, height, content height) of the last fit()
        self._wheel_rest = 0  # wheel delta not yet scrolled (fine-grained wheels, touchpads)
        self.canvas.bind("<Configure>", lambda _e: self.fit())
        # The wheel scrolls the area over any of its widgets but the lists: they get this area's
        # binding tag, before their class's (a combo box would change its value instead). A
        # widget that takes the focus (Tab) is scrolled into view.
        self._tag = "IflowScroll%d" % id(self)
        self._tag_commands = [self.canvas.bind_class(self._tag, sequence, self._on_wheel)
                              for sequence in ("<MouseWheel>", "<Button-4>", "<Button-5>")]
        # <<TraverseIn>>: the focus came by Tab (not by the window being activated again)
        self._tag_commands.append(self.canvas.bind_class(self._tag, "<<TraverseIn>>", lambda e: self.show(e.widget)))
        self.outer.bind("<Destroy>", self._forget_tag, add="+")
        for widget in (self.canvas, self.inner, self.bar):
            widget.bindtags((str(widget), self._tag) + widget.bindtags()[1:])

    def match_content(self) -> None:
        """Ask for the content's own size: the window's natural size is that of its largest page."""
        self.canvas.configure(width=self.inner.winfo_reqwidth(), height=self.inner.winfo_reqheight())

    def fit(self) -> None:
        """Lay the content out for the area's current size. Runs on a resize, a language
        switch, a message, and each second for the page shown (App._tick: content may grow
        at any time, as an update notice does); it does nothing when nothing changed."""
        width, height = self.canvas.winfo_width(), self.canvas.winfo_height()
        needed = self.inner.winfo_reqheight()
        if width <= 1 or (width, height, needed) == self._laid_out:  # not laid out yet; or as it is
            return
        self._laid_out = (width, height, needed)
        self.scrolls = needed > height
        # height 0: the content's own; else stretched to the area's
        self.canvas.itemconfigure(self._item, width=width, height=0 if self.scrolls else height)
        self.canvas.configure(scrollregion=(0, 0, width, max(needed, height)))
        if self.scrolls:
            self.bar.grid(row=0, column=1, sticky="ns")
        else:
            self.bar.grid_remove()
            self.canvas.yview_moveto(0)
        self._tag_for_wheel(self.inner)

    def _tag_for_wheel(self, widget) -> None:
        for child in widget.winfo_children():
            tags = child.bindtags()
            if child.winfo_class() not in self.OWN_WHEEL and self._tag not in tags:
                child.bindtags(tags[:1] + (self._tag,) + tags[1:])
            self._tag_for_wheel(child)

    def _on_wheel(self, event) -> str:
        if self.scrolls:
            if event.num in (4, 5):  # X11: a button per notch
                units = -1 if event.num == 4 else 1
            elif sys.platform == "darwin" and abs(event.delta) < 120:  # Tk 8.6 on macOS: in lines
                units = -event.delta
            else:  # 120 a notch (Windows, newer Tk), less per event from fine wheels and touchpads
                if (self._wheel_rest > 0) != (event.delta > 0):
                    self._wheel_rest = 0  # the other way now: what was left of a notch is dropped
                self._wheel_rest += event.delta
                units = -int(self._wheel_rest / 120)
                self._wheel_rest += units * 120
            if units:
                self.canvas.yview_scroll(units, "units")
        return "break"  # not the widget class's binding too

    def _forget_tag(self, event) -> None:
        # bind_class's Tcl commands are not freed with the window before Python 3.11
        if event.widget is self.outer:
            for command in self._tag_commands:
                try:
                    self.outer._root().deletecommand(command)  # and off the root's list (3.11+ keeps one)
                except tk.TclError:  # gone with the interpreter already
                    pass
            self._tag_commands = []

    def show(self, widget) -> None:
        """Scroll so that widget (inside the area) is in view."""
        if not self.scrolls:
            return
        top = widget.winfo_rooty() - self.inner.winfo_rooty()
        bottom = top + widget.winfo_height()
        first, last = self.canvas.yview()
        total = max(1, self.inner.winfo_height())
        if top < first * total or bottom > last * total:
            self.canvas.yview_moveto(max(0.0, min(top, bottom - self.canvas.winfo_height()) / total))


class Page:
    """A notebook page: a frame (that scrolls when the window is short), a message line,
    and the App's helpers."""

    title_key = ""

    def __init__(self, app):
        self.app, self.t = app, app.t
        self.area = ScrollArea(app.notebook, padding=(app.px(16), app.px(12)))
        self.tab = self.area.outer  # what the notebook holds
        self.frame = self.area.inner  # what the page builds in
        self._message = (None, False, {})
        self.build()

    def build(self) -> None:
        raise NotImplementedError

    def on_show(self) -> None:
        """The page became visible: load what it shows."""

    def retranslate(self) -> None:
        """The language changed: texts built from data (not registered with tr) are redone here."""

    def message_line(self, parent, **grid):
        self.message = ttk.Label(parent, style="Info.TLabel", wraplength=self.app.px(760), justify="left")
        self.message.grid(**grid)
        self.app.on_language(self._show_message)
        return self.message

    def say(self, key: str = None, error: bool = False, **values) -> None:
        """Show a message (a catalogue key or plain text) under the page's controls."""
        self._message = (key, error, values)
        self._show_message()
        if key:  # a message may be a line longer; an error must be seen, wherever it is
            self.app.root.update_idletasks()
            self.area.fit()
            if error:
                self.area.show(self.message)

    def fail(self, exc: BaseException) -> None:
        key = str(exc) if isinstance(exc, ValueError) and str(exc) in self.app.catalogue.strings["en"] else None
        if key:
            self.say(key, error=True)
        else:
            self.say("gui.error", error=True, detail=error_text(exc))

    def _show_message(self) -> None:
        key, error, values = self._message
        self.message.configure(text=self.t(key, **values) if key else "",
                               style="Error.TLabel" if error else "Info.TLabel")


def _grid_row(parent, row: int, widgets, padx, pady) -> None:
    for column, widget in enumerate(widgets):
        if widget is not None:
            widget.grid(row=row, column=column, sticky="w", padx=(0, padx), pady=pady)


class StatusPage(Page):
    title_key = "gui.tab.status"

    def build(self) -> None:
        app, f, px = self.app, self.frame, self.app.px
        self.model = StatusModel(app.service)
        self.snapshot = None
        f.columnconfigure(0, weight=1)

        top = ttk.Frame(f)
        top.grid(row=0, column=0, sticky="ew", pady=(0, px(10)))
        top.columnconfigure(1, weight=1)
        self.state_label = ttk.Label(top, style="Stopped.TLabel")
        self.state_label.grid(row=0, column=0, sticky="w")
        self.url_label = ttk.Label(top, style="Muted.TLabel")
        self.url_label.grid(row=0, column=1, sticky="w", padx=px(12))
        buttons = ttk.Frame(top)
        buttons.grid(row=0, column=2, sticky="e")
        self.start_button = app.button(buttons, "action.start", self.start, style="Accent.TButton")
        self.stop_button = app.button(buttons, "action.stop", self.stop)
        self.restart_button = app.button(buttons, "gui.restart", self.restart)
        for i, b in enumerate((self.start_button, self.stop_button, self.restart_button)):
            b.grid(row=0, column=i, padx=(px(6), 0))

        card = app.group(f, "stat.status")
        card.grid(row=1, column=0, sticky="ew")
        self.values = {}
        fields = [("gui.address", "url"), ("stat.requests", "requests"), ("col.provider", "provider"),
                  ("stat.errors", "errors"), ("col.account", "account"), ("gui.tokens", "tokens"),
                  ("gui.today", "today"), ("stat.uptime", "uptime")]
        for index, (key, name) in enumerate(fields):
            row, col = divmod(index, 2)
            if key is None:
                continue
            app.label(card, key, style="Muted.TLabel").grid(row=row, column=col * 2, sticky="w",
                                                           padx=(0 if col == 0 else px(24), px(12)), pady=px(3))
            value = ttk.Label(card, style="Value.TLabel")
            value.grid(row=row, column=col * 2 + 1, sticky="w", pady=px(3))
            self.values[name] = value
        card.columnconfigure(1, weight=1)
        card.columnconfigure(3, weight=1)

        self.cta = ttk.Frame(f, style="Notice.TFrame", padding=px(10))
        self.cta.columnconfigure(0, weight=1)
        app.label(self.cta, "gui.noCredentials", style="Notice.TLabel").grid(row=0, column=0, sticky="w")
        self.sign_in_button = app.button(self.cta, "gui.goSignIn", lambda: app.select(app.accounts_page),
                                         style="Accent.TButton")
        self.sign_in_button.grid(row=0, column=1, sticky="e", padx=(px(12), 0))

        connect = app.group(f, "gui.connect")
        connect.grid(row=3, column=0, sticky="ew", pady=(px(10), 0))
        actions = [("gui.copyBaseUrl", self.copy_base_url), ("gui.copyClaude", self.copy_claude),
                   ("gui.copyCodex", self.copy_codex), ("gui.openAdmin", lambda: self.open_page("/admin")),
                   ("gui.openDocs", lambda: self.open_page("/docs"))]
        self.connect_buttons = {}
        for i, (key, command) in enumerate(actions):
            button = self.connect_buttons[key] = app.button(connect, key, command)
            button.grid(row=i // 3, column=i % 3, sticky="ew", padx=(0, px(8)), pady=px(3))
        for column in range(3):
            connect.columnconfigure(column, weight=1, uniform="connect")
        self.message_line(f, row=4, column=0, sticky="w", pady=(px(10), 0))

        # A newer release (Service.update_notice): told, never downloaded.
        self.update_box = ttk.Frame(f, style="Notice.TFrame", padding=px(10))
        self.update_box.columnconfigure(0, weight=1)
        self.update_label = ttk.Label(self.update_box, style="Notice.TLabel")
        self.update_label.grid(row=0, column=0, sticky="w")
        app.button(self.update_box, "gui.openRelease", self.open_release).grid(row=0, column=1, sticky="e",
                                                                               padx=(px(12), 0))
        self.show(None)

    def show(self, snapshot) -> None:
        """Fill the page from a StatusModel snapshot (None: not known yet)."""
        self.snapshot = snapshot
        s = snapshot or {"running": False, "url": "", "provider": "", "account": "", "has_credentials": True,
                         "requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0, "uptime_s": None}
        running = s["running"]
        for label in (self.state_label, self.app.header_state):
            label.configure(text="● " + self.t("state.running" if running else "state.stopped"),
                            style="Running.TLabel" if running else "Stopped.TLabel")
        self.url_label.configure(text=s["url"] if running else "")
        self.values["url"].configure(text=s["url"] or "-")
        self.values["provider"].configure(text=s["provider"] or "-")
        self.values["account"].configure(text=s["account"] or self.t("gui.noAccount"))
        self.values["requests"].configure(text=format_count(s["requests"]))
        self.values["errors"].configure(text=format_count(s["errors"]))
        self.values["tokens"].configure(text="%s / %s" % (format_count(s["input_tokens"]),
                                                          format_count(s["output_tokens"])))
        self.values["uptime"].configure(text=format_uptime(s["uptime_s"], self.t) if running else "-")
        today = s.get("today")
        self.values["today"].configure(text=self.t("gui.todayValue", requests=format_count(today["requests"]),
                                                   tokens_in=format_count(today["input_tokens"]),
                                                   tokens_out=format_count(today["output_tokens"]))
                                       if today else "-")
        busy = self.app.busy_with("server")
        self.start_button.state(["disabled"] if running or busy else ["!disabled"])
        self.stop_button.state(["!disabled"] if running and not busy else ["disabled"])
        self.restart_button.state(["!disabled"] if running and not busy else ["disabled"])
        if s["has_credentials"]:
            self.cta.grid_remove()
        else:
            self.cta.grid(row=2, column=0, sticky="ew", pady=(self.app.px(10), 0))
        update = s.get("update")
        if update:
            self.update_label.configure(text=self.t("gui.updateAvailable", latest=update["latest"],
                                                    current=update["current"]))
            self.update_box.grid(row=5, column=0, sticky="ew", pady=(self.app.px(10), 0))
        else:
            self.update_box.grid_remove()

    def open_release(self) -> None:
        update = (self.snapshot or {}).get("update")
        if update:
            self.app.open_url(update["url"])

    def retranslate(self) -> None:
        self.show(self.snapshot)

    def _server_call(self, fn, starting: bool) -> None:
        self.say("gui.starting" if starting else "gui.stopping")
        self.app.run(fn, on_done=self._server_done, on_error=self._server_failed, tag="server")
        self.show(self.snapshot)

    def start(self) -> None:
        self._server_call(self.model.start, True)

    def stop(self) -> None:
        self._server_call(self.model.stop, False)

    def restart(self) -> None:
        self._server_call(self.model.restart, True)

    def _server_done(self, status) -> None:
        if status and status.get("running"):
            log.info("iflow2api %s listening on %s", iflow2api.__version__, status["url"])
            if status.get("generated_key"):
                self.say("gui.generatedKey", key=status["generated_key"])
            else:
                self.say("gui.started", url=status["url"])
        else:
            self.say("gui.stopped")
        self.app.refresh_status()

    def _server_failed(self, exc) -> None:
        self.fail(exc)
        self.app.refresh_status()

    def current_url(self) -> str:
        if self.snapshot:
            return self.snapshot["url"]
        config = self.app.service.config_get()
        return client_url(config["host"], config["port"])

    def copy_base_url(self) -> None:
        self.app.copy(openai_base_url(self.current_url()))
        self.say("copy.done")

    def copy_claude(self) -> None:
        keys_required = bool(self.snapshot and self.snapshot.get("keys_required"))
        self.app.copy(claude_code_setup(self.current_url(), keys_required))
        self.say("copy.done")

    def copy_codex(self) -> None:
        tiers = self.app.service.config_get().get("model_map") or {}
        self.app.copy(codex_config(self.current_url(), tiers.get("sonnet") or "glm-5"))
        self.say("copy.done")

    def open_page(self, path: str) -> None:
        url = self.current_url() + path
        self.app.run(lambda: self.app.open_url(url))


class AccountsPage(Page):
    title_key = "tab.accounts"

    def build(self) -> None:
        app, f, px = self.app, self.frame, self.app.px
        self.model = AccountsModel(app.service)
        self.flow = None
        f.columnconfigure(0, weight=1)
        f.rowconfigure(2, weight=1)

        oauth = app.group(f, "acc.oauthTitle")
        oauth.grid(row=0, column=0, sticky="ew")
        oauth.columnconfigure(1, weight=1)
        row0 = ttk.Frame(oauth)
        row0.grid(row=0, column=0, columnspan=3, sticky="w", pady=(0, px(6)))
        self.sign_in_button = app.button(row0, "acc.oauthStart", self.sign_in, style="Accent.TButton")
        self.sign_in_button.grid(row=0, column=0)
        self.cancel_button = app.button(row0, "action.cancel", self.cancel)
        self.cancel_button.grid(row=0, column=1, padx=px(8))
        self.cancel_button.state(["disabled"])
        app.label(row0, "acc.oauthState", style="Muted.TLabel").grid(row=0, column=2, padx=(px(8), px(4)))
        self.login_state = ttk.Label(row0, style="Value.TLabel")
        self.login_state.grid(row=0, column=3)
        app.label(oauth, "acc.oauthLink", style="Muted.TLabel").grid(row=1, column=0, sticky="w", pady=px(3))
        self.url_var = tk.StringVar()
        self.url_entry = ttk.Entry(oauth, textvariable=self.url_var, state="readonly")
        self.url_entry.grid(row=1, column=1, sticky="ew", padx=px(8))
        app.button(oauth, "action.copy", lambda: self.url_var.get() and app.copy(self.url_var.get())).grid(
            row=1, column=2, sticky="ew")
        app.label(oauth, "acc.oauthPaste", style="Muted.TLabel").grid(row=2, column=0, sticky="w", pady=px(3))
        self.paste_var = tk.StringVar()
        ttk.Entry(oauth, textvariable=self.paste_var).grid(row=2, column=1, sticky="ew", padx=px(8))
        self.paste_button = app.button(oauth, "acc.oauthSubmit", self.paste)
        self.paste_button.grid(row=2, column=2, sticky="ew")
        self.paste_button.state(["disabled"])

        keys = app.group(f, "acc.keyTitle")
        keys.grid(row=1, column=0, sticky="ew", pady=(px(10), 0))
        keys.columnconfigure(1, weight=1)
        app.label(keys, "acc.keyLabel").grid(row=0, column=0, sticky="w")
        self.key_var = tk.StringVar()
        self.key_entry = ttk.Entry(keys, textvariable=self.key_var, show="•")
        self.key_entry.grid(row=0, column=1, sticky="ew", padx=px(8))
        self.add_key_button = app.button(keys, "acc.keyAdd", self.add_key, style="Accent.TButton")
        self.add_key_button.grid(row=0, column=2, sticky="ew")
        self.extra_var = tk.BooleanVar(value=False)
        app.check(keys, "acc.extra", self.extra_var).grid(row=1, column=0, columnspan=3, sticky="w",
                                                          pady=(px(6), 0))

        listing = app.group(f, "gui.accountsList")
        listing.grid(row=2, column=0, sticky="nsew", pady=(px(10), 0))
        self.tree = app.table(listing, [("id", "col.id", 110), ("type", "col.type", 100),
                                        ("key", "col.key", 120), ("expires", "col.expires", 150),
                                        ("status", "col.status", 200)], height=4)
        bar = ttk.Frame(listing)
        bar.grid(row=1, column=0, columnspan=2, sticky="w", pady=(px(6), 0))
        self.remove_button = app.button(bar, "action.remove", self.remove)
        self.remove_button.grid(row=0, column=0)
        app.button(bar, "action.reload", self.on_show).grid(row=0, column=1, padx=px(8))
        self.message_line(f, row=3, column=0, sticky="w", pady=(px(8), 0))
        app.on_language(self._show_login_state)

    def on_show(self) -> None:
        self.app.run(self.model.accounts, on_done=self._fill, on_error=self.fail)

    def _fill(self, accounts) -> None:
        self.tree.delete(*self.tree.get_children())
        for a in accounts:
            status = a["status"] + (": " + a["message"] if a.get("message") else "")
            self.tree.insert("", "end", iid=a["id"], values=(a["id"], a["auth_type"], a["api_key"] or "-",
                                                             a["expires_at"] or "-", status))
        if not accounts:
            self.say("acc.none")

    def add_key(self, force: bool = False) -> None:
        key, extra = self.key_var.get(), self.extra_var.get()
        self.app.run(lambda: self.model.add_api_key(key, extra, force), on_done=self._key_added,
                     on_error=self._key_failed)

    def _key_failed(self, exc) -> None:
        if isinstance(exc, iflow2api.KeyRefusedError) and self.app.confirm("gui.keyRefused"):
            self.add_key(force=True)
        else:
            self.fail(exc)

    def _key_added(self, saved) -> None:
        self.key_var.set("")
        self.say("gui.keyUnchecked" if saved["check"] == "unreachable" else "acc.added", id=saved["id"])
        self.on_show()
        self.app.refresh_status()

    def remove(self) -> None:
        selected = self.tree.selection()
        if not selected or not self.app.confirm("acc.confirmRemove", id=selected[0]):
            return
        account_id = selected[0]
        self.app.run(lambda: self.model.remove(account_id),
                     on_done=lambda _ok: (self.say("acc.removed", id=account_id), self.on_show(),
                                          self.app.refresh_status()), on_error=self.fail)

    # -- OAuth --
    def sign_in(self) -> None:
        if self.flow is not None and self.flow.state == "waiting":
            self.flow.cancel()
        flow = self.flow = LoginFlow(self.app.service, add=self.extra_var.get())
        self.app.run(flow.start, on_done=lambda url: self._login_started(flow, url), on_error=self.fail)

    def _login_started(self, flow, url) -> None:
        self.url_var.set(url)
        self._show_login_state()
        self.app.run(lambda: self.app.open_url(url))
        self.app.run(flow.wait, on_done=lambda _state: self._login_ended(flow), tag="login")

    def paste(self) -> None:
        flow, text = self.flow, self.paste_var.get()
        if flow is None or flow.state != "waiting":
            return
        if not text.strip():
            self.say("acc.needPaste", error=True)
            return
        self.app.run(lambda: flow.paste(text), on_done=lambda _state: self._login_ended(flow), tag="login")

    def cancel(self) -> None:
        flow = self.flow
        if flow is not None:
            self.app.run(flow.cancel, on_done=lambda _r: self._login_ended(flow))

    def _login_ended(self, flow) -> None:
        if flow is not self.flow:
            return  # an older sign-in finishing after a new one started
        self._show_login_state()
        if flow.state == "done":
            self.paste_var.set("")
            self.say("acc.added", id=flow.account)
            self.on_show()
            self.app.refresh_status()
        elif flow.state == "error":
            self.say("gui.error", error=True, detail=flow.message)

    def _show_login_state(self) -> None:
        flow = self.flow
        state = flow.state if flow else "idle"
        texts = {"waiting": "oauth.waiting", "done": "oauth.done", "error": "oauth.error",
                 "cancelled": "gui.oauthCancelled"}
        self.login_state.configure(text=self.t(texts[state]) if state in texts else "-")
        waiting = state == "waiting"
        self.cancel_button.state(["!disabled"] if waiting else ["disabled"])
        self.paste_button.state(["!disabled"] if waiting else ["disabled"])


class ProvidersPage(Page):
    title_key = "gui.tab.providers"

    def build(self) -> None:
        app, f, px = self.app, self.frame, self.app.px
        self.model = ProvidersModel(app.service)
        self.providers = []
        f.columnconfigure(0, weight=1)
        f.rowconfigure(1, weight=1)

        add = app.group(f, "prov.add")
        add.grid(row=0, column=0, sticky="ew")
        add.columnconfigure(1, weight=1)
        app.label(add, "prov.preset").grid(row=0, column=0, sticky="w", pady=px(3))
        self.preset_var = tk.StringVar()
        self.preset_box = app.combobox(add, self.preset_var, readonly=True, width=18)
        self.preset_box.grid(row=0, column=1, sticky="w", padx=px(8))
        self.preset_box.bind("<<ComboboxSelected>>", lambda _e: self._show_notes())
        self.notes = ttk.Label(add, style="Muted.TLabel")
        self.notes.grid(row=0, column=2, columnspan=2, sticky="w")
        app.label(add, "prov.apiKey").grid(row=1, column=0, sticky="w", pady=px(3))
        self.key_var = tk.StringVar()
        ttk.Entry(add, textvariable=self.key_var, show="•").grid(row=1, column=1, columnspan=3, sticky="ew",
                                                                 padx=px(8), pady=px(3))
        app.label(add, "gui.baseUrlOptional").grid(row=2, column=0, sticky="w", pady=px(3))
        self.base_var = tk.StringVar()
        ttk.Entry(add, textvariable=self.base_var).grid(row=2, column=1, sticky="ew", padx=px(8), pady=px(3))
        self.default_var = tk.BooleanVar(value=False)  # on the base URL's row: the page must stay short
        app.check(add, "prov.makeDefault", self.default_var).grid(row=2, column=2, sticky="w", padx=(px(4), 0),
                                                                  pady=px(3))
        self.save_button = app.button(add, "prov.save", self.add, style="Accent.TButton")
        self.save_button.grid(row=2, column=3, sticky="e", padx=(px(12), px(8)), pady=px(3))

        listing = app.group(f, "gui.providersList")
        listing.grid(row=1, column=0, sticky="nsew", pady=(px(10), 0))
        self.tree = app.table(listing, [("name", "col.name", 100), ("state", "col.state", 90),
                                        ("base", "col.baseUrl", 300), ("keys", "col.keys", 150)], height=3)
        bar = ttk.Frame(listing)
        bar.grid(row=1, column=0, columnspan=2, sticky="w", pady=(px(6), 0))
        self.default_button = app.button(bar, "prov.setDefault", self.make_default)
        self.default_button.grid(row=0, column=0)
        self.remove_button = app.button(bar, "action.remove", self.remove)
        self.remove_button.grid(row=0, column=1, padx=px(8))

        # Claude Code routing, side by side: the tier map (left) and the scenario routes (right).
        routing = ttk.Frame(f)
        routing.grid(row=2, column=0, sticky="ew", pady=(px(10), 0))
        routing.columnconfigure(1, weight=1)
        tiers = app.group(routing, "gui.tiers")
        tiers.grid(row=0, column=0, sticky="nsew", padx=(0, px(10)))
        tiers.columnconfigure(1, weight=1)
        app.label(tiers, "gui.tiersIntro", style="Muted.TLabel", wraplength=px(250), justify="left").grid(
            row=0, column=0, columnspan=2, sticky="w", pady=(0, px(2)))
        self.tier_vars, self.tier_boxes = {}, {}
        for i, tier in enumerate(CLAUDE_TIERS):
            ttk.Label(tiers, text=tier.capitalize()).grid(row=1 + i, column=0, sticky="w", padx=(0, px(8)),
                                                          pady=px(3))
            var = self.tier_vars[tier] = tk.StringVar()
            box = self.tier_boxes[tier] = app.combobox(tiers, var, width=18)
            box.grid(row=1 + i, column=1, sticky="ew", pady=px(3))
        tiers.rowconfigure(4, weight=1)
        bar = ttk.Frame(tiers)
        bar.grid(row=5, column=0, columnspan=2, sticky="sw", pady=(px(6), 0))
        self.load_models_button = app.button(bar, "gui.loadModels", self.load_models)
        self.load_models_button.grid(row=0, column=0)
        self.save_tiers_button = app.button(bar, "action.save", self.save_tiers, style="Accent.TButton")
        self.save_tiers_button.grid(row=0, column=1, padx=px(8))
        self._build_scenarios(routing)
        self.models_list = None  # the model ids the combo boxes offer, once loaded
        self.message_line(f, row=3, column=0, sticky="w", pady=(px(8), 0))

    def _build_scenarios(self, parent) -> None:
        app, px = self.app, self.app.px
        group = app.group(parent, "gui.scenarios")
        group.grid(row=0, column=1, sticky="nsew")
        group.columnconfigure(2, weight=1)
        app.label(group, "gui.scenariosIntro", style="Muted.TLabel", wraplength=px(620), justify="left").grid(
            row=0, column=0, columnspan=3, sticky="w", pady=(0, px(2)))
        self.scenario_vars, self.scenario_boxes = {}, {}
        for i, scenario in enumerate(SCENARIOS):
            name_key, hint_key = SCENARIO_TEXTS[scenario]
            app.label(group, name_key).grid(row=1 + i, column=0, sticky="w", padx=(0, px(8)), pady=px(2))
            var = self.scenario_vars[scenario] = tk.StringVar()
            box = self.scenario_boxes[scenario] = app.combobox(group, var, width=22)
            box.grid(row=1 + i, column=1, sticky="w", pady=px(2))
            if scenario == "long_context":  # its threshold sits in its explanation
                hint = ttk.Frame(group)
                app.label(hint, hint_key, style="Muted.TLabel").grid(row=0, column=0, sticky="w")
                self.tokens_var = tk.StringVar()
                self.tokens_entry = ttk.Entry(hint, textvariable=self.tokens_var, width=8, justify="right")
                self.tokens_entry.grid(row=0, column=1, padx=px(6))
                app.label(hint, "gui.scenario.longContextUnit", style="Muted.TLabel").grid(row=0, column=2,
                                                                                            sticky="w")
            else:
                hint = app.label(group, hint_key, style="Muted.TLabel", wraplength=px(330), justify="left")
            hint.grid(row=1 + i, column=2, sticky="w", padx=(px(10), 0))
        bar = ttk.Frame(group)
        bar.grid(row=1 + len(SCENARIOS), column=0, columnspan=3, sticky="ew", pady=(px(6), 0))
        bar.columnconfigure(1, weight=1)
        self.save_scenarios_button = app.button(bar, "action.save", self.save_scenarios, style="Accent.TButton")
        self.save_scenarios_button.grid(row=0, column=0, sticky="w")
        self.scenario_message = ttk.Label(bar, style="Info.TLabel", wraplength=px(480), justify="left")
        self.scenario_message.grid(row=0, column=1, sticky="w", padx=(px(10), 0))
        self._scenario_said = (None, "", False)  # (catalogue key, or the server's own text), error
        app.on_language(self._show_scenario_message)

    def on_show(self) -> None:
        self.app.run(lambda: (self.model.providers(), self.model.tiers(), self.model.scenarios()),
                     on_done=self._fill, on_error=self.fail)
        if self.models_list is None and not self.app.busy_with("models"):  # once, quietly, for the combo boxes
            self.app.run(self.model.models, on_done=self._offer_models, on_error=lambda _exc: None, tag="models")

    def _fill(self, result) -> None:
        self.providers, tiers, scenarios = result
        self.preset_box.configure(values=self.model.preset_names(self.providers))
        for tier, var in self.tier_vars.items():
            var.set(tiers.get(tier, ""))
        for scenario, var in self.scenario_vars.items():
            var.set(scenarios["routes"].get(scenario, ""))
        self.tokens_var.set(scenarios["long_context_tokens"])
        self._fill_tree()
        self._show_notes()

    def _fill_tree(self) -> None:
        self.tree.delete(*self.tree.get_children())
        for p in self.providers:
            if p["configured"]:
                keys = ", ".join(p["keys"]) or (self.t("prov.noKeyNeeded") if p["keyless"] else
                                                ("$" + p["key_env"] if p["key_env"] else "-"))
                self.tree.insert("", "end", iid=p["name"], values=(p["name"], self.t(self.model.state_key(p)),
                                                                   p["base_url"], keys))

    def retranslate(self) -> None:
        self._fill_tree()

    def _show_notes(self) -> None:
        chosen = next((p for p in self.providers if p["name"] == self.preset_var.get()), None)
        self.notes.configure(text=chosen["notes"] if chosen else "")

    def add(self) -> None:
        preset, key, base, default = (self.preset_var.get(), self.key_var.get(), self.base_var.get(),
                                      self.default_var.get())
        self.app.run(lambda: self.model.add(preset, key, base, default), on_done=self._added, on_error=self.fail)

    def _added(self, provider) -> None:
        self.key_var.set("")
        self.base_var.set("")
        self.say("prov.saved", name=provider["name"])
        self.models_list = None  # its models join the combo boxes' lists
        self.on_show()
        self.app.refresh_status()

    def _selected(self):
        selected = self.tree.selection()
        return selected[0] if selected else None

    def make_default(self) -> None:
        name = self._selected()
        if name:
            self.app.run(lambda: self.model.make_default(name),
                         on_done=lambda _r: (self.say("prov.nowDefault", name=name), self.on_show(),
                                             self.app.refresh_status()), on_error=self.fail)

    def remove(self) -> None:
        name = self._selected()
        if name and name != "iflow" and self.app.confirm("prov.confirmRemove", name=name):
            self.app.run(lambda: self.model.remove(name),
                         on_done=lambda _r: (self.say("prov.removed", name=name), self.on_show()),
                         on_error=self.fail)

    def load_models(self) -> None:
        self.app.run(self.model.models, on_done=self._models_loaded, on_error=self.fail)

    def _models_loaded(self, models) -> None:
        self._offer_models(models)
        self.say("gui.modelsLoaded", n=len(models))

    def _offer_models(self, models) -> None:
        self.models_list = list(models)
        for box in list(self.tier_boxes.values()) + list(self.scenario_boxes.values()):
            box.configure(values=self.models_list)

    def save_tiers(self) -> None:
        tiers = {tier: var.get() for tier, var in self.tier_vars.items()}
        self.app.run(lambda: self.model.save_tiers(tiers), on_done=self._tiers_saved, on_error=self.fail)

    def _tiers_saved(self, errors) -> None:
        if errors:
            self.say("gui.err.choice", error=True)
        else:
            self.say("gui.tiersSaved")

    def save_scenarios(self) -> None:
        routes = {scenario: var.get() for scenario, var in self.scenario_vars.items()}
        tokens = self.tokens_var.get()
        self.app.run(lambda: self.model.save_scenarios(routes, tokens), on_done=self._scenarios_saved,
                     on_error=lambda exc: self._say_scenario(text=error_text(exc), error=True))

    def _scenarios_saved(self, result) -> None:
        errors, field = result.get("errors") or {}, result.get("field")
        marked = set(errors)  # the fields to outline in red
        if field == "long_context_tokens":
            marked.add(field)
        elif field == "scenario_routes":  # the server's message names the row
            marked.update(SCENARIOS)
        for name, widget in list(self.scenario_boxes.items()) + [("long_context_tokens", self.tokens_entry)]:
            widget.state(["invalid"] if name in marked else ["!invalid"])
        if errors:  # the first wrong field, top to bottom
            first = next(n for n in list(SCENARIOS) + ["long_context_tokens"] if n in errors)
            self._say_scenario(errors[first], error=True)
        elif "refused" in result:
            self._say_scenario(text=result["refused"], error=True)
        else:
            self._say_scenario("gui.saved")

    def _say_scenario(self, key: str = None, text: str = "", error: bool = False) -> None:
        """The message beside the scenario Save button: a catalogue key, or the server's text."""
        self._scenario_said = (key, text, error)
        self._show_scenario_message()

    def _show_scenario_message(self) -> None:
        key, text, error = self._scenario_said
        self.scenario_message.configure(text=self.t(key) if key else text,
                                        style="Error.TLabel" if error else "Info.TLabel")


class InstancesPage(Page):
    title_key = "tab.instances"

    def build(self) -> None:
        app, f, px = self.app, self.frame, self.app.px
        self.model = InstancesModel(app.service)
        self.rows = []
        f.columnconfigure(0, weight=1)
        f.rowconfigure(1, weight=1)
        app.label(f, "inst.intro", style="Muted.TLabel").grid(row=0, column=0, sticky="w", pady=(0, px(8)))
        listing = app.group(f, "inst.title")
        listing.grid(row=1, column=0, sticky="nsew")
        self.tree = app.table(listing, [("name", "col.name", 120), ("address", "col.url", 220),
                                        ("state", "col.state", 100), ("requests", "col.requests", 90),
                                        ("errors", "col.errors", 90)], height=6)
        bar = ttk.Frame(listing)
        bar.grid(row=1, column=0, columnspan=2, sticky="w", pady=(px(6), 0))
        self.buttons = {}
        for i, (key, command) in enumerate([("action.start", self.start), ("action.stop", self.stop),
                                            ("action.remove", self.remove), ("action.reload", self.on_show)]):
            self.buttons[key] = app.button(bar, key, command)
            self.buttons[key].grid(row=0, column=i, padx=(0, px(8)))

        add = app.group(f, "inst.add")
        add.grid(row=2, column=0, sticky="ew", pady=(px(10), 0))
        self.name_var, self.host_var, self.port_var = tk.StringVar(), tk.StringVar(value="127.0.0.1"), tk.StringVar()
        for i, (key, var, width) in enumerate([("col.name", self.name_var, 16), ("inst.host", self.host_var, 16),
                                               ("inst.port", self.port_var, 8)]):
            app.label(add, key).grid(row=0, column=i * 2, sticky="w", padx=(0 if i == 0 else px(12), px(6)))
            ttk.Entry(add, textvariable=var, width=width).grid(row=0, column=i * 2 + 1, sticky="w")
        self.add_button = app.button(add, "inst.addButton", self.add, style="Accent.TButton")
        self.add_button.grid(row=0, column=6, padx=(px(12), 0))
        app.label(add, "inst.hostHint", style="Muted.TLabel", wraplength=px(720), justify="left").grid(
            row=1, column=0, columnspan=7, sticky="w", pady=(px(6), 0))
        self.message_line(f, row=3, column=0, sticky="w", pady=(px(8), 0))

    def on_show(self) -> None:
        self.app.run(self.model.instances, on_done=self._fill, on_error=self.fail)

    def _fill(self, rows) -> None:
        self.rows = rows
        selected = self.tree.selection()
        self.tree.delete(*self.tree.get_children())
        for i in rows:
            address = i.get("url") or "%s:%s" % (i.get("host"), i.get("port"))
            self.tree.insert("", "end", iid=i["name"], values=(
                i["name"], address, self.t("state.running" if i.get("running") else "state.stopped"),
                format_count(i.get("requests")), format_count(i.get("errors"))))
        keep = [name for name in selected if self.tree.exists(name)]
        if keep:
            self.tree.selection_set(keep)

    def retranslate(self) -> None:
        self._fill(self.rows)

    def _selected(self):
        selected = self.tree.selection()
        return selected[0] if selected else None

    def add(self) -> None:
        name, host, port = self.name_var.get().strip(), self.host_var.get().strip(), self.port_var.get().strip()
        errors = self.model.validate(name, host, port)
        if errors:
            self.say(next(iter(errors.values())), error=True)
            return
        self.app.run(lambda: self.model.add(name, host, port), on_done=self._added, on_error=self.fail)

    def _added(self, status) -> None:
        self.name_var.set("")
        self.port_var.set("")
        self.say("inst.added", name=status["name"], url=status.get("url", ""))
        self.on_show()

    def _act(self, method, done_key, confirm_key=None) -> None:
        name = self._selected()
        if not name or (confirm_key and not self.app.confirm(confirm_key, name=name)):
            return

        def done(_result):
            self.say(done_key, name=name)
            self.on_show()
            self.app.refresh_status()
        self.app.run(lambda: method(name), on_done=done, on_error=self.fail)

    def start(self) -> None:
        self._act(self.model.start, "inst.started")

    def stop(self) -> None:
        self._act(self.model.stop, "inst.stopped")

    def remove(self) -> None:
        if self._selected() == "default":
            return
        self._act(self.model.remove, "inst.removed", "inst.confirmRemove")


class SettingsPage(Page):
    title_key = "gui.tab.settings"

    def build(self) -> None:
        app, f, px = self.app, self.frame, self.app.px
        self.model = SettingsModel(app.service, app.autostart)
        self.vars, self.errors, self.choices = {}, {}, {}
        f.columnconfigure(0, weight=1, uniform="settings")
        f.columnconfigure(1, weight=1, uniform="settings")

        server = app.group(f, "gui.serverGroup")
        server.grid(row=0, column=0, sticky="nsew", padx=(0, px(8)))
        server.columnconfigure(1, weight=1)
        self._entry(server, 0, "host", "gui.host")
        self._entry(server, 1, "port", "gui.port", width=8)
        self._entry(server, 2, "concurrency", "gui.concurrency", width=8)
        self._check(server, 3, "upstream_proxy_enabled", "gui.proxyEnabled")
        self._entry(server, 4, "upstream_proxy", "gui.proxy")
        self._choice(server, 5, "preserve_reasoning_content", "gui.reasoning",
                     [(False, "gui.reasoning.strip"), (True, "gui.reasoning.preserve")])
        self.host_hint = ttk.Label(server, style="Muted.TLabel", wraplength=px(330), justify="left")
        self.host_hint.grid(row=100, column=0, columnspan=2, sticky="w")

        desktop = app.group(f, "gui.desktopGroup")
        desktop.grid(row=0, column=1, sticky="nsew")
        desktop.columnconfigure(1, weight=1)
        self._choice(desktop, 0, "theme_mode", "gui.theme",
                     [("system", "theme.system"), ("light", "theme.light"), ("dark", "theme.dark")],
                     on_pick=self._theme_picked)
        self._choice(desktop, 1, "language", "gui.language", [(code, None) for code in LANGUAGES],
                     on_pick=self._language_picked)
        self._choice(desktop, 2, "close_action", "gui.closeAction",
                     [("minimize_to_tray", "gui.close.minimize_to_tray"), ("quit", "gui.close.quit")])
        self._check(desktop, 3, "start_minimized", "gui.startMinimized")
        self._check(desktop, 4, "auto_start", "gui.autostart")
        self._check(desktop, 5, "auto_run_server", "gui.autoRun")
        self.tray_note = ttk.Label(desktop, style="Muted.TLabel", wraplength=px(330), justify="left")
        self.tray_note.grid(row=100, column=0, columnspan=2, sticky="w", pady=(px(6), 0))
        app.on_language(lambda: self.tray_note.configure(
            text=self.t("gui.trayActive" if app.tray else "gui.trayMissing")))

        keys = app.group(f, "keys.title")
        keys.grid(row=1, column=0, columnspan=2, sticky="nsew", pady=(px(10), 0))
        keys.columnconfigure(0, weight=1)
        app.label(keys, "keys.intro", style="Muted.TLabel", wraplength=px(700), justify="left").grid(
            row=0, column=0, columnspan=2, sticky="w")
        self.keys_tree = app.table(keys, [("id", "col.id", 140), ("key", "col.key", 200)], height=3, row=1)
        bar = ttk.Frame(keys)
        bar.grid(row=2, column=0, columnspan=2, sticky="ew", pady=(px(6), 0))
        bar.columnconfigure(2, weight=1)
        self.create_key_button = app.button(bar, "keys.create", self.create_key)
        self.create_key_button.grid(row=0, column=0)
        self.revoke_key_button = app.button(bar, "keys.revoke", self.revoke_key)
        self.revoke_key_button.grid(row=0, column=1, padx=px(8))
        self.new_key_var = tk.StringVar()
        self.new_key = ttk.Entry(bar, textvariable=self.new_key_var, state="readonly")
        self.new_key.grid(row=0, column=2, sticky="ew")

        bottom = ttk.Frame(f)
        bottom.grid(row=2, column=0, columnspan=2, sticky="ew", pady=(px(10), 0))
        bottom.columnconfigure(1, weight=1)
        self.save_button = app.button(bottom, "action.save", self.save, style="Accent.TButton")
        self.save_button.grid(row=0, column=0, sticky="w")
        self.message_line(bottom, row=0, column=1, sticky="w", padx=px(12))
        app.on_language(self._show_errors)

    # -- form building --
    # Field n sits in grid row 2n; its error line (hidden until needed) in row 2n + 1.
    def _error_label(self, parent, row, name) -> None:
        label = ttk.Label(parent, style="Error.TLabel", wraplength=self.app.px(300), justify="left")
        label.grid(row=2 * row + 1, column=1, sticky="w", pady=(0, self.app.px(3)))
        label.grid_remove()
        self.errors[name] = [label, None]

    def _entry(self, parent, row, name, key, width=None) -> None:
        px = self.app.px
        self.app.label(parent, key).grid(row=2 * row, column=0, sticky="w", pady=px(3), padx=(0, px(8)))
        var = self.vars[name] = tk.StringVar()
        entry = ttk.Entry(parent, textvariable=var, width=width or 24)
        entry.grid(row=2 * row, column=1, sticky="w" if width else "ew", pady=px(3))
        self._error_label(parent, row, name)

    def _check(self, parent, row, name, key) -> None:
        var = self.vars[name] = tk.BooleanVar()
        self.app.check(parent, key, var).grid(row=2 * row, column=0, columnspan=2, sticky="w",
                                              pady=self.app.px(3))

    def _choice(self, parent, row, name, key, options, on_pick=None) -> None:
        px = self.app.px
        self.app.label(parent, key).grid(row=2 * row, column=0, sticky="w", pady=px(3), padx=(0, px(8)))
        var = tk.StringVar()
        box = self.app.combobox(parent, var, readonly=True, width=26)
        box.grid(row=2 * row, column=1, sticky="w", pady=px(3))
        self.choices[name] = (box, var, options)
        self.vars[name] = var
        self._error_label(parent, row, name)
        if on_pick:
            box.bind("<<ComboboxSelected>>", lambda _e: on_pick(self._choice_value(name)))
        self.app.on_language(lambda: self._label_choices(name))

    def _choice_label(self, value, label_key) -> str:
        return LANGUAGE_NAMES[value] if label_key is None else self.t(label_key)

    def _label_choices(self, name) -> None:
        box, var, options = self.choices[name]
        current = self._choice_value(name) if var.get() else None
        box.configure(values=[self._choice_label(v, k) for v, k in options])
        if current is not None:
            self._set_choice(name, current)

    def _set_choice(self, name, value) -> None:
        box, var, options = self.choices[name]
        for v, k in options:
            if v == value:
                var.set(self._choice_label(v, k))

    def _choice_value(self, name):
        box, var, options = self.choices[name]
        labels = [self._choice_label(v, k) for v, k in options]
        return options[labels.index(var.get())][0] if var.get() in labels else None

    # -- data --
    def on_show(self) -> None:
        self.app.run(lambda: (self.model.load(), self.model.client_keys()), on_done=self._fill, on_error=self.fail)

    def _fill(self, result) -> None:
        form, keys = result
        # What the window shows now (a language from the OS locale, a theme just picked) wins.
        form["language"], form["theme_mode"] = self.app.catalogue.language, self.app.theme_mode
        for name, var in self.vars.items():
            if name in self.choices:
                self._set_choice(name, form.get(name))
            elif isinstance(var, tk.BooleanVar):
                var.set(bool(form.get(name)))
            else:
                var.set(str(form.get(name) if form.get(name) is not None else ""))
        self._fill_keys(keys)
        self._update_host_hint()

    def _fill_keys(self, keys) -> None:
        self.keys_tree.delete(*self.keys_tree.get_children())
        for k in keys:
            self.keys_tree.insert("", "end", iid=k["id"], values=(k["id"], k["masked"]))

    def form(self) -> dict:
        out = {}
        for name, var in self.vars.items():
            out[name] = self._choice_value(name) if name in self.choices else var.get()
        return out

    def save(self) -> None:
        form = self.form()
        self.app.run(lambda: self.model.save(form), on_done=self._saved, on_error=self.fail)

    def _saved(self, result) -> None:
        for name in self.errors:
            self.errors[name][1] = result["errors"].get(name)
        self._show_errors()
        if result["errors"]:
            self.say("gui.fixErrors", error=True)
            return
        self.say("gui.savedRestart" if result["restart"] and self.app.server_running() else "gui.saved")
        self.app.reload_preferences()
        self._update_host_hint()

    def _show_errors(self) -> None:
        for label, key in self.errors.values():
            if key:
                label.configure(text=self.t(key))
                label.grid()
            else:
                label.grid_remove()

    def _update_host_hint(self) -> None:
        host = self.vars["host"].get().strip()
        self.host_hint.configure(text="" if not host or is_loopback(host) else self.t("gui.hostWarning"))

    def _theme_picked(self, mode) -> None:
        self.app.set_theme(mode)

    def _language_picked(self, language) -> None:
        self.app.set_language(language)

    def create_key(self) -> None:
        self.app.run(self.model.create_client_key, on_done=self._key_created, on_error=self.fail)

    def _key_created(self, created) -> None:
        self.new_key_var.set(created["key"])
        self.say("keys.once")
        self.app.run(self.model.client_keys, on_done=self._fill_keys)

    def revoke_key(self) -> None:
        selected = self.keys_tree.selection()
        if not selected or not self.app.confirm("keys.confirmRevoke", id=selected[0]):
            return
        key_id = selected[0]
        self.app.run(lambda: self.model.revoke_client_key(key_id),
                     on_done=lambda _r: (self.say("keys.revoked", id=key_id), self.new_key_var.set(""),
                                         self.app.run(self.model.client_keys, on_done=self._fill_keys)),
                     on_error=self.fail)


class LogPage(Page):
    title_key = "gui.tab.log"

    def build(self) -> None:
        app, f, px = self.app, self.frame, self.app.px
        self.model = LogModel(app.service)
        self.shown = None
        f.columnconfigure(0, weight=1)
        f.rowconfigure(1, weight=1)
        bar = ttk.Frame(f)
        bar.grid(row=0, column=0, sticky="ew", pady=(0, px(8)))
        app.label(bar, "gui.logLevel").grid(row=0, column=0, padx=(0, px(6)))
        self.level_var = tk.StringVar()
        self.level_box = app.combobox(bar, self.level_var, readonly=True, width=10)
        self.level_box.grid(row=0, column=1)
        self.level_box.bind("<<ComboboxSelected>>", lambda _e: self._level_picked())
        self.follow_var = tk.BooleanVar(value=True)
        app.check(bar, "gui.logFollow", self.follow_var).grid(row=0, column=2, padx=px(12))
        self.copy_button = app.button(bar, "action.copy", self.copy)
        self.copy_button.grid(row=0, column=3)
        app.on_language(self._label_levels)

        box = ttk.Frame(f)
        box.grid(row=1, column=0, sticky="nsew")
        box.columnconfigure(0, weight=1)
        box.rowconfigure(0, weight=1)
        self.text = tk.Text(box, wrap="none", height=20, width=100, font="TkFixedFont", borderwidth=0,
                            highlightthickness=1, padx=px(6), pady=px(4))
        app.register_tk(self.text)
        self.text.grid(row=0, column=0, sticky="nsew")
        scroll = ttk.Scrollbar(box, orient="vertical", command=self.text.yview)
        scroll.grid(row=0, column=1, sticky="ns")
        hscroll = ttk.Scrollbar(box, orient="horizontal", command=self.text.xview)
        hscroll.grid(row=1, column=0, sticky="ew")
        self.text.configure(yscrollcommand=scroll.set, xscrollcommand=hscroll.set, state="disabled")
        self.message_line(f, row=2, column=0, sticky="w", pady=(px(6), 0))

    def _label_levels(self) -> None:
        self.level_box.configure(values=[self.t("gui.logAll")] + list(LOG_LEVELS))
        self.level_var.set(self.model.level or self.t("gui.logAll"))

    def _level_picked(self) -> None:
        value = self.level_var.get()
        self.model.level = value if value in LOG_LEVELS else ""
        self.shown = None
        self.on_show()

    def on_show(self) -> None:
        self.app.run(self.model.lines, on_done=self.show)

    def show(self, lines) -> None:
        if lines == self.shown:
            return
        self.shown = lines
        self.text.configure(state="normal")
        self.text.delete("1.0", "end")
        self.text.insert("end", "\n".join(lines))
        self.text.configure(state="disabled")
        if self.follow_var.get():
            self.text.see("end")

    def copy(self) -> None:
        self.app.copy("\n".join(self.shown or []))
        self.say("copy.done")


class App:
    """The main window: header, notebook of pages, theme, language, tray, timers."""

    POLL_BUSY_MS, POLL_IDLE_MS = 100, 400
    STATUS_VISIBLE_MS, STATUS_HIDDEN_MS, LOG_MS = 2000, 10000, 1000

    def __init__(self, root, service, inbox=None, single_instance=None, autostart=None, prefers_dark=None,
                 open_url=None, tray: bool = True, minimized: bool = False, run_server: bool = False,
                 _test: bool = False):
        self.root, self.service, self._test = root, service, _test
        self.inbox = inbox or queue.Queue()
        self.single_instance, self.autostart = single_instance, autostart
        self.prefers_dark = prefers_dark or system_prefers_dark
        self.open_url = open_url or webbrowser.open
        self.pending, self.tags = 0, {}
        self._setters, self._tk_widgets, self._comboboxes = [], [], []
        self._status_busy, self._closing, self.tray, self.tray_reason = False, False, None, ""
        self.tray_menu = self._pump_after = self._tick_after = None
        self.confirm_answer = True  # what confirm() says in _test mode

        config = service.config_get()
        server_log = logging.getLogger("iflow2api")
        if server_log.level == logging.NOTSET:  # the Log page shows INFO lines (root would drop them)
            level = str(config.get("log_level") or "INFO").upper()
            server_log.setLevel(getattr(logging, level, logging.INFO))
        chosen = config.get("language") if "language" in configured_keys(service) else None
        self.catalogue = Catalogue(chosen if chosen in LANGUAGES else default_language(
            windows_language_id=_windows_language_id() if sys.platform == "win32" else None))
        self.theme_mode = config.get("theme_mode") if config.get("theme_mode") in THEME_MODES else "system"
        self.close_action = config.get("close_action")

        self.scale = float(root.tk.call("tk", "scaling")) / (96.0 / 72.0)
        self.style = ttk.Style(root)
        self.style.theme_use("clam")
        self._setup_fonts()
        self._build()
        self.set_language(self.catalogue.language, save=False)
        self.apply_theme()
        if tray:
            self._start_tray()
        root.protocol("WM_DELETE_WINDOW", self.on_close)
        self._fix_size()
        self._schedule_pump(self.POLL_IDLE_MS)
        self.refresh_status()
        if run_server or config.get("auto_run_server"):
            self.status_page.start()
        if minimized or config.get("start_minimized"):
            self.hide()

    # -- helpers the pages use --
    def t(self, key: str, **values) -> str:
        return self.catalogue.t(key, **values)

    def px(self, n: float) -> int:
        """n pixels at 96 dpi, scaled like the fonts (HiDPI, tk scaling)."""
        return int(round(n * self.scale))

    def on_language(self, setter) -> None:
        """Run setter now and again whenever the language changes."""
        setter()
        self._setters.append(setter)

    def tr(self, widget, key: str, option: str = "text"):
        self.on_language(lambda: widget.configure(**{option: self.t(key)}))
        return widget

    def label(self, parent, key: str, **options):
        return self.tr(ttk.Label(parent, **options), key)

    def button(self, parent, key: str, command, style: str = "TButton"):
        return self.tr(ttk.Button(parent, command=command, style=style), key)

    def check(self, parent, key: str, variable):
        return self.tr(ttk.Checkbutton(parent, variable=variable), key)

    def group(self, parent, key: str):
        return self.tr(ttk.Labelframe(parent, padding=(self.px(12), self.px(6), self.px(12), self.px(10))), key)

    def combobox(self, parent, variable, readonly: bool = False, width: int = 20):
        box = ttk.Combobox(parent, textvariable=variable, width=width, state="readonly" if readonly else "normal")
        self._comboboxes.append(box)
        return box

    def table(self, parent, columns, height: int = 5, row: int = 0):
        """A Treeview with a scroll bar; columns are (id, heading key, width at 96 dpi)."""
        tree = ttk.Treeview(parent, columns=[c[0] for c in columns], show="headings", height=height,
                            selectmode="browse")
        for column, key, width in columns:
            tree.column(column, width=self.px(width), minwidth=self.px(50), stretch=True, anchor="w")
            self.on_language(lambda c=column, k=key: tree.heading(c, text=self.t(k), anchor="w"))
        tree.grid(row=row, column=0, sticky="nsew")
        scroll = ttk.Scrollbar(parent, orient="vertical", command=tree.yview)
        scroll.grid(row=row, column=1, sticky="ns")
        tree.configure(yscrollcommand=scroll.set)
        parent.columnconfigure(0, weight=1)
        parent.rowconfigure(row, weight=1)
        return tree

    def register_tk(self, widget) -> None:
        """A plain tk widget (Text, Menu) that the theme colours by hand."""
        self._tk_widgets.append(widget)

    def copy(self, text: str) -> None:
        self.root.clipboard_clear()
        self.root.clipboard_append(text)

    def confirm(self, key: str, **values) -> bool:
        if self._test:
            return self.confirm_answer
        return messagebox.askyesno("iflow2api", self.t(key, **values), parent=self.root)

    def select(self, page) -> None:
        self.notebook.select(page.tab)

    # -- work in threads --
    def run(self, fn, on_done=None, on_error=None, tag: str = None) -> None:
        """Call fn in a worker thread; on_done(result) / on_error(exc) run later on the Tk thread."""
        self.pending += 1
        if tag:
            self.tags[tag] = self.tags.get(tag, 0) + 1

        def work():
            try:
                result, failed = fn(), False
            except Exception as exc:  # reported on the page, never a crash of the window
                result, failed = exc, True
                if not isinstance(exc, (iflow2api.Iflow2apiError, OSError, ValueError)):
                    log.exception("GUI task failed")
            self.inbox.put((self._finished, (tag, on_error if failed else on_done, result, failed)))
        threading.Thread(target=work, name="iflow2api-gui-task", daemon=True).start()
        self._schedule_pump(self.POLL_BUSY_MS)  # results come back soon: look sooner

    def busy_with(self, tag: str) -> bool:
        return self.tags.get(tag, 0) > 0

    def _finished(self, tag, callback, result, failed) -> None:
        self.pending -= 1
        if tag:
            self.tags[tag] -= 1
        if callback is not None:
            callback(result)
        elif failed:
            log.warning("GUI task failed: %s", error_text(result))

    def post(self, action, *args) -> None:
        """From any thread: run a named action or callable on the Tk thread."""
        self.inbox.put((action, args))

    def _pump_once(self) -> None:
        while True:
            try:
                target, args = self.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                if callable(target):
                    target(*args)
                else:
                    self.do(target)
            except Exception:
                log.exception("GUI event failed")

    def _schedule_pump(self, delay_ms: int) -> None:
        if self._pump_after is not None:
            self.root.after_cancel(self._pump_after)
        self._pump_after = None if self._closing else self.root.after(delay_ms, self._pump)

    def _pump(self) -> None:
        self._pump_after = None
        self._pump_once()
        self._schedule_pump(self.POLL_BUSY_MS if self.pending else self.POLL_IDLE_MS)

    def settle(self, timeout_s: float = 10.0) -> None:
        """Tests: process events until no work is pending (or timeout_s passed)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            self.root.update()
            self._pump_once()
            if self.pending <= self.tags.get("login", 0) and self.inbox.empty():  # a sign-in may wait minutes
                self.root.update()
                return
            time.sleep(0.01)
        raise TimeoutError("GUI work still pending after %.0f s" % timeout_s)

    # -- actions (tray menu, second launch) --
    def do(self, action: str) -> None:
        if action == "show":
            self.show()
        elif action == "toggle" and self.is_visible():
            self.hide()
        elif action == "toggle":
            self.show()
        elif action == "start":
            self.status_page.start()
        elif action == "stop":
            self.status_page.stop()
        elif action == "admin":
            self.status_page.open_page("/admin")
        elif action == "copy_url":
            self.status_page.copy_base_url()
        elif action == "quit":
            self.quit()
        elif action == "popup":
            self.popup_tray_menu()

    def popup_tray_menu(self) -> None:
        """The tray menu drawn by Tk, for tray backends that have no menus (X11)."""
        if self.tray_menu is not None:
            self.tray_menu.unpost()
        menu = self.tray_menu = tk.Menu(self.root, tearoff=False)
        self._color_tk(menu)
        for label, action in self.tray.menu_entries():
            menu.add_command(label=label, command=lambda a=action: self.do(a))
        x, y = self.root.winfo_pointerxy()
        menu.tk_popup(x, y)

    def is_visible(self) -> bool:
        return self.root.state() == "normal"

    def show(self) -> None:
        self.root.deiconify()
        self.root.lift()
        self.root.attributes("-topmost", True)  # some window managers only raise this way
        self.root.attributes("-topmost", False)
        self.root.focus_force()
        self.refresh_status()

    def hide(self) -> None:
        if self.tray is not None and self.tray.is_docked():
            self.root.withdraw()
        else:
            self.root.iconify()

    def on_close(self) -> None:
        if self.close_action == "minimize_to_tray" and self.tray is not None and self.tray.is_docked():
            self.hide()
        elif not self.server_running() or self.confirm("gui.confirmQuit"):
            self.quit()

    def quit(self) -> None:
        self._closing = True
        for after_id in (self._pump_after, self._tick_after):  # no timer may outlive the window
            if after_id is not None:
                self.root.after_cancel(after_id)
        if self.tray is not None:
            self.tray.stop()
        if self.single_instance is not None:
            self.single_instance.release()
        try:
            self.root.withdraw()
        except tk.TclError:
            pass
        if not self._test:
            self.service.stop(timeout_s=2.0)
            self.root.destroy()

    def server_running(self) -> bool:
        snap = self.status_page.snapshot
        return bool(snap and snap["running"])

    # -- status timer --
    def refresh_status(self) -> None:
        if self._status_busy or self._closing:
            return
        self._status_busy = True
        self.run(self.status_page.model.snapshot, on_done=self._status_arrived, on_error=self._status_failed)

    def _status_arrived(self, snapshot) -> None:
        self._status_busy = False
        self.status_page.show(snapshot)
        if self.tray is not None:
            self.run(lambda: self.tray.update(snapshot["running"], snapshot["url"]))
        current = self.current_page()
        if current is self.instances_page:
            current.on_show()

    def _status_failed(self, exc) -> None:
        self._status_busy = False
        log.warning("status: %s", error_text(exc))

    def _tick(self) -> None:
        """Refresh what is visible: status every 2 s (10 s when hidden), the log every 1 s."""
        if self._closing:
            return
        visible = self.is_visible()
        page = self.current_page() if visible else None
        if page is not None:
            page.area.fit()
        if page is self.log_page:
            self.log_page.on_show()
        self._ticks = getattr(self, "_ticks", 0) + 1
        every = (self.STATUS_VISIBLE_MS if visible else self.STATUS_HIDDEN_MS) // self.LOG_MS
        if self._ticks % every == 0:
            self.refresh_status()
        self._tick_after = self.root.after(self.LOG_MS, self._tick)

    def current_page(self):
        selected = self.notebook.select()
        return next((p for p in self.pages if str(p.tab) == selected), None)

    # -- building --
    def _setup_fonts(self) -> None:
        names = ("TkDefaultFont", "TkTextFont", "TkMenuFont", "TkHeadingFont", "TkCaptionFont",
                 "TkSmallCaptionFont", "TkIconFont", "TkTooltipFont")
        self.fonts = {name: tkfont.nametofont(name) for name in names}
        self.base_family = self.fonts["TkDefaultFont"].actual("family")
        # Point sizes (positive) follow tk scaling; Tk's X11 defaults are pixels and would not.
        self.font_sizes = {"TkDefaultFont": 10, "TkTextFont": 10, "TkMenuFont": 10, "TkHeadingFont": 10,
                           "TkCaptionFont": 10, "TkSmallCaptionFont": 9, "TkIconFont": 10, "TkTooltipFont": 9}
        self.fonts["IflowTitle"] = tkfont.Font(root=self.root, name="IflowTitle", size=15, weight="bold")
        self.fonts["IflowBig"] = tkfont.Font(root=self.root, name="IflowBig", size=12, weight="bold")
        self.fonts["IflowBold"] = tkfont.Font(root=self.root, name="IflowBold", size=10, weight="bold")
        tkfont.nametofont("TkFixedFont").configure(size=9)

    def _build(self) -> None:
        root, px = self.root, self.px
        root.title("iflow2api " + iflow2api.__version__)
        self._set_window_icon()
        outer = ttk.Frame(root)
        outer.pack(fill="both", expand=True)
        header = ttk.Frame(outer, padding=(px(16), px(12), px(16), px(4)))
        header.pack(fill="x")
        if getattr(self, "icon_small", None) is not None:
            ttk.Label(header, image=self.icon_small).pack(side="left", padx=(0, px(10)))
        ttk.Label(header, text="iflow2api", style="Title.TLabel").pack(side="left")
        ttk.Label(header, text=iflow2api.__version__, style="Muted.TLabel").pack(side="left", padx=px(8),
                                                                                pady=(px(6), 0))
        self.header_state = ttk.Label(header, style="Stopped.TLabel")
        self.header_state.pack(side="right")
        self.notebook = ttk.Notebook(outer)
        self.notebook.pack(fill="both", expand=True, padx=px(12), pady=(px(4), px(12)))
        self.status_page = StatusPage(self)
        self.accounts_page = AccountsPage(self)
        self.providers_page = ProvidersPage(self)
        self.instances_page = InstancesPage(self)
        self.settings_page = SettingsPage(self)
        self.log_page = LogPage(self)
        self.pages = [self.status_page, self.accounts_page, self.providers_page, self.instances_page,
                      self.settings_page, self.log_page]
        for page in self.pages:
            self.notebook.add(page.tab)
            self.on_language(lambda p=page: self.notebook.tab(p.tab, text=self.t(p.title_key)))
        self.notebook.bind("<<NotebookTabChanged>>", lambda _e: self._page_changed())
        self._tick_after = self.root.after(self.LOG_MS, self._tick)

    def _fix_size(self) -> None:
        """Size the window once, to fit the widest language, so switching never clips or
        jumps; but never beyond the screen: the pages scroll instead."""
        language, sizes = self.catalogue.language, []
        for candidate in LANGUAGES:
            self.set_language(candidate, save=False)
            self.root.update_idletasks()
            for page in self.pages:
                page.area.match_content()
            self.root.update_idletasks()
            sizes.append((self.root.winfo_reqwidth(), self.root.winfo_reqheight()))
        self.set_language(language, save=False)
        natural = max(w for w, _h in sizes), max(h for _w, h in sizes)
        screen = self.root.winfo_screenwidth(), self.root.winfo_screenheight()
        width, height = window_size(natural, screen, [self.px(m) for m in SCREEN_MARGIN],
                                    self.status_page.area.bar.winfo_reqwidth())
        self.root.minsize(width, min(height, self.px(MIN_WINDOW_HEIGHT)))
        self.root.geometry("%dx%d" % (width, height))

    def _page_changed(self) -> None:
        page = self.current_page()
        if page is not None and page is not self.status_page:
            page.on_show()

    def _set_window_icon(self) -> None:
        try:
            data = base64.b64encode(read_resource("static/icon.png"))
            self.icon_image = tk.PhotoImage(master=self.root, data=data)
        except (OSError, KeyError, tk.TclError):  # no icon file in this build: Tk's default icon
            self.icon_image = self.icon_small = None
            return
        factor = max(1, int(round(self.icon_image.width() / (28 * self.scale))))
        self.icon_small = self.icon_image.subsample(factor)
        self.root.iconphoto(True, self.icon_image, self.icon_image.subsample(4))

    def _start_tray(self) -> None:
        modules, self.tray_reason = load_tray_modules()
        if modules is None:
            log.info("no tray icon (%s); pip install pystray pillow", self.tray_reason)
            return
        try:
            tray = TrayIcon(modules, read_resource("static/icon.png"), self.post, self.t)
            tray.start()
            self.tray = tray
        except Exception as exc:  # a backend that imports but cannot run (no tray host)
            self.tray_reason = error_text(exc)
            log.info("no tray icon: %s", self.tray_reason)

    # -- language and theme --
    def set_language(self, language: str, save: bool = True) -> None:
        self.catalogue.language = language if language in LANGUAGES else "en"
        family = pick_font_family(self.catalogue.language, tkfont.families(self.root), self.base_family)
        for name, font in self.fonts.items():
            font.configure(family=family, **({"size": self.font_sizes[name]} if name in self.font_sizes else {}))
        self.style.configure("Treeview", rowheight=self.fonts["TkDefaultFont"].metrics("linespace") + self.px(8))
        for setter in self._setters:
            setter()
        for page in self.pages:
            page.retranslate()
        self.root.update_idletasks()
        for page in self.pages:
            page.area.fit()
        if self.tray is not None:
            self.run(self.tray.refresh_texts)
        if save:
            self.run(lambda: self.settings_page.model.set_now("language", self.catalogue.language))

    def set_theme(self, mode: str, save: bool = True) -> None:
        self.theme_mode = mode if mode in THEME_MODES else "system"
        self.apply_theme()
        if save:
            self.run(lambda: self.settings_page.model.set_now("theme_mode", self.theme_mode))

    def reload_preferences(self) -> None:
        """After Settings were saved: pick up close action (theme and language apply live)."""
        config = self.service.config_get()
        self.close_action = config.get("close_action")

    def apply_theme(self) -> None:
        self.theme_name = resolve_theme(self.theme_mode, self.prefers_dark)
        p = self.palette = PALETTES[self.theme_name]
        s, px = self.style, self.px
        flat = {"lightcolor": p["bg"], "darkcolor": p["bg"], "bordercolor": p["border"]}
        s.configure(".", background=p["bg"], foreground=p["fg"], fieldbackground=p["field"],
                    troughcolor=p["surface2"], selectbackground=p["accent"], selectforeground=p["accent_fg"],
                    insertcolor=p["fg"], focuscolor=p["accent"], arrowcolor=p["fg"], font="TkDefaultFont", **flat)
        s.map(".", foreground=[("disabled", p["disabled"])])
        s.configure("TFrame", background=p["bg"])
        s.configure("Notice.TFrame", background=p["accent_soft"])
        s.configure("TLabel", background=p["bg"], foreground=p["fg"])
        s.configure("Notice.TLabel", background=p["accent_soft"], foreground=p["fg"])
        s.configure("Muted.TLabel", foreground=p["muted"])
        s.configure("Title.TLabel", font="IflowTitle")
        s.configure("Value.TLabel", font="IflowBold")
        s.configure("Running.TLabel", foreground=p["ok"], font="IflowBig")
        s.configure("Stopped.TLabel", foreground=p["muted"], font="IflowBig")
        s.configure("Info.TLabel", foreground=p["ok"])
        s.configure("Error.TLabel", foreground=p["bad"])
        s.configure("TLabelframe", background=p["bg"], borderwidth=1, relief="solid", **flat)
        s.configure("TLabelframe.Label", background=p["bg"], foreground=p["fg"], font="IflowBold")
        s.configure("TSeparator", background=p["border"])
        button = {"background": p["surface2"], "lightcolor": p["surface2"], "darkcolor": p["surface2"]}
        s.configure("TButton", foreground=p["fg"], bordercolor=p["border"], padding=(px(10), px(4)),
                    anchor="center", **button)
        hover = [("pressed", p["border"]), ("active", p["accent_soft"])]
        s.map("TButton", background=[("disabled", p["bg"])] + hover,
              lightcolor=[("disabled", p["bg"])] + hover, darkcolor=[("disabled", p["bg"])] + hover,
              foreground=[("disabled", p["disabled"])], bordercolor=[("focus", p["accent"])])
        accent = {"background": p["accent"], "lightcolor": p["accent"], "darkcolor": p["accent"]}
        s.configure("Accent.TButton", foreground=p["accent_fg"], bordercolor=p["accent"], **accent)
        strong = [("pressed", p["fg"] if self.theme_name == "dark" else "#1e4fc4"),
                  ("active", "#7aa3f3" if self.theme_name == "dark" else "#3b74f0")]
        s.map("Accent.TButton", background=[("disabled", p["surface2"])] + strong,
              lightcolor=[("disabled", p["surface2"])] + strong, darkcolor=[("disabled", p["surface2"])] + strong,
              foreground=[("disabled", p["disabled"])], bordercolor=[("disabled", p["border"])])
        field = {"fieldbackground": p["field"], "foreground": p["fg"], "insertcolor": p["fg"],
                 "bordercolor": p["border"], "lightcolor": p["field"], "darkcolor": p["field"]}
        s.configure("TEntry", padding=(px(5), px(3)), **field)
        s.map("TEntry", fieldbackground=[("readonly", p["surface2"]), ("disabled", p["bg"])],
              bordercolor=[("invalid", p["bad"]), ("focus", p["accent"])],
              lightcolor=[("invalid", p["bad"]), ("focus", p["accent"])])
        s.configure("TCombobox", background=p["surface2"], arrowcolor=p["fg"], padding=(px(5), px(3)),
                    arrowsize=px(12), **field)
        s.map("TCombobox", fieldbackground=[("readonly", p["field"]), ("disabled", p["bg"])],
              foreground=[("disabled", p["disabled"])], background=[("active", p["accent_soft"])],
              selectbackground=[("readonly", "focus", p["accent_soft"])],
              selectforeground=[("readonly", "focus", p["fg"])],
              bordercolor=[("invalid", p["bad"]), ("focus", p["accent"])],
              lightcolor=[("invalid", p["bad"]), ("focus", p["accent"])])
        s.configure("TCheckbutton", background=p["bg"], foreground=p["fg"], indicatorbackground=p["field"],
                    indicatorforeground=p["fg"], upperbordercolor=p["border"], lowerbordercolor=p["border"],
                    indicatorsize=px(14), indicatormargin=(0, 0, px(6), 0))
        s.map("TCheckbutton", background=[("active", p["bg"])],
              indicatorbackground=[("pressed", p["surface2"]), ("selected", p["accent_soft"])])
        s.configure("TNotebook", background=p["bg"], tabmargins=(px(2), px(4), px(2), 0), **flat)
        s.configure("TNotebook.Tab", background=p["surface2"], foreground=p["muted"], padding=(px(14), px(5)),
                    bordercolor=p["border"], lightcolor=p["surface2"], darkcolor=p["surface2"])
        s.map("TNotebook.Tab", background=[("selected", p["bg"]), ("active", p["accent_soft"])],
              foreground=[("selected", p["fg"]), ("active", p["fg"])],
              lightcolor=[("selected", p["bg"])], expand=[("selected", (1, 1, 1, 0))])
        s.configure("Treeview", background=p["field"], fieldbackground=p["field"], foreground=p["fg"],
                    bordercolor=p["border"], lightcolor=p["field"], darkcolor=p["field"])
        s.map("Treeview", background=[("selected", p["accent_soft"])], foreground=[("selected", p["fg"])])
        s.configure("Treeview.Heading", background=p["surface2"], foreground=p["fg"], font="IflowBold",
                    bordercolor=p["border"], lightcolor=p["surface2"], darkcolor=p["surface2"], relief="flat",
                    padding=(px(6), px(3)))
        s.map("Treeview.Heading", background=[("active", p["border"])])
        for orient in ("Vertical.TScrollbar", "Horizontal.TScrollbar"):
            s.configure(orient, background=p["surface2"], troughcolor=p["bg"], bordercolor=p["border"],
                        arrowcolor=p["muted"], lightcolor=p["surface2"], darkcolor=p["surface2"], gripcount=0,
                        arrowsize=px(13))
            s.map(orient, background=[("active", p["border"])])
        self.root.configure(background=p["bg"])
        for page in getattr(self, "pages", ()):
            page.area.canvas.configure(background=p["bg"])
        for option, value in (("background", p["surface"]), ("foreground", p["fg"]),
                              ("selectBackground", p["accent"]), ("selectForeground", p["accent_fg"])):
            self.root.option_add("*TCombobox*Listbox." + option, value)
        for widget in self._tk_widgets + ([self.tray_menu] if self.tray_menu is not None else []):
            self._color_tk(widget)
        for box in self._comboboxes:  # popdown lists are plain tk listboxes made once per combobox
            popdown = box.tk.call("ttk::combobox::PopdownWindow", box)
            box.tk.call("%s.f.l" % popdown, "configure", "-background", p["surface"], "-foreground", p["fg"],
                        "-selectbackground", p["accent"], "-selectforeground", p["accent_fg"])
        if hasattr(self, "status_page"):
            self.status_page.show(self.status_page.snapshot)

    def _color_tk(self, widget) -> None:
        p = self.palette
        if isinstance(widget, tk.Menu):
            widget.configure(background=p["surface"], foreground=p["fg"], activebackground=p["accent"],
                             activeforeground=p["accent_fg"], borderwidth=1, relief="solid")
        else:
            widget.configure(background=p["field"], foreground=p["fg"], insertbackground=p["fg"],
                             selectbackground=p["accent"], selectforeground=p["accent_fg"],
                             highlightbackground=p["border"], highlightcolor=p["accent"])

    def run_forever(self) -> None:
        try:
            self.root.mainloop()
        finally:
            self._closing = True
            if self.tray is not None:
                self.tray.stop()
            if self.single_instance is not None:
                self.single_instance.release()


# == 7. main ======================================================================

NO_TKINTER = ("iflow2api: the desktop window needs tkinter, which this Python does not have "
              "(Debian/Ubuntu: sudo apt install python3-tk; Windows/macOS: the python.org installer); "
              "run the server without it: iflow2api (or python3 iflow2api.py, or python3 iflow2api.pyz)")
NO_DISPLAY = ("iflow2api: no display to open the window on (%s); "
              "run the server headless instead: iflow2api (or python3 iflow2api.py, or python3 iflow2api.pyz)")


def display_problem(tk_module, env, platform: str = sys.platform) -> str:
    """Why the window cannot open here ("" when it can try)."""
    if tk_module is None:
        return NO_TKINTER
    if platform not in ("win32", "darwin", "cygwin") and not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        return NO_DISPLAY % "DISPLAY is not set"
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iflow2api gui", description="The iflow2api desktop window.")
    parser.add_argument("--minimized", action="store_true", help="start hidden in the tray (or minimised)")
    parser.add_argument("--autostart", action="store_true",
                        help="as started at login: minimised, with the server running")
    parser.add_argument("--config", metavar="FILE", help="config file (default ~/.iflow2api/config.json)")
    parser.add_argument("--scaling", type=float, help="Tk scaling (pixels per point), e.g. 2.0 for HiDPI")
    parser.add_argument("--no-tray", action="store_true", help="no tray icon")
    return parser


def _say(line: str) -> None:
    stream = sys.stderr or sys.stdout  # pythonw has neither: nothing to print to
    if stream is not None:
        print(line, file=stream)


def _enable_dpi_awareness() -> None:  # pragma: no cover - Windows only
    """Crisp text on HiDPI Windows: per-monitor DPI awareness, before Tk starts."""
    try:
        import ctypes
        ctypes.windll.shcore.SetProcessDpiAwareness(2)
    except (AttributeError, OSError):
        try:
            ctypes.windll.user32.SetProcessDPIAware()
        except (AttributeError, OSError):
            pass


def main(argv=None) -> int:
    """Entry point of `iflow2api-gui`, `python3 iflow2api_gui.py` and `iflow2api gui`."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    problem = display_problem(tk, os.environ)
    if problem:
        _say(problem)
        return 2
    if sys.platform == "win32":
        _enable_dpi_awareness()
    service = iflow2api.add_web_admin(iflow2api.Service.from_config(path=args.config))
    inbox = queue.Queue()
    config_dir = os.path.dirname(os.path.abspath(service.status()["config_path"]))
    single = SingleInstance(config_dir, lambda: inbox.put(("show", ())))
    if not single.acquire():
        _say("iflow2api: the window is already open; brought it to the front")
        service.stop()
        return 0
    threading.Thread(target=service.check_for_update, name="iflow2api-update-check", daemon=True).start()
    try:
        root = tk.Tk(className="iflow2api")
    except tk.TclError as exc:
        single.release()
        service.stop()
        _say(NO_DISPLAY % exc)
        return 2
    if args.scaling:
        root.tk.call("tk", "scaling", args.scaling)
    app = App(root, service, inbox=inbox, single_instance=single, autostart=autostart_for(),
              tray=not args.no_tray, minimized=args.minimized or args.autostart, run_server=args.autostart)
    app.run_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
