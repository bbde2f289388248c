#!/usr/bin/env python3
# == 0. Module header =============================================================================
"""iflow2api: a local OpenAI- and Anthropic-compatible API bridge in one file.

Run it:   python3 iflow2api.py [--host 127.0.0.1] [--port 28000]
Help:     python3 iflow2api.py --help

Clients talk OpenAI (`/v1/chat/completions`, `/v1/models`) or Anthropic
(`/v1/messages`, as Claude Code does) to 127.0.0.1:28000; the server forwards to
the iFlow API (with the login the iFlow CLI keeps in ~/.iflow/settings.json, or
`iflow2api login`) or to any OpenAI-compatible provider. Web admin at /admin,
API docs at /docs. Standard library only (CPython >= 3.8); h11 and certifi are
used when importable.

Sections (search for "# == N."), lowest layer first; a section only uses names
from sections above it:
  0. Module header
  1. Constants, logging, secret redaction, errors
  2. Config, iFlow credentials, secrets at rest
  3. Translation (sans-IO): the Anthropic and Responses faces over chat completions
  4. Wire codecs (sans-IO): SSE, chunked bodies, request framing, event encoders
  5. Upstream: connection pool, proxies, providers, remote images
  6. Auth: client keys, OAuth login and refresh, admin sign-in, the Backend
  7. HTTP server: Request/Response, router, h11 and stdlib adapters, limits
  8. Routes: OpenAI, Anthropic and Responses APIs, health, models, static files, OpenAPI
  9. Service: instances, status, logs, accounts, providers (the CLI, GUI and admin drive it)
 10. Admin API: the web admin's JSON API over Service
 11. CLI: serve, gui, claude, codex, login, accounts, providers, config
"""
from __future__ import annotations

__version__ = "0.1.0"

import os
import sys


def _restart_as_import() -> None:
    """Run as a script (`python3 iflow2api.py`), CPython keeps the parse tree of the whole
    file alive until the script ends: about 20 MB that a server would hold for its whole
    life. Start over (exec: same process id, arguments, terminal and interpreter options) as
    an import of this file, which frees the tree once compiled: idle RSS 50 -> 28 MB."""
    options = ["-" + letter for flag, letter in (("isolated", "I"), ("no_site", "S"), ("ignore_environment", "E"),
                                                 ("no_user_site", "s"), ("dont_write_bytecode", "B"),
                                                 ("safe_path", "P")) if getattr(sys.flags, flag, 0)]
    options += ["-O"] * sys.flags.optimize + ["-W" + w for w in sys.warnoptions]
    options += ["-X" + (k if v is True else "%s=%s" % (k, v)) for k, v in sys._xoptions.items()]
    run = ("import importlib.util, sys; sys.argv = sys.argv[1:]; "
           "spec = importlib.util.spec_from_file_location('iflow2api', sys.argv[0]); "
           "module = sys.modules['iflow2api'] = importlib.util.module_from_spec(spec); "
           "spec.loader.exec_module(module); raise SystemExit(module.main())")
    try:
        os.execv(sys.executable, [sys.executable] + options + ["-c", run, os.path.abspath(__file__)] + sys.argv[1:])
    except OSError:  # no usable interpreter path: go on as a script
        pass


# Commands that end soon: their memory does not matter, so they skip the restart's ~60 ms.
_ONE_SHOT_ARGS = {"version", "models", "config", "login", "logout", "accounts", "providers", "admin-password",
                  "usage", "-h", "--help", "--version"}

# Before the other imports, which the restarted process does anyway (30 ms of start-up).
if __name__ == "__main__" and __spec__ is None and os.name == "posix" and sys.executable \
        and sys.gettrace() is None and not _ONE_SHOT_ARGS.intersection(sys.argv[1:]):  # pragma: no cover
    # (not under a debugger or a coverage tool: the restart would leave them behind)
    _restart_as_import()

import argparse
import gc
import getpass
import base64
import collections
import contextlib
import datetime
import difflib
import functools
import hashlib
import hmac
import shutil
import http.client
import ipaddress
import json
import logging
import math
import random
import re
import selectors
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler


# Optional packages: each imported here only, bound to None when missing.
try:
    import h11
except ImportError:  # the stdlib HTTP adapter is used instead
    h11 = None
# certifi is imported when the first TLS connection needs it (make_tls_context):
# its import costs ~30 ms of start-up that plain-http setups never need.

__all__ = [
    # entry points and the object the CLI, the desktop app and the admin drive
    "__version__", "main", "Service", "Instance", "Config", "add_web_admin",
    # errors
    "Iflow2apiError", "InvalidRequestError", "AuthenticationError", "TranslationError", "UpstreamError",
    "ConfigError",
    # translation (sans-IO): the Anthropic and Responses faces and their stream state machines
    "TranslationContext", "ResponsesContext", "anthropic_to_openai_request", "openai_to_anthropic_response",
    "AnthropicStream", "responses_to_openai_request", "openai_to_responses_response", "ResponsesStream",
    "normalize_reasoning_message", "ReasoningMerger",
    # wire codecs (sans-IO)
    "SSEParser", "EventSplitter", "ChunkedDecoder", "request_framing", "encode_anthropic_event",
    "encode_responses_event",
    # helpers other tools may use
    "iflow_signature", "iflow_model_tweaks", "write_json_atomic", "redact", "pick_http_adapter",
]


# == 1. Constants, logging, secret redaction, errors ==============================================
# Defaults shared by every section, the logger, and the redaction that keeps
# keys and tokens out of every log line. Tests: tests/unit/test_core_units.py.

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 28000
IFLOW_BASE_URL = "https://apis.iflow.cn/v1"
IFLOW_USER_AGENT = "iFlow-Cli"
DEFAULT_MODEL = "glm-5"
MIB = 1024 * 1024

log = logging.getLogger("iflow2api")

# Ids that must be unique but need not be secret (request and conversation ids): drawn from a
# generator of our own, seeded from os.urandom once, as os.urandom per id is a system call that
# releases the GIL, and the random module's shared one may be seeded by an embedding app.
_IDS = random.Random()

# (pattern, replacement, a pattern the case-folded text must hold for the first to match):
# the cheap test comes first, as the three patterns on every log line took 8 us, a third of
# the cost of an access log line.
_SECRET_PATTERNS = [
    # "Authorization: Bearer xyz" and similar
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]{4,}"), r"\1***", re.compile(r"bearer\s")),
    # key=value and "key": "value" for names that hold secrets
    (re.compile(r"(?i)(\"?(?:api_?key|apikey|access_token|refresh_token|password|secret|"
                r"token|x-api-key)\"?\s*[:=]\s*\"?)([^\"\s,&}]{4,})"), r"\1***",
     re.compile(r'(?:key|token|password|secret)"?\s*[:=]')),
    # OpenAI-style keys anywhere
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), "sk-***", re.compile("sk-")),
]
_known_secrets = ()  # longest first; replaced whole, so redact() reads it without a lock
_known_secrets_lock = threading.Lock()


def register_secret(value) -> None:
    """Remember a secret so that it is masked wherever it appears in a log line."""
    global _known_secrets
    if isinstance(value, str) and len(value) >= 6 and value not in _known_secrets:
        with _known_secrets_lock:
            _known_secrets = tuple(sorted(set(_known_secrets) | {value}, key=len, reverse=True))


def mask_secret(value: str) -> str:
    """Show a secret as its first 3 and last 4 characters, for UIs and listings."""
    if not value:
        return ""
    if len(value) < 12:
        return "***"
    return value[:3] + "..." + value[-4:]


_CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def escape_controls(text: str) -> str:
    """text with line breaks and other control characters escaped (\\n, \\x1b, ...): a
    value a client chose (a model name, a path) can never start a log line of its own."""
    if not _CONTROL_CHARS.search(text):
        return text
    return _CONTROL_CHARS.sub(lambda m: repr(m.group())[1:-1], text)


def find_lone_surrogate(value) -> bool:
    """Whether any string in a JSON value holds a lone surrogate (it cannot be encoded)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False


def _compact_json_encoder():
    """A function doing json.dumps(obj, ensure_ascii=False, separators=(",", ":")), the JSON
    we send upstream and to clients. It calls json's C encoder, made once, directly: dumps()
    with options builds a JSONEncoder and a C encoder per call (2.8 -> 1.6 us for an event
    of a Responses stream, which makes five before its first text)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without json's C accelerator
        return json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    encode = make(None, json.JSONEncoder().default, json.encoder.encode_basestring, None, ":", ",",
                  False, False, True)  # NaN allowed, as in dumps(); no circular check (markers None):
    # a value that holds itself raises RecursionError, not ValueError (ours never do)
    return lambda obj: "".join(encode(obj, 0))


compact_json = _compact_json_encoder()


def mask_url_password(url: str) -> str:
    """A URL with the password of its user:password part shown as ***."""
    scheme, sep, rest = (url or "").partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url or ""
    return "%s://%s:***@%s" % (scheme, userinfo.split(":", 1)[0], hostpart)


def redact(text: str) -> str:
    """Return text with every known secret and secret-looking token masked."""
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, "***")
    folded = text.casefold()  # as (?i) matches: "ſ" is an "s" to it, and casefold() knows, lower() not
    for pattern, replacement, needed in _SECRET_PATTERNS:
        if needed.search(folded):
            text = pattern.sub(replacement, text)
    return text


class _RedactingFilter(logging.Filter):
    """Masks secrets in the final message before any handler sees the record."""

    def filter(self, record):
        message = record.getMessage()
        cleaned = escape_controls(redact(message))
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


def get_logger(name: str = "") -> logging.Logger:
    """The iflow2api logger (or a child of it) with secret redaction attached.

    The filter sits on each logger rather than on a handler so that records are
    clean for every handler, including ones added by tests or embedding apps."""
    logger = logging.getLogger("iflow2api" + ("." + name if name else ""))
    if not any(isinstance(f, _RedactingFilter) for f in logger.filters):
        logger.addFilter(_RedactingFilter())
    return logger


log = get_logger()


class _UnlockedHandler(logging.Handler):
    """A handler whose handle() formats and emits without the handler's lock.

    logging holds a handler's lock around emit(), and so while the line is formatted. A
    lock that every request's log line takes, held while functions run, made all threads
    queue on it whenever the GIL changed hands inside (a lock convoy: at 32 clients, most
    handler threads were found waiting there). emit() takes a lock only where it must:
    around the write to a stream, or to wake a reader of the recent lines."""

    def handle(self, record):
        allowed = self.filter(record)
        if isinstance(allowed, logging.LogRecord):  # Python 3.12+: a filter may give a new record
            record = allowed
        if allowed:
            self.emit(record)
        return allowed


class RecentLogHandler(_UnlockedHandler):
    """Keeps the last N formatted log lines in memory, numbered, for status pages,
    the GUI and the admin's live log (since() waits for new lines).

    Lines are numbered when read: a logging thread only appends to a deque, and takes
    the lock only while someone waits in since()."""

    def __init__(self, capacity: int = 500):
        super().__init__()
        self.entries = collections.deque(maxlen=capacity)  # (number, line)
        self._count = 0
        self._incoming = collections.deque(maxlen=capacity)  # lines not numbered yet
        self._changed = threading.Condition()
        self._listeners = 0  # since() calls waiting: only they need to be woken
        self.setFormatter(LineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record):
        try:
            self._incoming.append(self.format(record))
            if self._listeners:
                with self._changed:
                    self._changed.notify_all()
        except Exception:  # a broken record must never break serving
            self.handleError(record)

    def _take_in(self) -> None:
        """Number the lines that came in (under self._changed)."""
        while self._incoming:
            self._count += 1
            self.entries.append((self._count, self._incoming.popleft()))

    @property
    def count(self) -> int:
        """The number of the newest line."""
        with self._changed:
            self._take_in()
            return self._count

    def lines(self, count: int = 100) -> list:
        with self._changed:
            self._take_in()
            return [line for _n, line in list(self.entries)[-count:]]

    def since(self, number: int, timeout_s: float):
        """(newest number, lines after `number`), waiting up to timeout_s for one."""
        with self._changed:
            self._listeners += 1  # first: a line appended after the next look will notify
            try:
                self._take_in()
                if self._count <= number:
                    self._changed.wait(timeout_s)
                    self._take_in()
            finally:
                self._listeners -= 1
            return self._count, [line for n, line in self.entries if n > number]


class LineFormatter(logging.Formatter):
    """logging.Formatter with the time text made once a second rather than once a line
    (localtime and strftime were 3 of the 14 us an access line cost with two handlers)."""

    _cached = (None, "")  # (second, its text)

    def formatTime(self, record, datefmt=None):
        second, text = self._cached
        if second != int(record.created):
            second = int(record.created)
            text = time.strftime(datefmt or self.default_time_format, self.converter(record.created))
            self._cached = (second, text)  # one assignment: threads may race, never tear it
        return text if datefmt else self.default_msec_format % (text, record.msecs)


ACCESS_LOG = get_logger("access")  # one line per request (App._log)


class StderrHandler(_UnlockedHandler, logging.StreamHandler):
    """Writes each line to stderr (or the given stream) at once, formatted outside any lock.

    Only the write is under the handler's lock, so lines from many threads come out whole
    and in order. Access lines used to wait up to 0.1 s to go out in batches, which saved
    0.02-0.04 ms of CPU per request at 32 clients, but the first chunk of a stream came
    0.08 ms later at one client (bench: 0.40 -> 0.31 ms over direct without the batching)."""

    def emit(self, record):
        try:
            line = self.format(record) + self.terminator
            with self.lock:
                if self.stream is not None:  # pythonw on Windows: no stderr
                    self.stream.write(line)
                    self.flush()
        except Exception:  # a broken record or stream must never break serving
            self.handleError(record)


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr at the given level (once per process)."""
    root = logging.getLogger("iflow2api")
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    if not any(getattr(h, "_iflow2api_stderr", False) for h in root.handlers):
        handler = StderrHandler(sys.stderr)
        handler.setFormatter(LineFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._iflow2api_stderr = True
        root.addHandler(handler)


class Iflow2apiError(Exception):
    """Base error: carries the HTTP status and both API dialects' error types."""

    status = 500
    code = "internal_error"
    openai_type = "server_error"
    anthropic_type = "api_error"

    def __init__(self, message: str = "", status: int = None, code: str = None,
                 openai_type: str = None, anthropic_type: str = None, headers=None, param: str = None):
        super().__init__(message or self.__class__.__name__)
        self.param = param  # the request field (or config key) at fault, when one is
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if openai_type is not None:
            self.openai_type = openai_type
        if anthropic_type is not None:
            self.anthropic_type = anthropic_type
        self.headers = list(headers or [])


class InvalidRequestError(Iflow2apiError):
    status, code = 400, "invalid_request_error"
    openai_type, anthropic_type = "invalid_request_error", "invalid_request_error"


class AuthenticationError(Iflow2apiError):
    status, code = 401, "invalid_api_key"
    openai_type, anthropic_type = "invalid_request_error", "authentication_error"


class NotFoundError(Iflow2apiError):
    status, code = 404, "not_found"
    openai_type, anthropic_type = "invalid_request_error", "not_found_error"


class MethodNotAllowedError(Iflow2apiError):
    status, code = 405, "method_not_allowed"
    openai_type, anthropic_type = "invalid_request_error", "invalid_request_error"


class RequestTooLargeError(Iflow2apiError):
    status, code = 413, "request_too_large"
    openai_type, anthropic_type = "invalid_request_error", "request_too_large"


class KeyRefusedError(Iflow2apiError):
    """An API key the provider refused when it was checked before saving."""
    status, code = 422, "key_refused"
    openai_type, anthropic_type = "invalid_request_error", "invalid_request_error"


class RateLimitError(Iflow2apiError):
    status, code = 429, "rate_limit_exceeded"
    openai_type, anthropic_type = "rate_limit_error", "rate_limit_error"


class TranslationError(InvalidRequestError):
    """A client request that cannot be translated; the message is fit for the client."""

    def __init__(self, message, status=400, error_type="invalid_request_error"):
        super().__init__(message, status=status, anthropic_type=error_type)
        self.message = message
        self.error_type = error_type


class UpstreamError(Iflow2apiError):
    """An upstream failure, classified for both API dialects (translation.md 4.2).

    `status` is the status on Anthropic routes; error_response() sends 529 as 503
    on OpenAI routes (`openai_status`)."""

    def __init__(self, status, anthropic_type, message, openai_type="server_error",
                 openai_code=None, retry_after=None, upstream_status=None):
        super().__init__(message, status=status, code=openai_code or anthropic_type,
                         openai_type=openai_type, anthropic_type=anthropic_type,
                         headers=[("retry-after", retry_after)] if retry_after else None)
        self.message = message
        self.openai_code = openai_code
        self.retry_after = retry_after
        self.upstream_status = upstream_status

    @property
    def openai_status(self) -> int:
        """The status on OpenAI routes (error_response applies the same rule)."""
        return 503 if self.status == 529 else self.status


class UpstreamTimeoutError(Iflow2apiError):
    status, code = 504, "timeout"


# == 2. Config, iFlow credentials, secrets at rest ================================================
# App config (~/.iflow2api/config.json, keys compatible with the original) with
# precedence CLI > environment > file > defaults; the iFlow CLI's
# ~/.iflow/settings.json; atomic 0600 writes. Tests: tests/unit/test_core_units.py.

DEFAULT_CONFIG = {
    # keys of the original iflow2api (host defaults to loopback here, on purpose)
    "host": DEFAULT_HOST,
    "port": DEFAULT_PORT,
    "api_key": "",
    "base_url": "",
    "preserve_reasoning_content": False,
    "upstream_proxy_enabled": False,
    "upstream_proxy": "",
    "custom_api_key": "",
    "theme_mode": "system",
    "language": "zh",
    "auto_start": False,
    "start_minimized": False,
    "close_action": "minimize_to_tray",
    "auto_run_server": False,
    "check_update_on_startup": True,
    "skip_version": "",
    # where the newest release is read (GitHub's releases/latest JSON, or PyPI's JSON API)
    "update_check_url": "https://api.github.com/repos/iflow2api/iflow2api/releases/latest",
    # ours
    "log_level": "INFO",
    "concurrency": 64,
    "queue_timeout_s": 30.0,
    "max_body_bytes": 32 * MIB,
    "header_timeout_s": 20.0,
    "idle_timeout_s": 75.0,
    "body_timeout_s": 300.0,
    "shutdown_grace_s": 10.0,  # on SIGTERM/Ctrl-C: time for streams to finish before they are cut
    "max_connections": 1024,
    "upstream_connect_timeout_s": 10.0,
    "upstream_read_timeout_s": 600.0,
    "models_cache_s": 600.0,
    # usage history: one row per API request in usage.db beside this file
    "usage_history": True,
    "usage_retention_days": 90.0,
    "usage_max_mb": 100.0,
    # browser pages of other origins may call the API only when listed here (["*"]: any)
    "cors_allow_origins": [],
    # Host names served on a loopback bind without client keys, besides localhost/127.0.0.1/::1
    "allowed_hosts": [],
    "api_keys": [],
    # tokens (input + output) a client key may use per local day: {"key id" or "*": tokens}
    "daily_token_quota": {},
    "default_model": "",
    # Anthropic route: Claude tiers (and any other alias) -> upstream model, like the original (glm-5)
    "model_map": {"opus": "glm-5", "sonnet": "glm-5", "haiku": "glm-5"},
    # accounts besides the iFlow CLI's settings.json: [{"id", "label", "auth_type", "api_key",
    # "base_url", "oauth_access_token", "oauth_refresh_token", "oauth_expires_at"}]
    "accounts": [],
    "account_cooldown_s": 30.0,
    # binding anything but 127.0.0.1/::1/localhost needs client keys unless this is true
    "allow_remote_without_key": False,
    # iFlow OAuth (public client of the iFlow CLI); URLs configurable for tests and mirrors
    "oauth_authorize_url": "https://iflow.cn/oauth",
    "oauth_token_url": "https://iflow.cn/oauth/token",
    "oauth_userinfo_url": "https://iflow.cn/api/oauth/getUserInfo",
    "oauth_client_id": "10009311001",
    "oauth_client_secret": "4Z3YjXycVsQvyGF1etiNlIBB4RsqSDtW",
    "oauth_callback_port": 11451,
    "oauth_refresh_before_s": 86400.0,
    "oauth_refresh_check_s": 300.0,
    # providers besides iFlow: {name: {"preset", "type", "base_url", "api_keys", "headers", "models",
    # "discover_models", "aliases", "enabled", "quirks", "text_only_models", "vision_models"}}
    "providers": {},
    "default_provider": "iflow",
    "model_routes": {},  # model name -> "provider" or "provider/model"
    # Claude Code's requests by kind: {"background", "think", "long_context", "image", "default"} -> target
    "scenario_routes": {},
    "long_context_tokens": 60000,  # prompts estimated above this take the long_context route
    # when a model fails before answering: {"provider/model" | "model" | "provider" | "*": [targets]}
    "fallbacks": {},
    "fallback_attempts": 3,  # calls at most per request, the first included
    "fallback_deadline_s": 120.0,  # no new attempt after this long
    # a request with images for a text-only model: "route" to vision_model, or "reject" (400)
    "vision_model": "qwen-vl-max",
    "vision_fallback": "route",
    # web admin: PBKDF2 hash of the admin password (set on first use from this machine)
    "admin_password_hash": "",
    # server instances besides "default": [{"name", "host", "port"}], started by `serve`
    "instances": [],
}

# One line per key for `iflow2api config --help` (docs/configuration.md says more).
CONFIG_HELP = {
    "host": "address to listen on; anything but loopback needs client keys",
    "port": "port to listen on (0: any free port)",
    "api_key": "iFlow API key used when ~/.iflow/settings.json has none",
    "base_url": "iFlow API base URL used when settings.json has none (https)",
    "preserve_reasoning_content": "OpenAI route: keep reasoning_content apart instead of merged",
    "upstream_proxy_enabled": "send upstream calls through upstream_proxy",
    "upstream_proxy": "http://, https://, socks5:// or socks5h:// proxy URL",
    "custom_api_key": "the original's single client key (one more entry of api_keys)",
    "theme_mode": "desktop window theme: system, light or dark",
    "language": "desktop window language: zh or en",
    "auto_start": "start the desktop app at login",
    "start_minimized": "open the desktop app hidden in the tray",
    "close_action": "closing the desktop window: minimize_to_tray or quit",
    "auto_run_server": "the desktop app starts the server when it opens",
    "check_update_on_startup": "look up the newest release at start-up (only reported)",
    "skip_version": "a release version the update notice stays silent about",
    "update_check_url": "where the newest release is read (GitHub or PyPI JSON)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "concurrency": "upstream calls at once per server instance",
    "queue_timeout_s": "seconds a request waits for a free slot before 429",
    "max_body_bytes": "largest request body in bytes (413 beyond)",
    "header_timeout_s": "seconds for a request head, and for each body read",
    "idle_timeout_s": "seconds before an idle keep-alive connection is closed",
    "body_timeout_s": "seconds for a whole request body (408 beyond)",
    "shutdown_grace_s": "seconds requests get to finish on SIGTERM or Ctrl-C",
    "max_connections": "open client connections per instance (503 beyond)",
    "upstream_connect_timeout_s": "seconds to connect to the upstream",
    "upstream_read_timeout_s": "longest silence in seconds while reading the upstream",
    "models_cache_s": "seconds a provider's /models answer is cached",
    "usage_history": "keep one row per API request in usage.db (iflow2api usage reports it)",
    "usage_retention_days": "days the usage history keeps its rows",
    "usage_max_mb": "size cap of usage.db in MB (the oldest rows go first)",
    "cors_allow_origins": "web page origins allowed to call the API (JSON list)",
    "allowed_hosts": "extra Host names served on loopback without client keys",
    "api_keys": "client keys (manage them in the web admin)",
    "daily_token_quota": "tokens per local day for a client key id, or \"*\" for each key (JSON object)",
    "default_model": "model for requests without one (empty: the iFlow CLI's, else glm-5)",
    "model_map": "Anthropic route: Claude names or tiers -> model (JSON object)",
    "accounts": "extra iFlow accounts for the pool (iflow2api login --add)",
    "account_cooldown_s": "seconds an account rests after a failure",
    "allow_remote_without_key": "serve a non-loopback address without client keys",
    "oauth_authorize_url": "iFlow OAuth login page",
    "oauth_token_url": "iFlow OAuth token endpoint",
    "oauth_userinfo_url": "where the API key of a fresh OAuth login is fetched",
    "oauth_client_id": "OAuth client id (the iFlow CLI's public client)",
    "oauth_client_secret": "OAuth client secret of that public client",
    "oauth_callback_port": "local port of the browser login's redirect",
    "oauth_refresh_before_s": "refresh an OAuth token this many seconds before it expires",
    "oauth_refresh_check_s": "seconds between looks at the accounts' tokens",
    "providers": "providers besides iFlow (iflow2api providers add)",
    "default_provider": "provider for model names no other rule routes",
    "model_routes": "model name -> provider or provider/model (JSON object)",
    "scenario_routes": "request kinds (background, think, long_context, image, default) -> provider/model",
    "long_context_tokens": "prompt tokens (estimated) above which long_context routes",
    "fallbacks": "model or provider -> provider/model list tried when it fails before answering",
    "fallback_attempts": "upstream calls at most per request, fallbacks included",
    "fallback_deadline_s": "seconds after which no further fallback is tried",
    "vision_model": "where requests with images go when their model is text-only",
    "vision_fallback": "images for a text-only model: route (to vision_model) or reject",
    "admin_password_hash": "the web admin password's hash (iflow2api admin-password)",
    "instances": "more servers on other ports, started by serve",
}

# Where each key is shown (the admin's config page, in this order).
CONFIG_GROUPS = (
    ("server", ("host", "port", "log_level", "concurrency", "queue_timeout_s", "max_connections",
                "allowed_hosts", "cors_allow_origins", "shutdown_grace_s", "instances", "usage_history",
                "usage_retention_days", "usage_max_mb")),
    ("upstream", ("base_url", "upstream_proxy_enabled", "upstream_proxy", "upstream_connect_timeout_s",
                  "upstream_read_timeout_s")),
    ("models", ("default_model", "default_provider", "model_map", "model_routes", "scenario_routes",
                "long_context_tokens", "fallbacks", "fallback_attempts", "fallback_deadline_s", "vision_model",
                "vision_fallback", "preserve_reasoning_content", "models_cache_s", "providers")),
    ("accounts", ("allow_remote_without_key", "daily_token_quota", "account_cooldown_s", "api_key",
                  "custom_api_key", "api_keys", "accounts", "admin_password_hash")),
    ("desktop", ("theme_mode", "language", "auto_start", "start_minimized", "close_action",
                 "auto_run_server", "check_update_on_startup", "skip_version")),
    ("advanced", ("max_body_bytes", "header_timeout_s", "idle_timeout_s", "body_timeout_s",
                  "update_check_url", "oauth_authorize_url", "oauth_token_url", "oauth_userinfo_url",
                  "oauth_client_id", "oauth_client_secret", "oauth_callback_port", "oauth_refresh_before_s",
                  "oauth_refresh_check_s")),
)

# Keys a running server cannot follow: where it listens (and the desktop app's keys, read
# when the app starts). Every other key applies within seconds of a change to the file.
RESTART_KEYS = frozenset(("host", "port", "instances", "usage_history") + dict(CONFIG_GROUPS)["desktop"])

# Original key names that map to one of ours when ours is absent.
_LEGACY_KEYS = {"api_concurrency": "concurrency"}


def app_home(env=None) -> str:
    """Directory of our config: $IFLOW2API_HOME or ~/.iflow2api."""
    env = os.environ if env is None else env
    return env.get("IFLOW2API_HOME") or os.path.join(os.path.expanduser("~"), ".iflow2api")


def iflow_settings_path() -> str:
    """Where the iFlow CLI keeps its credentials."""
    return os.path.join(os.path.expanduser("~"), ".iflow", "settings.json")


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON through a temp file and os.replace, mode 0600, dir 0700."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = "%s.%d.%d.tmp" % (path, os.getpid(), threading.get_ident())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json_file(path: str):
    """(data, problem): data is {} when the file is missing; a corrupt file is
    moved aside to <path>.bak and reported, never silently overwritten."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, "cannot read %s: %s" % (path, exc)
    try:
        text = raw.decode("utf-8-sig")
        data = json.loads(text) if text.strip(" \t\r\n") else {}  # JSON's whitespace only
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        return data, None
    except ValueError as exc:
        try:
            backup = keep_backup(path)
        except OSError:
            backup = "(could not move it aside)"
        return {}, "%s is not valid JSON (%s); kept it as %s and used defaults" % (path, exc, backup)


BACKUPS_KEPT = 5


def keep_backup(path: str) -> str:
    """Move path aside to path.bak, shifting older backups to .bak.1 ... (the oldest
    dropped), so a second corruption never overwrites the first one's evidence."""
    backups = [path + ".bak"] + ["%s.bak.%d" % (path, n) for n in range(1, BACKUPS_KEPT)]
    for older, newer in reversed(list(zip(backups, backups[1:]))):
        if os.path.exists(older):
            os.replace(older, newer)
    os.replace(path, backups[0])
    return backups[0]


def remove_stale_temp_files(path: str, older_than_s: float = 60.0) -> None:
    """Delete <path>.*.tmp left by a crash during a write (a live write takes milliseconds)."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if entry.startswith(name + ".") and entry.endswith(".tmp"):
            full = os.path.join(directory, entry)
            try:
                if now - os.stat(full).st_mtime > older_than_s:
                    os.unlink(full)
            except OSError:
                pass


# -- Secrets at rest ------------------------------------------------------------------------------
# Config secrets are stored as "enc:v1:<base64(nonce | ciphertext | tag)>": an
# HMAC-SHA256 keystream (counter mode) and an HMAC-SHA256 tag over the nonce and
# ciphertext, with a random 32-byte key kept apart from the config in a 0600 file
# (secret.key next to config.json). Stdlib only; tampering and wrong keys are
# detected by the tag. Plaintext from older configs is read and sealed on the next save.

SECRET_PREFIX = "enc:v1:"


class ConfigError(InvalidRequestError, ValueError):
    """A config value that does not fit its key."""


class SecretError(Iflow2apiError):
    status, code = 500, "secret_unreadable"


class SecretBox:
    """Authenticated encryption of short strings with one key (see above)."""

    def __init__(self, key: bytes):
        if len(key) < 32:
            raise ValueError("secret key must be at least 32 bytes")
        self._enc_key = hmac.new(key, b"iflow2api-encrypt", hashlib.sha256).digest()
        self._mac_key = hmac.new(key, b"iflow2api-authenticate", hashlib.sha256).digest()

    def seal(self, text: str, nonce: bytes = None) -> str:
        nonce = nonce or os.urandom(16)
        data = text.encode("utf-8")
        cipher = bytes(a ^ b for a, b in zip(data, self._keystream(nonce, len(data))))
        tag = hmac.new(self._mac_key, b"v1" + nonce + cipher, hashlib.sha256).digest()
        return SECRET_PREFIX + base64.b64encode(nonce + cipher + tag).decode("ascii")

    def open(self, token: str) -> str:
        """The plaintext of a sealed value; SecretError when it was changed or the key is wrong."""
        try:
            raw = base64.b64decode(token[len(SECRET_PREFIX):].encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise SecretError("a stored secret is not readable (damaged)") from None
        if len(raw) < 48:
            raise SecretError("a stored secret is not readable (too short)")
        nonce, cipher, tag = raw[:16], raw[16:-32], raw[-32:]
        expected = hmac.new(self._mac_key, b"v1" + nonce + cipher, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, expected):
            raise SecretError("a stored secret failed its integrity check (tampered, or another key)")
        return bytes(a ^ b for a, b in zip(cipher, self._keystream(nonce, len(cipher)))).decode("utf-8")

    def _keystream(self, nonce: bytes, length: int) -> bytes:
        blocks = []
        for counter in range((length + 31) // 32):
            blocks.append(hmac.new(self._enc_key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest())
        return b"".join(blocks)[:length]


def load_secret_key(path: str) -> bytes:
    """The key in path, created (random, 0600) when missing."""
    try:
        with open(path, "rb") as f:
            key = base64.b64decode(f.read().strip())
        if len(key) >= 32:
            return key
        raise ValueError("key file too short")
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise SecretError("cannot use the key file %s (%s); move it away to start over, "
                          "then log in again" % (path, exc)) from None
    key = os.urandom(32)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(key) + b"\n")
    return key


# Which config fields hold secrets: top-level names, lists of secrets, and fields
# inside each account.
SECRET_FIELDS = ("api_key", "custom_api_key", "oauth_access_token", "oauth_refresh_token",
                 "admin_password_hash", "upstream_proxy")
SECRET_LISTS = ("api_keys",)
ACCOUNT_SECRET_FIELDS = ("api_key", "oauth_access_token", "oauth_refresh_token")


def map_secrets(data: dict, fn) -> dict:
    """A copy of config data with fn applied to every secret string in it."""
    out = dict(data)
    for key in SECRET_FIELDS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = fn(out[key])
    for key in SECRET_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [fn(v) if isinstance(v, str) and v else v for v in out[key]]
    if isinstance(out.get("providers"), dict):
        providers = {}
        for name, entry in out["providers"].items():
            if isinstance(entry, dict):
                entry = dict(entry)
                if isinstance(entry.get("api_keys"), list):
                    entry["api_keys"] = [fn(v) if isinstance(v, str) and v else v for v in entry["api_keys"]]
                if isinstance(entry.get("api_key"), str) and entry["api_key"]:
                    entry["api_key"] = fn(entry["api_key"])
                if isinstance(entry.get("headers"), dict):  # often Authorization-like values
                    entry["headers"] = {k: fn(v) if isinstance(v, str) and v else v
                                        for k, v in entry["headers"].items()}
            providers[name] = entry
        out["providers"] = providers
    if isinstance(out.get("accounts"), list):
        accounts = []
        for account in out["accounts"]:
            if isinstance(account, dict):
                account = dict(account)
                for key in ACCOUNT_SECRET_FIELDS:
                    if isinstance(account.get(key), str) and account[key]:
                        account[key] = fn(account[key])
            accounts.append(account)
        out["accounts"] = accounts
    return out

def _coerce(value, default):
    """Convert a config value to the type of its default, or raise ValueError."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int):
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError("expected an integer")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected a whole number")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError("expected a whole number") from None
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    if isinstance(default, dict):
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError("expected an object")
        return value
    if isinstance(default, list):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return value
        raise ValueError("expected a list")
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    return value


def resolve_config(file_data: dict, env: dict, cli: dict):
    """(effective config, warnings): CLI > environment > file > defaults.

    Environment variables are IFLOW2API_<KEY>, e.g. IFLOW2API_PORT=28001.
    Unknown file keys are kept; bad values fall back to defaults with a warning."""
    warnings = []
    merged = dict(DEFAULT_CONFIG)
    data = dict(file_data)
    for old, new in _LEGACY_KEYS.items():
        if old in data and new not in data:
            data[new] = data[old]
    layers = [("config file", data),
              ("environment", {k: env["IFLOW2API_" + k.upper()] for k in DEFAULT_CONFIG
                               if "IFLOW2API_" + k.upper() in env}),
              ("command line", {k: v for k, v in cli.items() if v is not None})]
    for source, layer in layers:
        for key, value in layer.items():
            if find_lone_surrogate(value):
                warnings.append("%s: %s ignored (text with an invalid character)" % (source, key))
                continue
            if key not in DEFAULT_CONFIG:
                merged[key] = value
                continue
            try:
                merged[key] = _coerce(value, DEFAULT_CONFIG[key])
            except (TypeError, ValueError) as exc:
                warnings.append("%s: %s=%r ignored (%s)" % (source, key, value, exc))
    for key in _RANGE_CHECKS:
        problem = _out_of_range(key, merged[key])
        if problem:
            warnings.append("%s; using %r" % (problem, DEFAULT_CONFIG[key]))
            merged[key] = DEFAULT_CONFIG[key]
    problem = _cross_key_problem(merged)
    if problem:
        warnings.append(problem + "; no proxy is used")
    return merged, warnings


def _cross_key_problem(values: dict):
    """A message when keys that are fine one by one do not fit together, else None."""
    if values.get("upstream_proxy_enabled") and not values.get("upstream_proxy"):
        return ("upstream_proxy_enabled=true needs upstream_proxy: expected a proxy URL such as "
                "http://127.0.0.1:7890 (set both together, or upstream_proxy_enabled to false)")
    return None


def unknown_key_error(key) -> ConfigError:
    """"unknown key 'x'; did you mean 'y'?" (the nearest DEFAULT_CONFIG key, when one is near)."""
    near = difflib.get_close_matches(str(key), list(DEFAULT_CONFIG), n=1)
    return ConfigError("unknown key %s%s" % (_shown(key), "; did you mean %r?" % near[0] if near else ""),
                       param=str(key))


PROXY_SCHEMES = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}  # default ports
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_proxy_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url.strip())
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme.lower() in PROXY_SCHEMES and bool(parts.hostname)


def is_safe_endpoint(url: str) -> bool:
    """An https URL, or http to this machine: credentials are sent there."""
    parts = urllib.parse.urlsplit(url.strip())
    try:
        parts.port  # noqa: B018
    except ValueError:
        return False
    if not parts.hostname:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK_NAMES)


def validate_config_value(key: str, value):
    """value converted to key's type and checked (ConfigError names the key, the value
    and what is allowed); text anywhere in it must be encodable (no lone surrogates)."""
    if find_lone_surrogate(value):
        raise ConfigError("%s: text with an invalid character (a lone surrogate)" % key, param=key)
    if key not in DEFAULT_CONFIG:
        raise unknown_key_error(key)
    try:
        coerced = _coerce(value, DEFAULT_CONFIG[key])
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError("%s=%s: %s" % (key, _shown(value), exc), param=key) from None
    problem = _out_of_range(key, coerced)
    if problem:
        raise ConfigError(problem, param=key)
    return coerced


def is_host(text: str) -> bool:
    """An IP address (IPv6 with or without brackets) or a syntactically valid host name;
    a dotted all-digit text must be an IPv4 address (999.1.1.1 is refused, never looked up)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not text or len(text) > 253 or all(label.isdigit() for label in labels):
        return False
    return all(re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$", label) for label in labels)


def _shown(value) -> str:
    """A value for an error message: short, and never a secret-looking token."""
    return redact(repr(value))[:80]


def _names_to_names(value) -> bool:
    return all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


# Scenario routes (config scenario_routes), tried in this order; "default" catches the rest.
SCENARIOS = ("image", "long_context", "background", "think", "default")

# Allowed values of the enum keys (the admin shows a select, the GUI a combo box).
CONFIG_CHOICES = {
    "vision_fallback": ("route", "reject"),
    "theme_mode": ("system", "light", "dark"),
    "language": ("zh", "en"),
    "close_action": ("minimize_to_tray", "quit"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),  # any case is accepted
}

# Number ranges: key -> (lowest, highest or None, whether the lowest itself is allowed).
CONFIG_NUMBER_BOUNDS = {
    "port": (0, 65535, True),
    "oauth_callback_port": (0, 65535, True),
    "concurrency": (1, None, True),
    "max_connections": (1, None, True),
    "max_body_bytes": (1, None, True),
    "queue_timeout_s": (0, None, True),
    "shutdown_grace_s": (0, 3600, True),
    "header_timeout_s": (0, None, False),
    "idle_timeout_s": (0, None, False),
    "body_timeout_s": (0, None, False),
    "upstream_connect_timeout_s": (0, None, False),
    "upstream_read_timeout_s": (0, None, False),
    "usage_retention_days": (0, None, False),
    "long_context_tokens": (1, None, True),
    "fallback_attempts": (1, 10, True),
    "fallback_deadline_s": (0, None, False),
    "usage_max_mb": (0, None, False),
}


def _within(bounds):
    low, high, low_allowed = bounds
    return lambda v: (v >= low if low_allowed else v > low) and (high is None or v <= high)


def _bounds_text(key, bounds) -> str:
    low, high, low_allowed = bounds
    if key.endswith("port"):
        return "a port from %d to %d" % (low, high)
    unit = " seconds" if key.endswith("_s") else " byte" if key.endswith("_bytes") else ""
    if high is not None:
        return "%s to %s%s" % (low, high, unit)
    if not low_allowed:
        return "more than %s%s" % (low, unit)
    return ("at least %s%s" if low else "%s or more%s") % (low, unit)


def _choices_text(allowed) -> str:
    quoted = ['"%s"' % choice for choice in allowed]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


_HTTPS_TEXT = "an https:// URL (http:// only for this machine)"

# Checks beyond the type: key -> (test, what is expected).
_RANGE_CHECKS = {
    "host": (is_host, "an IP address or host name of this machine, e.g. 127.0.0.1 (this machine "
                      "only) or 0.0.0.0 (all interfaces)"),
    "model_map": (_names_to_names, "an object of names to model names"),
    "model_routes": (_names_to_names, "an object of model names to providers"),
    "daily_token_quota": (lambda v: all(isinstance(k, str) and isinstance(t, int) and not isinstance(t, bool)
                                        and t >= 0 for k, t in v.items()),
                          "an object of client key ids (or \"*\") to whole numbers of tokens"),
    "fallbacks": (lambda v: all(isinstance(k, str) and isinstance(t, list) and all(isinstance(x, str) for x in t)
                                for k, t in v.items()),
                  "an object of models or providers to lists of provider/model"),
    "scenario_routes": (lambda v: _names_to_names(v) and set(v) <= set(SCENARIOS),
                        "an object of background, think, long_context, image or default to provider/model"),
    "log_level": (lambda v: v.upper() in CONFIG_CHOICES["log_level"], "DEBUG, INFO, WARNING or ERROR"),
    "upstream_proxy": (lambda v: not v or is_proxy_url(v),
                       "http://, https://, socks5:// or socks5h:// with a host, e.g. http://127.0.0.1:7890"),
    "base_url": (lambda v: not v or is_safe_endpoint(v), _HTTPS_TEXT),
    "oauth_authorize_url": (is_safe_endpoint, _HTTPS_TEXT),
    "update_check_url": (lambda v: not v or is_safe_endpoint(v), _HTTPS_TEXT),
    "oauth_token_url": (is_safe_endpoint, _HTTPS_TEXT),
    "oauth_userinfo_url": (is_safe_endpoint, _HTTPS_TEXT),
    "cors_allow_origins": (lambda v: all(isinstance(o, str) for o in v), "a list of origins"),
    "allowed_hosts": (lambda v: all(isinstance(h, str) for h in v), "a list of host names"),
}
_RANGE_CHECKS.update({key: (_within(bounds), _bounds_text(key, bounds))
                      for key, bounds in CONFIG_NUMBER_BOUNDS.items()})
_RANGE_CHECKS.update({key: (lambda v, allowed=allowed: v in allowed, _choices_text(allowed))
                      for key, allowed in CONFIG_CHOICES.items() if key not in _RANGE_CHECKS})


def _out_of_range(key, value):
    """A message when value (already of the right type) does not fit key, else None."""
    check = _RANGE_CHECKS.get(key)
    if check is None or check[0](value):
        return None
    return "%s=%s: expected %s" % (key, _shown(value), check[1])


class Config:
    """The app config: file contents plus environment and CLI overrides.

    Secrets are sealed in the file (see SecretBox) and plain in memory. A sealed
    value that cannot be opened stays sealed (and unused), so saving never loses it."""

    def __init__(self, path: str = None, env=None, cli: dict = None, data: dict = None):
        self.env = dict(os.environ if env is None else env)
        self.path = path or self.env.get("IFLOW2API_CONFIG") or os.path.join(app_home(self.env), "config.json")
        self.key_path = os.path.join(os.path.dirname(os.path.abspath(self.path)), "secret.key")
        self.cli = dict(cli or {})
        self.lock = threading.RLock()
        self.warnings = []
        self._box = None
        self._stamp = None  # the file as we last read or wrote it: (mtime_ns, size)
        from_file = data is None
        if from_file:
            remove_stale_temp_files(self.path)
            data = self._read_file()
        self.file_data = data
        self._resolve()
        if from_file and self._name_unnamed_entries():
            self._save_names()

    def _read_file(self) -> dict:
        data, problem = read_json_file(self.path)
        if problem:
            self.warnings.append(problem)
        for key in [k for k, v in data.items() if find_lone_surrogate(v)]:
            self.warnings.append("%s: %s ignored (text with an invalid character)" % (self.path, key))
            del data[key]  # it could never be written back
        self._stamp = _file_stamp(self.path)
        return map_secrets(data, self._open_secret)

    def _resolve(self):
        self.values, warnings = resolve_config(self.file_data, self.env, self.cli)
        self.warnings.extend(warnings)

    def get(self, key, default=None):
        return self.values.get(key, default)

    def __getitem__(self, key):
        return self.values[key]

    def update(self, changes: dict, save: bool = True) -> None:
        """Change keys in the file layer: all validated first (ConfigError, nothing
        changed), then written and applied together or not at all. When another
        process (the CLI, an editor) changed the file since we read it, the changes
        go on top of its contents instead of undoing them."""
        with self.lock:
            checked = {key: validate_config_value(key, value) for key, value in changes.items()}
            base = self.file_data
            if save and _file_stamp(self.path) != self._stamp:
                base = self._read_file()
            data = dict(base, **checked)
            if set(checked) & {"upstream_proxy_enabled", "upstream_proxy"}:
                problem = _cross_key_problem(resolve_config(data, self.env, self.cli)[0])
                if problem:
                    raise ConfigError(problem, param="upstream_proxy")
            if save:
                self._write(data)
            self.file_data = data
            self._resolve()

    def refresh(self) -> bool:
        """Re-read the file when another process changed it (`iflow2api admin-password`
        while the server runs); True when it did."""
        with self.lock:
            if _file_stamp(self.path) == self._stamp:
                return False
            self.file_data = self._read_file()
            self._resolve()
            if self._name_unnamed_entries():
                self._save_names()
            return True

    def _save_names(self) -> None:
        """Keep the ids just given (a read-only file keeps working with them in memory)."""
        try:
            self.save()
        except OSError as exc:
            self.warnings.append("%s: the ids given could not be saved (%s)" % (self.path, exc))

    def _name_unnamed_entries(self) -> bool:
        """Give hand-written `accounts` entries an id and `instances` entries a name (both
        are how the app refers to them, and the id is where refreshed tokens are saved);
        True when something was added, so the file gets it too."""
        added = []
        for key, field, make in (("accounts", "id", lambda _e: "acct-" + uuid.uuid4().hex[:8]),
                                 ("instances", "name", lambda e: "port-%s" % e.get("port"))):
            entries = self.file_data.get(key)
            if not isinstance(entries, list):
                continue
            for entry in entries:
                if isinstance(entry, dict) and not entry.get(field):
                    entry[field] = make(entry)
                    added.append("%s %s" % (key, entry[field]))
        if added:
            self.warnings.append("%s: gave %s (entries without one)" % (self.path, ", ".join(added)))
            self._resolve()
        return bool(added)

    def save(self) -> None:
        """Write the file layer with every secret sealed (plaintext from older files too)."""
        with self.lock:
            self._write(self.file_data)

    def _write(self, data: dict) -> None:
        write_json_atomic(self.path, map_secrets(data, self._seal_secret))
        self._stamp = _file_stamp(self.path)

    def _secret_box(self, create: bool):
        if self._box is None and (create or os.path.exists(self.key_path)):
            self._box = SecretBox(load_secret_key(self.key_path))
        return self._box

    def _seal_secret(self, value: str) -> str:
        if value.startswith(SECRET_PREFIX):
            return value  # one we could not open: keep it as it was
        return self._secret_box(create=True).seal(value)

    def _open_secret(self, value: str) -> str:
        if not value.startswith(SECRET_PREFIX):
            return value  # plaintext from an older config: sealed on the next save
        try:
            box = self._secret_box(create=False)
            if box is None:
                raise SecretError("the key file %s is missing" % self.key_path)
            return box.open(value)
        except SecretError as exc:
            self.warnings.append("%s; that secret is ignored (log in or set it again)" % exc)
            return value


def _file_stamp(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def usable_secret(value) -> str:
    """value when it is a usable plain secret, else "" (missing, or sealed and unreadable)."""
    if isinstance(value, str) and value and not value.startswith(SECRET_PREFIX):
        return value
    return ""


def parse_expiry(value):
    """Seconds since the epoch from an ISO 8601 time (naive = local, as the original
    writes it; offsets and Z accepted) or a number of seconds or milliseconds; else None."""
    if isinstance(value, bool) or value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return float(value) / 1000.0 if value > 1e11 else float(value)
    try:
        text = str(value).strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def format_expiry(epoch_s: float) -> str:
    """An expiry as settings.json holds it: local time, ISO 8601, no offset (like the original)."""
    return datetime.datetime.fromtimestamp(epoch_s).replace(microsecond=0).isoformat()


def update_iflow_settings(path: str, updates: dict, remove=()) -> None:
    """Set credential keys in the iFlow CLI's settings.json and keep every other key.

    A file we cannot parse is not overwritten: it belongs to the iFlow CLI."""
    data = {}
    if os.path.exists(path):
        data, problem = _read_settings(path)
        if problem:
            raise Iflow2apiError("%s; fix or remove it, then log in again" % problem)
    data.update(updates)
    for key in remove:
        data.pop(key, None)
    write_json_atomic(path, data)


class IFlowCredentials:
    """What the iFlow CLI stores in settings.json, re-read when the file changes.

    Keys as the CLI writes them: selectedAuthType, apiKey (fallback searchApiKey),
    baseUrl, modelName, oauth_* tokens. Our config's api_key/base_url are the
    fallback when settings.json has none."""

    def __init__(self, config: Config, path: str = None):
        self.config = config
        self.path = path or iflow_settings_path()
        self._read = (None, {})  # (the file's stat stamp, its contents): one attribute, read whole
        self._lock = threading.Lock()  # for re-reading the file

    def _load(self) -> dict:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        read_stamp, data = self._read
        if stamp == read_stamp:  # unchanged (or still missing): no lock, as every request asks
            return data
        with self._lock:
            if stamp != self._read[0]:
                data, problem = ({}, None) if stamp is None else _read_settings(self.path)
                if problem:
                    log.warning("%s", problem)
                for key in ("apiKey", "searchApiKey", "oauth_access_token", "oauth_refresh_token"):
                    register_secret(data.get(key))
                self._read = (stamp, data)
            return self._read[1]

    def data(self) -> dict:
        """The current settings.json contents (re-read only when the file changed)."""
        return self._load()

    def login(self) -> dict:
        """The login in one look at the file: api_key, base_url, auth_type, source."""
        return self.login_from(self._load(), self.config.get("api_key"), self.config.get("base_url"))

    def login_from(self, data: dict, api_key, base_url) -> dict:
        """login() from settings.json contents already read (data()) and the config's
        api_key and base_url (the fallbacks)."""
        from_file = data.get("apiKey") or data.get("searchApiKey")
        key = from_file or usable_secret(api_key)
        register_secret(key)
        file_url = data.get("baseUrl") if isinstance(data.get("baseUrl"), str) else ""  # a hand edit may put 5
        return {"api_key": key,
                "base_url": (file_url or base_url or IFLOW_BASE_URL).rstrip("/"),
                "auth_type": data.get("selectedAuthType") or ("api-key" if key else ""),
                "source": self.path if from_file else (self.config.path if key else "")}

    @property
    def api_key(self) -> str:
        return self.login()["api_key"]

    @property
    def base_url(self) -> str:
        return self.login()["base_url"]

    @property
    def auth_type(self) -> str:
        return self.login()["auth_type"]

    @property
    def model_name(self) -> str:
        return self._load().get("modelName") or ""

    def source(self) -> str:
        return self.login()["source"]


def _read_settings(path: str):
    """settings.json is owned by the iFlow CLI: read it, never move it aside."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        return data, None
    except (OSError, ValueError) as exc:
        return {}, "cannot use %s: %s" % (path, exc)


# -- Usage history: SQLite beside the config -------------------------------------------------------
# One row per API request in usage.db (WAL). The request path only puts the row on a bounded
# queue; one writer thread inserts rows in batches, prunes by age and size, and moves aside a
# database it cannot use (corrupt, locked, unwritable) and starts a new one: a broken history
# never blocks serving. sqlite3 is imported on the first row (about 1.5 MB an idle server
# never needs). Tests: tests/integration/test_usage.py.

USAGE_FIELDS = ("at", "route", "client_key", "provider", "account", "model_asked", "model_used", "status",
                "input_tokens", "output_tokens", "reasoning_tokens", "latency_ms", "first_byte_ms", "chain")

# Schema versions in order: the database's user_version says how many of these it has run.
USAGE_MIGRATIONS = (
    """CREATE TABLE requests (
           id INTEGER PRIMARY KEY,
           at REAL NOT NULL,           -- unix time the answer ended
           route TEXT NOT NULL,        -- openai | anthropic | responses
           client_key TEXT,            -- the client key's id (never the key)
           provider TEXT, account TEXT, model_asked TEXT, model_used TEXT,
           status INTEGER NOT NULL,
           input_tokens INTEGER, output_tokens INTEGER, reasoning_tokens INTEGER,
           latency_ms REAL, first_byte_ms REAL,
           chain TEXT                  -- the providers tried, "p1/m1 > p2/m2", when more than one
       );
       CREATE INDEX requests_at ON requests (at);""",
)


class UsageStore:
    """The usage history: record() from any thread (never waits), query() for reports."""

    BATCH = 500
    PRUNE_EVERY_S = 600.0
    WRITE_EVERY_S = 0.5  # rows wait this long at most: no thread switch per request

    def __init__(self, path: str, retention_days: float = 90.0, max_mb: float = 100.0, queue_size: int = 10000):
        self.path, self.retention_days, self.max_mb = path, retention_days, max_mb
        self._queue = collections.deque()
        self._queue_size = queue_size
        self._wake = threading.Condition(threading.Lock())
        self._thread = None
        self._closing = False
        self.dropped = 0  # rows lost to a full queue (the disk could not keep up)
        self._pruned_at = 0.0

    def record(self, row: dict) -> None:
        with self._wake:
            if self._closing:
                return
            if len(self._queue) >= self._queue_size:
                self.dropped += 1
                return
            self._queue.append(tuple(map(row.get, USAGE_FIELDS)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, name="iflow2api-usage", daemon=True)
                self._thread.start()
            elif len(self._queue) in (1, self.BATCH):  # the first of a batch wakes the writer; a full one too
                self._wake.notify()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the writer."""
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    # -- the writer thread --

    def _write_loop(self) -> None:
        db = None
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closing or self._queue)  # idle: asleep
                self._wake.wait_for(lambda: self._closing or len(self._queue) >= self.BATCH, self.WRITE_EVERY_S)
                rows = [self._queue.popleft() for _ in range(min(self.BATCH, len(self._queue)))]
                closing = self._closing and not self._queue
            if rows:
                db = self._write(db, rows)
            if closing:
                if db is not None:
                    db.close()
                return

    def _write(self, db, rows: list):
        """Insert rows (and prune now and then); the connection to use next time."""
        import sqlite3
        for attempt in (1, 2):
            try:
                if db is None:
                    db = self._open()
                with db:
                    db.executemany("INSERT INTO requests (%s) VALUES (%s)"
                                   % (", ".join(USAGE_FIELDS), ", ".join("?" * len(USAGE_FIELDS))), rows)
                if time.monotonic() - self._pruned_at > self.PRUNE_EVERY_S:
                    self._prune(db)
                return db
            except sqlite3.Error as exc:
                if db is not None:
                    db.close()
                db = None
                if attempt == 2:
                    log.warning("usage history: %d rows not written (%s)", len(rows), exc)
                    return None
                self._set_aside(exc)
        return db

    def _open(self):
        import sqlite3
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=2.0, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, migration in enumerate(USAGE_MIGRATIONS[version:], version + 1):
                with db:
                    db.executescript(migration)
                    db.execute("PRAGMA user_version=%d" % number)
            if os.name == "posix":
                os.chmod(self.path, 0o600)
        except BaseException:
            db.close()
            raise
        return db

    def _set_aside(self, problem) -> None:
        """Move an unusable database (and its WAL files) aside, so the next write starts anew."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                try:
                    os.replace(self.path + suffix, "%s.broken-%s%s" % (self.path, stamp, suffix))
                except OSError:
                    pass
        log.warning("usage history: %s unusable (%s); moved aside, starting a new one", self.path, problem)

    def _prune(self, db) -> None:
        """Drop rows past the retention, then the oldest while the file is over its cap."""
        self._pruned_at = time.monotonic()
        with db:
            db.execute("DELETE FROM requests WHERE at < ?", (time.time() - self.retention_days * 86400,))
        cap = self.max_mb * MIB
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        while db.execute("PRAGMA page_count").fetchone()[0] * page_size > cap:
            count = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
            if count == 0:
                break
            with db:
                db.execute("DELETE FROM requests WHERE id IN (SELECT id FROM requests ORDER BY at LIMIT ?)",
                           (max(1, count // 10),))
            db.execute("VACUUM")

    # -- reports --

    def query(self, since: float, by: str) -> list:
        """[{key, requests, errors, input_tokens, output_tokens, reasoning_tokens, p50_ms, p95_ms}]
        since the unix time `since`, grouped by model, provider, account, key or day."""
        return self.report(since, (by,))[by]

    def report(self, since: float, groupings) -> dict:
        """{grouping: query()'s table} for several groupings, in one pass over the rows."""
        import sqlite3
        if not os.path.exists(self.path):
            return {by: [] for by in groupings}
        columns = ", ".join(USAGE_GROUPS[by] for by in groupings)
        db = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(self.path)), uri=True,
                             timeout=2.0)
        try:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'requests'").fetchone():
                return {by: [] for by in groupings}  # a new file, its table not made yet by the writer
            rows = db.execute("SELECT status, input_tokens, output_tokens, reasoning_tokens, latency_ms, %s "
                              "FROM requests WHERE at >= ? ORDER BY at" % columns, (since,)).fetchall()
        except sqlite3.Error as exc:
            raise Iflow2apiError("cannot read the usage history %s: %s" % (self.path, exc), status=503,
                                 code="unavailable") from None
        finally:
            db.close()
        return {by: usage_table((row[5 + i],) + row[:5] for row in rows) for i, by in enumerate(groupings)}


def since_time(text: str, now: float) -> float:
    """The unix time `--since` means: "7d", "24h", "30m" back from now, or a local date."""
    text = text.strip()
    units = {"d": 86400, "h": 3600, "m": 60}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * units[text[-1]]
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%d"))
    except ValueError:
        raise ConfigError("--since %s: expected 7d, 24h, 30m or a date such as 2026-11-01" % _shown(text)) from None


def usage_db_path(config_path: str) -> str:
    """Where the usage history lives: usage.db beside the config file."""
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), "usage.db")


def start_of_day(now: float) -> float:
    """The unix time of local midnight before now (the usage history's and quotas' day)."""
    return since_time(time.strftime("%Y-%m-%d", time.localtime(now)), now)


USAGE_GROUPS = {"model": "COALESCE(model_used, model_asked, '-')", "provider": "COALESCE(provider, '-')",
                "account": "COALESCE(account, '-')", "key": "COALESCE(client_key, '-')",
                "day": "date(at, 'unixepoch', 'localtime')"}


def usage_table(rows) -> list:
    """Rows (group key, status, input, output, reasoning tokens, latency ms) summed per key."""
    groups = collections.OrderedDict()
    for key, status, tokens_in, tokens_out, reasoning, latency in rows:
        group = groups.setdefault(key, {"key": key, "requests": 0, "errors": 0, "input_tokens": 0,
                                        "output_tokens": 0, "reasoning_tokens": 0, "_latencies": []})
        group["requests"] += 1
        group["errors"] += status >= 400
        group["input_tokens"] += tokens_in or 0
        group["output_tokens"] += tokens_out or 0
        group["reasoning_tokens"] += reasoning or 0
        if latency is not None:
            group["_latencies"].append(latency)
    out = []
    for group in sorted(groups.values(), key=lambda g: (-g["requests"], str(g["key"]))):
        latencies = sorted(group.pop("_latencies"))
        pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else 0  # noqa: E731
        group["p50_ms"], group["p95_ms"] = pick(0.5), pick(0.95)
        out.append(group)
    return out


# == 3. Translation (sans-IO): the Anthropic and Responses faces over chat completions ============
# Pure functions over dicts: reasoning handling for the OpenAI route. No sockets,
# clocks, files or randomness here. Tests: tests/unit/test_anthropic_translation.py,
# tests/unit/test_responses_translation.py.

def carries_reasoning(message: dict) -> bool:
    """Whether normalize_reasoning_message() has something to do in this message."""
    return isinstance(message.get("reasoning_content"), str) or isinstance(message.get("reasoning"), str)


def normalize_reasoning_message(message: dict, preserve: bool) -> dict:
    """Apply `preserve_reasoning_content` to a non-streaming assistant message.

    preserve=False (default): reasoning and answer merged into `content` as
    "reasoning\\n\\nanswer" (the original's README), `reasoning_content` removed.
    preserve=True: `reasoning_content` kept; `content` filled with the reasoning
    when the model answered only there (GLM-5 does), so content-only clients work.
    Providers that name the field `reasoning` (OpenRouter, Ollama) are read the same
    way and answer with `reasoning_content`."""
    if not carries_reasoning(message):
        return message
    if not isinstance(message.get("reasoning_content"), str):
        message["reasoning_content"] = message.pop("reasoning")
    reasoning = message["reasoning_content"]
    content = message.get("content")
    content = content if isinstance(content, str) else ""
    if preserve:
        if not content and reasoning:
            message["content"] = reasoning
        return message
    del message["reasoning_content"]
    if reasoning:
        message["content"] = reasoning + "\n\n" + content if content else reasoning
    return message


class ReasoningMerger:
    """Streaming form of preserve_reasoning_content.

    preserve=False: reasoning deltas become content deltas, with one blank line
    between the reasoning and the answer. preserve=True: reasoning stays apart, in
    `reasoning_content` also for providers that call the field `reasoning`.
    The relay asks wants() about the raw bytes of complete events first, so that
    chunks without reasoning are forwarded untouched and never parsed."""

    def __init__(self, preserve: bool = False):
        self.preserve = preserve
        self.seen_reasoning = False
        self.separated = False

    def wants(self, events: bytes) -> bool:
        if self.preserve:
            return b'"reasoning"' in events
        return b'"reasoning' in events or (self.seen_reasoning and not self.separated)

    def rewrite(self, data: str) -> str:
        """The data of one SSE event, rewritten when it carries reasoning."""
        if data == "[DONE]":
            return data
        try:
            chunk = json.loads(data)
        except ValueError:
            return data
        changed = False
        for choice in (chunk.get("choices") or []) if isinstance(chunk, dict) else []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and (self._rename(delta) if self.preserve else self._merge_delta(delta)):
                changed = True
        return compact_json(chunk) if changed else data

    @staticmethod
    def _rename(delta: dict) -> bool:
        if isinstance(delta.get("reasoning"), str) and "reasoning_content" not in delta:
            delta["reasoning_content"] = delta.pop("reasoning")
            return True
        return False

    def _merge_delta(self, delta: dict) -> bool:
        field = "reasoning_content" if "reasoning_content" in delta else "reasoning"
        has_reasoning = field in delta and (field == "reasoning_content" or isinstance(delta[field], str)
                                            or delta[field] is None)
        if not has_reasoning and not (self.seen_reasoning and delta.get("content")):
            return False
        reasoning = (delta.pop(field, None) if has_reasoning else None) or ""
        content = delta.get("content") or ""
        text = reasoning
        if reasoning:
            self.seen_reasoning = True
        if content:
            if self.seen_reasoning and not self.separated:
                text += "\n\n"
                self.separated = True
            text += content
        if text or "content" in delta:
            delta["content"] = text
        return True

def validate_chat_request(body) -> dict:
    """Check the shape of an OpenAI chat request; InvalidRequestError names the field."""
    if not isinstance(body, dict):
        raise _field_error(None, "request body must be a JSON object")
    if "model" in body and not isinstance(body["model"], str):
        raise _field_error("model", "model: expected a string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _field_error("messages", "messages: a non-empty list of messages is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _field_error("messages", "messages[%d]: expected an object with a string 'role'" % i)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _field_error("stream", "stream: expected true or false")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise _field_error(key, "%s: expected an integer" % key)
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _field_error(key, "%s: expected a number" % key)
    return body


def _field_error(param, message):
    return InvalidRequestError(message, param=param)


def completion_to_chunks(resp: dict) -> list:
    """A complete chat.completion replayed as chunks, for a stream request that the
    upstream answered with one JSON body."""
    base = {"id": resp.get("id") or "chatcmpl-proxy", "object": "chat.completion.chunk",
            "created": resp.get("created") or 0, "model": resp.get("model") or ""}
    chunks = []
    for choice in resp.get("choices") or []:
        if not isinstance(choice, dict):
            continue  # an upstream's malformed entry: nothing to replay
        message = dict(choice["message"]) if isinstance(choice.get("message"), dict) else {}
        message.setdefault("role", "assistant")
        delta = {k: v for k, v in message.items() if v is not None}
        chunks.append(dict(base, choices=[{"index": choice.get("index", 0), "delta": delta,
                                            "finish_reason": None}]))
        chunks.append(dict(base, choices=[{"index": choice.get("index", 0), "delta": {},
                                            "finish_reason": choice.get("finish_reason") or "stop"}]))
    if resp.get("usage"):
        chunks.append(dict(base, choices=[], usage=resp["usage"]))
    return chunks


# -- Anthropic Messages <-> OpenAI Chat Completions -----------------------------------------------
# As specified rule by rule in docs/translation.md (section numbers below
# refer to it). Tests: tests/unit/test_anthropic_translation.py.


# -- Context --------------------------------------------------------------------------------------

class TranslationContext:
    """Per-request inputs and outputs of the translation functions.

    Inputs: client_model (echoed back to the client), upstream_model (already resolved),
    new_id(prefix) -> str, profile (dict of provider flags, see _PROFILE_DEFAULTS),
    model_info (dict: vision, max_output_tokens, context_window), preserve_reasoning.
    Filled by anthropic_to_openai_request: thinking_requested, tool_names (upstream
    short name -> original), history_tool_ids, stop_sequences, estimated_input_tokens.
    """

    def __init__(self, client_model="", upstream_model="", new_id=None, profile=None,
                 model_info=None, preserve_reasoning=False):
        self.client_model = client_model
        self.upstream_model = upstream_model
        # The default is deterministic and only unique within one context: fine for tests
        # and count_tokens; the server passes a real random id source.
        self.new_id = new_id or _counter_ids()
        self.profile = profile or {}
        self.model_info = model_info or {}
        self.preserve_reasoning = preserve_reasoning
        self.thinking_requested = False
        self.tool_names = {}
        self.history_tool_ids = set()
        self.stop_sequences = []
        self.estimated_input_tokens = 0
        # What the translation dropped or worked around, for the HTTP layer to log with
        # the request id (translation itself never logs): notes are routine, warnings odd.
        self.notes = []
        self.warnings = []

    def note(self, message):
        if message not in self.notes:
            self.notes.append(message)

    def warn(self, message):
        if message not in self.warnings:
            self.warnings.append(message)

    def flag(self, name):
        """Value of a profile flag; absent or None -> the documented default."""
        value = self.profile.get(name)
        return _PROFILE_DEFAULTS.get(name) if value is None else value

    @property
    def shows_reasoning(self):
        """Whether upstream reasoning becomes thinking blocks (2.2 step 1)."""
        return bool(self.thinking_requested or self.preserve_reasoning
                    or self.flag("replay_reasoning"))


_PROFILE_DEFAULTS = {
    "max_tokens_field": "max_tokens",
    "stream_usage": True,
    "accepts_top_k": False,
    "tool_choice_any": "required",
    "parallel_tool_calls": True,
    "thinking_style": None,
    "replay_reasoning": False,
    "reasoning_placeholder": "(reasoning omitted)",
    "needs_user_first": False,
    "inline_think_tags": False,  # no effect: a leading <think> is always parsed (2.2, 3.7)
    "supports_pdf": False,
    "drop_tool_choice_when_thinking": False,
    "drop_sampling_params": False,
    "strict_schema": False,
    "reasoning_split": False,
    "send_user": False,
    "refusal_as_end_turn": False,
    "accepts_strict_tools": False,  # Responses route: keep a function tool's "strict"
}


# -- rule 1.1 Model resolution --------------------------------------------------------------------

_DATE_SUFFIX_RE = re.compile(r"-\d{8}$")
_ONE_M_SUFFIX_RE = re.compile(r"\[1m\]$", re.IGNORECASE)
_FAMILIES = ("haiku", "sonnet", "opus")


def resolve_model(name, model_map, known_models, default_model) -> str:
    """Return the upstream model id for a client model name (1.1).

    Order: exact known id; the name without `[1m]` / `-YYYYMMDD` as a known id; an alias
    in model_map (full name, then stripped name); the family words haiku/sonnet/opus as
    model_map keys in a Claude name; then default_model for Claude names. Other names pass through with
    only `[1m]` removed (`deepseek-chat` -> `deepseek-chat`).
    """
    model_map = model_map or {}
    known_models = known_models or ()
    name = (name or "").strip()
    if name in known_models:
        return name
    without_1m = _ONE_M_SUFFIX_RE.sub("", name)
    base = _DATE_SUFFIX_RE.sub("", without_1m)
    for candidate in (without_1m, base):
        if candidate in known_models:
            return candidate
    for candidate in (name, without_1m, base):
        if candidate in model_map:
            return model_map[candidate]
    lower = base.lower()
    if not lower.startswith("claude"):  # "anthropic/claude-sonnet-4" is another provider's id
        return without_1m
    for family in _FAMILIES:
        if family in lower and family in model_map:
            return model_map[family]
    return default_model or without_1m


def pick_scenario(scenario_routes: dict, client_model, model_map: dict, has_images: bool, thinking: bool,
                  estimate, long_context_tokens: int):
    """(scenario, target) when a configured scenario route takes the request, else None.

    Scenarios apply to the names Claude Code sends (a Claude name, a model_map key, or no
    model), never to a model the client chose by its own name. estimate() gives the
    prompt's tokens; it is called only when a long_context route is configured."""
    name = (client_model or "").strip()
    if not scenario_routes or not (name.lower().startswith("claude") or name in (model_map or {}) or not name):
        return None
    applies = {"image": lambda: has_images, "long_context": lambda: estimate() > long_context_tokens,
               "background": lambda: "haiku" in name.lower(), "think": lambda: thinking, "default": lambda: True}
    for scenario in SCENARIOS:
        target = scenario_routes.get(scenario)
        if isinstance(target, str) and target and applies[scenario]():
            return scenario, target
    return None


# -- rule 1 Request: Anthropic -> OpenAI ----------------------------------------------------------

@contextlib.contextmanager
def client_input_errors():
    """Around code that reads a client's request: a field of a shape the validation
    did not foresee (a number where a list belongs) is the client's mistake, a
    TranslationError (400 in the route's dialect), never a 500."""
    try:
        yield
    except Iflow2apiError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError) as exc:
        raise TranslationError("the request has a field of an unexpected type or shape (%s: %s)"
                               % (type(exc).__name__, str(exc)[:200])) from None


def anthropic_to_openai_request(req, ctx) -> dict:
    """Translate an Anthropic Messages request into an OpenAI chat.completions body.

    Fills ctx (thinking_requested, tool_names, history_tool_ids, stop_sequences,
    estimated_input_tokens). Raises TranslationError for invalid input (1.3).
    """
    with client_input_errors():
        return _anthropic_to_openai_request(req, ctx)


def _anthropic_to_openai_request(req, ctx) -> dict:
    if not isinstance(req, dict):
        raise TranslationError("request body must be a JSON object")
    raw_messages = _validated_messages(req)
    _validate_max_tokens(req.get("max_tokens"))
    ctx.thinking_requested = _thinking_type(req) in ("enabled", "adaptive")

    tools = _translate_tools(req.get("tools"), ctx)
    messages = _system_messages(req.get("system"))
    messages += _translate_conversation(raw_messages, ctx)
    if not any(m["role"] != "system" for m in messages):
        raise TranslationError("messages: all messages are empty")

    body = {"model": ctx.upstream_model, "messages": messages}
    if req.get("stream"):
        body["stream"] = True
        if ctx.flag("stream_usage"):
            body["stream_options"] = {"include_usage": True}
    _copy_sampling(req, body, ctx)
    _copy_stop_sequences(req, body, ctx)
    if tools:
        body["tools"] = tools
        _apply_tool_choice(req.get("tool_choice"), body, ctx)
    _apply_thinking(req, body, ctx)
    _apply_user(req, body, ctx)

    ctx.estimated_input_tokens = _estimate_openai_body(body)
    max_tokens = _max_tokens(req, ctx)
    if max_tokens is not None:
        body[ctx.flag("max_tokens_field") or "max_tokens"] = max_tokens
    return body


def shorten_tool_name(name) -> str:
    """Return an upstream-safe tool name (1.4): unchanged when it already fits
    `^[a-zA-Z0-9_-]{1,64}$`, else sanitized, cut to 55 chars, plus `_` and 8 hex chars
    of sha256(original). Deterministic, so no state is needed between requests."""
    name = name if isinstance(name, str) else str(name)
    if _TOOL_NAME_RE.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:55] + "_" + digest


_TOOL_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _validated_messages(req):
    messages = req.get("messages")
    if messages is None:
        raise TranslationError("messages: Field required")
    if not isinstance(messages, list):
        raise TranslationError("messages: Input should be a valid list")
    if not messages:
        raise TranslationError("messages: at least one message is required")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise TranslationError("messages.%d: Input should be a valid dictionary" % i)
        role = msg.get("role")
        if role == "system":
            raise TranslationError(
                'messages: Unexpected role "system". The Messages API accepts a top-level '
                '`system` parameter, not "system" as an input message role.')
        if role not in ("user", "assistant"):
            raise TranslationError('messages.%d: Unexpected role "%s"; expected "user" or '
                                   '"assistant"' % (i, role))
        if "content" not in msg:
            raise TranslationError("messages.%d.content: Field required" % i)
        content = msg["content"]
        if not isinstance(content, (str, list)):
            raise TranslationError("messages.%d.content: Input should be a valid string "
                                   "or list of content blocks" % i)
        if isinstance(content, list):
            for j, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise TranslationError("messages.%d.content.%d: Input should be a "
                                           "content block object with a type" % (i, j))
    return messages


def _validate_max_tokens(max_tokens):
    # Missing is fine (1.1: the model's default); a wrong type is the client's mistake.
    if max_tokens is not None and (isinstance(max_tokens, bool)
                                   or not isinstance(max_tokens, int) or max_tokens < 1):
        raise TranslationError("max_tokens: Input should be an integer of at least 1")


# 1.1 system: billing header blocks carry a per-request hash that defeats prompt caching.
_BILLING_HEADER = "x-anthropic-billing-header:"


def _system_messages(system):
    if system is None:
        return []
    if isinstance(system, str):
        text = system
    elif isinstance(system, list):
        texts = []
        for block in system:
            if isinstance(block, str):
                block = {"type": "text", "text": block}
            if not isinstance(block, dict) or block.get("type", "text") != "text":
                continue
            text = block.get("text")
            if not isinstance(text, str) or not text.strip():
                continue
            if text.lstrip().startswith(_BILLING_HEADER):
                continue
            texts.append(text)
        text = "\n\n".join(texts)
    else:
        raise TranslationError("system: Input should be a valid string or list")
    return [{"role": "system", "content": text}] if text.strip() else []


def _copy_sampling(req, body, ctx):
    if ctx.flag("drop_sampling_params"):
        return
    for key in ("temperature", "top_p"):
        if isinstance(req.get(key), (int, float)) and not isinstance(req.get(key), bool):
            body[key] = req[key]
    if ctx.flag("accepts_top_k") and isinstance(req.get("top_k"), int):
        body["top_k"] = req["top_k"]


def _copy_stop_sequences(req, body, ctx):
    stops = req.get("stop_sequences")
    if isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, list):
        return
    stops = [s for s in stops if isinstance(s, str) and s]
    ctx.stop_sequences = list(stops)
    if len(stops) > 4:
        ctx.note("OpenAI accepts at most 4 stop sequences; sent the first 4")
        stops = stops[:4]
    if stops:
        body["stop"] = stops


def _apply_user(req, body, ctx):
    # 1.1: metadata.user_id identifies machine and session; only a hash may leave.
    metadata = req.get("metadata")
    if not ctx.flag("send_user") or not isinstance(metadata, dict):
        return
    user_id = metadata.get("user_id")
    if isinstance(user_id, str) and user_id:
        body["user"] = hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]


def _max_tokens(req, ctx):
    """1.8: clamp to the output limit, then keep input + output inside the window."""
    info = ctx.model_info
    output_limit = info.get("max_output_tokens")
    window = info.get("context_window")
    max_tokens = req.get("max_tokens")
    if max_tokens is None:
        max_tokens = output_limit
    if max_tokens is None:
        return None
    if output_limit and max_tokens > output_limit:
        max_tokens = output_limit
    estimate = ctx.estimated_input_tokens
    if window and estimate + max_tokens > window:
        max_tokens = min(max_tokens, max(1024, window - estimate - 1024))
    return max_tokens


# -- rule 1.2 / 1.3 Messages ----------------------------------------------------------------------

def _translate_conversation(raw_messages, ctx):
    """Translate A messages into O messages with the ordering rules of 1.3."""
    out = []
    pending_ids = []  # tool calls of the last assistant message still waiting for results
    for msg in raw_messages:
        if msg["role"] == "assistant":
            assistant = _assistant_message(msg, ctx)
            if assistant is None:
                continue  # 1.2: nothing left; neighbours merge below
            out += _interrupted_results(pending_ids)
            out.append(assistant)
            pending_ids = [call["id"] for call in assistant.get("tool_calls", [])]
        else:
            out += _user_messages(msg, pending_ids, ctx)
            pending_ids = []
    out += _interrupted_results(pending_ids)
    out = _merge_same_role(out)
    if ctx.flag("replay_reasoning"):
        _add_reasoning_placeholders(out, ctx.flag("reasoning_placeholder"))
    if ctx.flag("needs_user_first") and out and out[0]["role"] == "assistant":
        out.insert(0, {"role": "user", "content": "(continue)"})
    return out


_INTERRUPTED = "(no result: the tool call was interrupted)"


def _interrupted_results(tool_call_ids):
    # 1.3 step 3: O needs one tool message per call, even for runs that were cut off.
    return [{"role": "tool", "tool_call_id": i, "content": _INTERRUPTED} for i in tool_call_ids]


def _assistant_message(msg, ctx):
    content = msg["content"]
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    texts, tool_calls, thoughts = [], [], []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if isinstance(text, str) and text.strip():
                texts.append(text)
        elif kind == "tool_use":
            tool_calls.append(_history_tool_call(block, ctx))
        elif kind == "thinking":
            thought = block.get("thinking")
            if isinstance(thought, str) and thought.strip():
                thoughts.append(thought)
        # redacted_thinking, server_tool_use, web_search_tool_result, ...: dropped (1.2)
    if not texts and not tool_calls:
        return None
    out = {"role": "assistant", "content": "\n".join(texts) if texts else None}
    if tool_calls:
        out["tool_calls"] = tool_calls
    if thoughts and ctx.flag("replay_reasoning"):
        out["reasoning_content"] = "\n\n".join(thoughts)  # 1.7; signatures never leave
    return out


def _history_tool_call(block, ctx):
    call_id = block.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = ctx.new_id("toolu_")
    ctx.history_tool_ids.add(call_id)
    tool_input = block.get("input")
    if not isinstance(tool_input, dict):
        tool_input = {}
    return {"id": call_id, "type": "function",
            "function": {"name": shorten_tool_name(block.get("name") or ""),
                         "arguments": json.dumps(tool_input, ensure_ascii=False)}}


def _add_reasoning_placeholders(messages, placeholder):
    # 1.7: Kimi / DeepSeek thinking models 400 on a tool-call message without reasoning.
    for msg in messages:
        needs_reasoning = msg["role"] == "assistant" and msg.get("tool_calls")
        if needs_reasoning and not msg.get("reasoning_content"):
            msg["reasoning_content"] = placeholder or "(reasoning omitted)"


def _user_messages(msg, pending_ids, ctx):
    """One A user message -> tool messages, interrupted stubs, then one user message (1.3)."""
    content = msg["content"]
    if isinstance(content, str):
        blocks = [{"type": "text", "text": content}]
    else:
        blocks = content
    answered = []
    tool_messages = []
    tool_images = []  # parts moved out of tool results (1.3 step 2)
    parts = []
    for block in blocks:
        if block.get("type") != "tool_result":
            parts += _user_parts(block, ctx)
            continue
        call_id = block.get("tool_use_id") or ""
        text, extra_parts = _tool_result_content(block, ctx)
        if call_id in pending_ids and call_id not in answered:
            answered.append(call_id)
            tool_messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            if extra_parts:
                tool_images.append(_text_part("Image output of tool call %s:" % call_id))
                tool_images += extra_parts
        else:
            # 1.3 steps 5 and 6: orphan or repeated result -> plain user text.
            parts.append(_text_part("Result of tool call %s:\n%s" % (call_id, text)))
            parts += extra_parts
    out = tool_messages
    out += _interrupted_results([i for i in pending_ids if i not in answered])
    # Moved tool images go first: they belong to the results, which precede the text.
    user_content = _user_content(tool_images + parts)
    if user_content is not None:
        out.append({"role": "user", "content": user_content})
    return out


def _user_content(parts):
    """Text-only parts -> one string joined with "\\n" (1.2); none -> None."""
    if not parts:
        return None
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _text_part(text):
    return {"type": "text", "text": text}


def _user_parts(block, ctx):
    """O content parts for one A user block (1.2)."""
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return [_text_part(text)] if isinstance(text, str) and text.strip() else []
    if kind == "image":
        return [_image_part(block, ctx)]
    if kind == "document":
        return _document_parts(block, ctx)
    if kind == "search_result":
        return [_text_part(_search_result_text(block))]
    return []  # thinking, tool_use, server_tool_use, unknown: not valid in a user turn


def _image_part(block, ctx):
    if ctx.model_info.get("vision") is False:
        return _text_part("[image omitted: this model does not accept images]")
    source = block.get("source") or {}
    if not isinstance(source, dict):
        raise TranslationError("image source: expected an object with a type (base64 or url)")
    kind = source.get("type")
    if kind == "base64":
        media_type = source.get("media_type") or "image/png"
        url = "data:%s;base64,%s" % (media_type, source.get("data") or "")
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "url" and source.get("url"):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    if kind == "file":
        return _text_part("[image omitted: file references are not supported]")
    return _text_part("[image omitted: unsupported image source]")


def _document_parts(block, ctx):
    source = block.get("source") or {}
    kind = source.get("type")
    title = block.get("title") if isinstance(block.get("title"), str) else ""
    if kind == "text":
        data = source.get("data") or ""
        return [_text_part(title + "\n" + data if title else data)]
    if kind == "content":
        inner = source.get("content")
        if isinstance(inner, str):
            inner = [{"type": "text", "text": inner}]
        parts = [_text_part(title)] if title else []
        for item in inner if isinstance(inner, list) else []:
            if isinstance(item, dict):
                parts += _user_parts(item, ctx)
        return parts
    if kind == "base64":
        if ctx.flag("supports_pdf"):
            data_url = "data:%s;base64,%s" % (source.get("media_type") or "application/pdf",
                                              source.get("data") or "")
            return [{"type": "file", "file": {"filename": title or "document.pdf",
                                              "file_data": data_url}}]
        return [_text_part("[PDF omitted: not supported by this model]")]
    if kind == "url":
        url = source.get("url") or ""
        return [_text_part((title + "\n" if title else "") + "Document: " + url)]
    return [_text_part("[document omitted: file references are not supported]")]


def _search_result_text(block):
    lines = [block.get(key) for key in ("title", "source") if isinstance(block.get(key), str)]
    lines.append(_joined_texts(block.get("content")))
    return "\n".join(line for line in lines if line)


def _joined_texts(content, sep="\n"):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return sep.join(p["text"] for p in content
                    if isinstance(p, dict) and isinstance(p.get("text"), str))


def _tool_result_content(block, ctx):
    """Return (string for the tool message, parts that must move to the user message)."""
    content = block.get("content")
    if isinstance(content, dict):
        content = [content]
    texts, moved = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for item in content:
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind in ("image", "document"):
                # Several upstreams accept only a string in a tool message (1.3 step 2):
                # text stays, images and files move to the following user message.
                for part in _user_parts(item, ctx):
                    if part["type"] == "text":
                        texts.append(part["text"])
                    else:
                        moved.append(part)
            elif kind == "search_result":
                texts.append(_search_result_text(item))
            elif kind == "tool_reference" and isinstance(item.get("tool_name"), str):
                texts.append("Tool reference: " + item["tool_name"])
            elif isinstance(item.get("text"), str):
                texts.append(item["text"])
    text = "\n".join(t for t in texts if t)
    if not text.strip():
        text = "(no output)"  # several upstreams reject empty tool content
    elif block.get("is_error") and "<tool_use_error>" not in text and not text.startswith("Error"):
        text = "Error: " + text  # O has no error flag; the text is the only signal
    return text, moved


def _merge_same_role(messages):
    """Merge consecutive user or assistant messages (1.3); tool messages stay apart."""
    out = []
    for msg in messages:
        prev = out[-1] if out else None
        if prev is None or prev["role"] != msg["role"] or msg["role"] not in ("user", "assistant"):
            out.append(msg)
        elif msg["role"] == "user":
            prev["content"] = _merge_user_content(prev["content"], msg["content"])
        else:
            _merge_assistant(prev, msg)
    return out


def _merge_user_content(a, b):
    if isinstance(a, str) and isinstance(b, str):
        return a + "\n\n" + b
    return _as_parts(a) + _as_parts(b)


def _as_parts(content):
    return [_text_part(content)] if isinstance(content, str) else content


def _merge_assistant(prev, msg):
    texts = [t for t in (prev.get("content"), msg.get("content")) if t]
    prev["content"] = "\n".join(texts) if texts else None
    if msg.get("tool_calls"):
        prev["tool_calls"] = prev.get("tool_calls", []) + msg["tool_calls"]
    thoughts = [t for t in (prev.get("reasoning_content"), msg.get("reasoning_content")) if t]
    if thoughts:
        prev["reasoning_content"] = "\n\n".join(thoughts)


# -- rule 1.4 / 1.5 Tools -------------------------------------------------------------------------

def _translate_tools(tools, ctx):
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise TranslationError("tools: Input should be a valid list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise TranslationError("tools.%d: Input should be a valid dictionary" % i)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            # Server tools (web_search_*, bash_*, MCP toolsets...): the upstream cannot run them.
            ctx.note("dropped server tool of type %r (not supported through the proxy)" % kind)
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise TranslationError("tools.%d.name: Field required" % i)
        if not isinstance(tool.get("input_schema"), dict):
            raise TranslationError("tools.%d.input_schema: Field required" % i)
        short = shorten_tool_name(name)
        ctx.tool_names[short] = name
        description = tool.get("description")
        out.append({"type": "function", "function": {
            "name": short,
            "description": description if isinstance(description, str) else "",
            "parameters": _clean_schema(tool["input_schema"], ctx.flag("strict_schema"),
                                        top_level=True),
        }})
    return out


# JSON Schema keywords whose values are schemas, maps of schemas or lists of schemas. Only
# these are walked, so a property that happens to be called "format" or "default" survives.
_SCHEMA_VALUE_KEYS = ("items", "additionalItems", "not", "if", "then", "else", "contains",
                      "propertyNames", "unevaluatedProperties", "unevaluatedItems",
                      "additionalProperties")
_SCHEMA_MAP_KEYS = ("properties", "$defs", "definitions", "patternProperties",
                    "dependentSchemas")
_SCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_STRICT_DROPPED_KEYS = ("format", "additionalProperties", "default")


def _clean_schema(schema, strict, top_level=False):
    """1.4: drop $schema, give object schemas `properties` at every depth; strict
    profiles also drop format / additionalProperties / default."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$schema" or (strict and key in _STRICT_DROPPED_KEYS):
            continue
        if key in _SCHEMA_MAP_KEYS and isinstance(value, dict):
            value = {k: _clean_schema(v, strict) for k, v in value.items()}
        elif key in _SCHEMA_LIST_KEYS and isinstance(value, list):
            value = [_clean_schema(v, strict) for v in value]
        elif key in _SCHEMA_VALUE_KEYS and isinstance(value, dict):
            value = _clean_schema(value, strict)
        out[key] = value
    if top_level and "type" not in out:
        out["type"] = "object"  # not in the spec: several upstreams 400 on a typeless root
    schema_type = out.get("type")
    is_object = schema_type == "object" or (isinstance(schema_type, list)
                                            and "object" in schema_type)
    if is_object and not isinstance(out.get("properties"), dict):
        out["properties"] = {}
    return out


def _apply_tool_choice(choice, body, ctx):
    """1.5 (only called when tools are sent: no tools -> no tool_choice at all)."""
    if isinstance(choice, str):
        choice = {"type": choice}
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    value = None
    if kind == "auto":
        value = "auto"
    elif kind == "any":
        value = ctx.flag("tool_choice_any") or "required"
    elif kind == "none":
        value = "none"
    elif kind == "tool":
        name = choice.get("name")
        short = shorten_tool_name(name) if isinstance(name, str) and name else None
        if short in ctx.tool_names:
            value = {"type": "function", "function": {"name": short}}
        else:
            value = "auto"  # the named tool was dropped in 1.4
    if value is not None and not (ctx.flag("drop_tool_choice_when_thinking")
                                  and ctx.thinking_requested):
        body["tool_choice"] = value
    if choice.get("disable_parallel_tool_use") is True and ctx.flag("parallel_tool_calls"):
        body["parallel_tool_calls"] = False


# -- rule 1.6 Thinking ----------------------------------------------------------------------------

def _thinking_type(req):
    thinking = req.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive", "disabled"):
        return thinking["type"]
    return None


_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high"}


def _reasoning_effort(req):
    thinking = req["thinking"]
    if thinking["type"] == "adaptive":
        config = req.get("output_config")
        effort = config.get("effort") if isinstance(config, dict) else None
        return _EFFORTS.get(effort, "medium")
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool):
        return "medium"
    if budget <= 1024:
        return "low"
    return "medium" if budget <= 8192 else "high"


def _apply_thinking(req, body, ctx):
    kind = _thinking_type(req)
    style = ctx.flag("thinking_style")
    if ctx.flag("reasoning_split"):
        body["reasoning_split"] = True  # MiniMax: reasoning in its own field, not <think>
    if kind is None:
        return
    enabled = kind != "disabled"
    if style is None:
        if enabled:
            body["reasoning_effort"] = _reasoning_effort(req)
    elif style == "enable_thinking":
        body["enable_thinking"] = enabled
        budget = req["thinking"].get("budget_tokens")
        if enabled and isinstance(budget, int) and not isinstance(budget, bool):
            body["thinking_budget"] = budget
    elif style == "thinking_type":
        body["thinking"] = {"type": "enabled" if enabled else "disabled"}
    elif style == "chat_template_kwargs":
        body["chat_template_kwargs"] = {"enable_thinking": enabled}
    # style "provider": the provider's own per-model request fields decide (iFlow).


# -- rule 2 Response: OpenAI -> Anthropic (non-streaming) -----------------------------------------

def openai_to_anthropic_response(resp, ctx) -> dict:
    """Translate a non-streaming chat.completions response into an Anthropic message.

    Runs the response through AnthropicStream as one chunk and aggregates the events
    (3.11), so both routes share one code path for reasoning, think tags, tool repair and
    stop reasons. Raises UpstreamError for error bodies and bodies without choices.
    """
    if not isinstance(resp, dict):
        raise UpstreamError(502, "api_error", "upstream returned an unparsable body",
                            upstream_status=200)
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices:
        if _is_error_body(resp):
            raise upstream_error(200, resp)
        raise UpstreamError(502, "api_error", "upstream returned no choices",
                            upstream_status=200)
    choice = _first_choice(choices) or {}
    message = choice.get("message") or choice.get("delta")
    if not isinstance(message, dict):
        message = {}
    if isinstance(message.get("tool_calls"), list):
        # Complete calls: number them so that two calls with the same id stay two calls.
        message = dict(message, tool_calls=[dict(call, index=i) for i, call in
                                            enumerate(message["tool_calls"])
                                            if isinstance(call, dict)])
    chunk_choice = {"index": 0, "delta": message, "finish_reason": choice.get("finish_reason")}
    for key in ("stop_reason", "matched_stop"):
        if key in choice:
            chunk_choice[key] = choice[key]
    chunk = {"choices": [chunk_choice], "usage": resp.get("usage")}
    stream = AnthropicStream(ctx)
    events = stream.feed(chunk) + stream.close(done=True)
    return aggregate_stream_to_message(events)


# -- rule 3 Streaming: OpenAI chunks -> Anthropic events ------------------------------------------

class StreamState:
    """Readable state of an AnthropicStream (3.5); tests and the HTTP layer look at it."""

    def __init__(self):
        self.started = False
        self.done = False
        self.failed = False
        self.open_kind = None  # "text" | "thinking" | None
        self.open_index = None
        self.next_index = 0
        self.tools = {}  # key -> _ToolCall
        self.emitted_tool_count = 0
        self.finish_reason = None
        self.matched_stop = None
        self.usage = None
        self.hidden_reasoning = ""


# Theory of operation (AnthropicStream, 3.5 - 3.7)
#
# One instance per request turns OpenAI chunks into Anthropic events that always obey the
# grammar of 3.2:  message_start ping (block_start block_delta* block_stop)* message_delta
# message_stop, or, after a failure, ... error.
#
# States:   not started --feed/start--> started --finish_reason--> finished
#           --close(done)--> done.   fail() goes to done from anywhere after started.
# Blocks:   at most one block is open at a time (state.open_kind / open_index). Text and
#           thinking stream live: a delta of the other kind closes the open block and
#           opens a new one (a thinking block always gets its signature_delta before its
#           stop). Tool calls never stream: fragments are merged per O index into
#           state.tools and emitted whole (start, one input_json_delta, stop) at
#           finish_reason, or at close when no finish came (3.6).
# Holding back: a text or thinking block is opened only once its content has a
#           non-whitespace character, so whitespace-only content never makes a block
#           (rule 7); the <think> parser holds back a possible partial tag (3.7).
# End:      close() emits the hidden-reasoning fallback if nothing was emitted, then the
#           single message_delta (stop reason + usage together) and message_stop.
#           Anything fed after done is ignored.
# Errors:   an error chunk before the start raises UpstreamError (the HTTP layer can still
#           answer with a status or retry); after the start it becomes one `error` event.

def _joined_text(parts) -> str:
    """Text pieces joined in order; bytes pieces are JSON string literals the fast path
    passed on as they came (rule 3.1 fast path), decoded here in one go."""
    if bytes not in map(type, parts):
        return "".join(parts)
    literals = [part if part.__class__ is bytes else json.dumps(part).encode("utf-8") for part in parts]
    return "".join(json.loads(b"[" + b",".join(literals) + b"]"))


class _StreamUsage:
    """What both stream state machines (Anthropic, Responses) report for the access log."""

    def restart(self) -> None:
        """Start over for another model (a fallback): nothing of this stream reached the client."""
        self.__init__(self.ctx)

    def usage_for_log(self):
        """(input_tokens, output_tokens) as sent to the client, or the current estimate."""
        usage = self.final_usage or self._final_usage()
        return usage["input_tokens"], usage["output_tokens"]


def _choice_delta(choice) -> dict:
    """The delta of a chunk's choice (a replayed completion carries a message instead)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta
    return choice.get("message") if isinstance(choice.get("message"), dict) else {}


def _delta_tool_calls(delta) -> list:
    """A delta's tool_calls entries (the legacy single function_call as one entry)."""
    if isinstance(delta.get("tool_calls"), list):
        return delta["tool_calls"]
    if isinstance(delta.get("function_call"), dict):
        return [dict(delta["function_call"], index=0, _legacy=True)]
    return []


class AnthropicStream(_StreamUsage):
    """Sans-IO converter from OpenAI stream chunks (dicts) to Anthropic SSE events.

    feed(chunk) -> list of (event_name, data); start() forces message_start + ping;
    close(done) handles `[DONE]` (done=True) or EOF (done=False); fail(type, message)
    gives the final `error` event. Events are tuples whose data["type"] == event_name.
    """

    def __init__(self, ctx):
        self.ctx = ctx
        self.state = StreamState()
        self.message_id = None
        self.final_usage = None
        self._think_parser = _ThinkTagParser()
        self._pending_text = ""  # whitespace waiting for a first visible character
        self._pending_thinking = ""
        self._used_tool_ids = set()
        self._generated = []  # all generated text, for the output estimate without usage
        self._saw_data = False

    # -- public surface --

    def plain_text_target(self):
        """When a chunk that only adds text may skip this state machine (a text block open,
        nothing held back, no think tag in play): the fast path's event fields before the
        text, (block index,); else None."""
        st = self.state
        if st.open_kind == "text" and not st.done and self._think_parser.idle and not self._pending_text:
            return (st.open_index,)
        return None

    def took_plain_text(self, literal: bytes):
        """Count text that the fast path sent on as it came (a JSON string literal; decoded
        only for the output estimate, when the upstream reports no usage). The target of
        the next such chunk: the same block."""
        self._saw_data = True
        self._generated.append(literal)
        return (self.state.open_index,)

    def start(self) -> list:
        """Emit message_start + ping if not done yet (3.4: the HTTP layer's 10 s mark)."""
        if self.state.started or self.state.done:
            return []
        self.state.started = True
        self.message_id = self.ctx.new_id("msg_")
        message = {
            "id": self.message_id, "type": "message", "role": "assistant",
            "model": self.ctx.client_model, "content": [], "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.ctx.estimated_input_tokens, "output_tokens": 1,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                         "ephemeral_1h_input_tokens": 0},
                      "service_tier": "standard"},
        }
        return [_event("message_start", message=message), _event("ping")]

    def feed(self, chunk) -> list:
        """Process one upstream chunk (3.5 steps 1-6). Raises UpstreamError for an error
        chunk that arrives before the stream started (3.4)."""
        if self.state.done or not isinstance(chunk, dict):
            return []
        if _is_error_body(chunk):
            err = upstream_error(200, chunk)
            if not self.state.started:
                self.state.done = True
                raise err
            return self.fail(err.anthropic_type, err.message)
        out = self.start()
        self._saw_data = True
        choice = _first_choice(chunk.get("choices"))
        if choice is not None:
            self._feed_choice(choice, out)
        usage = chunk.get("usage")
        if not isinstance(usage, dict) and choice is not None:
            usage = choice.get("usage")
        if isinstance(usage, dict):
            self.state.usage = usage  # 3.5 step 6: overwrite (some send cumulative usage)
        return out

    def close(self, done) -> list:
        """End of the upstream stream: done=True for `[DONE]`, False for EOF (3.5 step 7)."""
        st = self.state
        if st.done:
            return []
        if not done and st.finish_reason is None:
            # Connection cut mid-answer: the client must retry, not keep a truncated answer.
            if not st.started:
                st.done = True
                raise UpstreamError(502, "api_error", "upstream stream ended unexpectedly")
            return self.fail("api_error", "upstream stream ended unexpectedly")
        out = self.start()
        if not self._saw_data:
            self.ctx.warn("upstream stream ended without any data; sending an empty message")
        self._finish_blocks(out)
        if st.next_index == 0 and st.hidden_reasoning.strip():
            # Empty-answer fallback (2.2 step 2): some models put the answer in reasoning.
            self._open_block("text", out)
            out.append(_delta(st.open_index, "text_delta", text=st.hidden_reasoning))
            self._close_block(out)
        self.final_usage = self._final_usage()
        out.append(_event("message_delta",
                          delta={"stop_reason": self._stop_reason(),
                                 "stop_sequence": self._stop_sequence()},
                          usage=self.final_usage))
        out.append(_event("message_stop"))
        st.done = True
        return out

    def fail(self, error_type, message) -> list:
        """Final `error` event (3.9). Before message_start nothing may be written (the
        HTTP layer answers with an HTTP error instead), so this returns []."""
        st = self.state
        if st.done:
            return []
        st.done = st.failed = True
        if not st.started:
            return []
        return [_event("error", error={"type": error_type, "message": message})]

    # -- per chunk --

    def _feed_choice(self, choice, out):
        delta = _choice_delta(choice)
        reasoning = _reasoning_text(delta)
        if reasoning:
            self._on_reasoning(reasoning, out)
        content = _content_text(delta)
        if content:
            for kind, text in self._think_parser.feed(content):
                self._on_parsed(kind, text, out)
        merge_tool_call_chunks(self.state.tools, _delta_tool_calls(delta))
        finish = choice.get("finish_reason")
        if finish and isinstance(finish, str):  # an upstream's odd value (a list...) is no reason
            self.state.finish_reason = finish
            for key in ("stop_reason", "matched_stop"):  # vLLM, SGLang (2.3)
                if isinstance(choice.get(key), str):
                    self.state.matched_stop = choice[key]
            self._finish_blocks(out)

    def _on_parsed(self, kind, text, out):
        if kind == "reasoning":
            self._on_reasoning(text, out)
        else:
            self._on_text(text, out)

    def _on_reasoning(self, text, out):
        st = self.state
        self._generated.append(text)
        if not self.ctx.shows_reasoning:
            st.hidden_reasoning += text
            return
        if st.open_kind != "thinking":
            self._pending_thinking += text
            if not self._pending_thinking.strip():
                return  # whitespace-only reasoning makes no block (2.2 step 1)
            text, self._pending_thinking = self._pending_thinking, ""
            self._open_block("thinking", out)
        out.append(_delta(st.open_index, "thinking_delta", thinking=text))

    def _on_text(self, text, out):
        st = self.state
        self._generated.append(text)
        if st.open_kind != "text":
            self._pending_text += text
            if not self._pending_text.strip():
                return  # a block with no visible content is not started (3.2 rule 7)
            text, self._pending_text = self._pending_text, ""
            self._open_block("text", out)
        out.append(_delta(st.open_index, "text_delta", text=text))

    # -- blocks --

    def _open_block(self, kind, out, content_block=None):
        st = self.state
        self._close_block(out)
        st.open_kind, st.open_index = kind, st.next_index
        st.next_index += 1
        if content_block is None:
            content_block = ({"type": "text", "text": ""} if kind == "text" else
                             {"type": "thinking", "thinking": "", "signature": ""})
        out.append(_event("content_block_start", index=st.open_index,
                          content_block=content_block))

    def _close_block(self, out):
        st = self.state
        if st.open_kind is None:
            return
        if st.open_kind == "thinking":
            # Claude Code discards a thinking block without a signature (3.3).
            out.append(_delta(st.open_index, "signature_delta",
                              signature=_signature(self.message_id, st.open_index)))
        out.append(_event("content_block_stop", index=st.open_index))
        st.open_kind = st.open_index = None

    def _finish_blocks(self, out):
        """3.5 step 5: flush the think parser, close the open block, emit buffered tools."""
        for kind, text in self._think_parser.flush():
            self._on_parsed(kind, text, out)
        self._close_block(out)
        self._pending_text = self._pending_thinking = ""
        tools = sorted(self.state.tools.values(), key=lambda t: t.sort_key)
        self.state.tools = {}
        for tool in tools:
            self._emit_tool(tool, out)

    # -- tools (3.6) --

    def _emit_tool(self, tool, out):
        st = self.state
        name = _original_tool_name(tool.name, self.ctx)
        if not name:
            self.ctx.warn("dropped an upstream tool call without a name (id %r)" % tool.id)
            return
        arguments = tool.input_json(self.ctx.warn)
        self._generated.append(arguments)
        tool_id = self._client_tool_id(tool.id)
        self._open_block("tool_use", out, {"type": "tool_use", "id": tool_id, "name": name,
                                           "input": {}})
        out.append(_delta(st.open_index, "input_json_delta", partial_json=arguments))
        self._close_block(out)
        st.emitted_tool_count += 1

    def _client_tool_id(self, upstream_id):
        """2.2 step 3: keep a valid, unique, not-yet-used upstream id, else a fresh one."""
        ok = (isinstance(upstream_id, str) and _TOOL_ID_RE.fullmatch(upstream_id)
              and upstream_id not in self._used_tool_ids
              and upstream_id not in self.ctx.history_tool_ids)
        tool_id = upstream_id if ok else self.ctx.new_id("toolu_")
        self._used_tool_ids.add(tool_id)
        return tool_id

    # -- end --

    def _stop_reason(self):
        st = self.state
        reason = _STOP_REASONS.get(st.finish_reason, "end_turn")
        if reason == "end_turn" and self._stop_sequence() is not None:
            reason = "stop_sequence"
        if reason == "refusal" and self.ctx.flag("refusal_as_end_turn"):
            reason = "end_turn"
        # 2.3 overrides: Claude Code runs tools only when the reason is tool_use.
        if st.emitted_tool_count and reason == "end_turn":
            reason = "tool_use"
        if reason == "tool_use" and not st.emitted_tool_count:
            reason = "end_turn"
        return reason

    def _stop_sequence(self):
        st = self.state
        if st.finish_reason == "stop" and st.matched_stop in self.ctx.stop_sequences:
            return st.matched_stop
        return None

    def _final_usage(self):
        usage = _anthropic_usage(self.state.usage)
        if usage is None:
            self.ctx.note("upstream sent no usage; token counts are estimated")
            text = _joined_text(self._generated)
            usage = {"input_tokens": self.ctx.estimated_input_tokens,
                     "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                     "output_tokens": estimate_text_tokens(text)}
        return usage


_TOOL_ID_RE = re.compile(r"[a-zA-Z0-9_-]+")

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}


class _ToolCall:
    """One upstream tool call being assembled from fragments (3.5 step 4, 3.6).

    Key: the O `index`; without one, the id; without both, the position in a chunk's
    list when it holds several entries, else the most recent call.
    """

    def __init__(self, key, order):
        self.key = key
        self.order = order
        self.id = ""
        self.name = ""
        self.arguments = ""  # fragments appended
        self.snapshot = ""  # the last fragment, while every fragment extended the one before
        self.arguments_object = None

    @property
    def sort_key(self):
        # Ascending O index; calls without an index follow in first-seen order.
        if isinstance(self.key, int):
            return (0, self.key, self.order)
        return (1, 0, self.order)

    def merge(self, entry):
        if not self.id and isinstance(entry.get("id"), str):
            self.id = entry["id"]
        function = entry if entry.get("_legacy") else entry.get("function")
        if not isinstance(function, dict):
            return
        if not self.name and isinstance(function.get("name"), str):
            self.name = function["name"]
        fragment = function.get("arguments")
        if isinstance(fragment, dict):
            self.arguments_object = fragment  # some gateways send an object
        elif isinstance(fragment, str) and fragment:
            # Cumulative snapshots (3.6) cannot be told from plain fragments one at a
            # time (a fragment may start like everything so far by chance), so both
            # readings are kept and input_json() takes the one that parses.
            if self.snapshot is not None:
                self.snapshot = fragment if fragment.startswith(self.snapshot) else None
            self.arguments += fragment

    def input_json(self, warn=None):
        """The argument JSON to send: as received when valid, else repaired (2.2, 3.6);
        warn(message) hears about arguments that could not be repaired."""
        if self.arguments_object is not None and not self.arguments:
            return json.dumps(self.arguments_object, ensure_ascii=False)
        if not self.arguments.strip():
            return "{}"
        for text in (self.arguments, self.snapshot):
            try:
                if text and isinstance(json.loads(text), dict):
                    return text
            except ValueError:
                pass
        text = self.snapshot if self.snapshot and self.snapshot != self.arguments else self.arguments
        parsed = _parse_tool_arguments(text)
        if parsed is None:
            if warn is not None:
                warn("tool %r: arguments are not a JSON object even after repair; sent {}: %s"
                     % (self.name, _shorten(text, 200)))
            return "{}"
        return json.dumps(parsed, ensure_ascii=False)


def aggregate_stream_to_message(events) -> dict:
    """Build a non-streaming Anthropic message from AnthropicStream events (3.11).

    Raises UpstreamError for an `error` event or a stream without message_stop.
    """
    message = None
    blocks = {}
    partial_json = {}
    finished = False
    for name, data in events:
        if name == "message_start":
            message = dict(data["message"])
        elif name == "content_block_start":
            blocks[data["index"]] = dict(data["content_block"])
            partial_json[data["index"]] = ""
        elif name == "content_block_delta":
            _apply_delta(blocks[data["index"]], data["delta"], partial_json, data["index"])
        elif name == "content_block_stop":
            block = blocks[data["index"]]
            if block["type"] == "tool_use":
                block["input"] = _json_object(partial_json[data["index"]])
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"] = dict(message.get("usage") or {}, **{
                k: v for k, v in data["usage"].items() if v is not None})
        elif name == "error":
            error = data["error"]
            raise UpstreamError(_STATUS_FOR_TYPE.get(error["type"], 502), error["type"],
                                error["message"])
        elif name == "message_stop":
            finished = True
    if message is None or not finished:
        raise UpstreamError(502, "api_error", "upstream stream ended unexpectedly")
    message["content"] = [blocks[i] for i in sorted(blocks)]
    usage = message.get("usage") or {}
    message["usage"] = {key: usage.get(key, 0) for key in (
        "input_tokens", "output_tokens", "cache_creation_input_tokens",
        "cache_read_input_tokens")}
    return message


def _apply_delta(block, delta, partial_json, index):
    kind = delta["type"]
    if kind == "text_delta":
        block["text"] += delta["text"]
    elif kind == "thinking_delta":
        block["thinking"] += delta["thinking"]
    elif kind == "signature_delta":
        block["signature"] = delta["signature"]
    elif kind == "input_json_delta":
        partial_json[index] += delta["partial_json"]


def _json_object(text):
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


_STATUS_FOR_TYPE = {"invalid_request_error": 400, "authentication_error": 401,
                    "billing_error": 402, "permission_error": 403, "not_found_error": 404,
                    "request_too_large": 413, "rate_limit_error": 429, "api_error": 502,
                    "timeout_error": 504, "overloaded_error": 529}


def _event(name, **fields):
    data = {"type": name}
    data.update(fields)
    return (name, data)


def _delta(index, kind, **fields):
    delta = {"type": kind}
    delta.update(fields)
    return _event("content_block_delta", index=index, delta=delta)


def _signature(message_id, index):
    """Opaque, non-empty, deterministic thinking signature made by the proxy (2.2)."""
    digest = hashlib.sha256(("%s%d" % (message_id, index)).encode("utf-8")).digest()
    return "p1." + base64.b64encode(digest).decode("ascii")[:32]


def _first_choice(choices):
    """choices[0] (the entry with index 0 when the list is out of order)."""
    if not isinstance(choices, list) or not choices:
        return None
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None


def _reasoning_text(delta):
    """3.7: reasoning_content, else reasoning, else reasoning_details[*].text."""
    for key in ("reasoning_content", "reasoning"):
        if isinstance(delta.get(key), str) and delta[key]:
            return delta[key]
    details = delta.get("reasoning_details")
    if isinstance(details, list):
        return "".join(d["text"] for d in details
                       if isinstance(d, dict) and isinstance(d.get("text"), str))
    return ""


def _content_text(delta):
    """delta.content as a string (a list of parts is joined); refusal when empty (2.2)."""
    content = delta.get("content")
    if isinstance(content, list):
        content = _joined_texts(content, sep="")
    if isinstance(content, str) and content:
        return content
    refusal = delta.get("refusal")
    return refusal if isinstance(refusal, str) else ""


def _original_tool_name(name, ctx):
    """2.2 step 3: undo 1.4 shortening; `functions.X` / `functions.X:0` -> X if declared."""
    if not name:
        return ""
    if name in ctx.tool_names:
        return ctx.tool_names[name]
    match = re.match(r"^functions\.([^:]+)(?::\d+)?$", name)
    if match:
        inner = match.group(1)
        if inner in ctx.tool_names:
            return ctx.tool_names[inner]
        if inner in ctx.tool_names.values():
            return inner
    return name


def _anthropic_usage(usage):
    """2.4: O usage -> A counters (cached tokens are not counted twice); None if absent."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    output = usage.get("completion_tokens", usage.get("output_tokens"))
    if prompt is None and output is None:
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached is None:
        cached = usage.get("cached_tokens")  # Kimi
    if cached is None:
        cached = usage.get("prompt_cache_hit_tokens")  # DeepSeek
    prompt, output, cached = _int(prompt), _int(output), _int(cached)
    return {"input_tokens": max(0, prompt - cached), "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": output}


def _int(value):
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


# -- rule 3.7 <think> tags ------------------------------------------------------------------------

class _ThinkTagParser:
    """Split streamed content into ("reasoning", s) and ("text", s) pieces (3.7).

    States: before (only whitespace so far: undecided), in_think, after_close (drop the
    newlines right after </think>), after (everything is answer text). Only a <think> at
    the very start opens reasoning. A tail that could be a split tag is held back.
    """

    _OPEN, _CLOSE = "<think>", "</think>"

    def __init__(self):
        self.state = "before"
        self._buf = ""

    @property
    def idle(self) -> bool:
        """Past any think block with nothing held back: more text is answer text as it is."""
        return self.state == "after" and not self._buf

    def feed(self, text):
        self._buf += text
        out = []
        while self._buf:
            if self.state == "before":
                stripped = self._buf.lstrip()
                if not stripped or self._OPEN.startswith(stripped):
                    break  # undecided: only whitespace, or a partial "<think>"
                if stripped.startswith(self._OPEN):
                    self.state, self._buf = "in_think", stripped[len(self._OPEN):]
                else:
                    self.state = "after"
            elif self.state == "in_think":
                end = self._buf.find(self._CLOSE)
                if end >= 0:
                    out.append(("reasoning", self._buf[:end]))
                    self.state, self._buf = "after_close", self._buf[end + len(self._CLOSE):]
                    continue
                split_at = len(self._buf) - _partial_suffix_length(self._buf, self._CLOSE)
                ready, self._buf = self._buf[:split_at], self._buf[split_at:]
                if ready:
                    out.append(("reasoning", ready))
                break
            elif self.state == "after_close":
                self._buf = self._buf.lstrip("\r\n")
                if self._buf:
                    self.state = "after"
            else:
                out.append(("text", self._buf))
                self._buf = ""
        return [piece for piece in out if piece[1]]

    def flush(self):
        """Release whatever is held back at the end of the content."""
        buf, self._buf = self._buf, ""
        if not buf:
            return []
        if self.state == "in_think":
            return [("reasoning", buf)]
        if self.state in ("before", "after"):
            return [("text", buf)]
        return []


def _partial_suffix_length(text, tag):
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def merge_tool_call_chunks(tools: dict, entries: list) -> None:
    """Merge the tool_calls entries of one chunk into tools (key -> _ToolCall), for both
    stream state machines (3.5 step 4): an entry belongs to a call by its index; else
    by its id; else by its position in a chunk that lists several; a lone fragment
    with neither continues the most recent call."""
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        key = _tool_call_key(tools, entry, position, len(entries))
        tool = tools.get(key)
        if tool is None:
            tool = tools[key] = _ToolCall(key, len(tools) + 1)
        tool.merge(entry)


def _tool_call_key(tools: dict, entry: dict, position: int, entry_count: int):
    index = entry.get("index")
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    known = list(tools.values())
    call_id = entry.get("id")
    if isinstance(call_id, str) and call_id:
        for tool in known:
            if tool.id == call_id:
                return tool.key
        return ("id", call_id)
    if entry_count > 1:
        return ("pos", position)
    return max(known, key=lambda t: t.order).key if known else ("pos", 0)


# -- rule 2.2 step 3: tool arguments --------------------------------------------------------------

def _parse_tool_arguments(text):
    """Parse tool-call arguments into a dict: double-encoded strings, markdown fences,
    trailing junk and truncated JSON are repaired. None when nothing works."""
    value = _loads_or_none(text)
    if isinstance(value, str):
        value = _loads_or_none(value)  # double-encoded
    if isinstance(value, dict):
        return value
    return _repair_json_object(text)


def _loads_or_none(text):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


_FENCE_RE = re.compile(r"^\s*```[a-zA-Z]*\s*(.*?)\s*(?:```\s*)?$", re.DOTALL)


def _repair_json_object(text):
    fence = _FENCE_RE.match(text)
    if fence:
        text = fence.group(1)
    start = text.find("{")
    if start < 0:
        return None
    text = text[start:]
    end = text.rfind("}")
    if end >= 0:
        value = _loads_or_none(text[:end + 1])
        if isinstance(value, dict):
            return value
    return _close_truncated_json(text)


def _close_truncated_json(text):
    """Close an unterminated string and open brackets; try a few cut points."""
    _, in_string, escaped, last_comma = _json_scan(text)
    if in_string:
        text = (text[:-1] if escaped else text) + '"'
    candidates = [text, text + "null", text + ":null", text.rstrip().rstrip(",")]
    if last_comma > 0:
        candidates.append(text[:last_comma])  # drop a half-written last member
    for candidate in candidates:
        value = _loads_or_none(candidate + _json_scan(candidate)[0])
        if isinstance(value, dict):
            return value
    return None


def _json_scan(text):
    """(closing brackets needed, inside a string?, after a backslash?, last comma outside
    strings) for a JSON prefix."""
    stack, in_string, escaped, last_comma = [], False, False, -1
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
        elif ch == ",":
            last_comma = i
    return "".join(reversed(stack)), in_string, escaped, last_comma


# -- rule 4 Upstream errors (the one place the upstream error mapping lives) ----------------------

def anthropic_error_body(error_type, message, request_id=None) -> dict:
    """Return the Anthropic error JSON body (4.1)."""
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def openai_error_body(message, type, code=None, param=None) -> dict:  # noqa: A002 (spec name)
    """Return the OpenAI error JSON body (4.1)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def upstream_error(status, body, headers=None) -> UpstreamError:
    """Classify an upstream error response (status, body, headers) per 4.2 and 4.3.

    `body` may be bytes, str or an already parsed dict. For an error found inside a 200
    body (iFlow's `{"status": "434", "msg": ...}`, or an `error` object whose `code` is
    an HTTP-like number) that number is used as the upstream status.
    """
    parsed, raw_text = _parse_error_body(body)
    text, code, effective_status = _error_fields(parsed, raw_text, status)
    retry_after = _header(headers, "retry-after")

    overflow = _context_overflow_message(text, code)
    if overflow is not None:
        return UpstreamError(400, "invalid_request_error", overflow, "invalid_request_error",
                             "context_length_exceeded", retry_after, effective_status)

    client_status, a_type, o_type, o_code = _classify_error(effective_status, code, text)
    message = _shorten("upstream %s: %s" % (effective_status, redact(text)), 1000)
    return UpstreamError(client_status, a_type, message, o_type, o_code, retry_after,
                         effective_status)


def _is_error_body(body):
    """A body that is an error rather than a completion (2.1, 3.5 step 1)."""
    if body.get("error"):
        return True
    # iFlow: {"status": "434", "msg": "Invalid apiKey"}
    return ("msg" in body and not body.get("choices")
            and str(body.get("status", "")) not in ("0", "200", "success"))


def _parse_error_body(body):
    if isinstance(body, dict):
        return body, json.dumps(body, ensure_ascii=False)
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8", "replace")
    text = body if isinstance(body, str) else ""
    parsed = _loads_or_none(text)
    return (parsed if isinstance(parsed, dict) else None), text


def _error_fields(parsed, raw_text, status):
    """(message, code, effective status) from an error body (4.2 extraction order)."""
    text, code = None, None
    effective = status
    if parsed is not None:
        error = parsed.get("error")
        if isinstance(error, dict):
            text = error.get("message")
            code = error.get("code") or error.get("type")
        elif isinstance(error, str):
            text = error
        for key in ("message", "msg", "detail"):
            if not isinstance(text, str) or not text:
                text = parsed.get(key)
        # An error inside a 200 body: use its own HTTP-like number (iFlow "status", "code").
        if status == 200:
            for candidate in (parsed.get("status"), code):
                number = _int_or_none(candidate)
                if number is not None and 400 <= number <= 599:
                    effective = number
                    break
    if not isinstance(text, str) or not text.strip():
        text = raw_text.strip() or "(empty body)"
    return text, (str(code) if code is not None else ""), effective


def _int_or_none(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_QUOTA_RE = re.compile(
    r"insufficient[_ ](?:quota|balance|credit)|exceeded your current quota|quota (?:has been )?"
    r"exhausted|credit balance|out of credits|billing|payment required|arrears|"
    r"余额不足|欠费",
    re.IGNORECASE)
_OVERLOADED_RE = re.compile(r"overload|over capacity|server is busy|too busy|服务繁忙|繁忙",
                            re.IGNORECASE)
_AUTH_RE = re.compile(r"api ?key|token (?:has )?expired|expired token|invalid token|"
                      r"unauthori[sz]ed|authentication", re.IGNORECASE)
_RATE_RE = re.compile(r"rate limit|too many requests|频率", re.IGNORECASE)

_STATUS_TABLE = {
    # upstream status: (client status, A type, O type, O code)   -- 4.2
    400: (400, "invalid_request_error", "invalid_request_error", None),
    401: (401, "authentication_error", "invalid_request_error", "invalid_api_key"),
    402: (402, "billing_error", "insufficient_quota", "insufficient_quota"),
    403: (403, "permission_error", "permission_error", None),
    404: (404, "not_found_error", "invalid_request_error", "model_not_found"),
    408: (504, "api_error", "server_error", "timeout"),
    413: (413, "request_too_large", "invalid_request_error", None),
    422: (400, "invalid_request_error", "invalid_request_error", None),
    429: (429, "rate_limit_error", "rate_limit_error", "rate_limit_exceeded"),
    500: (500, "api_error", "server_error", None),
    502: (502, "api_error", "server_error", None),
    503: (529, "overloaded_error", "server_error", None),
    504: (504, "api_error", "server_error", "timeout"),
    529: (529, "overloaded_error", "server_error", None),
}


def _classify_error(status, code, text):
    """4.2: upstream status + error code/text -> (client status, A type, O type, O code)."""
    hint = "%s %s" % (code, text)
    if code == "insufficient_quota" or _QUOTA_RE.search(hint):
        return _STATUS_TABLE[402]
    says_overloaded = code in ("overloaded", "overloaded_error") or _OVERLOADED_RE.search(hint)
    if says_overloaded and not 400 <= status < 500:
        return _STATUS_TABLE[529]
    if status in _STATUS_TABLE:
        return _STATUS_TABLE[status]
    if 400 <= status < 500:
        # Non-standard 4xx (iFlow's 434 "Invalid apiKey", 449 rate limit, ...): use the text.
        if _AUTH_RE.search(hint):
            return _STATUS_TABLE[401]
        if _RATE_RE.search(hint):
            return _STATUS_TABLE[429]
        return _STATUS_TABLE[400]
    return _STATUS_TABLE[502]  # other 5xx, or an error body with a 2xx status


_OVERFLOW_RE = re.compile(
    r"context[_ ]length[_ ]exceeded|context length|context window|maximum context|"
    r"(?:prompt|input|context) (?:is )?too long|too many (?:input )?tokens|"
    r"input tokens exceed|exceeds? (?:the )?(?:model'?s? )?(?:maximum )?(?:context|input length)|"
    r"上下文长度|超出.*长度", re.IGNORECASE)
# "... maximum context length is 32768 tokens. However, you requested 40000 tokens
# (8000 in the messages, 32000 in the completion)" (OpenAI, vLLM) and SGLang's
# "... 8000 tokens from the input messages and 32000 tokens for the completion".
_IN_PLUS_MAX_RES = (
    re.compile(r"(\d+) in the messages, (\d+) in the completion"),
    re.compile(r"(\d+) tokens from the input messages and (\d+) tokens for the completion"),
)
_VLLM_SUM_RE = re.compile(r"maximum context length is (\d+) tokens and your request has "
                          r"(\d+) input tokens \((\d+) >")
_WINDOW_RE = re.compile(r"(?:maximum context length (?:is|of)|context window of|"
                        r"context length of) (\d+)", re.IGNORECASE)
_PROMPT_RE = re.compile(r"(?:resulted in|requested|prompt has|input has|input is|"
                        r"prompt is|contains?) (\d+) (?:input )?tokens", re.IGNORECASE)
_N_GT_M_RE = re.compile(r"(\d+) tokens? > (\d+)")


def _context_overflow_message(text, code):
    """4.3: A's own "prompt is too long" wording for a context overflow, else None."""
    if code != "context_length_exceeded" and not _OVERFLOW_RE.search(text):
        return None
    window = _WINDOW_RE.search(text)
    vllm = _VLLM_SUM_RE.search(text)
    if vllm:
        window_n, input_n, max_n = vllm.group(1), vllm.group(2), vllm.group(3)
        return _in_plus_max_message(input_n, max_n, window_n)
    for regex in _IN_PLUS_MAX_RES:
        match = regex.search(text)
        if match and window:
            return _in_plus_max_message(match.group(1), match.group(2), window.group(1))
    prompt = _PROMPT_RE.search(text)
    if prompt and window:
        return "prompt is too long: %s tokens > %s maximum" % (prompt.group(1), window.group(1))
    n_gt_m = _N_GT_M_RE.search(text)
    if n_gt_m:
        return "prompt is too long: %s tokens > %s maximum" % (n_gt_m.group(1), n_gt_m.group(2))
    return "prompt is too long: " + _shorten(redact(text), 1000)


def _in_plus_max_message(input_n, max_n, window_n):
    return ("input length and max_tokens exceed context limit: %s + %s > %s, decrease input "
            "length or max_tokens and try again" % (input_n, max_n, window_n))


def _header(headers, name):
    if not headers:
        return None
    for key, value in headers.items():
        if key.lower() == name:
            return str(value)
    return None


def _shorten(text, limit):
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


# -- rule 5 Token estimate ------------------------------------------------------------------------

def estimate_text_tokens(s) -> int:
    """Estimate the tokens of a string (section 5 text rule).

    Method: whitespace runs count as one character; ASCII characters cost 1/4 token,
    CJK ideographs / kana / hangul 1 token, other non-ASCII 1/2 token; rounded up.

    Measured against tiktoken's cl100k_base / o200k_base (js-tiktoken 1.0.21, the same
    ranks as Python tiktoken) on six samples; estimate / real:
      English prose, 1.5 k chars ................. 1.26 / 1.25
      English Markdown spec with tables, 6 k ..... 0.85 / 0.85
      Python source (this module), 76 k .......... 0.88 / 0.87
      JSON tool schemas (Claude Code style), 12 k  1.01 / 1.02
      Chinese prose, 560 chars ................... 0.99 / 1.45
      Mixed Chinese/English question, 260 chars .. 1.04 / 1.29
    So about +-25% on English and code. Chinese is exact for cl100k but overcounted
    by ~45% for o200k-like vocabularies (GLM, Qwen, DeepSeek and Kimi tokenizers are of
    that kind); overcounting is the safe side for the 1.8 check.
    """
    if not s:
        return 0
    collapsed = _WHITESPACE_RE.sub(" ", s)
    cjk = len(_CJK_RE.findall(collapsed))
    ascii_count = len(collapsed.encode("ascii", "ignore"))
    other = len(collapsed) - ascii_count - cjk
    return int(math.ceil(ascii_count / 4.0 + cjk + other / 2.0))


_WHITESPACE_RE = re.compile(r"\s+")
_CJK_RE = re.compile("[\u1100-\u11ff\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
                     "\U00020000-\U0003ffff]")


def estimate_tokens_anthropic(req, ctx=None) -> int:
    """Estimate the input tokens of an Anthropic request (section 5, count_tokens).

    Counts the translated request (what the upstream will see). Raises TranslationError
    for an invalid request, like the messages route.
    """
    ctx = ctx or TranslationContext()
    anthropic_to_openai_request(req, ctx)
    return ctx.estimated_input_tokens


def _estimate_openai_body(body):
    """Section 5 over an OpenAI body: +4 per message, +3 system, tools +10 each, +3."""
    total = 3
    for msg in body.get("messages", []):
        total += 3 if msg["role"] == "system" else 4
        total += _estimate_content(msg.get("content"))
        total += estimate_text_tokens(msg.get("reasoning_content") or "")
        for call in msg.get("tool_calls") or []:
            function = call["function"]
            total += estimate_text_tokens(function["name"])
            total += estimate_text_tokens(function["arguments"])
    for tool in body.get("tools") or []:
        function = tool["function"]
        total += 10 + estimate_text_tokens(function["name"])
        total += estimate_text_tokens(function.get("description") or "")
        total += estimate_text_tokens(json.dumps(function.get("parameters"), ensure_ascii=False))
    return total


def _estimate_content(content):
    if isinstance(content, str):
        return estimate_text_tokens(content)
    total = 0
    for part in content or []:
        kind = part.get("type")
        if kind == "text":
            total += estimate_text_tokens(part["text"])
        elif kind == "image_url":
            total += _image_tokens(part["image_url"]["url"])
        elif kind == "file":
            data = part["file"]["file_data"]
            total += int(math.ceil((len(data) - data.find(",") - 1) * 3 / 4.0 / 3000))
    return total


def _image_tokens(url):
    """A's rule of thumb: width * height / 750, capped at 1600; unknown size -> 1600."""
    size = None
    if url.startswith("data:") and ";base64," in url:
        size = image_size_from_base64(url.split(",", 1)[1])
    if size is None:
        return 1600
    width, height = size
    return max(1, min(1600, int(math.ceil(width * height / 750.0))))


def image_size_from_base64(data):
    """(width, height) from the header of a base64 PNG / GIF / JPEG / WebP, or None."""
    prefix = _WHITESPACE_RE.sub("", data[:400000])
    prefix = prefix[:len(prefix) // 4 * 4]
    try:
        head = base64.b64decode(prefix)
    except (ValueError, TypeError):
        return None
    try:
        return _image_size(head)
    except (struct.error, IndexError):
        return None


def _image_size(head):
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", head[6:10])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_size(head)
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(head)
    return None


def _webp_size(head):
    chunk = head[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        b0, b1, b2, b3 = head[21:25]
        width = 1 + (b0 | (b1 & 0x3F) << 8)
        height = 1 + (b1 >> 6 | b2 << 2 | (b3 & 0x0F) << 10)
        return width, height
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(head[24:27], "little")
        height = 1 + int.from_bytes(head[27:30], "little")
        return width, height
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(head):
    i = 2
    while i + 9 < len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", head[i + 5:i + 9])
            return width, height
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        (length,) = struct.unpack(">H", head[i + 2:i + 4])
        i += 2 + length
    return None


# -- small helpers --------------------------------------------------------------------------------

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _counter_ids():
    """Deterministic id source: prefix + 24 base62 chars from a per-context counter."""
    counter = [0]

    def new_id(prefix):
        counter[0] += 1
        n, digits = counter[0], ""
        while n:
            n, r = divmod(n, 62)
            digits = _BASE62[r] + digits
        return prefix + digits.rjust(24, "0")
    return new_id


# -- Images: detection and inlining (issue: vision routing) ---------------------------------------

def openai_has_images(body: dict) -> bool:
    """Whether an OpenAI chat request carries image parts."""
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image_url", "input_image")
                                             for p in content):
            return True
    return False


def anthropic_has_images(req: dict) -> bool:
    """Whether an Anthropic request carries image blocks (also inside tool results)."""
    def has_image(blocks):
        return isinstance(blocks, list) and any(
            isinstance(b, dict) and (b.get("type") == "image" or
                                     (b.get("type") == "tool_result" and has_image(b.get("content"))))
            for b in blocks)
    return any(isinstance(m, dict) and has_image(m.get("content")) for m in req.get("messages") or [])


def inline_image_urls(body: dict, fetch) -> dict:
    """A copy of an OpenAI request whose http(s) image URLs became data: URLs.

    fetch(url) -> (content type, bytes) does the I/O, so this stays testable."""
    def inline(part):
        url = ((part.get("image_url") or {}).get("url") or "") if part.get("type") == "image_url" else ""
        if not url.startswith(("http://", "https://")):
            return part
        content_type, data = fetch(url)
        image = dict(part["image_url"], url="data:%s;base64,%s" % (content_type,
                                                                   base64.b64encode(data).decode("ascii")))
        return dict(part, image_url=image)

    messages = []
    for message in body.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            message = dict(message, content=[inline(p) if isinstance(p, dict) else p for p in message["content"]])
        messages.append(message)
    return dict(body, messages=messages)

# -- OpenAI Responses <-> OpenAI Chat Completions (issue 13) --------------------------------------
# The third client face over the one chat-completions upstream call: POST /v1/responses
# (Codex CLI, `client.responses.*` of the openai SDKs). Sans-IO like the Anthropic face:
# dicts in, dicts out; ids and the clock come through ctx, and what gets dropped is reported
# in ctx.notes for the HTTP layer to log (translation does not log what it drops).
# Reused from the Anthropic face: tool-name shortening, schema cleaning, the 1.3 ordering
# rules, thinking quirks (1.6), reasoning replay (1.7), max_tokens clamping (1.8), <think>
# parsing and tool-argument repair (3.6, 3.7). The bounded response store and
# previous_response_id live in the HTTP layer (not sans-IO).
# Tests: tests/unit/test_responses_translation.py.



# Namespaced tools reach the upstream flattened as "<namespace>__<function>" (two
# underscores: allowed by every upstream's name pattern, and rare inside a namespace name).
# The flat name goes through shorten_tool_name like every tool name (1.4). Going back uses
# ctx.tool_specs, the table built from the request's own tools, so a namespace or function
# name that contains "__" itself, or a shortened name, still maps back exactly.
NAMESPACE_SEPARATOR = "__"

# What a flat upstream tool name stands for on the Responses side. kind: "function",
# "custom" (freeform tool: one string argument "input"), or "local_shell".
ResponsesTool = collections.namedtuple("ResponsesTool", "kind name namespace")


class ResponsesContext(TranslationContext):
    """TranslationContext of the Responses face.

    Extra input: created_at (unix seconds, read from the HTTP layer's clock).
    Filled by responses_to_openai_request: echo (the request fields a response object
    repeats), tool_specs (upstream tool name -> ResponsesTool), namespaces (declared
    namespace names), notes (what was dropped or ignored, one line each, for the caller
    to log at debug level). Also the inherited thinking_requested, tool_names,
    history_tool_ids and estimated_input_tokens.
    """

    def __init__(self, *args, created_at=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.created_at = created_at
        self.echo = {}
        self.tool_specs = {}
        self.namespaces = set()


# -- Request: Responses -> chat completions -------------------------------------------------------

def responses_to_openai_request(req, ctx) -> dict:
    """Translate a Responses API request into an OpenAI chat.completions body.

    `input` must already hold the earlier turns when previous_response_id was used (the
    HTTP layer prepends the stored items). Fills ctx (echo, tool_specs, namespaces, notes,
    thinking_requested, history_tool_ids, estimated_input_tokens). Raises TranslationError
    for a request that cannot be translated, with a message fit for the client.
    """
    if not isinstance(req, dict):
        raise TranslationError("request body must be a JSON object")
    ctx.echo = responses_echo(req)
    max_output_tokens = _validated_max_output_tokens(req.get("max_output_tokens"))
    effort = _responses_effort(req.get("reasoning"))
    ctx.thinking_requested = effort not in (None, "none")

    tools = _responses_tools(req.get("tools"), ctx)
    messages = _ResponsesConversation(ctx).translate(req.get("instructions"), req.get("input"))

    body = {"model": ctx.upstream_model, "messages": messages}
    if req.get("stream"):
        body["stream"] = True
        if ctx.flag("stream_usage"):
            body["stream_options"] = {"include_usage": True}
    _copy_sampling(req, body, ctx)
    if tools:
        body["tools"] = tools
        _apply_responses_tool_choice(req.get("tool_choice"), body, ctx)
        if req.get("parallel_tool_calls") is False and ctx.flag("parallel_tool_calls"):
            body["parallel_tool_calls"] = False
    _apply_text_format(req.get("text"), body)
    _apply_thinking(_as_anthropic_thinking(effort), body, ctx)
    _note_ignored_fields(req, ctx)

    ctx.estimated_input_tokens = _estimate_openai_body(body)
    max_tokens = _max_tokens({"max_tokens": max_output_tokens}, ctx)
    if max_tokens is not None:
        body[ctx.flag("max_tokens_field") or "max_tokens"] = max_tokens
    return body


def namespaced_tool_name(namespace, name) -> str:
    """The upstream name of a tool: `<namespace>__<name>` inside a namespace, else the
    name; shortened like every tool name (1.4). responses_tool_for() reverses it."""
    name = name if isinstance(name, str) else ""
    if isinstance(namespace, str) and namespace:
        name = namespace + NAMESPACE_SEPARATOR + name
    return shorten_tool_name(name)


def responses_tool_for(upstream_name, ctx) -> ResponsesTool:
    """What an upstream tool name stands for: the declared tool (kind, original name,
    namespace) when the request declared it; else a plain function of that name, split
    at the separator when its prefix is a declared namespace."""
    name = _original_tool_name(upstream_name, ctx)  # "functions.X:0" -> "X"
    spec = ctx.tool_specs.get(name) or ctx.tool_specs.get(shorten_tool_name(name or ""))
    if spec is not None:
        return spec
    name = name or ""
    prefixes = [ns for ns in ctx.namespaces if name.startswith(ns + NAMESPACE_SEPARATOR)]
    if prefixes:
        namespace = max(prefixes, key=len)  # "a__b" wins over "a" for "a__b__c"
        rest = name[len(namespace) + len(NAMESPACE_SEPARATOR):]
        if rest:
            return ResponsesTool("function", rest, namespace)
    return ResponsesTool("function", name, None)


def responses_echo(req) -> dict:
    """The request fields a response object repeats, with the API's defaults."""
    reasoning = req.get("reasoning") if isinstance(req.get("reasoning"), dict) else {}
    text = req.get("text") if isinstance(req.get("text"), dict) else {}
    instructions = req.get("instructions")
    tool_choice = req.get("tool_choice")
    return {
        "instructions": instructions if isinstance(instructions, (str, list)) else None,
        "max_output_tokens": _echo_field(req, "max_output_tokens", int, None),
        "metadata": _echo_field(req, "metadata", dict, {}),
        "parallel_tool_calls": _echo_field(req, "parallel_tool_calls", bool, True),
        "previous_response_id": _echo_field(req, "previous_response_id", str, None),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": _echo_field(req, "store", bool, True),
        "temperature": _echo_field(req, "temperature", (int, float), 1.0),
        "text": dict(text, format=text.get("format") if isinstance(text.get("format"), dict)
                     else {"type": "text"}),
        "tool_choice": tool_choice if isinstance(tool_choice, (str, dict)) else "auto",
        "tools": _echo_field(req, "tools", list, []),
        "top_p": _echo_field(req, "top_p", (int, float), 1.0),
        "truncation": _echo_field(req, "truncation", str, "disabled"),
        "user": _echo_field(req, "user", str, None),
    }


def _echo_field(req, key, kinds, default):
    value = req.get(key)
    if kinds is bool:
        return value if isinstance(value, bool) else default
    # bool is an int in Python, but `true` is no token count or temperature
    return value if isinstance(value, kinds) and not isinstance(value, bool) else default


def _validated_max_output_tokens(value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise TranslationError("max_output_tokens: Input should be an integer of at least 1")
    return value


# Fields the chat upstream has no use for. store and previous_response_id are the HTTP
# layer's (response store), so they are not reported as ignored.
_RESPONSES_TRANSLATED_FIELDS = frozenset([
    "model", "input", "instructions", "stream", "tools", "tool_choice", "parallel_tool_calls",
    "max_output_tokens", "temperature", "top_p", "reasoning", "text", "store",
    "previous_response_id"])


def _note_ignored_fields(req, ctx):
    ignored = sorted(key for key in req if key not in _RESPONSES_TRANSLATED_FIELDS)
    if ignored:
        ctx.note("ignored request fields: " + ", ".join(ignored))


# -- Input items -> messages ----------------------------------------------------------------------

_RESPONSES_TOOL_OUTPUTS = ("function_call_output", "custom_tool_call_output",
                           "local_shell_call_output")


class _ResponsesConversation:
    """Turns Responses input items into chat messages with the ordering rules of 1.3.

    An assistant message stays open while assistant-side items follow each other
    (output_text messages, function_call, custom_tool_call, local_shell_call, reasoning):
    they become one assistant message with `content` and `tool_calls`. Tool outputs that
    answer its calls become `tool` messages right after it; anything else (a user message,
    the next assistant turn, the end) first closes the round: unanswered calls get the
    interrupted stub, and orphan or repeated outputs and tool images follow as one user
    message. System and developer messages before the first turn join `instructions` in
    one leading system message; later ones become user text in place, because several
    upstreams refuse a system message that is not first (and hoisting them would change
    the prompt prefix the upstream caches).
    """

    def __init__(self, ctx):
        self.ctx = ctx
        self.system_texts = []
        self.messages = []
        self.assistant = None  # the open assistant message, or None
        self.pending_ids = []  # calls of the last assistant message, in order
        self.answered = set()
        self.moved_parts = []  # user parts waiting for the end of the tool round
        self.reasoning = []  # reasoning summaries waiting for the next assistant message

    def translate(self, instructions, raw_input) -> list:
        if isinstance(instructions, str) and instructions.strip():
            self.system_texts.append(instructions)
        elif isinstance(instructions, list):  # instructions echoed as input items
            for i, item in enumerate(instructions):
                if isinstance(item, dict):
                    self._add(item, "instructions[%d]" % i)
        elif instructions is not None and not isinstance(instructions, str):
            raise TranslationError("instructions: Input should be a valid string")
        for i, item in enumerate(_input_items(raw_input)):
            self._add(item, "input[%d]" % i)
        self._close_round()
        messages = _merge_same_role(self.messages)
        if not messages:
            raise TranslationError("input: there is no message to answer")
        if self.ctx.flag("replay_reasoning"):
            _add_reasoning_placeholders(messages, self.ctx.flag("reasoning_placeholder"))
        if self.ctx.flag("needs_user_first") and messages[0]["role"] == "assistant":
            messages.insert(0, {"role": "user", "content": "(continue)"})
        if self.system_texts:
            messages.insert(0, {"role": "system", "content": "\n\n".join(self.system_texts)})
        return messages

    # -- one item --

    def _add(self, item, where):
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            self._add_message(item, where)
        elif kind == "function_call":
            arguments = item.get("arguments")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments if isinstance(arguments, dict) else {},
                                       ensure_ascii=False)
            self._add_call(item, namespaced_tool_name(item.get("namespace"), item.get("name")),
                           arguments)
        elif kind == "custom_tool_call":
            tool_input = item.get("input") if isinstance(item.get("input"), str) else ""
            self._add_call(item, namespaced_tool_name(item.get("namespace"), item.get("name")),
                           json.dumps({"input": tool_input}, ensure_ascii=False))
        elif kind == "local_shell_call":
            self._add_call(item, LOCAL_SHELL_TOOL_NAME, _local_shell_arguments(item.get("action")))
        elif kind in _RESPONSES_TOOL_OUTPUTS:
            # local_shell_call_output names its call in `id` (the API spec) or `call_id`.
            call_id = item.get("call_id") or item.get("id")
            self._add_tool_output(call_id if isinstance(call_id, str) else "", item.get("output"),
                                  where)
        elif kind == "reasoning":
            text = _reasoning_item_text(item)
            if text:
                self.reasoning.append(text)  # encrypted_content is never sent upstream
        elif kind == "item_reference":
            self.ctx.note("dropped input item_reference items (resolve them from the store "
                          "before translating)")
        else:
            # web_search_call, file_search_call, computer_call(_output), mcp_*, compaction...:
            # results of tools the proxy never ran, or opaque server state.
            self.ctx.note("dropped input items of type %r" % kind)

    def _add_message(self, item, where):
        role = item.get("role")
        content = item.get("content")
        if not isinstance(content, (str, list)):
            raise TranslationError("%s.content: Input should be a valid string or list of "
                                   "content parts" % where)
        if role == "assistant":
            text = _assistant_text(content)
            if text:
                self._open_assistant()
                current = self.assistant.get("content")
                self.assistant["content"] = current + "\n" + text if current else text
            return
        if role not in ("user", "system", "developer"):
            raise TranslationError('%s.role: Unexpected role "%s"; expected "user", "assistant", '
                                   '"system" or "developer"' % (where, role))
        parts = _responses_user_parts(content, self.ctx, where)
        if role != "user" and not self.messages and self.assistant is None:
            text = "\n".join(p["text"] for p in parts if p["type"] == "text")
            if text.strip():
                self.system_texts.append(text)
            return
        self._close_round()
        self.reasoning = []  # reasoning of an unfinished turn never belongs to the next one
        user_content = _user_content(parts)
        if user_content is not None:
            self.messages.append({"role": "user", "content": user_content})

    def _add_call(self, item, upstream_name, arguments):
        call_id = item.get("call_id") or item.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = self.ctx.new_id("call_")
        self.ctx.history_tool_ids.add(call_id)
        self._open_assistant()
        self.assistant.setdefault("tool_calls", []).append({
            "id": call_id, "type": "function",
            "function": {"name": upstream_name, "arguments": arguments}})
        self.pending_ids.append(call_id)

    def _add_tool_output(self, call_id, output, where):
        text, images = _tool_output_content(output, self.ctx, where)
        if call_id in self.pending_ids and call_id not in self.answered:
            self.assistant = None  # the tool messages now follow it; new items open a new one
            self.answered.add(call_id)
            self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            if images:
                self.moved_parts.append(_text_part("Image output of tool call %s:" % call_id))
                self.moved_parts += images
        else:
            # 1.3 steps 5 and 6: an orphan or repeated output becomes user text.
            self.moved_parts.append(_text_part("Result of tool call %s:\n%s" % (call_id, text)))
            self.moved_parts += images

    # -- rounds --

    def _open_assistant(self):
        if self.assistant is None:
            self._close_round()
            self.assistant = {"role": "assistant", "content": None}
            self.messages.append(self.assistant)
        if self.reasoning:
            if self.ctx.flag("replay_reasoning"):  # 1.7: Kimi / DeepSeek thinking models
                previous = self.assistant.get("reasoning_content")
                self.assistant["reasoning_content"] = "\n\n".join(
                    ([previous] if previous else []) + self.reasoning)
            self.reasoning = []

    def _close_round(self):
        self.messages += _interrupted_results([i for i in self.pending_ids
                                               if i not in self.answered])
        self.pending_ids, self.answered, self.assistant = [], set(), None
        if self.moved_parts:
            self.messages.append({"role": "user", "content": _user_content(self.moved_parts)})
            self.moved_parts = []


def _input_items(raw_input):
    if isinstance(raw_input, str):
        if not raw_input.strip():
            raise TranslationError("input: must not be empty")
        return [{"type": "message", "role": "user", "content": raw_input}]
    if raw_input is None:
        raise TranslationError("input: Field required")
    if not isinstance(raw_input, list):
        raise TranslationError("input: Input should be a valid string or list of items")
    for i, item in enumerate(raw_input):
        if not isinstance(item, dict):
            raise TranslationError("input[%d]: Input should be an item object" % i)
    return raw_input


def _assistant_text(content):
    if isinstance(content, str):
        return content if content.strip() else ""
    texts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        text = part.get("refusal") if part.get("type") == "refusal" else part.get("text")
        if isinstance(text, str) and text.strip():
            texts.append(text)
    return "\n".join(texts)


def _responses_user_parts(content, ctx, where):
    """Chat content parts for a user / system / developer message."""
    if isinstance(content, str):
        return [_text_part(content)] if content.strip() else []
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            part = {"type": "input_text", "text": part}
        if isinstance(part, dict):
            parts += _responses_part(part, ctx, "%s.content[%d]" % (where, j))
    return parts


def _responses_part(part, ctx, where):
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        text = part.get("text")
        return [_text_part(text)] if isinstance(text, str) and text.strip() else []
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return [_text_part(part["refusal"])]
    if kind == "input_image":
        return [_responses_image_part(part, ctx, where)]
    if kind == "input_file":
        return [_responses_file_part(part, ctx, where)]
    if kind == "input_audio":
        return [_text_part("[audio omitted: not supported through the proxy]")]
    ctx.note("dropped content parts of type %r" % kind)
    return []


def _responses_image_part(part, ctx, where):
    url = part.get("image_url")
    if isinstance(url, dict):  # chat-completions habit: {"url": ...}
        url = url.get("url")
    if not isinstance(url, str) or not url:
        if part.get("file_id"):
            raise TranslationError(
                "%s: input_image with a file_id is not supported (this proxy has no Files API); "
                "send the image as image_url, a URL or a data: URL" % where)
        raise TranslationError("%s.image_url: Field required" % where)
    if ctx.model_info.get("vision") is False:
        return _text_part("[image omitted: this model does not accept images]")
    image = {"url": url}
    if part.get("detail") in ("low", "high", "auto"):
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _responses_file_part(part, ctx, where):
    if part.get("file_id") and not part.get("file_data"):
        raise TranslationError(
            "%s: input_file with a file_id is not supported (this proxy has no Files API); "
            "send the file inline as file_data" % where)
    filename = part.get("filename") if isinstance(part.get("filename"), str) else "document.pdf"
    data = part.get("file_data")
    if isinstance(data, str) and data:
        if not ctx.flag("supports_pdf"):
            return _text_part("[file omitted: %s (files are not supported by this model)]" % filename)
        if not data.startswith("data:"):
            data = "data:application/pdf;base64," + data
        return {"type": "file", "file": {"filename": filename, "file_data": data}}
    if isinstance(part.get("file_url"), str):
        return _text_part("File: " + part["file_url"])
    raise TranslationError("%s: input_file needs file_data" % where)


def _tool_output_content(output, ctx, where):
    """(text for the tool message, image parts that must move to a user message)."""
    if isinstance(output, dict):  # {"content": ..., "success": false} from older clients
        output = output.get("content", "")
    texts, moved = [], []
    if isinstance(output, str):
        texts.append(output)
    elif isinstance(output, list):
        for j, part in enumerate(output):
            if not isinstance(part, dict):
                continue
            for converted in _responses_part(part, ctx, "%s.output[%d]" % (where, j)):
                # Most upstreams take only a string in a tool message (1.3 step 2).
                if converted["type"] == "text":
                    texts.append(converted["text"])
                else:
                    moved.append(converted)
    text = "\n".join(t for t in texts if t)
    return (text if text.strip() else "(no output)"), moved


def _reasoning_item_text(item):
    """Summary texts of a reasoning item; its raw `content` texts when it has no summary."""
    for key in ("summary", "content"):
        parts = item.get(key)
        if isinstance(parts, list):
            text = "\n\n".join(p["text"] for p in parts if isinstance(p, dict)
                               and isinstance(p.get("text"), str) and p["text"].strip())
            if text:
                return text
    return ""


# -- Tools ----------------------------------------------------------------------------------------

# local_shell (a built-in tool of the codex-mini models) becomes a function of this name;
# its calls go back as local_shell_call items that Codex runs itself.
LOCAL_SHELL_TOOL_NAME = "local_shell"
_LOCAL_SHELL_PARAMETERS = {
    "type": "object",
    "properties": {
        "command": {"type": "array", "items": {"type": "string"},
                    "description": "The command and its arguments (argv)."},
        "workdir": {"type": "string", "description": "Working directory."},
        "timeout_ms": {"type": "integer", "description": "Timeout in milliseconds."},
    },
    "required": ["command"],
}


def _responses_tools(tools, ctx):
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise TranslationError("tools: Input should be a valid list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise TranslationError("tools[%d]: Input should be a valid dictionary" % i)
        kind = tool.get("type")
        if kind == "namespace":
            out += _namespace_tools(tool, ctx, "tools[%d]" % i)
        elif kind in ("function", "custom"):
            out.append(_function_tool(tool, None, ctx, "tools[%d]" % i))
        elif kind == "local_shell":
            out.append(_declare_tool(ctx, LOCAL_SHELL_TOOL_NAME,
                                     ResponsesTool("local_shell", LOCAL_SHELL_TOOL_NAME, None),
                                     "Run a shell command on the user's machine.",
                                     _LOCAL_SHELL_PARAMETERS))
        else:
            # web_search, file_search, computer_use_preview, image_generation,
            # code_interpreter, mcp, tool_search...: built-in tools the upstream cannot run.
            ctx.note("dropped built-in tool of type %r (the upstream cannot run it)" % kind)
    return out


def _namespace_tools(tool, ctx, where):
    namespace = tool.get("name")
    if not isinstance(namespace, str) or not namespace:
        raise TranslationError("%s.name: Field required" % where)
    inner = tool.get("tools")
    if not isinstance(inner, list):
        raise TranslationError("%s.tools: Input should be a valid list" % where)
    ctx.namespaces.add(namespace)
    out = []
    for j, member in enumerate(inner):
        if isinstance(member, dict) and member.get("type", "function") in ("function", "custom"):
            out.append(_function_tool(member, tool, ctx, "%s.tools[%d]" % (where, j)))
        else:
            ctx.note("dropped a tool of type %r inside namespace %r" % (
                member.get("type") if isinstance(member, dict) else None, namespace))
    return out


def _function_tool(tool, namespace_tool, ctx, where):
    """A function or custom tool (at the top level or inside a namespace) as an O function."""
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise TranslationError("%s.name: Field required" % where)
    namespace = namespace_tool.get("name") if namespace_tool else None
    description = tool.get("description") if isinstance(tool.get("description"), str) else ""
    namespace_description = namespace_tool.get("description") if namespace_tool else None
    if isinstance(namespace_description, str) and namespace_description.strip():
        # The namespace's own description is all the model learns about the group.
        description = (description + "\n\n" if description else "") + "(%s: %s)" % (
            namespace, namespace_description.strip())
    if tool.get("type") == "custom":
        return _declare_tool(ctx, namespaced_tool_name(namespace, name),
                             ResponsesTool("custom", name, namespace),
                             description + _custom_format_hint(tool.get("format")),
                             _CUSTOM_TOOL_PARAMETERS)
    parameters = tool.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise TranslationError("%s.parameters: Input should be a valid dictionary" % where)
    keep_strict = tool.get("strict") is True and ctx.flag("accepts_strict_tools")
    # A strict-mode schema needs additionalProperties, so the strict_schema cleaning that
    # drops it only applies when `strict` is not sent.
    parameters = _clean_schema(parameters, ctx.flag("strict_schema") and not keep_strict,
                               top_level=True)
    return _declare_tool(ctx, namespaced_tool_name(namespace, name),
                         ResponsesTool("function", name, namespace), description, parameters,
                         strict=keep_strict)


# Custom (freeform) tools take one string. Codex's apply_patch is one: the grammar of its
# input goes into the description, the only place a chat model can learn it.
_CUSTOM_TOOL_PARAMETERS = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "The raw input for the tool."}},
    "required": ["input"],
}


def _custom_format_hint(fmt):
    if not isinstance(fmt, dict) or fmt.get("type") != "grammar":
        return ""
    definition = fmt.get("definition")
    if not isinstance(definition, str) or not definition.strip():
        return ""
    syntax = fmt.get("syntax") if isinstance(fmt.get("syntax"), str) else "lark"
    return "\n\nThe `input` string must follow this %s grammar:\n%s" % (syntax, definition)


def _declare_tool(ctx, upstream_name, spec, description, parameters, strict=False):
    if upstream_name in ctx.tool_specs:
        ctx.note("two tools share the upstream name %r; the last one wins" % upstream_name)
    ctx.tool_specs[upstream_name] = spec
    ctx.tool_names[upstream_name] = upstream_name  # lets _original_tool_name undo "functions.X"
    function = {"name": upstream_name, "description": description, "parameters": parameters}
    if strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _apply_responses_tool_choice(choice, body, ctx):
    """Only called when tools are sent (no tools -> no tool_choice at all, 1.4)."""
    value = None
    if choice in ("auto", "none"):
        value = choice
    elif choice == "required":
        value = ctx.flag("tool_choice_any") or "required"
    elif isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "custom"):
            name = _declared_tool_name(choice, ctx)
            value = {"type": "function", "function": {"name": name}} if name else "auto"
        elif kind == "allowed_tools":
            is_required = choice.get("mode") == "required"
            value = (ctx.flag("tool_choice_any") or "required") if is_required else "auto"
        else:
            value = "auto"  # a built-in tool, dropped with the tools
    if value is not None and not (ctx.flag("drop_tool_choice_when_thinking")
                                  and ctx.thinking_requested):
        body["tool_choice"] = value


def _declared_tool_name(choice, ctx):
    """The upstream name of the tool a tool_choice names, or None when it was not sent."""
    name = namespaced_tool_name(choice.get("namespace"), choice.get("name"))
    if name in ctx.tool_specs:
        return name
    for upstream_name, spec in ctx.tool_specs.items():  # a namespaced tool named bare
        if spec.name == choice.get("name"):
            return upstream_name
    return None


def _apply_text_format(text, body):
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict):
        return
    kind = fmt.get("type")
    if kind == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise TranslationError("text.format.schema: Field required")
        spec = {"name": fmt.get("name") if isinstance(fmt.get("name"), str) else "response",
                "schema": schema}
        if isinstance(fmt.get("description"), str):
            spec["description"] = fmt["description"]
        if isinstance(fmt.get("strict"), bool):
            spec["strict"] = fmt["strict"]
        body["response_format"] = {"type": "json_schema", "json_schema": spec}


# reasoning.effort -> the Anthropic route's `output_config.effort` values, so one function
# (_apply_thinking) applies the provider's thinking switch for both faces (1.6).
_RESPONSES_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
                      "xhigh": "max"}


def _responses_effort(reasoning):
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    return effort if effort == "none" or effort in _RESPONSES_EFFORTS else None


def _as_anthropic_thinking(effort):
    if effort is None:
        return {}
    if effort == "none":
        return {"thinking": {"type": "disabled"}}
    return {"thinking": {"type": "adaptive"}, "output_config": {"effort": _RESPONSES_EFFORTS[effort]}}


def _local_shell_arguments(action):
    action = action if isinstance(action, dict) else {}
    arguments = {"command": action.get("command") if isinstance(action.get("command"), list) else []}
    if isinstance(action.get("working_directory"), str):
        arguments["workdir"] = action["working_directory"]
    if isinstance(action.get("timeout_ms"), int):
        arguments["timeout_ms"] = action["timeout_ms"]
    return json.dumps(arguments, ensure_ascii=False)


# -- Response: chat completion -> Responses (non-streaming) ---------------------------------------

def openai_to_responses_response(resp, ctx, req=None) -> dict:
    """Translate a non-streaming chat.completions response into a Responses `response`.

    Runs the completion through ResponsesStream as one chunk, so both paths share the
    reasoning, think-tag, tool-repair and status rules. `req` (optional) refreshes the
    echoed request fields; otherwise those recorded by responses_to_openai_request are
    used. Raises UpstreamError for error bodies and bodies without choices.
    """
    if not isinstance(resp, dict):
        raise UpstreamError(502, "api_error", "upstream returned an unparsable body",
                            upstream_status=200)
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices:
        if _is_error_body(resp):
            raise upstream_error(200, resp)
        raise UpstreamError(502, "api_error", "upstream returned no choices", upstream_status=200)
    if req is not None:
        ctx.echo = responses_echo(req)
    choice = _first_choice(choices) or {}
    message = choice.get("message") or choice.get("delta")
    message = dict(message) if isinstance(message, dict) else {}
    if isinstance(message.get("tool_calls"), list):
        # Complete calls: number them so that two calls with the same id stay two calls.
        message["tool_calls"] = [dict(call, index=i) for i, call in
                                 enumerate(message["tool_calls"]) if isinstance(call, dict)]
    stream = ResponsesStream(ctx)
    stream.feed({"choices": [{"index": 0, "delta": message,
                              "finish_reason": choice.get("finish_reason")}],
                 "usage": resp.get("usage")})
    return stream.close(done=True)[-1]["response"]


# -- Streaming: chat chunks -> Responses events ---------------------------------------------------

class ResponsesStreamState:
    """Readable state of a ResponsesStream; tests and the HTTP layer look at it."""

    def __init__(self):
        self.started = False
        self.done = False
        self.failed = False
        self.status = None  # "completed" | "incomplete" | "failed" once done
        self.sequence_number = 0  # of the next event
        self.output = []  # finished output items, in output_index order
        self.open_item = None  # the reasoning or message item being streamed
        self.open_texts = []  # its text so far, in pieces (joined once, at its end)
        self.tools = {}  # key -> _ToolCall, emitted at finish_reason
        self.finish_reason = None
        self.usage = None


# Theory of operation (ResponsesStream)
#
# One instance per request turns chat chunks into Responses events in the grammar clients
# expect:  response.created response.in_progress item* (response.completed |
# response.incomplete | response.failed), where every item is output_item.added, its inner
# events, output_item.done. Every event carries sequence_number 0, 1, 2, ...
#
# Items:    at most one item is open at a time (state.open_item), so output_index is the
#           item's position in state.output. Reasoning streams live as a reasoning item with
#           one summary part (summary_part.added, summary_text.delta*, summary_text.done,
#           summary_part.done); text streams live as a message item with one output_text
#           part (content_part.added, output_text.delta*, output_text.done,
#           content_part.done). A delta of the other kind closes the open item and opens a
#           new one, so reasoning, text, reasoning yields three items.
# Holding back: an item opens only once its text has a non-whitespace character; a leading
#           <think>...</think> in the content is reasoning (3.7, shared parser).
# Tools:    never streamed fragment by fragment: merged per chat index (3.5 step 4) and
#           emitted whole at finish_reason (or at close when no finish came), each as
#           added, one arguments delta, arguments done, item done. That is what makes
#           interleaved parallel calls, ids and names that arrive late, cumulative
#           snapshots and argument repair (3.6) work, as on the Anthropic route.
#           Custom tools use custom_tool_call_input.delta/done; local_shell_call has none.
# End:      close(done) flushes, adds the empty-answer fallback (the reasoning as the
#           answer when a model answered only there and called no tool, 2.2 step 2), and
#           emits response.completed, or response.incomplete for finish_reason length or
#           content_filter. EOF without a finish chunk is a failure, never a silent end.
# Errors:   an error chunk before the start raises UpstreamError (the HTTP layer can still
#           answer with a status or retry); after the start, fail() closes the open item
#           and emits response.failed. Nothing is emitted after the terminal event.

class ResponsesStream(_StreamUsage):
    """Sans-IO converter from chat-completion chunks (dicts) to Responses event dicts.

    feed(chunk) -> events; start() forces response.created + response.in_progress (the
    HTTP layer's start-after-silence); close(done=True, usage=None, finish_reason=None)
    ends it (done=False: EOF without `[DONE]`); fail(message, code) -> response.failed.
    Each event is a dict whose "type" is the SSE event name.
    """

    def __init__(self, ctx):
        self.ctx = ctx
        self.state = ResponsesStreamState()
        self.response_id = None
        self.final_usage = None
        self._think_parser = _ThinkTagParser()
        self._pending = ""  # whitespace waiting for a first visible character
        self._pending_kind = None
        self._used_call_ids = set()
        self._reasoning_texts = []  # for the empty-answer fallback
        self._generated = []  # all generated text, for the output estimate without usage
        self._open_item_id = b""  # the open message's id as a JSON string, for the fast path
        self.result = None  # the response object of the terminal event, once sent

    # -- public surface --

    def plain_text_target(self):
        """When a chunk that only adds answer text may skip this state machine (a message
        open, nothing held back, no think tag in play): the fast path's event fields before
        the text, (sequence number, item id, output index); else None."""
        st = self.state
        item = st.open_item
        if item is not None and item["type"] == "message" and not st.done and self._think_parser.idle \
                and not self._pending:
            return st.sequence_number, self._open_item_id, len(st.output)
        return None

    def took_plain_text(self, literal: bytes):
        """Text the fast path sent as it came (a JSON string literal): it joins the open
        message's text, decoded when the message closes. The target of the next such
        chunk: the next sequence number."""
        st = self.state
        st.sequence_number += 1
        st.open_texts.append(literal)
        self._generated.append(literal)
        return st.sequence_number, self._open_item_id, len(st.output)

    def start(self) -> list:
        """response.created + response.in_progress, once."""
        st = self.state
        if st.started or st.done:
            return []
        st.started = True
        self.response_id = self.ctx.new_id("resp_")
        snapshot = self._response("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def feed(self, chunk) -> list:
        """Process one upstream chunk. Raises UpstreamError for an error chunk that
        arrives before the stream started."""
        if self.state.done or not isinstance(chunk, dict):
            return []
        if _is_error_body(chunk):
            err = upstream_error(200, chunk)
            if not self.state.started:
                self.state.done = True
                raise err
            return self.fail(err.message, responses_error_code(err))
        out = self.start()
        choice = _first_choice(chunk.get("choices"))
        if choice is not None:
            self._feed_choice(choice, out)
        usage = chunk.get("usage")
        if not isinstance(usage, dict) and choice is not None:
            usage = choice.get("usage")
        if isinstance(usage, dict):
            self.state.usage = usage  # overwrite: some upstreams send cumulative usage
        return out

    def close(self, done=True, usage=None, finish_reason=None) -> list:
        """End of the upstream stream: done=True for `[DONE]` (or a complete body), False
        for EOF. usage / finish_reason, when given, override what the chunks said."""
        st = self.state
        if st.done:
            return []
        if isinstance(usage, dict):
            st.usage = usage
        if finish_reason:
            st.finish_reason = finish_reason
        if not done and st.finish_reason is None:
            # Connection cut mid-answer: the client must retry, not keep a truncated answer.
            if not st.started:
                st.done = True
                raise UpstreamError(502, "api_error", "upstream stream ended unexpectedly")
            return self.fail("upstream stream ended unexpectedly", "server_error")
        out = self.start()
        self._finish_items(out)
        if not any(item["type"] != "reasoning" for item in st.output):
            fallback = "".join(self._reasoning_texts)
            if fallback.strip():
                self._open_item("message", out)
                self._delta(fallback, out)
                self._close_item(out)
        status = "incomplete" if st.finish_reason in ("length", "content_filter") else "completed"
        self.final_usage = self._final_usage()
        response = self._response(status, usage=self.final_usage)
        if status == "incomplete":
            response["incomplete_details"] = {"reason": "content_filter" if st.finish_reason
                                              == "content_filter" else "max_output_tokens"}
        out.append(self._event("response." + status, response=response))
        st.done, st.status = True, status
        self.result = response
        return out

    def fail(self, message, code="server_error") -> list:
        """response.failed with the error (after closing the open item). Before the start
        nothing may be written (the HTTP layer answers with an HTTP error), so []."""
        st = self.state
        if st.done:
            return []
        st.done = st.failed = True
        st.status = "failed"
        if not st.started:
            return []
        out = []
        self._close_item(out, "incomplete")
        response = self._response("failed", usage=self._final_usage())
        response["error"] = {"code": code or "server_error", "message": message}
        out.append(self._event("response.failed", response=response))
        self.result = response
        return out

    # -- per chunk --

    def _feed_choice(self, choice, out):
        delta = _choice_delta(choice)
        reasoning = _reasoning_text(delta)
        if reasoning:
            self._on_text("reasoning", reasoning, out)
        content = _content_text(delta)
        if content:
            for kind, text in self._think_parser.feed(content):
                self._on_text("reasoning" if kind == "reasoning" else "message", text, out)
        merge_tool_call_chunks(self.state.tools, _delta_tool_calls(delta))
        if choice.get("finish_reason") and isinstance(choice["finish_reason"], str):
            self.state.finish_reason = choice["finish_reason"]
            self._finish_items(out)

    def _on_text(self, kind, text, out):
        """Reasoning or answer text: opens the matching item once something is visible."""
        self._generated.append(text)
        if kind == "reasoning":
            self._reasoning_texts.append(text)
        open_item = self.state.open_item
        if open_item is None or open_item["type"] != kind:
            if self._pending_kind != kind:
                self._pending, self._pending_kind = "", kind
            self._pending += text
            if not self._pending.strip():
                return
            text, self._pending, self._pending_kind = self._pending, "", None
            self._open_item(kind, out)
        self._delta(text, out)

    # -- items --

    def _open_item(self, kind, out):
        st = self.state
        self._close_item(out)
        index = len(st.output)
        if kind == "reasoning":
            item = {"id": self.ctx.new_id("rs_"), "type": "reasoning", "summary": []}
            out.append(self._event("response.output_item.added", output_index=index, item=item))
            out.append(self._event("response.reasoning_summary_part.added", item_id=item["id"],
                                   output_index=index, summary_index=0,
                                   part={"type": "summary_text", "text": ""}))
        else:
            item = {"id": self.ctx.new_id("msg_"), "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}
            self._open_item_id = json.dumps(item["id"]).encode("utf-8")
            out.append(self._event("response.output_item.added", output_index=index, item=item))
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=index, content_index=0,
                                   part={"type": "output_text", "text": "", "annotations": []}))
        st.open_item, st.open_texts = item, []

    def _delta(self, text, out):
        # The hot path: one event per upstream chunk, built in one literal (the key order
        # is the one encode_responses_event's fast path writes).
        st = self.state
        st.open_texts.append(text)
        item = st.open_item
        if item["type"] == "reasoning":
            event = {"type": "response.reasoning_summary_text.delta",
                     "sequence_number": st.sequence_number, "item_id": item["id"],
                     "output_index": len(st.output), "summary_index": 0, "delta": text}
        else:
            event = {"type": "response.output_text.delta", "sequence_number": st.sequence_number,
                     "item_id": item["id"], "output_index": len(st.output), "content_index": 0,
                     "delta": text, "logprobs": []}
        st.sequence_number += 1
        out.append(event)

    def _close_item(self, out, status="completed"):
        st = self.state
        item = st.open_item
        if item is None:
            return
        index, text = len(st.output), _joined_text(st.open_texts)
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            out.append(self._event("response.reasoning_summary_text.done", item_id=item["id"],
                                   output_index=index, summary_index=0, text=text))
            out.append(self._event("response.reasoning_summary_part.done", item_id=item["id"],
                                   output_index=index, summary_index=0, part=part))
            done = dict(item, summary=[part])
        else:
            part = {"type": "output_text", "text": text, "annotations": []}
            out.append(self._event("response.output_text.done", item_id=item["id"],
                                   output_index=index, content_index=0, text=text, logprobs=[]))
            out.append(self._event("response.content_part.done", item_id=item["id"],
                                   output_index=index, content_index=0, part=part))
            done = dict(item, status=status, content=[part])
        out.append(self._event("response.output_item.done", output_index=index, item=done))
        st.output.append(done)
        st.open_item, st.open_texts = None, []

    def _finish_items(self, out):
        """At finish_reason or close: flush the think parser, close the open item, emit
        the buffered tool calls."""
        for kind, text in self._think_parser.flush():
            self._on_text("reasoning" if kind == "reasoning" else "message", text, out)
        self._close_item(out, "incomplete" if self.state.finish_reason == "length" else "completed")
        self._pending, self._pending_kind = "", None
        tools = sorted(self.state.tools.values(), key=lambda t: t.sort_key)
        self.state.tools = {}
        for tool in tools:
            self._emit_tool(tool, out)

    # -- tools --

    def _emit_tool(self, tool, out):
        spec = responses_tool_for(tool.name, self.ctx)
        if not spec.name:
            self.ctx.warn("dropped an upstream tool call without a name")
            return
        # A custom tool's input may be plain text: it is read raw, never "repaired" to {}.
        arguments = _custom_tool_input(tool) if spec.kind == "custom" else tool.input_json(self.ctx.warn)
        self._generated.append(arguments)
        index = len(self.state.output)
        call_id = self._client_call_id(tool.id)
        if spec.kind == "custom":
            tool_input = arguments
            item = {"id": self.ctx.new_id("ctc_"), "type": "custom_tool_call", "call_id": call_id,
                    "name": spec.name, "input": ""}
            inner = [("response.custom_tool_call_input.delta", {"delta": tool_input}),
                     ("response.custom_tool_call_input.done", {"input": tool_input})]
            done = dict(item, input=tool_input)
        elif spec.kind == "local_shell":
            item = {"id": self.ctx.new_id("lsh_"), "type": "local_shell_call", "call_id": call_id,
                    "status": "in_progress", "action": _local_shell_action(arguments)}
            inner = []
            done = dict(item, status="completed")
        else:
            item = {"id": self.ctx.new_id("fc_"), "type": "function_call", "status": "in_progress",
                    "arguments": "", "call_id": call_id, "name": spec.name}
            inner = [("response.function_call_arguments.delta", {"delta": arguments}),
                     ("response.function_call_arguments.done", {"name": spec.name,
                                                                "arguments": arguments})]
            done = dict(item, status="completed", arguments=arguments)
        if spec.namespace:
            item["namespace"] = done["namespace"] = spec.namespace
        out.append(self._event("response.output_item.added", output_index=index, item=item))
        for name, fields in inner:
            if fields.get("delta") != "":  # no empty deltas
                out.append(self._event(name, item_id=item["id"], output_index=index, **fields))
        out.append(self._event("response.output_item.done", output_index=index, item=done))
        self.state.output.append(done)

    def _client_call_id(self, upstream_id):
        """Keep the upstream id unless it is missing, repeated or already in the history
        (models that number calls call_0, call_1... on every turn)."""
        ok = (isinstance(upstream_id, str) and upstream_id.strip() == upstream_id and upstream_id
              and upstream_id not in self._used_call_ids
              and upstream_id not in self.ctx.history_tool_ids)
        call_id = upstream_id if ok else self.ctx.new_id("call_")
        self._used_call_ids.add(call_id)
        return call_id

    # -- events and the response object --

    def _event(self, event_type, **fields):
        event = {"type": event_type, "sequence_number": self.state.sequence_number}
        event.update(fields)
        self.state.sequence_number += 1
        return event

    def _response(self, status, usage=None):
        output = list(self.state.output)
        response = {"id": self.response_id, "object": "response",
                    "created_at": self.ctx.created_at, "status": status, "error": None,
                    "incomplete_details": None, "model": self.ctx.client_model,
                    "output": output, "usage": usage}
        response.update(getattr(self.ctx, "echo", None) or responses_echo({}))
        if status != "in_progress":
            # Not an API field (the SDKs compute it); plain-HTTP clients read it.
            response["output_text"] = "".join(part["text"] for item in output
                                               if item["type"] == "message"
                                               for part in item["content"])
        return response

    def _final_usage(self):
        usage = _responses_usage(self.state.usage)
        if usage is None:
            input_tokens = self.ctx.estimated_input_tokens
            output_tokens = estimate_text_tokens(_joined_text(self._generated))
            usage = {"input_tokens": input_tokens,
                     "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                     "output_tokens": output_tokens,
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": input_tokens + output_tokens}
        return usage


def responses_error_code(err) -> str:
    """The `response.failed` error code for an UpstreamError, in the words Codex acts on:
    context_length_exceeded and invalid_prompt end the turn, insufficient_quota and
    rate_limit_exceeded are reported as such, server_is_overloaded and the rest retry."""
    if getattr(err, "openai_code", None) == "context_length_exceeded":
        return "context_length_exceeded"
    return _RESPONSES_ERROR_CODES.get(getattr(err, "anthropic_type", None), "server_error")


_RESPONSES_ERROR_CODES = {"rate_limit_error": "rate_limit_exceeded",
                          "billing_error": "insufficient_quota",
                          "overloaded_error": "server_is_overloaded",
                          "invalid_request_error": "invalid_prompt"}


def _responses_usage(usage):
    """Chat usage -> Responses usage (input_tokens include the cached ones); None if absent."""
    counts = _anthropic_usage(usage)  # one place knows where upstreams put cached tokens
    if counts is None:
        return None
    input_tokens = counts["input_tokens"] + counts["cache_read_input_tokens"]
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    if reasoning is None:
        reasoning = usage.get("reasoning_tokens")
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": counts["cache_read_input_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": counts["output_tokens"],
            "output_tokens_details": {"reasoning_tokens": _int(reasoning)},
            "total_tokens": input_tokens + counts["output_tokens"]}


def _custom_tool_input(tool):
    """The string a custom tool gets: the `input` argument. A model that ignored the schema
    and sent another single string, a JSON string or plain text is taken at its word."""
    raw = tool.arguments
    if not raw and tool.arguments_object is not None:
        raw = json.dumps(tool.arguments_object, ensure_ascii=False)
    parsed = _loads_or_none(raw)
    if isinstance(parsed, str):
        return parsed
    if not isinstance(parsed, dict):
        if not raw.lstrip().startswith("{"):
            return raw
        parsed = _loads_or_none(tool.input_json()) or {}  # cumulative or truncated JSON (3.6)
    value = parsed.get("input")
    if value is None and len(parsed) == 1:
        value = next(iter(parsed.values()))
    if value is None:
        return "" if not parsed else json.dumps(parsed, ensure_ascii=False)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _local_shell_action(arguments):
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = {}
    parsed = parsed if isinstance(parsed, dict) else {}
    command = parsed.get("command")
    if isinstance(command, str):
        command = ["bash", "-lc", command]  # a model that sent one command line
    if not isinstance(command, list):
        command = []
    timeout = parsed.get("timeout_ms")
    return {"type": "exec", "command": [str(c) for c in command],
            "timeout_ms": timeout if isinstance(timeout, int) and not isinstance(timeout, bool) else None,
            "working_directory": parsed.get("workdir") if isinstance(parsed.get("workdir"), str) else None,
            "env": {}, "user": None}

# == 4. Wire codecs (sans-IO): SSE, chunked bodies, request framing, event encoders ===============
# What goes over the wire, parsed and built without I/O: the incremental SSE parser,
# SSE framing for the relay, the chunked-body decoder (requests and upstream answers),
# request framing rules (Content-Length / Transfer-Encoding), and the event encoders of
# the Anthropic and Responses streams (with the fast path for chunks that only add text),
# and the HTTP/1.1 heads of upstream calls. Pure: bytes in, events out.
# Tests: tests/unit/test_core_units.py, tests/unit/test_fuzz.py (byte at a time),
# tests/unit/test_per_chunk_budget.py (work per streamed chunk).

class SSEParser:
    """Split a text/event-stream into (event, data) pairs as bytes arrive.

    Lines may end in \\n, \\r\\n or \\r; `data:` with or without a space (iFlow
    sends none); comments and id/retry fields are ignored. UTF-8 is decoded per
    complete line, so a character split across reads arrives intact."""

    def __init__(self, max_event_bytes: int = 16 * MIB):
        self._buf = b""
        self._pending = []  # pieces of one long line that has no end yet
        self._pending_bytes = 0
        self._event_bytes = 0
        self._event = None
        self._data = []
        self._max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list:
        """Events completed by chunk; ValueError when one event passes max_event_bytes."""
        if b"\n" not in chunk and b"\r" not in chunk and not self._buf.endswith(b"\r"):
            # Part of a long line: keep the piece (joining every time would be quadratic).
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)
            self._check_size(len(self._buf) + self._pending_bytes)
            return []
        if self._pending:
            self._buf += b"".join(self._pending)
            self._pending, self._pending_bytes = [], 0
        self._buf += chunk
        out = []
        if b"\r" not in self._buf:  # the common case: plain \n line ends, split at once
            lines = self._buf.split(b"\n")
            self._buf = lines.pop()
            for line in lines:
                self._line(line, out)
            return out
        while True:
            cut = _line_end(self._buf)
            if cut is None:
                return out
            end, after = cut
            line = self._buf[:end]
            self._buf = self._buf[after:]
            self._line(line, out)

    def flush(self) -> list:
        """Events completed by the end of the stream (a last event without a blank line)."""
        out = self.feed(b"\n") if self._buf or self._pending else []  # the end of input ends the last line
        self._buf = b""
        self._line(b"", out)
        return out

    def _check_size(self, size: int) -> None:
        if self._event_bytes + size > self._max_event_bytes:
            raise ValueError("an SSE event is larger than %d bytes" % self._max_event_bytes)

    def _line(self, line: bytes, out: list) -> None:
        if not line:
            if self._data:
                out.append((self._event, "\n".join(self._data)))
            self._event, self._data, self._event_bytes = None, [], 0
        elif line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            self._check_size(len(value))
            self._event_bytes += len(value)
            self._data.append(value.decode("utf-8", "replace"))
        elif line.startswith(b"event:"):
            self._event = line[6:].strip().decode("utf-8", "replace")


def _line_end(buf: bytes):
    """(end of line, start of next line) for the first complete line, or None.

    A lone \\r at the very end may be the first half of \\r\\n, so wait for more."""
    lf = buf.find(b"\n")
    cr = buf.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, lf + 1)
    if cr + 1 < len(buf):
        return (cr, cr + 2) if buf[cr + 1:cr + 2] == b"\n" else (cr, cr + 1)
    return None


def encode_sse_data(data: str) -> bytes:
    """One `data:` event in the form OpenAI clients expect."""
    return b"data: " + data.encode("utf-8") + b"\n\n"


# -- Event encoders of the Anthropic and Responses streams ----------------------------------------

_TEXT_DELTA = ('event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
               '"delta":{"type":"%s","%s":%s}}\n\n')
_STREAMED_DELTAS = {"text_delta": "text", "thinking_delta": "thinking"}


# -- rule 3.1 fast path: a chunk that only adds text -------------------------------------------
# Nearly every chunk of a long answer adds a few characters of text and nothing else. Such a
# chunk skips JSON decoding, the state machine and JSON encoding: its content's JSON string
# literal goes into a pre-built event as it came (measured: CPU per 1000 upstream chunks on
# the Anthropic route 20 -> 9 ms). Anything else in the chunk, or JSON written with spaces
# (the checks below read compact JSON only), takes the full path.

# A delta of content alone (the role may come along): no tool calls, reasoning or refusal.
_PLAIN_TEXT_DELTA = re.compile(rb'"delta":\{(?:"role":"assistant",)?"content":("(?:[^"\\<]|\\[^u]|\\u(?!003))+")'
                               rb'(?:,"role":"assistant")?\}')


def plain_text_literal(data: bytes):
    """The content of a chunk (its data bytes) that only adds answer text, as the JSON string
    literal it holds; None for any other chunk (a finish reason, usage, tool calls, reasoning,
    an error, several choices, or a "<" that may start a think tag, also as \\u003c)."""
    found = _PLAIN_TEXT_DELTA.search(data)
    if found is None or data.count(b'"delta"') != 1 or b'"error"' in data:
        return None
    for field in (b'"finish_reason"', b'"usage"'):  # absent, or null as compact JSON writes it
        at = data.find(field)
        if at != -1 and not data.startswith(b":null", at + len(field)):
            return None
    return found.group(1)


# The events of the fast path: % (the stream's plain_text_target() + (the literal as it came,)).
ANTHROPIC_PLAIN_TEXT_EVENT = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                              b'"delta":{"type":"text_delta","text":%s}}\n\n')
RESPONSES_PLAIN_TEXT_EVENT = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                              b'"sequence_number":%d,"item_id":%s,"output_index":%d,"content_index":0,"delta":%s,'
                              b'"logprobs":[]}\n\n')


def encode_anthropic_event(event) -> bytes:
    """Encode one (name, data) event as SSE bytes (3.1).

    Text and thinking deltas, nearly every event of a stream, are formatted
    directly (same bytes as the generic path, measured ~3x cheaper)."""
    name, data = event
    if name == "content_block_delta":
        delta = data["delta"]
        field = _STREAMED_DELTAS.get(delta["type"])
        if field is not None and len(delta) == 2 and len(data) == 3:
            return (_TEXT_DELTA % (data["index"], delta["type"], field,
                                   json.encoder.encode_basestring(delta[field]))).encode("utf-8")
    return ("event: %s\ndata: %s\n\n" % (name, compact_json(data))).encode("utf-8")


# Text and reasoning deltas are nearly every event of a stream: formatted directly (the
# same bytes as the generic path, checked by a test) like encode_anthropic_event does.
_RESPONSES_DELTA_FORMATS = {
    "response.output_text.delta": (
        7, 'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
           '"sequence_number":%d,"item_id":%s,"output_index":%d,"content_index":%d,"delta":%s,'
           '"logprobs":[]}\n\n'),
    "response.reasoning_summary_text.delta": (
        6, 'event: response.reasoning_summary_text.delta\ndata: {"type":'
           '"response.reasoning_summary_text.delta","sequence_number":%d,"item_id":%s,'
           '"output_index":%d,"summary_index":%d,"delta":%s}\n\n'),
}


def encode_responses_event(event) -> bytes:
    """Encode one Responses event dict as SSE bytes: `event: <type>` + `data: <json>`."""
    fast = _RESPONSES_DELTA_FORMATS.get(event["type"])
    if fast is not None and len(event) == fast[0]:
        index = event.get("content_index", event.get("summary_index"))
        return (fast[1] % (event["sequence_number"], json.encoder.encode_basestring(event["item_id"]),
                           event["output_index"], index,
                           json.encoder.encode_basestring(event["delta"]))).encode("utf-8")
    return ("event: %s\ndata: %s\n\n" % (event["type"], compact_json(event))).encode("utf-8")


class EventSplitter:
    """Cuts a byte stream after its last complete SSE event (blank line), keeping the
    rest for the next feed. Linear in the bytes fed (a huge event is searched once,
    not once per read) and bounded: ValueError when one event passes max_event_bytes."""

    def __init__(self, max_event_bytes: int = 16 * MIB):
        self._pending = bytearray()
        self._max_event_bytes = max_event_bytes

    @property
    def pending(self) -> bytes:
        return bytes(self._pending)

    def feed(self, data: bytes) -> bytes:
        searched_from = max(0, len(self._pending) - 2)  # a boundary may straddle the reads
        self._pending += data
        end = _last_event_end(self._pending, searched_from)
        if end == -1:
            if len(self._pending) > self._max_event_bytes:
                raise ValueError("an SSE event is larger than %d bytes" % self._max_event_bytes)
            return b""
        complete = bytes(self._pending[:end])
        del self._pending[:end]
        return complete


def _last_event_end(buf, start: int) -> int:
    """The end of the last blank line (\n\n or \n\r\n) at or after start, or -1."""
    i = buf.rfind(b"\n\n", start)
    j = buf.rfind(b"\n\r\n", i if i > start else start)  # from i on: a stream without \r is scanned once
    return max(i + 2 if i != -1 else -1, j + 3 if j != -1 else -1)


def last_usage_in_stream(tail: bytes):
    """The `usage` object of the last chunk in the tail of an SSE stream that has one.

    Looked for from the end, a line at a time (a chunk's JSON is one data line): parsing the
    whole tail (the last three reads, up to 192 KiB) took 0.9 ms per stream, a quarter of the
    CPU of a 2000-chunk stream; this takes about 5 us. The whole tail is still parsed when the
    lines do not settle it (a chunk's data over several lines, or many "usage": null)."""
    end = len(tail)
    for _ in range(USAGE_LOOK_BACK_LINES):
        at = tail.rfind(b'"usage"', 0, end)
        if at < 0:
            return None
        start, stop = tail.rfind(b"\n", 0, at) + 1, tail.find(b"\n", at)
        found, unparsed = _usage_objects(tail[start:stop if stop >= 0 else len(tail)])
        if found:
            return found[-1]
        if unparsed:
            break
        end = start
    found, _unparsed = _usage_objects(tail[tail.find(b"data:"):] if b"data:" in tail else b"")
    return found[-1] if found else None


def _usage_objects(sse: bytes) -> tuple:
    """([the usage objects of the events in sse, in order], whether data naming "usage" did not parse)."""
    found, unparsed = [], False
    for _event, data in SSEParser().feed(sse + b"\n\n"):
        if '"usage"' not in data:
            continue
        try:
            usage = json.loads(data).get("usage")
        except (ValueError, AttributeError):
            unparsed = True
            continue
        if isinstance(usage, dict):
            found.append(usage)
    return found, unparsed


USAGE_LOOK_BACK_LINES = 64  # some providers send "usage": null in every chunk but the last


class ChunkedDecoder:
    """Incremental decoder of an HTTP/1.1 chunked body (sans-IO): feed() raw bytes,
    get the body bytes; `done` after the last chunk and its trailers.

    Strict on purpose (request smuggling, issue 10): a size is 1-16 hex digits,
    nothing else (int() would also take "-1", "+2" and "1_0"), and every chunk ends
    in CRLF. ValueError when malformed; RequestTooLargeError past max_bytes."""

    def __init__(self, max_bytes: int = None):
        self._buf = b""
        self._left = 0
        self._total = 0
        self._max_bytes = max_bytes
        self._state = "size"  # size -> data -> crlf -> size ... -> trailer -> done

    @property
    def done(self) -> bool:
        return self._state == "done"

    @property
    def data_wanted(self) -> int:
        """Bytes that can be read without passing the end of the current chunk (its
        data and CRLF); 0 while a size or trailer line is expected (read a line)."""
        if self._state == "data":
            return self._left + 2
        return max(0, 2 - len(self._buf)) if self._state == "crlf" else 0

    def feed(self, data: bytes) -> bytes:
        # Positions into one buffer, not slices of it: a read holds hundreds of small
        # chunks, and cutting the rest off after each one copied the read quadratically.
        buf = self._buf + data if self._buf else data
        pos, size_of_buf, out = 0, len(buf), []
        while self._state != "done":
            if self._state == "size":
                pos = self._whole_chunks(buf, pos, out)
            if self._state == "data":
                take = min(self._left, size_of_buf - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                if self._left:
                    break
                self._state = "crlf"
            elif self._state == "crlf":
                if size_of_buf - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ValueError("chunk data not followed by CRLF")
                pos += 2
                self._state = "size"
            else:  # "size" or "trailer": one line each
                end = buf.find(b"\n", pos)
                if end == -1:
                    if size_of_buf - pos > 4096:
                        raise ValueError("chunk size line too long")
                    break
                line, pos = buf[pos:end].rstrip(b"\r"), end + 1
                if self._state == "trailer":
                    if not line:
                        self._state = "done"
                    continue
                size = parse_chunk_size(line)
                self._total += size
                if self._max_bytes is not None and self._total > self._max_bytes:
                    raise RequestTooLargeError("request body exceeds the limit of %d bytes" % self._max_bytes)
                if size == 0:
                    self._state = "trailer"
                else:
                    self._left, self._state = size, "data"
        self._buf = buf[pos:]
        return b"".join(out)

    def _whole_chunks(self, buf: bytes, pos: int, out: list) -> int:
        """Take the chunks that lie whole in buf from pos on (plain size line, data, CRLF),
        in one tight loop; the state machine does the rest. Small SSE chunks, 64 KiB per read:
        1.8 us per chunk through the state machine alone, 0.48 us this way."""
        match, append, total = _PLAIN_CHUNK_HEAD.match, out.append, self._total
        while True:
            head = match(buf, pos)
            if head is None:
                break
            size = int(head[1], 16)
            start = head.end()
            stop = start + size
            if size == 0 or buf[stop:stop + 2] != b"\r\n":
                break  # the last chunk, a chunk cut off, or a malformed one: the state machine's
            total += size
            append(buf[start:stop])
            pos = stop + 2
        self._total = total
        if self._max_bytes is not None and total > self._max_bytes:
            raise RequestTooLargeError("request body exceeds the limit of %d bytes" % self._max_bytes)
        return pos


_PLAIN_CHUNK_HEAD = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")


def request_framing(transfer_encodings: list, content_lengths: list):
    """How a request body is framed: "chunked", or its length in bytes (0 when none).

    As strict as h11 (no request smuggling through a lenient parser, issue 10):
    only "chunked" as transfer coding (501 otherwise), no Content-Length beside it,
    one Content-Length value of digits only (repeats must agree)."""
    if transfer_encodings:
        codings = [c.strip().lower() for value in transfer_encodings for c in value.split(",")]
        if codings != ["chunked"]:
            raise InvalidRequestError("only Transfer-Encoding: chunked is supported", status=501)
        if content_lengths:
            raise InvalidRequestError("a request may not carry both Transfer-Encoding and Content-Length")
        return "chunked"
    values = {v.strip() for value in content_lengths for v in value.split(",")}
    if not values:
        return 0
    if len(values) > 1:
        raise InvalidRequestError("conflicting Content-Length headers")
    value = values.pop()
    if not value.isdigit() or not value.isascii() or len(value) > 18:
        raise InvalidRequestError("invalid Content-Length")
    return int(value)


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


def parse_chunk_size(line: bytes) -> int:
    """The size in a chunk-size line (extensions after ";" ignored); ValueError
    unless it is 1-16 hex digits."""
    size = line.split(b";", 1)[0].strip(b" \t") if b";" in line or b" " in line or b"\t" in line else line
    if not _CHUNK_SIZE.fullmatch(size):
        raise ValueError("malformed chunk size %r" % size[:20])
    return int(size, 16)


# -- HTTP/1.1 heads of upstream calls ----------------------------------------------------------------
# Our own request line, headers and answer head: http.client's header parsing goes through
# the email package and cost about a third of a non-streamed request's CPU (issue 16).

class Headers:
    """Case-insensitive, multi-valued headers (of a request or an upstream answer) in arrival order."""

    __slots__ = ("_items",)

    def __init__(self, items=()):
        self._items = [(k.lower(), v) for k, v in items]

    @classmethod
    def lowered(cls, items: list) -> "Headers":
        """Headers of (name, value) pairs whose names are lower case already (taken as is)."""
        headers = cls.__new__(cls)
        headers._items = items
        return headers

    def get(self, name: str, default=None):
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list:
        name = name.lower()
        return [v for k, v in self._items if k == name]

    def items(self) -> list:
        return list(self._items)

    def __contains__(self, name):
        return self.get(name) is not None


MAX_HEAD_BYTES = 64 * 1024
_LINE_BREAK = re.compile(r"[\r\n\0]")


def encode_request_head(method: str, target: str, host: str, headers: dict, body_length=None) -> bytes:
    """Request line and headers of an upstream call, with Host, Accept-Encoding: identity and
    Content-Length added as http.client adds them; ValueError for a line break in a header
    (a config value must not smuggle a header in) or text beyond Latin-1."""
    fields = ["%s: %s" % (name, value) for name, value in headers.items()]
    if _LINE_BREAK.search("".join(fields)):  # one search for all: the name comes in the rare case
        raise ValueError("header %r holds a line break" % next(
            name for name, value in headers.items() if _LINE_BREAK.search("%s%s" % (name, value)))[:40])
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: " + host] + fields
    given = {name.lower() for name in headers}
    if "accept-encoding" not in given:
        lines.append("Accept-Encoding: identity")  # no gzip: bodies are relayed as they come
    if body_length is not None and "content-length" not in given:
        lines.append("Content-Length: %d" % body_length)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


MAX_HEADER_COUNT = 100  # as http.client


def parse_header_lines(lines) -> Headers:
    """Headers from "Name: value" lines (bytes, line ends already removed); ValueError for a
    line that is not one (folded lines included: HTTP/1.1 no longer allows them)."""
    items = []
    for line in lines:
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name[-1] in " \t" or name[0] in " \t":
            raise ValueError("malformed header line %r" % line[:60])
        items.append((name.lower(), value.strip(" \t")))
    if len(items) > MAX_HEADER_COUNT:
        raise ValueError("more than %d headers" % MAX_HEADER_COUNT)
    return Headers.lowered(items)


def parse_response_head(head: bytes) -> tuple:
    """(status, version, Headers) of an answer's head (without its blank line); ValueError
    when it is not an HTTP/1.x answer."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not status.isdigit() or len(status) != 3:
        raise ValueError("not an HTTP/1.x answer: %r" % lines[0][:60])
    return int(status), version.decode("ascii"), parse_header_lines(lines[1:])


def response_framing(method: str, status: int, version: str, headers: Headers) -> tuple:
    """(framing, keep_alive) of an answer's body: framing is "chunked", a byte count, or None
    (until the connection closes, which then cannot be reused)."""
    connection = (headers.get("connection") or "").lower()
    keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return 0, keep_alive
    codings = ",".join(headers.get_all("transfer-encoding")).lower()
    if codings:
        if codings.replace(" ", "").split(",")[-1] != "chunked":
            return None, False  # not chunked last: the body ends with the connection
        return "chunked", keep_alive
    lengths = {v.strip() for value in headers.get_all("content-length") for v in value.split(",")}
    if not lengths:
        return None, False
    length = lengths.pop()
    if lengths or not length.isdigit() or not length.isascii():
        raise ValueError("invalid Content-Length in the answer")
    return int(length), keep_alive


# == 5. Upstream: connection pool, proxies, providers, remote images ==============================
# Keep-alive HTTP(S) connections per host over http.client (TCP_NODELAY, certifi
# when present), the iFlow provider (headers, HMAC signature, per-model tweaks)
# and the model list. System proxy variables are never read.
# Tests: tests/integration/test_providers.py, tests/unit/test_core_units.py.

IFLOW_TEXT_MODELS = [
    ("glm-4.6", "GLM-4.6"), ("glm-4.7", "GLM-4.7"), ("glm-5", "GLM-5"),
    ("iFlow-ROME-30BA3B", "iFlow-ROME-30BA3B"), ("deepseek-v3.2-chat", "DeepSeek-V3.2"),
    ("qwen3-coder-plus", "Qwen3-Coder-Plus"), ("kimi-k2", "Kimi-K2"),
    ("kimi-k2-thinking", "Kimi-K2-Thinking"), ("kimi-k2.5", "Kimi-K2.5"),
    ("kimi-k2-0905", "Kimi-K2-0905"), ("minimax-m2.5", "MiniMax-M2.5"),
]
IFLOW_VISION_MODELS = [("qwen-vl-max", "Qwen-VL-Max")]
# Context windows (tokens) as the model makers publish them; a request whose prompt
# plus max_tokens would not fit gets max_tokens lowered (translation.md 1.8).
IFLOW_CONTEXT_WINDOWS = {
    "glm-4.6": 200000, "glm-4.7": 200000, "glm-5": 200000, "iFlow-ROME-30BA3B": 128000,
    "deepseek-v3.2-chat": 128000, "qwen3-coder-plus": 1000000, "kimi-k2": 128000,
    "kimi-k2-0905": 256000, "kimi-k2-thinking": 256000, "kimi-k2.5": 256000,
    "minimax-m2.5": 200000, "qwen-vl-max": 128000,
}
# Names the original also routed images to (besides qwen-vl-max).
_VISION_NAME_RE = re.compile(r"(?i)(-vl\b|-vl-|^qwen\d*(\.\d+)?-vl|glm-4(\.\d)?v|vision)")


def iflow_model_info(model: str) -> dict:
    """What translation needs to know of an iFlow model: vision and context window.

    A name we do not know may accept images: the upstream decides."""
    known_text = {m for m, _d in IFLOW_TEXT_MODELS}
    vision = model not in known_text or bool(_VISION_NAME_RE.search(model))
    return {"vision": vision, "context_window": IFLOW_CONTEXT_WINDOWS.get(model),
            "max_output_tokens": None}


def iflow_profile(model: str) -> dict:
    """Translation flags for an iFlow model (translation.md 1.6, 1.7, section 7)."""
    name = model.lower()
    profile = {"thinking_style": "provider"}  # iflow_model_tweaks() turns thinking on
    if name.startswith("glm-"):
        profile["thinking_style"] = "chat_template_kwargs"
    elif name.startswith(("kimi-k2.5", "mimo-")):
        profile["thinking_style"] = "thinking_type"
    if name.startswith(("kimi-k2-thinking", "kimi-k2.5", "deepseek")):
        # These answer 400 when an assistant tool-call turn lacks reasoning_content.
        profile["replay_reasoning"] = True
    return profile


# Unix time of 2025-01-01, the `created` stamp of catalogue entries (stable output).
CATALOGUE_CREATED = 1735689600


def make_tls_context() -> ssl.SSLContext:
    """TLS with certifi's CA bundle when importable (works inside a zip), else the system store."""
    try:
        import certifi
        return ssl.create_default_context(cadata=certifi.contents())
    except (ImportError, AttributeError, OSError, ssl.SSLError):
        return ssl.create_default_context()


def has_certifi() -> bool:
    """Whether certifi can be imported (without importing it)."""
    import importlib.util
    return importlib.util.find_spec("certifi") is not None


def iflow_signature(api_key: str, session_id: str, timestamp_ms: int,
                    user_agent: str = IFLOW_USER_AGENT) -> str:
    """hex HMAC-SHA256(key=apiKey, msg="<user-agent>:<session-id>:<timestamp ms>")."""
    message = "%s:%s:%d" % (user_agent, session_id, timestamp_ms)
    return hmac.new(api_key.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


def iflow_model_tweaks(body: dict) -> dict:
    """Request fields the iFlow CLI adds per model; only fields the client did not set.

    Pure; returns a new dict. Rules as the iFlow CLI (and the original) apply them."""
    body = dict(body)
    model = str(body.get("model") or "")
    name = model.lower()

    def default(key, value):
        if key not in body:
            body[key] = value

    if name.startswith("deepseek"):
        default("thinking_mode", True)
        default("reasoning", True)
    elif model == "glm-5":
        default("chat_template_kwargs", {"enable_thinking": True})
        default("enable_thinking", True)
        default("thinking", {"type": "enabled"})
    elif name.startswith("glm-"):
        default("chat_template_kwargs", {"enable_thinking": True})
    elif name.startswith("kimi-k2.5"):
        default("thinking", {"type": "enabled"})
    elif "thinking" in name:
        default("thinking_mode", True)
    elif name.startswith("mimo-"):
        default("thinking", {"type": "enabled"})
    elif "claude" in name or "sonnet-" in name:
        default("chat_template_kwargs", {"enable_thinking": True})
    elif "reasoning" in name:
        default("reasoning", True)
    if re.match(r"qwen.*4b", name):
        for key in ("thinking_mode", "reasoning", "chat_template_kwargs"):
            body.pop(key, None)
    return body


class _Connection(http.client.HTTPConnection):
    """HTTPConnection with TCP_NODELAY and separate connect/read timeouts."""

    def __init__(self, host, port, connect_timeout_s, read_timeout_s):
        super().__init__(host, port, timeout=connect_timeout_s)
        self.read_timeout_s = read_timeout_s

    def connect(self):
        super().connect()
        _tune_socket(self.sock, self.read_timeout_s)


class _TLSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, connect_timeout_s, read_timeout_s, context):
        super().__init__(host, port, timeout=connect_timeout_s, context=context)
        self.read_timeout_s = read_timeout_s

    def connect(self):
        super().connect()
        _tune_socket(self.sock, self.read_timeout_s)


# -- Socket timeouts ------------------------------------------------------------------------------
# Python's socket timeout polls before every recv and send: two system calls where one
# would do, each releasing the GIL, and under load each release hands the GIL to another
# thread: those hand-offs were most of a short request's kernel time. On 64-bit Linux a
# plain socket is therefore kept in blocking mode and timed by the kernel (SO_RCVTIMEO,
# SO_SNDTIMEO): a non-streamed request makes four system calls fewer, and at 32 clients
# the futex calls per request (GIL hand-offs, strace) went from 70 to 41. A read that times
# out raises socket.timeout all the same (recv_timed). TLS sockets and other systems keep
# Python's timeout.

KERNEL_TIMEOUTS = sys.platform.startswith("linux") and struct.calcsize("l") == 8


def set_timeout(sock, timeout_s) -> None:
    """Time sock's reads and writes out after timeout_s; a no-op when that is set already
    (settimeout() is itself a system call releasing the GIL)."""
    if KERNEL_TIMEOUTS and not isinstance(sock, ssl.SSLSocket):
        if sock.gettimeout() is not None:
            sock.settimeout(None)
        value = _timeval(timeout_s)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, len(value)) != value:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    elif sock.gettimeout() != timeout_s:
        sock.settimeout(timeout_s)


def _timeval(timeout_s) -> bytes:
    """A struct timeval; at least 1 us, as zero would mean no timeout at all."""
    if timeout_s is None:
        return struct.pack("ll", 0, 0)
    micros = max(1, int(timeout_s * 1e6))
    return struct.pack("ll", micros // 1000000, micros % 1000000)


def recv_timed(sock, size: int = 65536) -> bytes:
    """sock.recv(size), raising socket.timeout also when the kernel's timeout passed."""
    try:
        return sock.recv(size)
    except BlockingIOError:  # EAGAIN: SO_RCVTIMEO passed
        raise socket.timeout("timed out") from None


def send_all(sock, data: bytes) -> None:
    """sock.sendall(data) within the socket's timeout for the whole of data, as Python's own
    timeout does. The kernel's SO_SNDTIMEO counts per send() call, and each call that moves a
    byte starts it again: a client reading a byte now and then would hold a write forever."""
    if sock.gettimeout() is not None or not KERNEL_TIMEOUTS:  # Python's timeout: sendall() keeps a deadline
        sock.sendall(data)
        return
    started = time.monotonic()
    sent = _send_some(sock, data)
    if sent == len(data):  # the usual case: one call
        return
    timeout_s = _seconds(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16))
    view = memoryview(data)
    try:
        while sent < len(data):
            if timeout_s:
                remaining = timeout_s - (time.monotonic() - started)
                if remaining <= 0:
                    raise socket.timeout("timed out")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(remaining))
            sent += _send_some(sock, view[sent:])
    finally:
        if timeout_s:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout_s))


def _send_some(sock, data) -> int:
    try:
        return sock.send(data)
    except BlockingIOError:  # EAGAIN: SO_SNDTIMEO passed without room for a byte
        raise socket.timeout("timed out") from None


def _seconds(timeval: bytes) -> float:
    seconds, micros = struct.unpack("ll", timeval)
    return seconds + micros / 1e6


def _tune_socket(sock, read_timeout_s):
    # Without TCP_NODELAY, Nagle + delayed ACK adds ~40 ms to small SSE writes.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_timeout(sock, read_timeout_s)


# -- Upstream proxies -----------------------------------------------------------------------------
# Only the configured proxy is used (upstream_proxy_enabled + upstream_proxy); the
# system's HTTP(S)_PROXY variables never are. http:// and https:// proxies: plain
# http targets are sent in absolute form, https targets through a CONNECT tunnel
# (http:// proxies only: TLS inside TLS is not available in the stdlib ssl module).
# socks5:// resolves names here, socks5h:// lets the proxy resolve them.

class ProxySpec:
    """A parsed upstream proxy URL."""

    def __init__(self, scheme, host, port, username="", password=""):
        self.scheme, self.host, self.port = scheme, host, port
        self.username, self.password = username, password

    @property
    def is_socks(self) -> bool:
        return self.scheme.startswith("socks5")

    def basic_auth(self):
        if not self.username:
            return None
        token = base64.b64encode(("%s:%s" % (self.username, self.password)).encode("utf-8")).decode("ascii")
        return "Basic " + token

    def __repr__(self):
        return "%s://%s:%d" % (self.scheme, self.host, self.port)  # never the password


PROXY_SCHEMES = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}


def parse_proxy(url: str) -> ProxySpec:
    """ProxySpec from http://, https://, socks5:// or socks5h:// URLs with optional user:password."""
    parts = urllib.parse.urlsplit((url or "").strip())
    scheme = parts.scheme.lower()
    if scheme not in PROXY_SCHEMES or not parts.hostname:
        raise InvalidRequestError("upstream_proxy must look like http://host:port, https://host:port, "
                         "socks5://host:port or socks5h://host:port (got %r)" % redact(url or ""))
    username = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    register_secret(password)
    return ProxySpec(scheme, parts.hostname, parts.port or PROXY_SCHEMES[scheme], username, password)


def proxy_from_config(config) -> ProxySpec:
    """The proxy to use, or None when disabled or empty."""
    if not config.get("upstream_proxy_enabled") or not config.get("upstream_proxy"):
        return None
    return parse_proxy(config.get("upstream_proxy"))


_SOCKS5_ERRORS = {1: "general failure", 2: "connection not allowed", 3: "network unreachable",
                  4: "host unreachable", 5: "connection refused", 6: "TTL expired",
                  7: "command not supported", 8: "address type not supported"}


def socks5_connect(proxy: ProxySpec, host: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP connection to host:port through a SOCKS5 proxy (RFC 1928, RFC 1929 login)."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout_s)
    try:
        methods = b"\x00\x02" if proxy.username else b"\x00"
        sock.sendall(b"\x05" + bytes([len(methods)]) + methods)
        version, method = _recv_exact(sock, 2)
        if version != 5 or method not in (0, 2):
            raise OSError("SOCKS5 proxy %r accepts none of our login methods" % proxy)
        if method == 2:
            user, password = proxy.username.encode("utf-8"), proxy.password.encode("utf-8")
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            if _recv_exact(sock, 2)[1] != 0:
                raise OSError("SOCKS5 proxy %r refused the user name or password" % proxy)
        sock.sendall(b"\x05\x01\x00" + _socks5_address(proxy, host, port) + port.to_bytes(2, "big"))
        _version, reply, _reserved, address_type = _recv_exact(sock, 4)
        if reply != 0:
            raise OSError("SOCKS5 proxy %r could not connect to %s:%d: %s"
                          % (proxy, host, port, _SOCKS5_ERRORS.get(reply, "error %d" % reply)))
        skip = {1: 4, 4: 16}.get(address_type)
        if skip is None:
            skip = _recv_exact(sock, 1)[0]
        _recv_exact(sock, skip + 2)  # the bound address and port, unused
        return sock
    except BaseException:
        sock.close()
        raise


def _socks5_address(proxy: ProxySpec, host: str, port: int) -> bytes:
    if proxy.scheme == "socks5h":
        name = host.encode("idna")
        return b"\x03" + bytes([len(name)]) + name
    family, _type, _proto, _name, address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    if family == socket.AF_INET6:
        return b"\x04" + socket.inet_pton(socket.AF_INET6, address[0])
    return b"\x01" + socket.inet_aton(address[0])


def _recv_exact(sock, count: int) -> bytes:
    data = b""
    while len(data) < count:
        piece = sock.recv(count - len(data))
        if not piece:
            raise OSError("the proxy closed the connection")
        data += piece
    return data


class _SocksConnection(_Connection):
    def __init__(self, host, port, connect_timeout_s, read_timeout_s, proxy):
        super().__init__(host, port, connect_timeout_s, read_timeout_s)
        self.proxy = proxy

    def connect(self):
        self.sock = socks5_connect(self.proxy, self.host, self.port, self.timeout)
        _tune_socket(self.sock, self.read_timeout_s)


class _SocksTLSConnection(_TLSConnection):
    def __init__(self, host, port, connect_timeout_s, read_timeout_s, context, proxy):
        super().__init__(host, port, connect_timeout_s, read_timeout_s, context)
        self.proxy = proxy

    def connect(self):
        sock = socks5_connect(self.proxy, self.host, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        _tune_socket(self.sock, self.read_timeout_s)

class UpstreamStreamError(http.client.HTTPException):
    """The upstream's stream ended badly: a framing problem (an oversized event), or
    we cut it (the server is stopping); the message is fit for the client."""


class UpstreamResponse:
    """An upstream HTTP response bound to its pooled connection.

    read_some() returns body bytes as they arrive (for streaming), with an
    optional timeout; read() everything. The body is decoded here rather than by
    http.client so that a timeout (a silent upstream) never loses framing state.
    close() hands a fully read connection back to the pool, or closes it;
    abort() may be called from another thread to stop a blocked read at once."""

    def __init__(self, pool, key, conn, sock, status: int, headers: Headers, framing, keep_alive: bool,
                 buffered: bytes):
        self._pool, self._key, self._conn, self._sock = pool, key, conn, sock
        self.status, self.headers = status, headers
        self._keep_alive = keep_alive
        self._closed = False
        self._lock = threading.Lock()  # abort() may race with close() from another thread
        self._chunked = ChunkedDecoder() if framing == "chunked" else None
        self._left = framing if isinstance(framing, int) else None  # None: until the connection closes
        self._complete = framing == 0
        self._timeout = conn.read_timeout_s
        self._buffered = [buffered] if buffered else []  # body bytes read with the head
        self._abort_reason = ""  # why abort() cut the stream, when it says

    @property
    def content_type(self) -> str:
        return (self.headers.get("content-type") or "").lower()

    def read(self) -> bytes:
        pieces = []
        while True:
            piece = self.read_some()
            if not piece:
                return b"".join(pieces)
            pieces.append(piece)

    def read_some(self, timeout_s: float = None):
        """Body bytes available now (b"" at the end); None when timeout_s passed silently."""
        while not self._complete:
            if self._buffered:
                raw = self._buffered.pop(0)
            else:
                try:
                    raw = self._recv(timeout_s)
                except OSError:
                    if self._abort_reason:
                        raise UpstreamStreamError(self._abort_reason) from None
                    raise
                if raw is None:
                    return None
            if not raw:
                if self._abort_reason:
                    raise UpstreamStreamError(self._abort_reason)
                if self._chunked is not None or self._left:
                    raise http.client.IncompleteRead(b"")
                self._complete = True
                return b""
            if self._chunked is not None:
                data = self._chunked.feed(raw)
                self._complete = self._chunked.done
            else:
                data = raw if self._left is None else raw[:self._left]
                if self._left is not None:
                    self._left -= len(data)
                    self._complete = self._left == 0
            if data:
                return data
        return b""

    def _recv(self, timeout_s):
        sock = self._sock
        wanted = self._conn.read_timeout_s if timeout_s is None else timeout_s
        if wanted != self._timeout:
            set_timeout(sock, wanted)
            self._timeout = wanted
        try:
            return recv_timed(sock)
        except socket.timeout:
            if timeout_s is None:
                raise
            return None

    def abort(self, reason: str = "") -> None:
        """Cut the connection now (the client left; or the server stops, and reason
        becomes the stream's error). A no-op once closed: by then the connection
        may serve another request from the pool."""
        self._abort_reason = reason
        with self._lock:
            sock = None if self._closed else self._sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._complete and self._keep_alive:
            if self._timeout != self._conn.read_timeout_s:  # as _recv() found it
                set_timeout(self._sock, self._conn.read_timeout_s)
            self._pool.put(self._key, self._conn)
        else:
            self._conn.close()


def _host_header(key) -> str:
    """The Host header for (scheme, host, port): the port only when it is not the scheme's."""
    scheme, host, port = key
    host = "[%s]" % host if ":" in host else host
    return host if port == (443 if scheme == "https" else 80) else "%s:%d" % (host, port)


def _read_head(sock, data: bytes) -> tuple:
    """(an answer's head, the bytes after its blank line), reading sock as needed."""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[:end], data[end + 4:]
        if len(data) > MAX_HEAD_BYTES:
            raise UpstreamStreamError("the upstream's answer head is larger than %d KiB" % (MAX_HEAD_BYTES // 1024))
        more = recv_timed(sock)
        if not more:
            if data:
                raise UpstreamStreamError("the upstream closed the connection in the middle of its answer's head")
            raise http.client.RemoteDisconnected("the upstream closed the connection without answering")
        data += more


@functools.lru_cache(maxsize=256)
def _url_parts(url: str) -> tuple:
    """(urlsplit(url), its pool key (scheme, host, port) or None when url is no http(s) URL).
    Cached: a provider calls the same few URLs, and their split was 5 us of each request."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return parts, None
    return parts, (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


class ConnectionPool:
    """Keep-alive connections per (scheme, host, port), taken LIFO, optionally via a proxy."""

    def __init__(self, connect_timeout_s=10.0, read_timeout_s=600.0, max_idle_per_host=64, proxy=None):
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self.proxy = proxy
        self._idle = collections.defaultdict(list)
        self._lock = threading.Lock()
        self._generation = 0  # bumped by use_proxy(): older connections are not pooled again
        self._tls = None

    def _new(self, key):
        scheme, host, port = key
        timeouts = (self.connect_timeout_s, self.read_timeout_s)
        proxy = self.proxy
        if self._tls is None and (scheme == "https" or (proxy is not None and proxy.scheme == "https")):
            self._tls = make_tls_context()
        if proxy is None:
            if scheme == "https":
                return _TLSConnection(host, port, *timeouts, self._tls)
            return _Connection(host, port, *timeouts)
        if proxy.is_socks:
            if scheme == "https":
                return _SocksTLSConnection(host, port, *timeouts, self._tls, proxy)
            return _SocksConnection(host, port, *timeouts, proxy)
        if scheme == "https":
            if proxy.scheme == "https":
                raise UpstreamError(502, "api_error", "an https:// proxy cannot tunnel to https upstreams "
                                    "here; use an http:// or socks5:// proxy URL")
            conn = _TLSConnection(proxy.host, proxy.port, *timeouts, self._tls)
            auth = proxy.basic_auth()
            conn.set_tunnel(host, port, {"Proxy-Authorization": auth} if auth else None)
            return conn
        if proxy.scheme == "https":
            return _TLSConnection(proxy.host, proxy.port, *timeouts, self._tls)
        return _Connection(proxy.host, proxy.port, *timeouts)

    def _request_target(self, parts, key):
        """Path for the request line: absolute form when a plain http target goes via an HTTP proxy."""
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        if self.proxy is not None and not self.proxy.is_socks and key[0] == "http":
            return "http://%s:%d%s" % (key[1], key[2], path)
        return path

    def use_proxy(self, proxy) -> None:
        """Make new connections through proxy (None: directly) from now on: a config change
        applies without a restart. Idle connections made the old way are closed; busy ones
        finish their request and are then closed instead of pooled."""
        with self._lock:
            self.proxy = proxy
            self._generation += 1
            idle, self._idle = self._idle, collections.defaultdict(list)
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def put(self, key, conn) -> None:
        if getattr(conn, "pool_generation", self._generation) != self._generation:
            conn.close()
            return
        with self._lock:
            idle = self._idle[key]
            if len(idle) < self.max_idle_per_host:
                idle.append(conn)
                return
        conn.close()

    def _take(self, key):
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def request(self, method: str, url: str, headers: dict, body: bytes = None) -> UpstreamResponse:
        """Send a request; a reused connection the server closed meanwhile is retried once fresh."""
        parts, key = _url_parts(url)
        if key is None:
            raise UpstreamError(502, "api_error", "invalid upstream URL %r" % url)
        path = self._request_target(parts, key)
        if path.startswith("http://") and self.proxy.basic_auth():
            headers = dict(headers, **{"Proxy-Authorization": self.proxy.basic_auth()})
        try:
            head = encode_request_head(method, path, _host_header(key), headers, None if body is None else len(body))
        except ValueError as exc:
            raise UpstreamError(502, "api_error", "cannot call upstream %s: %s" % (parts.netloc, exc)) from None
        conn = self._take(key)
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._new(key)
                conn.pool_generation = self._generation
            try:
                if conn.sock is None:
                    conn.connect()  # http.client's: TCP, the proxy tunnel, TLS
                send_all(conn.sock, head + body if body else head)
                return self._answer(key, conn, method)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if not reused:
                    raise UpstreamError(502, "api_error", "upstream closed the connection: %s" % exc) from None
                reused, conn = False, None  # stale keep-alive connection: try once on a new one
            except (socket.timeout, BlockingIOError):  # BlockingIOError: the kernel's send timeout
                conn.close()
                raise UpstreamTimeoutError("upstream timed out (%s%s)" % (parts.hostname, self._via())) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise UpstreamError(502, "api_error", "cannot reach upstream %s%s: %s"
                                    % (parts.netloc, self._via(), exc)) from None

    def _answer(self, key, conn, method: str) -> UpstreamResponse:
        """The answer to the request just sent on conn, its head read and parsed here."""
        sock, buffered = conn.sock, b""
        while True:  # 1xx interim answers are skipped
            head, buffered = _read_head(sock, buffered)
            try:
                status, version, headers = parse_response_head(head)
                if not 100 <= status < 200:
                    framing, keep_alive = response_framing(method, status, version, headers)
                    return UpstreamResponse(self, key, conn, sock, status, headers, framing, keep_alive, buffered)
            except ValueError as exc:
                raise UpstreamStreamError("the upstream sent a malformed answer: %s" % exc) from None

    def _via(self) -> str:
        """" through the proxy http://host:port" when one is used: its failure is not the upstream's."""
        return " through the proxy %r" % self.proxy if self.proxy is not None else ""

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class IFlowProvider:
    """The iFlow API as the iFlow CLI calls it: signed headers, per-model tweaks.

    Stateless but for the session id: the account to use comes with each call."""

    name = "iflow"

    def __init__(self, session_id: str = None, clock=time.time):
        # One session id per process, as the CLI does; conversation ids per call.
        self.session_id = session_id or str(uuid.uuid4())
        self.clock = clock

    def headers(self, api_key: str, is_stream: bool) -> dict:
        timestamp_ms = int(self.clock() * 1000)
        headers = {
            "Content-Type": "application/json",
            "Authorization": "Bearer " + api_key,
            "User-Agent": IFLOW_USER_AGENT,
            "session-id": self.session_id,
            # as uuid4() gives, without its system call (os.urandom releases the GIL)
            "conversation-id": str(uuid.UUID(int=_IDS.getrandbits(128), version=4)),
            "x-iflow-timestamp": str(timestamp_ms),
            "x-iflow-signature": iflow_signature(api_key, self.session_id, timestamp_ms),
        }
        if not is_stream:
            # Streaming calls send no Accept: with one the upstream may answer JSON, not SSE.
            headers["Accept"] = "application/json"
        return headers

    def prepare(self, body: dict, account):
        """(url, headers, body bytes) for a chat completion call with the account's key."""
        body = iflow_model_tweaks(body)
        data = compact_json(body).encode("utf-8")
        return (account.base_url + "/chat/completions",
                self.headers(account.api_key, bool(body.get("stream"))), data)

    def models_request(self, account):
        headers = self.headers(account.api_key, False)
        headers.pop("Content-Type", None)
        return account.base_url + "/models", headers

class Account:
    """One set of iFlow credentials in the pool, with its state and counters.

    Account "iflow-cli" is the iFlow CLI's settings.json (shared with the CLI and
    re-read when it changes); the others are entries of config `accounts`."""

    PRIMARY = "iflow-cli"

    def __init__(self, account_id: str):
        self.id = account_id
        self.label = account_id
        self.auth_type = ""
        self.api_key = ""
        self.base_url = IFLOW_BASE_URL
        self.access_token = ""
        self.refresh_token = ""
        self.expires_at = None  # seconds since the epoch, OAuth accounts only
        self.status = "ok"  # ok | auth_failed | refresh_failed
        self.message = ""
        self.cooldown_until = 0.0
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.refresh_failures = 0
        self.next_refresh_at = 0.0
        self.keyless = False  # local servers (Ollama, vLLM...) that need no key
        self.lock = threading.Lock()  # one refresh at a time

    @property
    def has_key(self) -> bool:
        return bool(self.api_key) or self.keyless

    @property
    def is_oauth(self) -> bool:
        return self.auth_type == "oauth-iflow" and bool(self.refresh_token)

    def usable(self, now: float) -> bool:
        return self.has_key and self.status != "auth_failed" and self.cooldown_until <= now

    def snapshot(self, now: float) -> dict:
        """What UIs may show: the key masked, never the tokens."""
        cooling = max(0.0, self.cooldown_until - now)
        return {"id": self.id, "label": self.label, "auth_type": self.auth_type or "api-key",
                "api_key": mask_secret(self.api_key), "base_url": self.base_url,
                "expires_at": format_expiry(self.expires_at) if self.expires_at else None,
                "status": "cooling_down" if cooling and self.status == "ok" else self.status,
                "message": self.message, "cooldown_s": round(cooling, 1), "in_flight": self.in_flight,
                "requests": self.requests, "errors": self.errors}


def _same_objects(a, b) -> bool:
    """Whether two tuples hold the very same objects (cheaper than comparing their contents)."""
    return a is not None and b is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b))


class AccountSet:
    """The accounts (keys) of one provider; picks the least busy usable one.

    Subclasses say what the list is made of (_sources()) and rebuild it from that
    (_rebuild()); each Account object lives on (by id) so counters and cool-downs survive
    reloads.

    Every request reads the list, so reading takes no lock: a rebuild makes a new dict and
    swaps it in. A lock that every request took while calling functions made all the
    threads queue on it whenever the GIL changed hands inside (a lock convoy: 12% of the
    CPU of a non-streamed request at 32 clients)."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._accounts = collections.OrderedDict()
        self._lock = threading.Lock()  # for rebuilds and the counters
        self._built_from = None  # the _sources() the list was last built from

    def accounts(self) -> list:
        if not _same_objects(self._sources(), self._built_from):  # outside the lock: it may stat a file
            with self._lock:
                # read again: a thread that read an older file before may only now get here
                sources = self._sources()
                if sources != self._built_from:
                    try:
                        self._rebuild(sources)
                    finally:  # a list that cannot be built is kept, not retried on every call
                        self._built_from = sources  # after the swap: a reader that sees it sees the list
                else:
                    self._built_from = sources  # equal, but new objects: compared by identity from now on
        return list(self._accounts.values())

    def get(self, account_id: str):
        return next((a for a in self.accounts() if a.id == account_id), None)

    def _sources(self) -> tuple:
        raise NotImplementedError

    def _rebuild(self, sources: tuple) -> None:
        raise NotImplementedError

    @property
    def has_credentials(self) -> bool:
        return any(a.has_key for a in self.accounts())

    def pick(self, exclude=()):
        """The account to use next, or None when every account was tried.

        Healthy accounts first, the least busy of them; accounts cooling down or
        marked failed are only a last resort, so that one account with a passing
        upstream error never locks its user out."""
        now = self.clock()
        candidates = [a for a in self.accounts() if a.id not in exclude and a.has_key]
        if not candidates:
            return None
        return min(candidates, key=lambda a: (a.status != "ok", a.cooldown_until > now, a.in_flight))

    def begin(self, account: Account):
        """Count a request on the account; returns the function that ends it (once)."""
        with self._lock:
            account.in_flight += 1
            account.requests += 1
        ended = []

        def end(ok: bool = True):
            if not ended:
                ended.append(True)
                with self._lock:
                    account.in_flight -= 1
                    if not ok:
                        account.errors += 1
        return end

    def cool_down(self, account: Account, seconds: float, reason: str) -> None:
        account.cooldown_until = self.clock() + seconds
        log.warning("account %s cools down for %.0f s: %s", account.id, seconds, reason)

    def mark(self, account: Account, status: str, message: str) -> None:
        account.status, account.message = status, message
        if status != "ok":
            log.warning("account %s: %s", account.id, message)


class KeyPool(AccountSet):
    """The API keys of an OpenAI-compatible provider (config, else its key variable)."""

    def __init__(self, name: str, keys_fn, keyless: bool = False, base_url: str = "", clock=time.time):
        super().__init__(clock)
        self.name, self.keys_fn, self.keyless, self.base_url = name, keys_fn, keyless, base_url

    def _sources(self) -> tuple:
        return tuple(k for k in self.keys_fn() if k) or (("",) if self.keyless else ())

    def _rebuild(self, keys: tuple) -> None:
        fresh = collections.OrderedDict()
        for i, key in enumerate(keys):
            account_id = "%s#%d" % (self.name, i + 1)
            account = self._accounts.get(account_id) or Account(account_id)
            if account.api_key != key:
                account.status, account.message = "ok", ""
            account.api_key, account.keyless, account.base_url = key, not key, self.base_url
            account.label, account.auth_type = "%s key %d" % (self.name, i + 1), "api-key"
            register_secret(key)
            fresh[account_id] = account
        self._accounts = fresh


class AccountPool(AccountSet):
    """iFlow accounts: the iFlow CLI's settings.json first, then config `accounts`."""

    def __init__(self, config: Config, credentials: IFlowCredentials, clock=time.time):
        super().__init__(clock)
        self.config, self.credentials = config, credentials
    def _sources(self) -> tuple:
        # settings.json is re-read only when its stat changed; config values are new objects
        # after any change: an unchanged list costs one stat and four comparisons
        return (self.credentials.data(), self.config.get("accounts"), self.config.get("api_key"),
                self.config.get("base_url"))

    def _rebuild(self, sources: tuple) -> None:
        data, entries, api_key, base_url = sources
        fresh = collections.OrderedDict()
        login = self.credentials.login_from(data, api_key, base_url)
        if login["api_key"]:
            account = self._accounts.get(Account.PRIMARY) or Account(Account.PRIMARY)
            account.label = "iFlow CLI (%s)" % login["source"]
            _fill_account(account, login["api_key"], login["base_url"], login["auth_type"],
                          data.get("oauth_access_token"), data.get("oauth_refresh_token"),
                          data.get("oauth_expires_at"))
            fresh[account.id] = account
        for entry in entries or []:
            if not isinstance(entry, dict) or not entry.get("id"):
                continue
            if not isinstance(entry.get("base_url") or "", str):
                log.warning("config accounts: %s skipped: its base_url is not text", _shown(entry["id"]))
                continue
            account = self._accounts.get(entry["id"]) or Account(str(entry["id"]))
            account.label = entry.get("label") or account.id
            _fill_account(account, usable_secret(entry.get("api_key")),
                          (entry.get("base_url") or IFLOW_BASE_URL).rstrip("/"),
                          entry.get("auth_type") or "api-key", usable_secret(entry.get("oauth_access_token")),
                          usable_secret(entry.get("oauth_refresh_token")), entry.get("oauth_expires_at"))
            fresh[account.id] = account
        self._accounts = fresh

    def store_tokens(self, account: Account, api_key: str, access_token: str, refresh_token: str,
                     expires_at) -> None:
        """Save new credentials where the account lives (settings.json or config)."""
        fields = {"apiKey": api_key, "oauth_access_token": access_token,
                  "oauth_refresh_token": refresh_token}
        if expires_at:
            fields["oauth_expires_at"] = fields["api_key_expires_at"] = format_expiry(expires_at)
        if account.id == Account.PRIMARY:
            update_iflow_settings(self.credentials.path, fields)
        else:
            self.update_entry(account.id, {"api_key": api_key, "oauth_access_token": access_token,
                                           "oauth_refresh_token": refresh_token,
                                           "oauth_expires_at": fields.get("oauth_expires_at")})
        account.api_key, account.access_token, account.refresh_token = api_key, access_token, refresh_token
        account.expires_at = expires_at
        for secret in (api_key, access_token, refresh_token):
            register_secret(secret)

    def add_entry(self, entry: dict) -> str:
        """Add an account to config (secrets sealed on save); returns its id."""
        entries = [e for e in self.config.get("accounts") or [] if isinstance(e, dict)]
        entry = dict(entry)
        entry.setdefault("id", "acct-" + uuid.uuid4().hex[:8])
        self.config.update({"accounts": entries + [entry]})
        return entry["id"]

    def update_entry(self, account_id: str, changes: dict) -> None:
        entries = [dict(e, **changes) if isinstance(e, dict) and e.get("id") == account_id else e
                   for e in self.config.get("accounts") or []]
        self.config.update({"accounts": entries})

    def remove(self, account_id: str) -> bool:
        """Forget an account: its credentials leave settings.json or config."""
        if account_id == Account.PRIMARY:
            if not self.credentials.api_key:
                return False
            if os.path.exists(self.credentials.path):
                update_iflow_settings(self.credentials.path, {}, remove=IFLOW_CREDENTIAL_KEYS)
            if self.config.file_data.get("api_key"):
                self.config.update({"api_key": ""})
            return True
        entries = self.config.get("accounts") or []
        kept = [e for e in entries if not (isinstance(e, dict) and e.get("id") == account_id)]
        if len(kept) == len(entries):
            return False
        self.config.update({"accounts": kept})
        return True


# Keys of settings.json that hold the login (the rest belongs to the iFlow CLI).
IFLOW_CREDENTIAL_KEYS = ("selectedAuthType", "apiKey", "searchApiKey", "oauth_access_token",
                         "oauth_refresh_token", "oauth_expires_at", "api_key_expires_at")


def _fill_account(account, api_key, base_url, auth_type, access_token, refresh_token, expires_at):
    if api_key != account.api_key or (refresh_token or "") != account.refresh_token:
        # A new login (ours or the iFlow CLI's): forget earlier failures and backoff.
        account.status, account.message = "ok", ""
        account.refresh_failures, account.next_refresh_at = 0, 0.0
    account.api_key, account.base_url, account.auth_type = api_key, base_url, auth_type
    account.access_token, account.refresh_token = access_token or "", refresh_token or ""
    account.expires_at = parse_expiry(expires_at)
    for secret in (api_key, access_token, refresh_token):
        register_secret(secret)

IFLOW_CATALOGUE = ([(m, d, "text") for m, d in IFLOW_TEXT_MODELS]
                   + [(m, d, "vision") for m, d in IFLOW_VISION_MODELS])


class ModelCatalogue:
    """A provider's known models merged with its /models answer (cached; discovery optional)."""

    def __init__(self, provider, accounts, pool: ConnectionPool, ttl_s: float = 600.0, clock=time.monotonic,
                 static=IFLOW_CATALOGUE, discover: bool = True):
        self.provider, self.accounts, self.pool, self.ttl_s, self.clock = provider, accounts, pool, ttl_s, clock
        self.static, self.discover = list(static), discover
        self._fetched_at = None
        self._upstream_ids = []
        self._known = (None, frozenset())  # (the _upstream_ids it was made from, the ids)
        self._lock = threading.Lock()

    def models(self) -> list:
        """[(id, display name, kind)] with kind "text" or "vision", known ones first."""
        known = {m for m, _d, _k in self.static}
        upstream = self._upstream() if self.discover else []
        return self.static + [(m, m, "text") for m in upstream if m not in known]

    def known_ids(self) -> frozenset:
        """Known model ids without asking the upstream (its list counts once fetched).
        Made again only when that list changes: routing asks on every request, and
        building the list each time was 6% of a non-streamed request's bytecode."""
        made_from, ids = self._known
        upstream = self._upstream_ids  # replaced whole by a fetch, never changed in place
        if made_from is not upstream:
            ids = frozenset(m for m, _d, _k in self.static).union(upstream)
            self._known = (upstream, ids)  # one assignment: a racing reader sees old or new
        return ids

    def _upstream(self) -> list:
        with self._lock:
            now = self.clock()
            if self._fetched_at is not None and now - self._fetched_at < self.ttl_s:
                return self._upstream_ids
            self._fetched_at = now
            account = self.accounts.pick()
            if account is not None:
                self._upstream_ids = self._fetch(account) or self._upstream_ids
            return self._upstream_ids

    def _fetch(self, account) -> list:
        url, headers = self.provider.models_request(account)
        try:
            resp = self.pool.request("GET", url, headers)
            try:
                body = resp.read()
            finally:
                resp.close()
            if resp.status != 200:
                log.info("upstream /models answered %d; using the built-in list", resp.status)
                return []
            data = json.loads(body).get("data") or []
            return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]
        except (Iflow2apiError, ValueError, AttributeError, OSError, http.client.HTTPException) as exc:
            log.info("upstream /models unavailable (%s); using the built-in list", exc)
            return []


def check_api_key(provider, account, pool: ConnectionPool) -> str:
    """What the provider says of account's key when asked for its /models: "ok", "refused"
    (401 or 403), or "unreachable" (no answer, or an answer that says nothing about the
    key: 404, 429, 5xx). Only a refusal means the key is bad."""
    url, headers = provider.models_request(account)
    try:
        resp = pool.request("GET", url, headers)
        try:
            resp.read()
        finally:
            resp.close()
    except (Iflow2apiError, OSError, http.client.HTTPException) as exc:
        log.info("key check: %s unreachable (%s)", url, exc)
        return "unreachable"
    if resp.status in (401, 403):
        return "refused"
    return "ok" if resp.status < 300 else "unreachable"


# -- Providers: iFlow and any OpenAI-compatible API -----------------------------------------------
# A provider profile in config `providers` ({name: {...}}) gives type "openai" (or
# "iflow"), base_url, api_keys, headers, models or discovery, aliases and quirks.
# Presets fill base URL, key variable and quirks for well-known providers. Quirks
# live here, in one place: request fields (apply_request_quirks) and the
# translation flags handed to section 3 (profile).

PROVIDER_PRESETS = {
    "deepseek": {"base_url": "https://api.deepseek.com/v1", "key_env": "DEEPSEEK_API_KEY",
                 "notes": "deepseek-chat, deepseek-reasoner; reasoning in reasoning_content",
                 "quirks": {"replay_reasoning_models": ["deepseek-reasoner"]}},
    "zhipu": {"base_url": "https://open.bigmodel.cn/api/paas/v4", "key_env": "ZHIPUAI_API_KEY",
              "notes": "GLM models (glm-4.6, glm-4.5-air...); thinking via thinking.type",
              "quirks": {"thinking_style": "thinking_type"}},
    "moonshot": {"base_url": "https://api.moonshot.cn/v1", "key_env": "MOONSHOT_API_KEY",
                 "notes": "Kimi models; thinking models need reasoning_content in history",
                 "quirks": {"replay_reasoning_models": ["kimi-k2-thinking", "kimi-k2.5"]}},
    "qwen": {"base_url": "https://dashscope.aliyuncs.com/compatible-mode/v1", "key_env": "DASHSCOPE_API_KEY",
             "notes": "Alibaba DashScope (Qwen); thinking via enable_thinking",
             "quirks": {"thinking_style": "enable_thinking"}},
    "openrouter": {"base_url": "https://openrouter.ai/api/v1", "key_env": "OPENROUTER_API_KEY",
                   "notes": "many vendors; model ids contain a slash (anthropic/claude-...)",
                   "quirks": {}},
    "ollama": {"base_url": "http://127.0.0.1:11434/v1", "key_env": "", "keyless": True,
               "notes": "local models, no key; reasoning in `reasoning`",
               "quirks": {"accepts_top_k": True}},
    "vllm": {"base_url": "http://127.0.0.1:8000/v1", "key_env": "VLLM_API_KEY", "keyless": True,
             "notes": "self-hosted; thinking via chat_template_kwargs",
             "quirks": {"thinking_style": "chat_template_kwargs", "accepts_top_k": True}},
    "lmstudio": {"base_url": "http://127.0.0.1:1234/v1", "key_env": "", "keyless": True,
                 "notes": "local models, no key", "quirks": {}},
}

# Request fields of the OpenAI chat API; `strict_fields` providers get nothing else.
OPENAI_CHAT_FIELDS = frozenset([
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "user", "tools", "tool_choice", "parallel_tool_calls", "response_format", "seed",
    "reasoning_effort", "modalities", "audio", "prediction", "store", "metadata", "service_tier"])
_SAFE_TOOL_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def apply_request_quirks(body: dict, quirks: dict) -> dict:
    """A copy of an OpenAI request body shaped for a provider's quirks (pure)."""
    body = dict(body)
    field = quirks.get("max_tokens_field")
    if field == "max_completion_tokens" and "max_tokens" in body:
        body.setdefault("max_completion_tokens", body.pop("max_tokens"))
    elif field == "max_tokens" and "max_completion_tokens" in body:
        body.setdefault("max_tokens", body.pop("max_completion_tokens"))
    if quirks.get("strict_fields"):
        body = {k: v for k, v in body.items() if k in OPENAI_CHAT_FIELDS}
    if quirks.get("no_stream_options"):
        body.pop("stream_options", None)
    if quirks.get("safe_tool_ids") and isinstance(body.get("messages"), list):
        body["messages"] = [_safe_tool_ids(m) for m in body["messages"]]
    return body


def _safe_tool_ids(message):
    """Tool call ids in [A-Za-z0-9_-], at most 40 chars (the OpenAI limit), mapped
    deterministically so a call and its result still match."""
    if not isinstance(message, dict):
        return message
    message = dict(message)
    if isinstance(message.get("tool_calls"), list):
        message["tool_calls"] = [dict(c, id=safe_tool_id(c.get("id"))) if isinstance(c, dict) else c
                                 for c in message["tool_calls"]]
    if "tool_call_id" in message:
        message["tool_call_id"] = safe_tool_id(message["tool_call_id"])
    return message


def safe_tool_id(value) -> str:
    value = str(value or "")
    if _SAFE_TOOL_ID_RE.match(value):
        return value
    return "call_" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:24]


class OpenAICompatibleProvider:
    """Any OpenAI-compatible chat API: Bearer key, extra headers, quirks."""

    def __init__(self, name: str, base_url: str, headers: dict = None, quirks: dict = None):
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.extra_headers = dict(headers or {})
        self.quirks = dict(quirks or {})

    def headers(self, api_key: str, is_stream: bool) -> dict:
        headers = {"Content-Type": "application/json", "User-Agent": "iflow2api/" + __version__}
        if api_key:
            headers["Authorization"] = "Bearer " + api_key
        if not is_stream:
            headers["Accept"] = "application/json"
        headers.update(self.extra_headers)
        return headers

    def prepare(self, body: dict, account):
        body = apply_request_quirks(body, self.quirks)
        data = compact_json(body).encode("utf-8")
        return self.base_url + "/chat/completions", self.headers(account.api_key, bool(body.get("stream"))), data

    def models_request(self, account):
        headers = self.headers(account.api_key, False)
        headers.pop("Content-Type", None)
        return self.base_url + "/models", headers


class ProviderRoute:
    """One enabled provider as requests see it: how to call it, its keys, its models."""

    def __init__(self, name, kind, provider, accounts, catalogue, aliases=None, quirks=None,
                 text_only=(), vision_models=()):
        self.name, self.kind, self.provider = name, kind, provider
        self.accounts, self.catalogue = accounts, catalogue
        self.aliases = dict(aliases or {})
        self.quirks = dict(quirks or {})
        self.text_only, self.vision_models = set(text_only), set(vision_models)

    def profile(self, model: str) -> dict:
        """Translation flags (translation.md section 7) for one of this provider's models."""
        if self.kind == "iflow":
            return iflow_profile(model)
        profile = {k: v for k, v in self.quirks.items() if k in _TRANSLATION_FLAGS}
        if model in self.quirks.get("replay_reasoning_models", ()):
            profile["replay_reasoning"] = True
        return profile

    def model_info(self, model: str) -> dict:
        if self.kind == "iflow":
            return iflow_model_info(model)
        vision = model in self.vision_models or (model not in self.text_only
                                                 and not self.quirks.get("text_only_default"))
        return {"vision": vision, "context_window": self.quirks.get("context_window"),
                "max_output_tokens": self.quirks.get("max_output_tokens")}


# Every translation flag may be set in a provider's quirks (one list: the documented defaults).
_TRANSLATION_FLAGS = tuple(_PROFILE_DEFAULTS)


def provider_settings(name: str, entry: dict) -> dict:
    """A provider's settings: its preset (by `preset` or by name) overlaid with config."""
    preset = PROVIDER_PRESETS.get(entry.get("preset") or name, {})
    merged = {"type": "openai", "base_url": preset.get("base_url", ""), "key_env": preset.get("key_env", ""),
              # a server of your own (no preset) may need no key: send none rather than refuse
              "keyless": preset.get("keyless", not preset), "quirks": dict(preset.get("quirks", {})),
              "headers": {}, "models": [], "discover_models": True, "aliases": {}, "enabled": True,
              "api_keys": [], "text_only_models": [], "vision_models": []}
    for key, value in entry.items():
        if key == "api_key" or (key in merged and type(value) is not type(merged[key])):
            continue  # a hand-edited value of the wrong type keeps the preset's value
        if key == "quirks":
            merged["quirks"].update(value)
        else:
            merged[key] = value
    if isinstance(entry.get("api_key"), str) and entry["api_key"]:  # the single-key form
        merged["api_keys"] = [entry["api_key"]] + [k for k in merged["api_keys"] or [] if k != entry["api_key"]]
    return merged


def split_provider(model: str, route_names) -> tuple:
    """("provider", "model") for "provider/model" when provider is configured, else (None, model).

    Only a configured name counts as a prefix, so OpenRouter ids such as
    "anthropic/claude-sonnet-4" still reach the default provider whole."""
    prefix, sep, rest = model.partition("/")
    if sep and prefix in route_names and rest:
        return prefix, rest
    return None, model

# -- Update notice -------------------------------------------------------------------------

UPDATE_CHECK_EVERY_S = 86400.0


def parse_version(text) -> tuple:
    """A comparable version: "v1.10.2" > "1.9" ; a pre-release ("1.2.0rc1", "1.2.0-beta")
    sorts before its release. () when text has no version in it."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)(.*)$", str(text or ""))
    if not match:
        return ()
    numbers = [int(n) for n in match.group(1).split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()  # 1.2.0 == 1.2
    is_release = 0 if match.group(2).strip(" -.+") else 1
    return (tuple(numbers), is_release)


def latest_version_in(data) -> str:
    """The version a releases document names: GitHub (tag_name) or PyPI (info.version)."""
    if isinstance(data, dict):
        if isinstance(data.get("tag_name"), str):
            return data["tag_name"].lstrip("v")
        info = data.get("info")
        if isinstance(info, dict) and isinstance(info.get("version"), str):
            return info["version"]
    return ""


class UpdateChecker:
    """Tells (never downloads, never installs) when a newer release exists.

    At most once a day (the time of the last check is kept in update-check.json beside the
    config), only when check_update_on_startup is on, never in tests or CI (the CI,
    PYTEST_CURRENT_TEST or IFLOW2API_NO_UPDATE_CHECK variables); skip_version silences one
    version. A failure is one debug line."""

    def __init__(self, config, pool, clock=time.time):
        self.config, self.pool, self.clock = config, pool, clock
        self.path = os.path.join(os.path.dirname(os.path.abspath(config.path)), "update-check.json")
        self.latest = ""

    def enabled(self) -> bool:
        env = self.config.env
        if any(env.get(name) for name in ("CI", "PYTEST_CURRENT_TEST", "IFLOW2API_NO_UPDATE_CHECK")):
            return False
        return bool(self.config["check_update_on_startup"] and self.config["update_check_url"])

    def check(self) -> None:
        """Ask the releases URL when the last check is a day old (run it off the main thread)."""
        if not self.enabled():
            return
        state, _problem = read_json_file(self.path)
        if self.clock() - float(state.get("checked_at") or 0) < UPDATE_CHECK_EVERY_S:
            self.latest = str(state.get("latest") or "")
        else:
            self.latest = self._ask() or str(state.get("latest") or "")
            try:
                write_json_atomic(self.path, {"checked_at": self.clock(), "latest": self.latest})
            except OSError as exc:
                log.debug("update check: cannot write %s: %s", self.path, exc)
        notice = self.notice()
        if notice:
            log.info("iflow2api %s is available (this is %s): %s", notice["latest"], __version__, notice["url"])

    def notice(self):
        """{"latest", "current", "url"} when a newer release than this one exists, else None."""
        if not self.latest or not self.enabled():
            return None
        if parse_version(self.latest) <= parse_version(__version__):
            return None
        if self.config.get("skip_version") and parse_version(self.config["skip_version"]) == parse_version(self.latest):
            return None
        return {"latest": self.latest, "current": __version__, "url": self._release_page()}

    def _ask(self) -> str:
        try:
            resp = self.pool.request("GET", self.config["update_check_url"],
                                     {"User-Agent": "iflow2api/" + __version__, "Accept": "application/json"})
            try:
                raw = resp.read()
            finally:
                resp.close()
            if resp.status != 200:
                raise ValueError("HTTP %d" % resp.status)
            return latest_version_in(json.loads(raw))
        except (OSError, ValueError, Iflow2apiError, http.client.HTTPException) as exc:
            log.debug("update check failed: %s", exc)
            return ""

    def _release_page(self) -> str:
        url = self.config["update_check_url"]
        match = re.match(r"https://api\.github\.com/repos/([^/]+/[^/]+)/releases", url)
        if match:
            return "https://github.com/%s/releases/latest" % match.group(1)
        match = re.match(r"https://pypi\.org/pypi/([^/]+)/json", url)
        return "https://pypi.org/project/%s/" % match.group(1) if match else url


# -- Remote images for providers that need them inline --------------------------------------------

class ImageFetcher:
    """Fetches the remote images of one request (`inline_image_urls` quirk).

    The URL comes from a client, so this is an SSRF surface (issue 10): the host is
    resolved first and every address must be public (no loopback, private,
    link-local, multicast, reserved or unspecified ones) unless the provider allows
    local images; the connection goes to the address that was checked (no second
    lookup a rebinding DNS could answer differently). Size, count, time and
    redirects are capped, and every failure has the same text, so error messages
    cannot be used to scan ports."""

    MAX_BYTES = 10 * MIB
    MAX_IMAGES = 8
    MAX_REDIRECTS = 3
    TIMEOUT_S = 15.0

    def __init__(self, allow_local: bool = False, resolver=None, tls_context=None, address_allowed=None):
        self.address_allowed = address_allowed or (lambda address: allow_local or is_public_address(address))
        self.resolver = resolver or socket.getaddrinfo
        self._tls_context = tls_context
        self.fetched_count = 0

    def fetch(self, url: str):
        """(content type, bytes) of the image at url; InvalidRequestError otherwise."""
        self.fetched_count += 1
        if self.fetched_count > self.MAX_IMAGES:
            raise InvalidRequestError("too many remote images in one request (at most %d); send them "
                                      "as data: URLs" % self.MAX_IMAGES)
        deadline = time.monotonic() + self.TIMEOUT_S
        for _hop in range(self.MAX_REDIRECTS + 1):
            status, headers, data = self._get(url, deadline)
            if status in (301, 302, 303, 307, 308) and headers.get("location"):
                url = urllib.parse.urljoin(url, headers.get("location"))
                continue
            content_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
            if status != 200 or not content_type.startswith("image/"):
                break
            return content_type, data
        raise self._failed(url)

    def _get(self, url: str, deadline: float):
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise self._failed(url) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self._failed(url)
        address = self._checked_address(parts.hostname, port, url)
        conn_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = conn_class(parts.hostname, port, address, max(0.1, deadline - time.monotonic()),
                          self._tls_context)
        try:
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            conn.request("GET", target, headers={"User-Agent": "iflow2api/" + __version__, "Accept": "image/*"})
            resp = conn.getresponse()
            data = _read_capped(resp, self.MAX_BYTES, deadline)
            if data is None:
                raise InvalidRequestError("the image at %s is larger than %d MiB" % (url[:200], self.MAX_BYTES // MIB))
            return resp.status, resp.headers, data
        except (OSError, http.client.HTTPException):
            raise self._failed(url) from None
        finally:
            conn.close()

    def _checked_address(self, host: str, port: int, url: str) -> str:
        try:
            infos = self.resolver(host, port, 0, socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise self._failed(url) from None
        addresses = [info[4][0] for info in infos]
        if not addresses:
            raise self._failed(url)
        if not all(self.address_allowed(a) for a in addresses):
            raise InvalidRequestError("image URL %s is not allowed: it points to a local or private address"
                                      % url[:200])
        return addresses[0]

    @staticmethod
    def _failed(url: str) -> InvalidRequestError:
        return InvalidRequestError("could not fetch the image %s (not reachable, or not an image)" % url[:200])


def is_public_address(address: str) -> bool:
    """Whether an IP address is a public unicast one (what a client may make us fetch)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    return not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                or ip.is_unspecified or ip.is_reserved) and ip.is_global


def _read_capped(resp, max_bytes: int, deadline: float):
    """The body, or None when it is larger than max_bytes (read no further)."""
    parts, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise socket.timeout("image download too slow")
        piece = resp.read(65536)
        if not piece:
            return b"".join(parts)
        total += len(piece)
        if total > max_bytes:
            return None
        parts.append(piece)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address checked beforehand (the Host header keeps the name)."""

    def __init__(self, host, port, address, timeout_s, _tls_context=None):
        super().__init__(host, port, timeout=timeout_s)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, address, timeout_s, tls_context=None):
        super().__init__(host, port, timeout=timeout_s, context=tls_context or make_tls_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


# == 6. Auth: client keys, OAuth login and refresh, admin sign-in, the Backend ====================
# Which keys a client must present (Bearer or x-api-key; required on remote
# binds), the iFlow OAuth login (browser and headless), saving logins like the
# iFlow CLI, and background token refresh. Tests: tests/integration/test_auth.py.

def client_key_of(headers) -> str:
    """The key a client sent: x-api-key first, then Authorization: Bearer."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return ""


# -- Client API keys for remote binds -------------------------------------------------------------

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
_LOOPBACK_CLIENTS = ("127.0.0.1", "::1", "::ffff:127.0.0.1")  # source addresses of this machine


def needs_client_key(config: Config, host: str) -> bool:
    """Binding anything but the default loopback addresses exposes the API: keys are
    required there unless the user opted out (allow_remote_without_key)."""
    return host not in LOOPBACK_HOSTS and not config["allow_remote_without_key"]


class ClientKeys:
    """Which clients may use one server: the client keys (`api_keys` list plus the
    original's `custom_api_key`, re-read when the config changes) and, on loopback
    binds without keys, which Host names (DNS rebinding, issue 10).

    Keys are required when the bind needs them or any key is configured, never
    depending on how many are usable: revoking the last key on a network bind or
    losing secret.key (sealed keys unreadable) locks the API, it does not open it."""

    def __init__(self, config: Config, bind_host: str = None):
        self.config = config
        self.bind_host = bind_host or config["host"]
        self._seen = None
        self._digests = set()

    def _current(self) -> set:
        keys = tuple(usable_secret(k) for k in self.config.get("api_keys") or [] if isinstance(k, str))
        keys += (usable_secret(self.config.get("custom_api_key")),)
        if keys != self._seen:
            for key in keys:
                register_secret(key)
            self._digests = {hashlib.sha256(k.encode("utf-8")).digest() for k in keys if k}
            self._seen = keys
        return self._digests

    def _configured(self) -> bool:
        entries = [k for k in self.config.get("api_keys") or [] if isinstance(k, str) and k]
        return bool(entries or self.config.get("custom_api_key"))

    @property
    def required(self) -> bool:
        return needs_client_key(self.config, self.bind_host) or self._configured()

    @property
    def has_usable_key(self) -> bool:
        return bool(self._current())

    def check(self, headers):
        """The id of the request's client key (client_key_id), None when keys are not
        required; AuthenticationError when they are and the request carries no valid one."""
        if not self.required:
            return None
        digests = self._current()
        key = client_key_of(headers)
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        if not key or not any(hmac.compare_digest(digest, d) for d in digests):
            raise AuthenticationError("invalid or missing API key: send the key in an Authorization "
                                      "header (Bearer) or an x-api-key header")
        return client_key_id(key)

    def host_allowed(self, host_header: str) -> bool:
        """Whether a request naming this Host may be served. Without client keys on a
        loopback bind, only loopback names (and allowed_hosts): a web page whose name
        resolves to 127.0.0.1 (DNS rebinding) must not reach the API."""
        if self.bind_host not in LOOPBACK_HOSTS or self.required:
            return True
        name = host_name_of(host_header)
        return (name in ("localhost", "127.0.0.1", "::1") or name.endswith(".localhost")
                or name in [h.lower() for h in self.config.get("allowed_hosts") or [] if isinstance(h, str)])


def client_key_id(key: str) -> str:
    """A client key's id: shown in listings and the usage history instead of the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]


class DailyQuota:
    """Tokens (input + output) per client key per local day, against config daily_token_quota
    ({key id or "*": tokens}). Counted as answers end; at the first look of a day a key's
    count starts from the usage history, so a restart does not reset it."""

    def __init__(self, config, usage=None, clock=time.time):
        self.config, self.usage, self.clock = config, usage, clock
        self._day, self._used = None, {}
        self._lock = threading.Lock()

    def _limit(self, key_id):
        quotas = self.config.get("daily_token_quota") or {}
        return quotas.get(key_id, quotas.get("*")) if key_id else None

    def _today(self):
        day = time.strftime("%Y-%m-%d", time.localtime(self.clock()))
        if day != self._day:
            self._day, self._used = day, {}
            if self.usage is not None:
                start = start_of_day(self.clock())
                try:
                    self._used = {row["key"]: row["input_tokens"] + row["output_tokens"]
                                  for row in self.usage.query(start, "key")}
                except Iflow2apiError as exc:
                    log.warning("daily quota: %s; counting from 0", exc)
        return self._used

    def check(self, key_id) -> None:
        """RateLimitError when the key used its tokens for today."""
        limit = self._limit(key_id)
        if limit is None:
            return
        with self._lock:
            used = self._today().get(key_id, 0)
        if used >= limit:
            raise RateLimitError("client key %s used its daily quota of %d tokens (%d used); it renews at "
                                 "midnight, local time of the server" % (key_id, limit, used),
                                 headers=[("retry-after", "%d" % self._seconds_to_midnight())])

    def add(self, key_id, tokens: int) -> None:
        if key_id and tokens and self._limit(key_id) is not None:
            with self._lock:
                used = self._today()
                used[key_id] = used.get(key_id, 0) + tokens

    def _seconds_to_midnight(self) -> int:
        now = time.localtime(self.clock())
        return max(1, 86400 - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec))


def host_name_of(host_header: str) -> str:
    """The lower-case name in a Host header, without port or IPv6 brackets."""
    host = (host_header or "").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

# -- iFlow OAuth ----------------------------------------------------------------------------------

class OAuthClient:
    """The iFlow OAuth endpoints (every URL from config, so tests point them at 127.0.0.1)."""

    def __init__(self, config: Config, pool: ConnectionPool):
        self.config, self.pool = config, pool

    def authorize_url(self, redirect_uri: str, state: str) -> str:
        query = urllib.parse.urlencode([("client_id", self.config["oauth_client_id"]),
                                        ("loginMethod", "phone"), ("type", "phone"),
                                        ("redirect", redirect_uri), ("state", state)])
        return self.config["oauth_authorize_url"] + "?" + query

    def exchange_code(self, code: str, redirect_uri: str, now: float) -> dict:
        """Tokens for an authorization code: access_token, refresh_token, expires_at."""
        return self._token_request({"grant_type": "authorization_code", "code": code,
                                    "redirect_uri": redirect_uri}, now)

    def refresh(self, refresh_token: str, now: float) -> dict:
        return self._token_request({"grant_type": "refresh_token", "refresh_token": refresh_token}, now)

    def user_info(self, access_token: str) -> dict:
        """The user's data; its `apiKey` is what chat calls use."""
        url = self.config["oauth_userinfo_url"] + "?" + urllib.parse.urlencode({"accessToken": access_token})
        data = self._json("GET", url, {"User-Agent": IFLOW_USER_AGENT, "Accept": "application/json"}, None)
        info = data.get("data") if isinstance(data.get("data"), dict) else data
        if data.get("success") is False or not info.get("apiKey"):
            raise AuthenticationError("iFlow did not return an API key for this login (%s)"
                                      % redact(str(data.get("message") or data.get("msg") or "no apiKey")))
        register_secret(info["apiKey"])
        return info

    def _token_request(self, fields: dict, now: float) -> dict:
        client_id, secret = self.config["oauth_client_id"], self.config["oauth_client_secret"]
        fields = dict(fields, client_id=client_id, client_secret=secret)
        basic = base64.b64encode(("%s:%s" % (client_id, secret)).encode("utf-8")).decode("ascii")
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json",
                   "Authorization": "Basic " + basic, "User-Agent": IFLOW_USER_AGENT}
        data = self._json("POST", self.config["oauth_token_url"], headers,
                          urllib.parse.urlencode(fields).encode("ascii"))
        if not data.get("access_token"):
            raise AuthenticationError("iFlow refused the token request: %s"
                                      % redact(str(data.get("error_description") or data.get("error")
                                                   or data.get("message") or "no access_token")))
        for key in ("access_token", "refresh_token"):
            register_secret(data.get(key))
        expires_in = data.get("expires_in")
        data["expires_at"] = now + float(expires_in) if isinstance(expires_in, (int, float)) else None
        return data

    def _json(self, method: str, url: str, headers: dict, body) -> dict:
        resp = self.pool.request(method, url, headers, body)
        try:
            raw = resp.read()
        finally:
            resp.close()
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if resp.status >= 400 or not isinstance(data, dict):
            if isinstance(data, dict):
                detail = data.get("error_description") or data.get("message") or data.get("error")
            else:
                detail = raw[:200].decode("utf-8", "replace")
            raise AuthenticationError("iFlow login endpoint answered %d: %s"
                                      % (resp.status, redact(str(detail or "unexpected answer"))))
        return data


class LoginSession:
    """One OAuth login, in the browser or headless.

    Browser: a callback server on 127.0.0.1 (the CLI's port 11451, else the next
    free one up to 11500, else any) receives the redirect; wait() returns the code.
    Headless: the user opens url() anywhere, then pastes the address the browser
    ended on (or just the code) into finish()."""

    def __init__(self, oauth: OAuthClient, headless: bool = False, port: int = 11451):
        self.oauth, self.headless = oauth, headless
        self.state = uuid.uuid4().hex
        self._codes = collections.deque()
        self._arrived = threading.Event()
        self._server = None
        if headless:
            self.redirect_uri = "http://localhost:%d/oauth2callback" % port
        else:
            self._server = self._start_callback_server(port)
            self.redirect_uri = "http://localhost:%d/oauth2callback" % self._server.server_address[1]

    @property
    def url(self) -> str:
        return self.oauth.authorize_url(self.redirect_uri, self.state)

    def wait(self, timeout_s: float) -> str:
        """The code from the browser's redirect; AuthenticationError on timeout or refusal."""
        try:
            if not self._arrived.wait(timeout_s):
                raise AuthenticationError("no login within %.0f s; start again" % timeout_s)
            return self._take()
        finally:
            self.close()

    def finish(self, pasted: str) -> str:
        """The code from a pasted redirect URL (state checked) or a bare code."""
        pasted = pasted.strip()
        if "?" in pasted or pasted.startswith("http"):
            params = urllib.parse.parse_qs(urllib.parse.urlsplit(pasted).query)
            self._accept(params.get("code", [""])[0], params.get("state", [None])[0],
                         params.get("error", [""])[0])
        else:
            self._accept(pasted, None, "")
        return self._take()

    def close(self) -> None:
        """Stop the callback server; a wait() still running ends as cancelled."""
        server, self._server = self._server, None  # close() may run in two threads at once
        if server is not None:
            server.shutdown()
            server.server_close()
        if not self._arrived.is_set():
            self._codes.append((False, "the login was cancelled"))
            self._arrived.set()

    def _take(self) -> str:
        if not self._codes:  # a browser redirect and a pasted answer raced: one of them won
            raise AuthenticationError("this login was already completed")
        ok, value = self._codes.popleft()
        if not ok:
            raise AuthenticationError(value)
        return value

    def _accept(self, code: str, state, error: str) -> bool:
        if error:
            self._codes.append((False, "iFlow refused the login: %s" % error))
        elif state is not None and not hmac.compare_digest(state, self.state):
            self._codes.append((False, "the login answer does not belong to this login (state mismatch)"))
        elif not code:
            self._codes.append((False, "the login answer has no code"))
        else:
            self._codes.append((True, code))
        self._arrived.set()
        return self._codes[-1][0]

    def _start_callback_server(self, port: int):
        session = self

        class Callback(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                parts = urllib.parse.urlsplit(self.path)
                if parts.path != "/oauth2callback":
                    self.send_error(404)
                    return
                params = urllib.parse.parse_qs(parts.query)
                ok = session._accept(params.get("code", [""])[0], params.get("state", [""])[0],
                                     params.get("error", [""])[0])
                page = ("<!doctype html><meta charset=utf-8><title>iflow2api</title><p>%s</p>"
                        % ("Login complete. You can close this tab." if ok else
                           "Login failed. Go back to iflow2api and try again.")).encode("utf-8")
                self.send_response(200 if ok else 400)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

        for candidate in list(range(port, port + 50)) + [0]:
            try:
                server = socketserver.TCPServer(("127.0.0.1", candidate), Callback)
                break
            except OSError:
                continue
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                         name="iflow2api-oauth-callback", daemon=True).start()
        return server


def complete_login(oauth: OAuthClient, code: str, redirect_uri: str, now: float) -> dict:
    """Exchange the code and fetch the API key: {api_key, access_token, refresh_token,
    expires_at, user}."""
    tokens = oauth.exchange_code(code, redirect_uri, now)
    info = oauth.user_info(tokens["access_token"])
    return {"api_key": info["apiKey"], "access_token": tokens["access_token"],
            "refresh_token": tokens.get("refresh_token") or "", "expires_at": tokens.get("expires_at"),
            "user": info.get("username") or info.get("nickname") or info.get("phone") or ""}


def save_login(accounts: AccountPool, result: dict, add: bool = False) -> str:
    """Store a login: in settings.json like the iFlow CLI (default), or as an extra
    account in config (add=True). Returns the account id."""
    oauth = bool(result.get("access_token"))
    if add:
        entry = {"label": result.get("user") or "", "auth_type": "oauth-iflow" if oauth else "api-key",
                 "api_key": result["api_key"], "base_url": result.get("base_url") or IFLOW_BASE_URL}
        if oauth:
            entry.update(oauth_access_token=result["access_token"], oauth_refresh_token=result["refresh_token"],
                         oauth_expires_at=format_expiry(result["expires_at"]) if result.get("expires_at") else None)
        return accounts.add_entry(entry)
    settings = accounts.credentials.data()
    fields = {"selectedAuthType": "oauth-iflow" if oauth else "api-key", "apiKey": result["api_key"],
              "baseUrl": result.get("base_url") or settings.get("baseUrl") or IFLOW_BASE_URL}
    remove = ()
    if oauth:
        fields.update(oauth_access_token=result["access_token"], oauth_refresh_token=result["refresh_token"])
        if result.get("expires_at"):
            fields["oauth_expires_at"] = fields["api_key_expires_at"] = format_expiry(result["expires_at"])
    else:
        remove = ("oauth_access_token", "oauth_refresh_token", "oauth_expires_at", "api_key_expires_at")
    update_iflow_settings(accounts.credentials.path, fields, remove)
    return Account.PRIMARY


class TokenRefresher:
    """Refreshes OAuth accounts before they expire, in a background thread.

    An account is refreshed when less than `oauth_refresh_before_s` is left; a
    failure is retried with backoff (1, 2, 4 ... minutes, at most 1 h); after 5
    failures, or once the token has expired, the account is marked and the user
    told to log in again. refresh_now() serves the one retry after an upstream 401."""

    MAX_FAILURES = 5

    def __init__(self, accounts: AccountPool, oauth: OAuthClient, config: Config, clock=time.time):
        self.accounts, self.oauth, self.config, self.clock = accounts, oauth, config, clock
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="iflow2api-token-refresh", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # a broken account entry must not end refreshing for the others
                log.exception("token refresh check failed")
            if self._stop.wait(self.config["oauth_refresh_check_s"]):
                return

    def check(self) -> None:
        """Refresh every account that is due."""
        now = self.clock()
        for account in self.accounts.accounts():
            if (account.is_oauth and account.expires_at is not None and now >= account.next_refresh_at
                    and account.expires_at - now < self.config["oauth_refresh_before_s"]):
                self.refresh_now(account)

    def refresh_now(self, account: Account, refused_key: str = None) -> bool:
        """Refresh one account now; True when it has a new key.

        refused_key: the key an upstream just refused. When several requests hit
        the same 401 at once, the first refreshes; the others find the key already
        replaced and just use the new one (a second refresh could void the first)."""
        if not account.is_oauth:
            return False
        with account.lock:
            if refused_key is not None and account.api_key != refused_key:
                return True
            now = self.clock()
            try:
                tokens = self.oauth.refresh(account.refresh_token, now)
                info = self.oauth.user_info(tokens["access_token"])
                self.accounts.store_tokens(account, info["apiKey"], tokens["access_token"],
                                           tokens.get("refresh_token") or account.refresh_token,
                                           tokens.get("expires_at"))
            except (Iflow2apiError, OSError, ValueError, KeyError) as exc:
                account.refresh_failures += 1
                backoff = min(3600.0, 60.0 * 2 ** (account.refresh_failures - 1))
                account.next_refresh_at = now + backoff
                expired = account.expires_at is not None and account.expires_at <= now
                if account.refresh_failures >= self.MAX_FAILURES or expired:
                    self.accounts.mark(account, "refresh_failed",
                                       "token refresh failed (%s): run `iflow2api login` to log in again"
                                       % exc)
                else:
                    log.warning("account %s: token refresh failed (%s); retrying in %.0f s",
                                account.id, exc, backoff)
                return False
            account.refresh_failures, account.next_refresh_at = 0, 0.0
            self.accounts.mark(account, "ok", "")
            log.info("account %s: token refreshed", account.id)
            return True


def ensure_client_key(config: Config, host: str) -> str:
    """Generate and save a client key for a remote bind that has none; the new key or ""."""
    if not needs_client_key(config, host) or ClientKeys(config, host).has_usable_key:
        return ""
    key = new_client_key()
    config.update({"api_keys": list(config.get("api_keys") or []) + [key]})
    return key


def new_client_key() -> str:
    return "sk-i2a-" + base64.urlsafe_b64encode(os.urandom(24)).decode("ascii").rstrip("=")

# -- Admin sign-in: password hash, sessions, CSRF, login rate limit -------------------------------

PASSWORD_ITERATIONS = 200000


def hash_password(password: str, salt: bytes = None, iterations: int = PASSWORD_ITERATIONS) -> str:
    """"pbkdf2_sha256$<iterations>$<salt>$<hash>" (base64 parts) for the admin password."""
    salt = salt or os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return "pbkdf2_sha256$%d$%s$%s" % (iterations, base64.b64encode(salt).decode("ascii"),
                                       base64.b64encode(digest).decode("ascii"))


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, expected = stored.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), base64.b64decode(salt), int(iterations))
        return hmac.compare_digest(digest, base64.b64decode(expected))
    except (ValueError, TypeError, AttributeError):
        return False


class AdminSessions:
    """Signed-in admin browsers: session token (cookie) -> CSRF token, with expiry.

    Only hashes of the tokens are kept, so a memory dump or a log line can never
    be replayed as a cookie."""

    def __init__(self, ttl_s: float = 12 * 3600, clock=time.time):
        self.ttl_s, self.clock = ttl_s, clock
        self._sessions = {}
        self._lock = threading.Lock()

    def create(self):
        """(session token for the cookie, CSRF token for the page)."""
        token, csrf = new_token(), new_token()
        with self._lock:
            self._sessions[_token_hash(token)] = (csrf, self.clock() + self.ttl_s)
        return token, csrf

    def csrf_for(self, token: str):
        """The CSRF token of a live session, else None."""
        if not token:
            return None
        with self._lock:
            found = self._sessions.get(_token_hash(token))
            if found is None:
                return None
            if found[1] < self.clock():
                del self._sessions[_token_hash(token)]
                return None
            return found[0]

    def drop(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(_token_hash(token or ""), None)

    def drop_all(self) -> None:
        with self._lock:
            self._sessions.clear()


def new_token() -> str:
    return base64.urlsafe_b64encode(os.urandom(24)).decode("ascii").rstrip("=")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class LoginLimiter:
    """At most `attempts` failed logins per client address in `window_s`; then wait."""

    def __init__(self, attempts: int = 5, window_s: float = 300.0, clock=time.monotonic):
        self.attempts, self.window_s, self.clock = attempts, window_s, clock
        self._failures = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """Seconds until this client may try again (0: now)."""
        with self._lock:
            failures = self._failures[client]
            now = self.clock()
            while failures and failures[0] <= now - self.window_s:
                failures.popleft()
            if len(failures) < self.attempts:
                return 0.0
            return failures[0] + self.window_s - now

    def failed(self, client: str) -> None:
        with self._lock:
            self._failures[client].append(self.clock())

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

# -- The upstream side of a service ---------------------------------------------------------------

def _refuse_unknown_provider(model: str, default, routes, configured: dict) -> None:
    """400 for "nope/glm-5": a prefix that names no provider, when the default provider's
    model list (fetched once, cached) does not hold the whole id either. Providers whose ids
    hold a slash (OpenRouter's "anthropic/claude-...", vLLM's "org/model"), or that list no
    models, get such names whole: their list may lag, and the upstream judges."""
    prefix, sep, rest = model.partition("/")
    if not (sep and prefix and rest):
        return
    known = [m for m, _d, _k in default.catalogue.models()]
    if not known or model in known or any("/" in m for m in known):
        return
    problem = "provider %r is disabled" % prefix if prefix in configured else "unknown provider %r" % prefix[:40]
    raise InvalidRequestError("%s in model %r; providers: %s (send provider/model, or a model name alone)"
                              % (problem, model[:100], ", ".join(routes)), param="model")


class Backend:
    """The upstream side, shared by every server instance of a service: connection
    pool (with the proxy), iFlow accounts, OAuth login and token refresh, and the
    enabled providers with their keys and models (routes)."""

    def __init__(self, config: Config):
        self.config = config
        self.credentials = IFlowCredentials(config)
        self.pool = ConnectionPool(config["upstream_connect_timeout_s"], config["upstream_read_timeout_s"],
                                   proxy=proxy_from_config(config))
        self._proxy_setting = (config["upstream_proxy_enabled"], config["upstream_proxy"])
        self.accounts = AccountPool(config, self.credentials)
        self.oauth = OAuthClient(config, self.pool)
        self.refresher = TokenRefresher(self.accounts, self.oauth, config)
        self.update = UpdateChecker(config, self.pool)
        self.routes = self._build_routes()

    def reload(self) -> None:
        """Follow a config change: provider routes (keys, models, providers), the proxy and the
        upstream timeouts (new connections use them)."""
        self.pool.connect_timeout_s = self.config["upstream_connect_timeout_s"]
        self.pool.read_timeout_s = self.config["upstream_read_timeout_s"]
        proxy_setting = (self.config["upstream_proxy_enabled"], self.config["upstream_proxy"])
        if proxy_setting != self._proxy_setting:
            self.pool.use_proxy(proxy_from_config(self.config))
            self._proxy_setting = proxy_setting
        self.routes = self._build_routes()

    def _build_routes(self):
        config, routes = self.config, collections.OrderedDict()
        providers = config.get("providers") or {}
        iflow_entry = providers.get("iflow") if isinstance(providers.get("iflow"), dict) else {}
        if iflow_entry.get("enabled", True):
            provider = IFlowProvider()
            routes["iflow"] = ProviderRoute(
                "iflow", "iflow", provider, self.accounts,
                ModelCatalogue(provider, self.accounts, self.pool, config["models_cache_s"]),
                aliases=iflow_entry.get("aliases"))
        for name, entry in providers.items():
            if name == "iflow" or not isinstance(entry, dict):
                continue
            settings = provider_settings(name, entry)
            if not settings["enabled"]:
                continue
            provider = OpenAICompatibleProvider(name, settings["base_url"], settings["headers"],
                                                settings["quirks"])
            accounts = KeyPool(name, _provider_keys(settings, config.env), settings["keyless"],
                               provider.base_url)
            static = [(m, m, "vision" if m in settings["vision_models"] else "text")
                      for m in settings["models"] if isinstance(m, str)]
            catalogue = ModelCatalogue(provider, accounts, self.pool, config["models_cache_s"], static=static,
                                       discover=bool(settings["discover_models"]))
            routes[name] = ProviderRoute(name, "openai", provider, accounts, catalogue, settings["aliases"],
                                         settings["quirks"], settings["text_only_models"],
                                         settings["vision_models"])
        return routes

    def default_model(self) -> str:
        """The model of requests that name none: config default_model, else the iFlow
        CLI's chosen model, else glm-5."""
        return self.config.get("default_model") or self.credentials.model_name or DEFAULT_MODEL

    @property
    def default_route(self):
        routes = self.routes
        return routes.get(self.config["default_provider"]) or next(iter(routes.values()), None)

    def resolve(self, model: str):
        """(route, upstream model id) for the model name a client sent.

        Order: "provider/model"; config model_routes ("provider" or "provider/model");
        a provider's aliases; a model the default provider knows; a model another
        provider knows; else the default provider with the name unchanged."""
        routes = self.routes
        if not routes:
            raise AuthenticationError("no provider is enabled; configure one (iflow2api providers add ...) "
                                      "or log in to iFlow (iflow2api login)")
        name, rest = split_provider(model, routes)
        if name:
            return routes[name], routes[name].aliases.get(rest, rest)
        target = (self.config.get("model_routes") or {}).get(model)
        if isinstance(target, str):
            name, rest = split_provider(target, routes)
            if name:
                return routes[name], rest
            if target in routes:
                return routes[target], model
        for route in routes.values():
            if model in route.aliases:
                return route, route.aliases[model]
        default = self.default_route
        for route in [default] + [r for r in routes.values() if r is not default]:
            if model in route.catalogue.known_ids():
                return route, model
        _refuse_unknown_provider(model, default, routes, self.config.get("providers") or {})
        return default, model

    def fallback_targets(self, route, model: str) -> list:
        """[(route, upstream model)] to try after (route, model) fails, from config fallbacks:
        the entry for "provider/model", else for the model, else the provider, else "*"."""
        table = self.config.get("fallbacks") or {}
        for key in ("%s/%s" % (route.name, model), model, route.name, "*"):
            if key in table:
                return [self.resolve(target) for target in table[key]]
        return []

    def public_model_ids(self):
        """[(id as clients send it, display name, owner)] over every enabled provider."""
        default, out, seen = self.default_route, [], set()
        for route in self.routes.values():
            prefix = "" if route is default else route.name + "/"
            names = [(m, d) for m, d, _k in route.catalogue.models()] + [(a, a) for a in route.aliases]
            for model_id, display in names:
                if prefix + model_id not in seen:
                    seen.add(prefix + model_id)
                    out.append((prefix + model_id, display, route.name))
        return out

    def has_credentials(self) -> bool:
        return any(route.accounts.has_credentials for route in self.routes.values())

    def close(self) -> None:
        self.refresher.stop()
        self.pool.close()


def _provider_keys(settings: dict, env: dict):
    """A function giving a provider's keys now: config api_keys, else its key variable."""
    def keys():
        configured = [usable_secret(k) for k in settings["api_keys"] if isinstance(k, str)]
        if any(configured):
            return configured
        return [env.get(settings["key_env"], "")] if settings["key_env"] else []
    return keys

# == 7. HTTP server: Request/Response, router, h11 and stdlib adapters, limits ====================
# Request/Response types, a router, the app wrapper (errors, CORS, access log),
# two socket adapters (h11 when importable, else http.server) with limits on
# body size, header/idle timeouts and connections, and a watcher that notices
# clients leaving mid-stream. Tests: tests/integration/test_server.py (both adapters).

_UNSET = object()
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


class Request:
    """One HTTP request as the handlers see it."""

    def __init__(self, method, target, headers, body=b"", client=("", 0), sock=None, watcher=None):
        self.method = method.upper()
        self.target = target
        path, _, self.query_string = target.partition("?")
        self.path = path or "/"
        self.headers = headers
        self.body = body
        self.client = client
        self.sock = sock
        self.params = {}
        self.dialect = "openai"
        self.id = "req_%024x" % _IDS.getrandbits(96)
        self.log = {}  # model, tokens, ... for the access log line
        self.abort_callbacks = []  # abort(reason) of the upstream calls serving it (a stopping server)
        self._watcher = watcher
        self._json = _UNSET

    @property
    def query(self) -> dict:
        return urllib.parse.parse_qs(self.query_string)

    def json(self):
        """The body parsed as JSON (whatever the content-type says), or a 400."""
        if self._json is _UNSET:
            if not self.body:
                raise InvalidRequestError("request body is empty; expected a JSON object")
            try:
                value = json.loads(self.body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidRequestError("request body is not valid JSON: %s" % exc) from None
            except RecursionError:
                raise InvalidRequestError("request body is nested too deeply") from None
            # A lone surrogate (an escape like \ud800 with no partner) can be parsed but
            # never encoded again; refuse it here, before it reaches an upstream or a log.
            if _SURROGATE_ESCAPE.search(self.body) and find_lone_surrogate(value):
                raise InvalidRequestError("request body contains an invalid \\u escape (a lone surrogate)")
            self._json = value
        return self._json

    def watch_disconnect(self, callback):
        """Call callback (from another thread) if the client goes away; returns a cancel function."""
        if self._watcher is None or self.sock is None:
            return lambda: None
        return self._watcher.watch(self.sock, callback)


class Response:
    """Status, headers and either a body or an iterator of body pieces (streaming)."""

    def __init__(self, status=200, body=b"", headers=None, stream=None):
        self.status = status
        self.body = body
        self.headers = list(headers or [])
        self.stream = stream
        self.first_byte_at = None  # when a streamed body's first piece went out (monotonic)
        self._on_close = []
        self._closed = False

    @classmethod
    def json(cls, obj, status=200, headers=None):
        body = compact_json(obj).encode("utf-8")
        return cls(status, body, [("content-type", "application/json")] + list(headers or []))

    def on_close(self, callback) -> None:
        self._on_close.append(callback)

    def close(self) -> None:
        """Release what the response holds (upstream stream, slots), then run callbacks."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.stream is not None and hasattr(self.stream, "close"):
                self.stream.close()
        finally:
            for callback in self._on_close:
                try:
                    callback()
                except Exception:
                    log.exception("error in response close callback")


def error_response(exc: Iflow2apiError, dialect: str, request_id: str = "") -> Response:
    """The one place errors become HTTP responses, in the caller's API dialect."""
    if dialect == "anthropic":
        body = anthropic_error_body(exc.anthropic_type, str(exc), request_id or None)
        return Response.json(body, exc.status, exc.headers)
    body = openai_error_body(str(exc), exc.openai_type, exc.code, exc.param)
    # Anthropic's 529 "overloaded" has no OpenAI equivalent: 503
    return Response.json(body, 503 if exc.status == 529 else exc.status, exc.headers)


def dialect_for_path(path: str) -> str:
    """The error dialect of a path before routing: Anthropic for the messages routes."""
    return "anthropic" if path.lstrip("/").startswith(("v1/messages", "messages", "api/v1/messages")) \
        else "openai"


class Router:
    """Maps (method, path) to handlers; `{name}` segments become req.params."""

    def __init__(self):
        self._exact = {}
        self._patterns = []

    def add(self, methods, path: str, handler, dialect: str = "openai") -> None:
        for method in methods.split():
            if "{" in path:
                pattern = re.sub(r"\{(\w+):([^}]+)\}", r"(?P<\1>\2)", path)  # {name:regex}
                regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
                self._patterns.append((method, regex, handler, dialect, path))
            else:
                self._exact[(method, path)] = (handler, dialect)

    def routes(self) -> list:
        """[(method, path pattern)] of every route, patterns as registered ("/v1/models/{model_id:.+}")."""
        exact = [(method, path) for (method, path) in self._exact]
        return exact + [(method, pattern) for method, _regex, _handler, _dialect, pattern in self._patterns]

    def match(self, method: str, path: str):
        """(handler, params, dialect); NotFoundError or MethodNotAllowedError otherwise."""
        found = self._exact.get((method, path))
        if found is None and method == "HEAD":
            found = self._exact.get(("GET", path))
        if found is not None:
            return found[0], {}, found[1]
        path_known = any(p == path for (_m, p) in self._exact)
        for m, regex, handler, dialect, _pattern in self._patterns:
            hit = regex.match(path)
            if hit and (m == method or (method == "HEAD" and m == "GET")):
                return handler, hit.groupdict(), dialect
            path_known = path_known or bool(hit)
        if path_known:
            raise MethodNotAllowedError("method %s is not allowed on %s" % (method, path))
        raise NotFoundError("no route for %s %s" % (method, path))


# The admin's own traffic and pages are not API requests: the dashboard would count itself.
_NOT_COUNTED = ("/admin", "/static/", "/docs", "/redoc", "/openapi.json", "/favicon")


class App:
    """Routing, error handling, CORS and the one access-log line per request."""

    def __init__(self, router: Router, cors_origins=(), stats=None, head_checks=(), usage=None, quota=None):
        self.router = router
        self.cors_origins = list(cors_origins or [])
        self.stats = stats
        self.usage = usage  # a UsageStore for the API routes' requests, or None
        self.quota = quota  # a DailyQuota that counts the API routes' tokens, or None
        self.head_checks = list(head_checks)
        self.access_log = ACCESS_LOG
        self.stopping = False  # set by a graceful stop: new requests get 503
        self._active = {}  # request id -> Request, from handle() until its response closed
        self._active_lock = threading.Lock()

    @property
    def active_count(self) -> int:
        return len(self._active)

    def abort_active(self, reason: str) -> None:
        """Cut the upstream calls of every request still being answered; their streams
        end with an error event that says reason."""
        with self._active_lock:
            requests = list(self._active.values())
        for req in requests:
            for abort in list(req.abort_callbacks):
                abort(reason)

    def check_head(self, method: str, target: str, headers, has_body: bool) -> None:
        """Run the checks that must pass before a body is read (Host, client key,
        admin session): a refused client never gets to make us buffer its body."""
        path = target.partition("?")[0]
        if "\x00" in path or "%00" in path:
            raise InvalidRequestError("the request path contains a NUL byte")
        for check in self.head_checks:
            check(method, path, headers, has_body)

    def handle(self, req: Request) -> Response:
        started = time.monotonic()
        dialect = dialect_for_path(req.path)
        with self._active_lock:
            self._active[req.id] = req
        try:
            if self.stopping:
                raise Iflow2apiError("the server is shutting down", status=503, code="shutting_down",
                                     headers=[("connection", "close"), ("retry-after", "5")])
            if req.method == "OPTIONS" and req.headers.get("access-control-request-method"):
                resp = Response(204)
            else:
                handler, req.params, dialect = self.router.match(req.method, req.path)
                req.dialect = dialect
                resp = handler(req)
        except Iflow2apiError as exc:
            resp = error_response(exc, dialect, req.id)
            req.log.setdefault("error", str(exc))
        except Exception:
            log.exception("internal error on %s %s (%s)", req.method, req.path, req.id)
            resp = error_response(Iflow2apiError("internal error; see the server log (%s)" % req.id),
                                  dialect, req.id)
        self._add_cors(req, resp)
        resp.on_close(lambda: self._finished(req, resp, started))
        return resp

    def _finished(self, req: Request, resp: Response, started: float) -> None:
        with self._active_lock:
            self._active.pop(req.id, None)
        self._log(req, resp, started)

    def _add_cors(self, req: Request, resp: Response) -> None:
        origin = req.headers.get("origin")
        if not origin or not self.cors_origins or req.path.startswith("/admin"):
            return
        if "*" not in self.cors_origins and origin not in self.cors_origins:
            return
        resp.headers.append(("access-control-allow-origin", origin if "*" not in self.cors_origins else "*"))
        if req.method == "OPTIONS":
            resp.headers += [
                ("access-control-allow-methods", "GET, POST, PUT, DELETE, OPTIONS"),
                ("access-control-allow-headers", req.headers.get("access-control-request-headers")
                 or "authorization, content-type, x-api-key, anthropic-version, anthropic-beta"),
                ("access-control-max-age", "86400"),
            ]

    def _log(self, req: Request, resp: Response, started: float) -> None:
        ms = (time.monotonic() - started) * 1000.0
        info = req.log
        tokens = ""
        if "input_tokens" in info or "output_tokens" in info:
            tokens = " tokens=%s+%s" % (info.get("input_tokens", "?"), info.get("output_tokens", "?"))
        counted = not req.path.startswith(_NOT_COUNTED)
        # The admin's pages and polling would drown the API lines: those go to DEBUG.
        level, access_log = logging.INFO if counted or resp.status >= 400 else logging.DEBUG, self.access_log
        if access_log.isEnabledFor(level):
            # handle(makeRecord()), not log(): log() also looks up the caller's file and line,
            # which the line does not show (2 of the 17 us it cost)
            access_log.handle(access_log.makeRecord(
                access_log.name, level, "(access log)", 0, "%s %s model=%s status=%d ms=%.0f%s%s%s",
                (req.method, req.path, info.get("model", "-"), resp.status, ms, tokens,
                 " rule=" + info["rule"] if "rule" in info else "",
                 " error=%r" % info["error"][:200] if info.get("error") else ""), None))
        if self.stats is not None and counted:
            self.stats.record(resp.status, info, ms)
        if self.quota is not None and "route" in info:
            self.quota.add(info.get("client_key"), (info.get("input_tokens") or 0) + (info.get("output_tokens") or 0))
        if self.usage is not None and "route" in info:
            first_byte = None if resp.first_byte_at is None else (resp.first_byte_at - started) * 1000.0
            self.usage.record(dict(info, at=time.time(), status=resp.status, latency_ms=round(ms, 1),
                                   first_byte_ms=None if first_byte is None else round(first_byte, 1)))


class DisconnectWatcher:
    """One thread that notices clients closing their connection mid-request.

    A handler is usually blocked reading the upstream; it only learns the client left
    at its next write, which may be long. This thread polls the client sockets of
    requests in flight and runs their callback (which aborts the upstream read) as soon
    as a socket reports EOF.

    A watch is taken up at the thread's next tick (TICK_S), not at once: most requests
    end before that and cost only a list append and a flag. Taking each watch up at once
    cost a wake-up of this thread and an epoll call both ways per request, 8 of the 30
    system calls of a short non-streamed request (strace)."""

    TICK_S = 0.2
    QUIET_TICKS = 25  # ticks without a watch before the thread sleeps until one comes

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._new = []  # watches since the last tick
        self._asleep = False  # waiting without a timeout: a new watch must wake it
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="iflow2api-disconnects", daemon=True)
        self._running = True
        self._thread.start()

    def watch(self, sock, callback):
        """Start watching sock; returns the function that ends the watch."""
        watch = _Watch(sock, callback)
        with self._lock:
            self._new.append(watch)
            wake, self._asleep = self._asleep, False
        if wake:
            self._wake()
        return watch.cancel

    def close(self) -> None:
        self._running = False
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        quiet = 0
        while self._running:
            seen = self._take_up_new_watches()
            quiet = 0 if seen or len(self._selector.get_map()) > 1 else quiet + 1
            timeout = self.TICK_S
            if quiet >= self.QUIET_TICKS:
                with self._lock:
                    if not self._new:
                        self._asleep, timeout = True, None
            for key, _mask in self._selector.select(timeout):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._check(key)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _take_up_new_watches(self) -> int:
        """Drop ended watches, register the new ones still running; how many came."""
        for key in list(self._selector.get_map().values()):
            if key.data is not None and not key.data.active:
                self._forget(key.fileobj)
        with self._lock:
            new, self._new = self._new, []
        for watch in new:
            if watch.active:
                self._register(watch)
        return len(new)

    def _register(self, watch) -> None:
        for _attempt in range(2):
            try:
                self._selector.register(watch.sock, selectors.EVENT_READ, watch)
                return
            except KeyError:  # the fd number is still mapped to a closed socket's watch
                self._forget(watch.sock)
            except (ValueError, OSError):
                return  # the socket is closed already

    def _forget(self, sock) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _check(self, key) -> None:
        sock, watch = key.fileobj, key.data
        try:
            gone = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            gone = True
        self._forget(sock)  # readable but not gone: pipelined data; stop polling
        if gone and watch.active:
            try:
                watch.callback()
            except Exception:
                log.exception("disconnect callback failed")


class _Watch:
    """A client socket watched for its closing, until cancel()."""
    __slots__ = ("sock", "callback", "active")

    def __init__(self, sock, callback):
        self.sock, self.callback, self.active = sock, callback, True

    def cancel(self) -> None:
        self.active = False


class Limits:
    """Server limits (from config): body size, timeouts, connection count."""

    def __init__(self, max_body_bytes=32 * MIB, header_timeout_s=20.0, idle_timeout_s=75.0,
                 max_connections=1024, body_timeout_s=300.0):
        self.max_body_bytes = max_body_bytes
        self.header_timeout_s = header_timeout_s  # the whole head; also each read of a body
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.body_timeout_s = body_timeout_s  # the whole body (a trickle must end)

    @classmethod
    def from_config(cls, config) -> "Limits":
        return cls(config["max_body_bytes"], config["header_timeout_s"], config["idle_timeout_s"],
                   config["max_connections"], config["body_timeout_s"])

    def follow(self, config) -> None:
        """Take the config's values in place: the server reads them per request."""
        self.__dict__.update(Limits.from_config(config).__dict__)


class BodyTimeoutError(Iflow2apiError):
    status, code = 408, "timeout"
    openai_type, anthropic_type = "invalid_request_error", "timeout_error"


def admit_request_head(app, limits: Limits, method: str, target: str, headers: Headers):
    """Framing, size and the app's checks of a request head, before any of its body is read
    (both adapters); the framing: "chunked" or the length."""
    framing = request_framing(headers.get_all("transfer-encoding"), headers.get_all("content-length"))
    if framing != "chunked" and framing > limits.max_body_bytes:
        raise RequestTooLargeError("request body is %d bytes; the limit is %d" % (framing, limits.max_body_bytes))
    app.check_head(method, target, headers, framing != 0)
    return framing


def body_read_timeout(deadline: float, per_read_s: float) -> float:
    """The timeout for the next read of a request body: per read, within the body's deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise BodyTimeoutError("request body too slow")
    return min(per_read_s, remaining)



class _PlainFramer:
    """HTTP/1.x response framing for the stdlib adapter (h11 does its own)."""

    def __init__(self, http11: bool, keep_alive: bool):
        self.http11, self.keep_alive, self.chunked = http11, keep_alive, False

    def head(self, status: int, headers: list) -> bytes:
        names = {k.lower() for k, _v in headers}
        if "content-length" not in names:
            if self.http11:
                self.chunked = True
                headers = headers + [("transfer-encoding", "chunked")]
            else:
                self.keep_alive = False  # the body ends when the connection closes
        if not self.keep_alive:
            headers = headers + [("connection", "close")]
        reason = http.client.responses.get(status, "Unknown")
        lines = ["HTTP/1.1 %d %s" % (status, reason)] + ["%s: %s" % kv for kv in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def data(self, piece: bytes) -> bytes:
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(piece), piece)
        return piece

    def end(self) -> bytes:
        return b"0\r\n\r\n" if self.chunked else b""


class _H11Framer:
    """h11 frames the head and the end; the pieces of a chunked body are framed here. They
    are nearly every write of a stream, and h11's event machinery cost more than the
    relay itself per chunk (h11 keeps no state about a chunked body's data)."""

    def __init__(self, conn):
        self.conn, self.chunked = conn, False

    def head(self, status: int, headers: list) -> bytes:
        head = self.conn.send(h11.Response(status_code=status, headers=headers,
                                           reason=http.client.responses.get(status, "Unknown")))
        self.chunked = b"transfer-encoding: chunked" in head.lower()
        return head

    def data(self, piece: bytes) -> bytes:
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(piece), piece)
        return self.conn.send(h11.Data(data=piece))

    def end(self) -> bytes:
        return self.conn.send(h11.EndOfMessage())


_SERVER_HEADER = ("server", "iflow2api/" + __version__)


def send_response(sock, framer, resp: Response, head_only: bool = False) -> bool:
    """Write resp to the socket; False when the client is gone or the body broke.

    Streaming: the head goes out together with the first body piece (one write,
    no Nagle delay), then one write per piece as it arrives."""
    try:
        headers = [_SERVER_HEADER] + resp.headers
        if resp.stream is None:
            body = resp.body or b""
            head = framer.head(resp.status, headers + [("content-length", str(len(body)))])
            if head_only or not body:
                send_all(sock, head + framer.end())
            else:
                send_all(sock, head + framer.data(body) + framer.end())
            return True
        pieces = iter(resp.stream)
        first = b""
        for first in pieces:
            if first:
                break
        resp.first_byte_at = time.monotonic()
        send_all(sock, framer.head(resp.status, headers) + (framer.data(first) if first else b""))
        for piece in pieces:
            if piece:
                send_all(sock, framer.data(piece))
        send_all(sock, framer.end())
        return True
    except OSError:
        return False  # the client went away; close() below frees the upstream
    except Exception:
        log.exception("response body failed")
        return False
    finally:
        resp.close()


class _ThreadingServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Thread per connection, bounded by Limits.max_connections."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 2048  # the listen backlog: 1024 clients may connect at once (256 dropped SYNs)

    def __init__(self, address, handler_class, app: App, limits: Limits, watcher: DisconnectWatcher):
        self.app, self.limits, self.watcher = app, limits, watcher
        self._conn_lock = threading.Lock()
        self._connections = set()
        super().__init__(address, handler_class)

    def get_request(self):
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request(self, request, client_address):
        with self._conn_lock:
            full = len(self._connections) >= self.limits.max_connections
            if not full:
                self._connections.add(request)
        if full:
            body = b'{"error":{"message":"too many connections","type":"server_error","code":"overloaded"}}'
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                                % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        """A client that resets its connection is not an error worth a traceback."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        log.exception("connection from %s failed", client_address[0] if client_address else "?")

    def shutdown_request(self, request):
        with self._conn_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._conn_lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def connection_count(self) -> int:
        return len(self._connections)


class _StdlibHandler(BaseHTTPRequestHandler):
    """The stdlib adapter: http.server parses, we route and frame."""

    protocol_version = "HTTP/1.1"
    server_version = "iflow2api/" + __version__
    sys_version = ""

    def setup(self):
        self.connection = self.request
        self.rfile = _ClientReader(self.connection, self.server.limits)
        self.rfile.set_timeout(self.server.limits.idle_timeout_s)
        self.wfile = _SendAll(self.connection)

    def finish(self):
        self.rfile.close()

    def log_message(self, format, *args):  # noqa: A002 - name fixed by http.server
        pass  # App logs one line per request

    def parse_request(self) -> bool:
        """The request line (read by http.server) and the headers, parsed here: http.server
        parses headers with the email package, which cost a third of a request's CPU."""
        words = self.raw_requestline.rstrip(b"\r\n").decode("latin-1").split()
        self.command, self.request_version, self.close_connection = None, "HTTP/0.9", True
        if len(words) == 3 and words[2] in ("HTTP/1.0", "HTTP/1.1"):
            self.command, self.path, self.request_version = words
        elif len(words) == 3 and words[2].startswith("HTTP/"):
            self.send_error(505, "HTTP version %s is not supported" % words[2][:20])
            return False
        else:
            self.send_error(400, "malformed request line")
            return False
        if self.path.startswith("//"):  # as http.server: never a scheme-relative URL downstream
            self.path = "/" + self.path.lstrip("/")
        lines = self.rfile.buffered_head_lines()
        if lines is None:  # not all in the buffer yet: line by line, within the head's time
            lines, size = [], 0
            while True:
                line = self.rfile.readline(65537)
                size += len(line)
                if not line.endswith(b"\n") or size > MAX_HEAD_BYTES:
                    self.send_error(431 if line else 400, "request head too large" if line else "incomplete request head")
                    return False
                line = line.rstrip(b"\r\n")
                if not line:
                    break
                lines.append(line)
        try:
            self.headers = parse_header_lines(lines)
        except ValueError as exc:
            self.send_error(431 if "headers" in str(exc) else 400, str(exc))
            return False
        connection = (self.headers.get("connection") or "").lower()
        self.close_connection = "close" in connection or (self.request_version == "HTTP/1.0"
                                                          and "keep-alive" not in connection)
        if self.request_version == "HTTP/1.1" and (self.headers.get("expect") or "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def send_error(self, code, message=None, explain=None):
        """Protocol errors found by http.server, answered in JSON."""
        self.close_connection = True
        exc = Iflow2apiError(message or http.client.responses.get(code, "error"), status=code,
                             code="bad_request" if code < 500 else "server_error",
                             openai_type="invalid_request_error" if code < 500 else "server_error")
        framer = _PlainFramer(True, False)
        send_response(self.connection, framer, error_response(exc, "openai"))

    def _read_body(self, headers: Headers) -> bytes:
        """The request body under max_body_bytes, within body_timeout_s in total, once
        the head passed the app's checks."""
        limits = self.server.limits
        framing = admit_request_head(self.server.app, limits, self.command, self.path, headers)
        if framing == "chunked":
            return self._read_chunked(limits)
        deadline, parts, left = time.monotonic() + limits.body_timeout_s, [], framing
        while left:
            data = self._timed_read(deadline, self.rfile.read_body, min(left, 1024 * 1024))
            if not data:
                raise ConnectionError("client closed during the body")
            parts.append(data)
            left -= len(data)
        return b"".join(parts)

    def _read_chunked(self, limits) -> bytes:
        decoder = ChunkedDecoder(limits.max_body_bytes)
        deadline, parts = time.monotonic() + limits.body_timeout_s, []
        while not decoder.done:
            wanted = decoder.data_wanted
            data = (self._timed_read(deadline, self.rfile.read_body, min(wanted, 1024 * 1024)) if wanted
                    else self._timed_read(deadline, self.rfile.body_line, 4098))
            if not data:
                raise ConnectionError("client closed during the body")
            try:
                parts.append(decoder.feed(data))
            except ValueError as exc:
                raise InvalidRequestError("malformed chunked body: %s" % exc) from None
        return b"".join(parts)

    def _timed_read(self, deadline: float, read, size: int) -> bytes:
        """read(size, timeout) within the body's deadline and the limit per read: 408 when slower."""
        timeout_s = body_read_timeout(deadline, self.server.limits.header_timeout_s)
        try:
            return read(size, timeout_s)
        except socket.timeout:
            raise BodyTimeoutError("request body too slow") from None

    def _dispatch(self):
        self.rfile.head_done()
        headers = self.headers
        try:
            body = self._read_body(headers)
        except Iflow2apiError as exc:
            self.close_connection = True  # the unread body makes the connection unusable
            send_response(self.connection, _PlainFramer(True, False),
                          error_response(exc, dialect_for_path(self.path)))
            _drain(self.connection)
            return
        except (OSError, ConnectionError):
            self.close_connection = True
            return
        self.rfile.set_timeout(self.server.limits.idle_timeout_s)  # for writing the answer
        req = Request(self.command, self.path, headers, body, self.client_address, self.connection,
                      self.server.watcher)
        resp = self.server.app.handle(req)
        framer = _PlainFramer(self.request_version == "HTTP/1.1", not self.close_connection)
        if not send_response(self.connection, framer, resp, head_only=self.command == "HEAD"):
            self.close_connection = True
        elif not framer.keep_alive:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _dispatch


class _SendAll:
    """The stdlib adapter's wfile, for http.server's interim answer (100 Continue): each
    write sent whole at once. Our answers go to the socket through send_response()."""

    def __init__(self, sock):
        self._sock = sock

    def write(self, data: bytes) -> int:
        send_all(self._sock, data)
        return len(data)

    def flush(self) -> None:
        pass


class _ClientReader:
    """The stdlib adapter's reads of a client socket, timed, with a buffer of its own.

    A request may take idle_timeout_s to begin; from its first byte, the request line
    and headers must arrive within header_timeout_s in total (a byte every few seconds
    would otherwise hold the connection forever); head_done() ends that. The body's
    reads are timed by the caller. The socket's timeout is set only before a read that
    reaches the socket: an io.BufferedReader hides whether one will, and arming it before
    every step cost five system calls per request."""

    def __init__(self, sock, limits: Limits):
        self._sock, self._limits = sock, limits
        self._buf = bytearray()
        self._head_deadline = None
        # as last set here: the answer's writes only change it for a moment (send_all), and a
        # refused request's _drain() is followed by the close
        self._timeout = None

    def set_timeout(self, timeout_s: float) -> None:
        """The socket's timeout for what comes next: without even the system call that
        asks the socket when it is the one set last (two per request)."""
        if timeout_s != self._timeout:
            set_timeout(self._sock, timeout_s)
            self._timeout = timeout_s

    def _recv(self, timeout_s: float, size: int = 65536) -> bytes:
        self.set_timeout(timeout_s)
        return recv_timed(self._sock, size)

    def readline(self, limit: int = 65537) -> bytes:
        """A line of the head (at most limit bytes), or what came before the client closed."""
        if self._head_deadline is None:
            if not self._buf:
                data = self._recv(self._limits.idle_timeout_s)
                if not data:
                    return b""  # the client closed the connection
                self._buf += data
            self._head_deadline = time.monotonic() + self._limits.header_timeout_s
        return self._line(limit, self._head_deadline, "request head too slow")

    def buffered_head_lines(self):
        """The header lines when the buffer holds them all up to the blank line (a head
        nearly always arrives in one piece), taken in one go; else None (read line by line)."""
        buf = self._buf
        if buf.startswith(b"\r\n"):
            del buf[:2]
            return []
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
        if end == -1 or b"\n" in buf[:end].replace(b"\r\n", b""):  # bare LF line ends: line by line
            return None
        return self._take(end + 4)[:end].split(b"\r\n")

    def head_done(self) -> None:
        self._head_deadline = None

    def read_body(self, size: int, timeout_s: float) -> bytes:
        """Up to size bytes of the body: what is buffered, else one read of the socket."""
        if self._buf:
            return self._take(min(size, len(self._buf)))
        return self._recv(timeout_s, size)

    def body_line(self, limit: int, timeout_s: float) -> bytes:
        """A line of the body (chunk sizes, trailers), whole within timeout_s: timing each read
        alone let a size line trickled a byte at a time outlast the body's deadline."""
        return self._line(limit, time.monotonic() + timeout_s, "body line too slow")

    def _line(self, limit: int, deadline: float, too_slow: str) -> bytes:
        """A line of at most limit bytes, reading as needed until the deadline."""
        buf, scanned = self._buf, 0  # a line trickled byte by byte is scanned once, not once per byte
        while True:
            end = buf.find(b"\n", scanned, limit)
            if end >= 0 or len(buf) >= limit:
                return self._take(end + 1 if end >= 0 else limit)
            scanned = len(buf)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(too_slow)
            data = self._recv(remaining)
            if not data:
                return self._take(len(buf))
            buf += data

    def _take(self, size: int) -> bytes:
        piece = bytes(self._buf[:size])
        del self._buf[:size]
        return piece

    def close(self) -> None:
        self._buf = bytearray()


class _H11Handler(socketserver.BaseRequestHandler):
    """The h11 adapter: h11 parses and frames, we route."""

    def handle(self):
        sock, server = self.request, self.server
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        while True:
            try:
                req = self._read_request(conn, sock, server.limits)
            except Iflow2apiError as exc:
                self._refuse(conn, sock, exc, self._target)
                return
            except h11.RemoteProtocolError as exc:
                self._refuse(conn, sock, InvalidRequestError("malformed HTTP request: %s" % exc,
                                                             status=exc.error_status_hint))
                return
            except (OSError, socket.timeout):
                return
            if req is None:
                return
            set_timeout(sock, server.limits.idle_timeout_s)  # for writing the answer
            resp = server.app.handle(req)
            if not send_response(sock, _H11Framer(conn), resp, head_only=req.method == "HEAD"):
                return
            if conn.our_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    def _read_request(self, conn, sock, limits: Limits):
        """The next complete request, or None when the client closed or idled out."""
        self._target = ""  # of the request being read, for the dialect of a refusal
        head, body, size = None, [], 0
        got_bytes = conn.trailing_data[0] != b""
        head_deadline = None  # the whole head must arrive in header_timeout_s (no slow-loris)
        body_deadline = None  # and the whole body in body_timeout_s
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if head is not None and conn.they_are_waiting_for_100_continue:
                    send_all(sock, conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                if not got_bytes:
                    timeout_s = limits.idle_timeout_s
                elif head is None:
                    head_deadline = head_deadline or time.monotonic() + limits.header_timeout_s
                    timeout_s = max(0.001, head_deadline - time.monotonic())
                else:
                    timeout_s = body_read_timeout(body_deadline, limits.header_timeout_s)
                set_timeout(sock, timeout_s)
                try:
                    data = recv_timed(sock)
                except socket.timeout:
                    if got_bytes:
                        raise Iflow2apiError("request head or body too slow", status=408,
                                             code="timeout", openai_type="invalid_request_error",
                                             anthropic_type="timeout_error") from None
                    return None
                got_bytes = True
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head, body_deadline = event, time.monotonic() + limits.body_timeout_s
                self._target = head.target.decode("latin-1")
                headers = Headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers)
                admit_request_head(self.server.app, limits, head.method.decode("ascii"), self._target, headers)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limits.max_body_bytes:
                    raise RequestTooLargeError("request body exceeds the limit of %d bytes"
                                               % limits.max_body_bytes)
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return Request(head.method.decode("ascii"), self._target, headers, b"".join(body),
                               self.client_address, sock, self.server.watcher)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def _refuse(self, conn, sock, exc: Iflow2apiError, path: str = "") -> None:
        """Answer a request we will not read (too large, malformed) and close."""
        resp = error_response(exc, dialect_for_path(path.partition("?")[0]))
        resp.headers.append(("connection", "close"))
        try:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                send_response(sock, _H11Framer(conn), resp)
            else:
                send_response(sock, _PlainFramer(True, False), resp)
        except h11.LocalProtocolError:
            send_response(sock, _PlainFramer(True, False), resp)
        _drain(sock)


def _drain(sock, max_bytes: int = 256 * MIB, max_s: float = 5.0) -> None:
    """Read and drop what the client still sends after we refused its request.

    Closing with unread data makes the kernel send a reset, and most clients then
    report "connection reset" instead of our 413; reading it first lets them see it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + max_s
        while max_bytes > 0 and time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            data = sock.recv(1024 * 1024)
            if not data:
                return
            max_bytes -= len(data)
    except OSError:
        pass


def _wait_until(done, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def pick_http_adapter(env=None) -> str:
    """"h11" when h11 imports and IFLOW2API_HTTP does not ask for "stdlib"."""
    env = os.environ if env is None else env
    if h11 is None or env.get("IFLOW2API_HTTP", "").lower() == "stdlib":
        return "stdlib"
    return "h11"


class HTTPServer:
    """A listening socket serving an App in background threads."""

    def __init__(self, app: App, host: str, port: int, limits: Limits, adapter: str = None):
        self.adapter = adapter or pick_http_adapter()
        handler = _H11Handler if self.adapter == "h11" else _StdlibHandler
        self.watcher = DisconnectWatcher()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_Server", (_ThreadingServer,), {"address_family": family})
        try:
            self._server = server_class((host, port), handler, app, limits, self.watcher)
        except OSError:
            self.watcher.close()
            raise
        self.host, self.limits = host, limits  # limits: read per request, may change in place
        self.port = self._server.server_address[1]
        self._thread = None

    @property
    def url(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "http://%s:%d" % (host, self.port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="iflow2api-http-%d" % self.port, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0, grace_s: float = 0.0) -> None:
        """Stop accepting at once; let requests being answered finish for up to grace_s,
        then cut their streams with an error event; close every connection."""
        app = self._server.app
        app.stopping = True
        self._server.shutdown()
        self._server.server_close()
        _wait_until(lambda: app.active_count == 0, grace_s)
        if app.active_count:
            app.abort_active("the server is shutting down")
            _wait_until(lambda: app.active_count == 0, 2.0)  # time to write the error events
        self._server.close_all_connections()
        self.watcher.close()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def connection_count(self) -> int:
        return self._server.connection_count


# == 8. Routes: OpenAI, Anthropic and Responses APIs, health, models, static files, OpenAPI =======
# Every public endpoint is registered in Api.router(), one table. Handlers turn
# a Request into a Response using the upstream (section 5) and translation
# (section 3). Tests: tests/integration/test_openai_api.py.

NO_CREDENTIALS_MESSAGE = (
    "no iFlow credentials: run `iflow2api login` (browser), `iflow2api login --api-key`, or use the "
    "Accounts page of the web admin (/admin) or of the desktop app; or put \"api_key\" in %s; then retry")


class ConcurrencyLimiter:
    """At most `limit` upstream calls at once; others wait up to timeout_s, then 429.
    Both can change while requests run (a config change reaches a running server)."""

    def __init__(self, limit: int, timeout_s: float):
        self.limit, self.timeout_s = limit, timeout_s
        self._free = threading.Condition(threading.Lock())
        self.in_flight = 0
        self.waiting = 0
        self.rejected = 0

    def resize(self, limit: int, timeout_s: float) -> None:
        with self._free:
            self.limit, self.timeout_s = limit, timeout_s
            self._free.notify_all()  # a larger limit lets waiting requests in at once

    def acquire(self):
        """A release function for the taken slot; RateLimitError after the wait."""
        with self._free:
            if self.in_flight >= self.limit:
                self.waiting += 1
                try:
                    ok = self._free.wait_for(lambda: self.in_flight < self.limit, self.timeout_s)
                finally:
                    self.waiting -= 1
                if not ok:
                    self.rejected += 1
                    raise RateLimitError("too many concurrent requests (limit %d); retry shortly" % self.limit,
                                         headers=[("retry-after", "1")])
            self.in_flight += 1
        released = []

        def release():
            if not released:
                released.append(True)
                with self._free:
                    self.in_flight -= 1
                    self._free.notify()
        return release


class Stats:
    """Request counters and latencies for /health, the status snapshot and the admin."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.by_model = collections.Counter()
        self.by_provider = collections.Counter()
        self.by_account = collections.Counter()
        self.latencies_ms = collections.deque(maxlen=1000)

    def record(self, status: int, info: dict, ms: float) -> None:
        with self._lock:
            self.requests += 1
            if status >= 400:
                self.errors += 1
            self.input_tokens += int(info.get("input_tokens") or 0)
            self.output_tokens += int(info.get("output_tokens") or 0)
            for counter, key in ((self.by_model, "model"), (self.by_provider, "provider"),
                                 (self.by_account, "account")):
                if info.get(key):
                    counter[info[key]] += 1
            if info.get("model"):  # upstream calls only: health checks would skew the numbers
                self.latencies_ms.append(ms)

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "errors": self.errors, "input_tokens": self.input_tokens,
                    "output_tokens": self.output_tokens, "by_model": dict(self.by_model),
                    "by_provider": dict(self.by_provider), "by_account": dict(self.by_account),
                    "latencies_ms": list(self.latencies_ms)}


def latency_summary(latencies_ms: list) -> dict:
    """avg, p50 and p95 of request durations (ms), rounded; zeros when there are none."""
    if not latencies_ms:
        return {"avg": 0, "p50": 0, "p95": 0}
    ordered = sorted(latencies_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"avg": round(sum(ordered) / len(ordered), 1), "p50": round(pick(0.5), 1), "p95": round(pick(0.95), 1)}


_LIVE_ACCOUNT_FIELDS = ("id", "status", "message", "cooldown_s", "requests", "errors")


class Api:
    """The HTTP API of one server instance."""

    def __init__(self, config: Config, backend: Backend, limiter: ConcurrencyLimiter, stats: Stats,
                 client_keys: ClientKeys, adapter: str, clock=time.monotonic, quota: DailyQuota = None):
        self.config, self.backend, self.limiter, self.stats = config, backend, limiter, stats
        self.quota = quota or DailyQuota(config)
        self.credentials = backend.credentials
        self.client_keys, self.adapter, self.clock = client_keys, adapter, clock
        self.started_at = clock()
        self.image_resolver = None  # socket.getaddrinfo; tests inject one (no lookups leave the machine)
        self.stored_responses = ResponseStore()
        self.extra_endpoints = {}  # what route sets over the same server add (the web admin's pages)

    def router(self) -> Router:
        r = Router()
        r.add("GET", "/", self.root)
        r.add("GET", "/health", self.health)
        for path in ("/v1/models", "/models"):
            r.add("GET", path, self.list_models)
        for prefix in ("/v1", ""):  # ids may hold a "/" (provider/model)
            r.add("GET", prefix + "/models/{model_id:.+}", self.get_model)
        r.add("GET", "/v1/vision-models", self.list_vision_models)
        for path in ("/v1/chat/completions", "/v1/chat/completions/", "/chat/completions",
                     "/chat/completions/", "/api/v1/chat/completions", "/api/v1/chat/completions/"):
            r.add("POST", path, self.chat_completions)
        for path in ("/v1/messages", "/v1/messages/", "/messages", "/messages/", "/api/v1/messages",
                     "/api/v1/messages/"):
            r.add("POST", path, self.messages, "anthropic")
        for path in ("/v1/messages/count_tokens", "/messages/count_tokens"):
            r.add("POST", path, self.count_tokens, "anthropic")
        for path in ("/", "/v1", "/v1/"):
            r.add("POST", path, self.root_post)
        r.add("POST", "/api/event_logging/batch", self.telemetry, "anthropic")
        for prefix in ("/v1", ""):
            r.add("POST", prefix + "/responses", self.responses)
            r.add("GET", prefix + "/responses/{response_id}", self.get_response)
            r.add("DELETE", prefix + "/responses/{response_id}", self.delete_response)
            r.add("GET", prefix + "/responses/{response_id}/input_items", self.response_input_items)
        return r

    def head_check(self, method: str, path: str, headers, has_body: bool) -> None:
        """Before a body is read: the Host name (DNS rebinding), and the client key
        of any request that brings a body to the API (not the admin: it checks its session)."""
        host = headers.get("host")
        if host is not None and not self.client_keys.host_allowed(host):
            raise Iflow2apiError("host name %r is not served here; add it to allowed_hosts to allow it"
                                 % host_name_of(host)[:100], status=403, code="host_not_allowed",
                                 openai_type="permission_error", anthropic_type="permission_error")
        if has_body and not path.startswith("/admin/"):
            self.client_keys.check(headers)

    # -- small endpoints -------------------------------------------------------

    def root(self, req: Request) -> Response:
        endpoints = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages",
                     "count_tokens": "/v1/messages/count_tokens", "responses": "/v1/responses",
                     "models": "/v1/models", "health": "/health"}
        endpoints.update(self.extra_endpoints)
        return Response.json({"name": "iflow2api", "version": __version__, "status": "running",
                              "endpoints": endpoints})

    def health(self, req: Request) -> Response:
        accounts = [a for route in self.backend.routes.values() for a in route.accounts.accounts()]
        has_key = any(a.has_key for a in accounts)
        body = {
            "status": "ok" if has_key else "no_credentials",
            "version": __version__,
            "uptime_s": round(self.clock() - self.started_at, 1),
            "credentials": {"present": has_key, "auth_type": self.credentials.auth_type or None},
            "upstream": self.credentials.base_url,
            "providers": list(self.backend.routes),
            "http_adapter": self.adapter,
            "concurrency": {"limit": self.limiter.limit, "in_flight": self.limiter.in_flight,
                            "waiting": self.limiter.waiting, "rejected": self.limiter.rejected},
            "accounts": {"total": len(accounts),
                         "usable": sum(1 for a in accounts if a.usable(time.time()))},
            "requests": self.stats.snapshot()["requests"],
            "routing": {"scenarios": {k: v for k, v in (self.config.get("scenario_routes") or {}).items()},
                        "model_routes": len(self.config.get("model_routes") or {})},
            "update": self.backend.update.notice(),
        }
        if req.client and req.client[0] in _LOOPBACK_CLIENTS:  # `iflow2api accounts` shows the live state
            now = time.time()
            body["accounts"]["live"] = [{k: v for k, v in a.snapshot(now).items() if k in _LIVE_ACCOUNT_FIELDS}
                                        for a in self.backend.accounts.accounts()]
        if not has_key:
            body["message"] = NO_CREDENTIALS_MESSAGE % self.config.path
        return Response.json(body)

    def _model_entries(self) -> list:
        """Every provider's models, then the Claude aliases of model_map (translation.md 6.3:
        clients that check a name against the list accept them)."""
        entries = [_model_entry(model_id, display, owner)
                   for model_id, display, owner in self.backend.public_model_ids()]
        listed = {e["id"] for e in entries}
        for alias, target in sorted(self.config["model_map"].items()):
            if alias not in listed:
                entries.append(_model_entry(alias, "%s (%s)" % (alias, target), "iflow2api"))
        return entries

    def list_models(self, req: Request) -> Response:
        self.client_keys.check(req.headers)
        data = self._model_entries()
        return Response.json({"object": "list", "data": data, "has_more": False,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})

    def list_vision_models(self, req: Request) -> Response:
        self.client_keys.check(req.headers)
        default = self.backend.default_route
        data = [_model_entry((m if route is default else route.name + "/" + m), d, route.name)
                for route in self.backend.routes.values() for m, d, kind in route.catalogue.models()
                if kind == "vision"]
        return Response.json({"object": "list", "data": data})

    def get_model(self, req: Request) -> Response:
        self.client_keys.check(req.headers)
        model_id = urllib.parse.unquote(req.params["model_id"])  # SDKs send "p2%2Fmodel"
        for entry in self._model_entries():
            if entry["id"] == model_id:
                return Response.json(entry)
        raise NotFoundError("model %r not found" % model_id, code="model_not_found")

    # -- chat completions ------------------------------------------------------

    def _admit_client(self, req: Request, route: str) -> None:
        """The client key (its id goes in the log and the usage history) and its daily quota;
        from here on the request is one of the route's (a refused one too)."""
        req.log["route"] = route
        req.log["client_key"] = self.client_keys.check(req.headers)
        self.quota.check(req.log["client_key"])

    def chat_completions(self, req: Request) -> Response:
        self._admit_client(req, "openai")
        return self.chat(req, req.json())

    def chat(self, req: Request, body) -> Response:
        """A chat completion for an already authorised caller (the admin playground too)."""
        with client_input_errors():
            body = validate_chat_request(body)
            client_model = body.get("model") or self.backend.default_model()
            req.log.update(route="openai", model_asked=client_model)
            has_images = openai_has_images(body)
            name = self._routing_name(req, client_model, has_images, bool(body.get("reasoning_effort")),
                                      lambda: _estimate_openai_body(body))
            route, upstream_model = self._route(name, has_images)

        def attempt(route, upstream_model):
            call = dict(body, model=upstream_model)
            if route.quirks.get("inline_image_urls"):
                with client_input_errors():
                    call = inline_image_urls(call, self._image_fetcher(route).fetch)
            return self._chat_call(req, call, route, client_model)
        return self._with_fallbacks(req, route, upstream_model, attempt)

    def _chat_call(self, req: Request, body: dict, route, client_model: str) -> Response:
        """One upstream call of a chat completion; a stream's first piece is read here, so a
        failure before it is still an HTTP error (and worth a fallback)."""
        is_stream, upstream_model = bool(body.get("stream")), body["model"]
        upstream, release = _watched(req, *self._open_upstream(body, route, req.log))
        renamed = client_model if client_model != upstream_model else None
        if is_stream and "text/event-stream" in upstream.content_type:
            return self._stream_response(req, upstream, release, renamed)
        raw = _read_all(upstream, release)
        result = _parse_completion(raw)
        _log_usage(req, result.get("usage"))
        if renamed:
            result["model"] = renamed
        if is_stream:  # the upstream answered a stream request with one JSON body
            chunks = completion_to_chunks(result)
            return _sse_response(b"".join(encode_sse_data(json.dumps(c, ensure_ascii=False))
                                          for c in chunks) + encode_sse_data("[DONE]"))
        messages = [choice["message"] for choice in result["choices"]
                    if isinstance(choice, dict) and isinstance(choice.get("message"), dict)]
        if not renamed and not any(map(carries_reasoning, messages)) and _is_utf8_object(raw):
            # Nothing to change: the body as it came (encoding it again was 4% of the request's work)
            return Response(200, raw, [("content-type", "application/json")])
        preserve = self.config.get("preserve_reasoning_content")
        for message in messages:
            normalize_reasoning_message(message, preserve)
        return Response.json(result)

    def _routing_name(self, req: Request, client_model: str, has_images=False, thinking=False,
                      estimate=lambda: 0) -> str:
        """The name routing resolves, the same on every route (translation.md 1.1), and the
        rule that chose it in req.log: "provider/model" and model_routes names as sent;
        then a scenario route (Claude Code's request kinds); then model_map (Claude names
        and tiers), so the names /v1/models lists are accepted everywhere."""
        routes, config = self.backend.routes, self.config
        if split_provider(client_model, routes)[0]:
            req.log["rule"] = "provider"
            return client_model
        if client_model in (config.get("model_routes") or {}):
            req.log["rule"] = "model_routes"
            return client_model
        scenario = pick_scenario(config.get("scenario_routes"), client_model, config["model_map"], has_images,
                                 thinking, estimate, config["long_context_tokens"])
        if scenario is not None:
            req.log["rule"] = "scenario:" + scenario[0]
            return scenario[1]
        known_by_route = [route.catalogue.known_ids() for route in routes.values()]
        known = known_by_route[0] if len(known_by_route) == 1 else frozenset().union(*known_by_route)
        name = resolve_model(client_model, config["model_map"], known, config.get("default_model") or DEFAULT_MODEL)
        req.log["rule"] = "model" if name == client_model else "model_map"
        return name

    def _route(self, model: str, has_images: bool):
        """(route, upstream model); requests with images for a text-only model go to
        the vision model, or get a 400, as vision_fallback says."""
        route, upstream_model = self.backend.resolve(model)
        if not has_images or route.model_info(upstream_model)["vision"]:
            return route, upstream_model
        if self.config["vision_fallback"] == "reject" or not self.config["vision_model"]:
            raise InvalidRequestError("model %s does not accept images; send text only or pick a vision model "
                                      "(%s)" % (upstream_model, self.config["vision_model"] or "none set"))
        vision_route, vision_model = self.backend.resolve(self.config["vision_model"])
        log.info("request has images: %s -> %s", upstream_model, _log_model(vision_route, vision_model))
        return vision_route, vision_model

    def _with_fallbacks(self, req: Request, route, model: str, attempt):
        """attempt(route, model) -> an answer, first for (route, model), then for its fallbacks
        (config fallbacks) while the failure came before anything reached the client and is
        worth another model: 429, 5xx, a timeout or broken connection, a context too long.
        At most fallback_attempts calls, none started after fallback_deadline_s. The models
        tried are in the log and the usage history (chain)."""
        chain = [(route, model)] + self.backend.fallback_targets(route, model)
        chain = chain[:self.config["fallback_attempts"]]
        deadline = self.clock() + self.config["fallback_deadline_s"]
        tried = []
        for number, (route, model) in enumerate(chain):
            tried.append("%s/%s" % (route.name, model))
            req.log["model"], req.log["model_used"] = _log_model(route, model), model
            if len(tried) > 1:
                req.log["chain"] = " > ".join(tried)
            try:
                return attempt(route, model)
            except (UpstreamError, UpstreamTimeoutError) as exc:
                if number + 1 == len(chain) or self.clock() > deadline or not _worth_another_model(exc):
                    raise
                log.warning("%s: %s failed before answering (%s); trying %s/%s", req.id, tried[-1], exc,
                            chain[number + 1][0].name, chain[number + 1][1])

    def _image_fetcher(self, route) -> ImageFetcher:
        """A fetcher for one request's images (the cap on their count is per request)."""
        return ImageFetcher(allow_local=bool(route.quirks.get("allow_local_image_urls")),
                            resolver=self.image_resolver)

    def _open_upstream(self, body: dict, route, log_info: dict = None):
        """(upstream response with a 2xx status, function that ends the call once).

        Picks the least busy account (key) of the route; a 429, 401 or 5xx (or a
        failed connection) before any byte reached the client cools that account
        down and tries the next one. A 401 on an OAuth account first gets one
        token refresh."""
        accounts = route.accounts
        first = accounts.pick()  # before a slot is taken: without credentials, 401 at once
        if first is None:
            raise AuthenticationError(_no_credentials_message(route, self.config))
        release_slot = self.limiter.acquire()
        tried, refreshed, last_error = [], set(), None
        try:
            while True:
                account = accounts.pick(exclude=tried) if tried else first
                if account is None:
                    raise last_error or AuthenticationError(_no_credentials_message(route, self.config))
                end_account = accounts.begin(account)
                used_key = account.api_key
                if log_info is not None:
                    log_info["provider"], log_info["account"] = route.name, account.id
                try:
                    url, headers, data = route.provider.prepare(body, account)
                    upstream = self.backend.pool.request("POST", url, headers, data)
                except UpstreamTimeoutError:
                    end_account(False)
                    raise
                except UpstreamError as exc:
                    end_account(False)
                    accounts.cool_down(account, self.config["account_cooldown_s"], str(exc))
                    tried.append(account.id)
                    last_error = exc
                    continue
                if 200 <= upstream.status < 300:
                    return upstream, _once(lambda: (end_account(True), release_slot()))
                if upstream.status == 407 and self.backend.pool.proxy is not None:
                    _read_all(upstream)
                    end_account(False)
                    raise UpstreamError(502, "api_error", "the upstream proxy %r refused the login: check "
                                        "user:password in upstream_proxy" % self.backend.pool.proxy)
                exc = upstream_error(upstream.status, _read_all(upstream), upstream.headers)
                if route.kind == "iflow":
                    exc = _with_login_hint(exc)
                end_account(False)
                next_step = self._after_upstream_error(accounts, account, upstream.status, exc, refreshed,
                                                       used_key)
                if next_step == "stop":
                    raise exc
                if next_step == "next":
                    tried.append(account.id)
                last_error = exc
        except BaseException:
            release_slot()
            raise

    def _after_upstream_error(self, accounts, account: Account, status: int, exc: UpstreamError,
                              refreshed: set, refused_key: str) -> str:
        """"same" (retry this account), "next" (another account) or "stop" (answer the error)."""
        if status == 401:
            if account.id not in refreshed and account.is_oauth:
                refreshed.add(account.id)
                if self.backend.refresher.refresh_now(account, refused_key=refused_key):
                    return "same"  # with its new key
            accounts.mark(account, "auth_failed", "the upstream refused this account's key: "
                                                  "log in again or replace the key")
            return "next"
        if status == 429:
            seconds = parse_retry_after(exc.retry_after) or self.config["account_cooldown_s"]
            accounts.cool_down(account, seconds, str(exc))
            return "next"
        if status >= 500:
            accounts.cool_down(account, self.config["account_cooldown_s"], str(exc))
            return "next"
        return "stop"

    def _stream_response(self, req: Request, upstream: UpstreamResponse, release, renamed=None) -> Response:
        """Relay the upstream SSE stream; an error in the first event is still an HTTP error."""
        try:
            first = upstream.read_some()
            if not first:
                raise UpstreamStreamError("the upstream closed the stream before sending anything")
        except BaseException as exc:
            upstream.close()
            release()
            raise _before_first_byte(exc) from None
        if b'"choices"' not in first[:4096] and (b'"error"' in first or b'"msg"' in first):
            for _event, data in SSEParser().feed(first + b"\n\n"):
                problem = _error_in_body(data)
                if problem is not None:
                    upstream.close()
                    release()
                    raise problem
        merger = ReasoningMerger(self.config.get("preserve_reasoning_content"))
        relayed = self._relay(req, upstream, release, first, merger)
        return _sse_response(_renamed_model(relayed, renamed) if renamed else relayed)

    def _relay(self, req, upstream, release, first: bytes, merger):
        """Forward upstream bytes as they arrive; only rewrite events that need it."""
        parser, splitter = SSEParser(), EventSplitter()
        older, previous, data = b"", b"", first
        try:
            try:
                while data:
                    try:
                        events = splitter.feed(data)
                    except ValueError as exc:
                        raise UpstreamStreamError(str(exc)) from None
                    out = _rewrite_events(events, parser, merger) if merger.wants(events) else events
                    if out:
                        yield out
                    older, previous = previous, data
                    data = upstream.read_some()
                if splitter.pending:
                    yield _rewrite_events(splitter.pending + b"\n\n", parser, merger)
            except (OSError, http.client.HTTPException) as exc:
                message = stream_failure_message(exc)
                req.log["error"] = message
                yield encode_sse_data(json.dumps({"error": {"message": message, "type": "server_error",
                                                            "code": "upstream_error"}}))
        finally:
            upstream.close()
            release()
            # Usage comes in the last chunks: look only there, once, at the end.
            _log_usage(req, last_usage_in_stream(older + previous + data))


    # -- Anthropic Messages ----------------------------------------------------

    def messages(self, req: Request) -> Response:
        """POST /v1/messages: translate to the upstream's OpenAI API and back.

        The upstream is always called with stream=true (translation.md 3.11), so
        streaming and non-streaming clients share one state machine."""
        self._admit_client(req, "anthropic")
        body = req.json()
        req.log.update(route="anthropic", model_asked=body.get("model") if isinstance(body, dict) else None)
        with client_input_errors():
            ctx = self._anthropic_context(req, body)
            openai_body = anthropic_to_openai_request(body, ctx)
            if ctx.route.quirks.get("inline_image_urls"):
                openai_body = inline_image_urls(openai_body, self._image_fetcher(ctx.route).fetch)
        req.log["model"], req.log["model_used"] = _log_model(ctx.route, ctx.upstream_model), ctx.upstream_model
        is_stream = body.get("stream") is True
        stream = AnthropicStream(ctx)
        def rebuild(route, model):
            _retarget(ctx, route, model)
            with client_input_errors():
                again = anthropic_to_openai_request(body, ctx)
                if route.quirks.get("inline_image_urls"):
                    again = inline_image_urls(again, self._image_fetcher(route).fetch)
            return again
        reader, events, finish = self._translated_call(req, ctx, openai_body, stream,
                                                       ANTHROPIC_FAST if is_stream else None, rebuild)
        headers = [("request-id", req.id)]
        if is_stream:
            return Response(200, headers=headers + _SSE_HEADERS,
                            stream=self._anthropic_events(req, reader, stream, events, finish))
        finish()
        return Response.json(aggregate_stream_to_message(events), headers=headers)

    def _translated_call(self, req: Request, ctx, openai_body: dict, stream, fast: FastPath = None,
                         rebuild=None):
        """The upstream call of a translated route (/v1/messages, /v1/responses), with its
        fallbacks: rebuild(route, model) translates the request again for another model."""
        first = (ctx.route, ctx.upstream_model)

        def attempt(route, model):
            body = openai_body
            if (route, model) != first:
                body = rebuild(route, model)
                stream.restart()
            return self._translated_attempt(req, ctx, body, stream, fast)
        return self._with_fallbacks(req, ctx.route, ctx.upstream_model, attempt)

    def _translated_attempt(self, req: Request, ctx, openai_body: dict, stream, fast: FastPath = None):
        """One upstream call of a translated route: always streamed upstream (translation.md
        3.11), its answer fed into stream until the stream started (a streaming client: fast
        says how its events are sent) or ended (not streaming). (reader, events so far,
        finish); a failure before anything reached the client raises as an HTTP error."""
        is_stream = fast is not None
        openai_body["stream"] = True
        if ctx.flag("stream_usage"):
            openai_body["stream_options"] = {"include_usage": True}
        upstream, release = _watched(req, *self._open_upstream(openai_body, ctx.route, req.log))

        def finish():
            upstream.close()
            release()
            _log_stream_usage(req, stream)
            _log_translation_notes(req, ctx)

        reader = None
        try:
            if "text/event-stream" in upstream.content_type:
                reader = ChunkReader(upstream)
                events = _until_started(reader, stream, ANTHROPIC_START_AFTER_S if is_stream else None,
                                        self.clock, fast)
            else:  # one JSON body: replay it through the same state machine
                events = _feed_items(stream, completion_to_chunks(_parse_completion(_read_all(upstream)))
                                     + [ChunkReader.DONE])
            if not is_stream:
                while reader is not None and not stream.state.done:
                    events += _feed_items(stream, reader.next(None))
        except BaseException as exc:
            finish()  # nothing was sent yet: an HTTP error, not an SSE one
            raise _before_first_byte(exc) from None
        return reader, events, finish

    def _anthropic_events(self, req, reader, stream, events, finish):
        """The SSE body of a streaming /v1/messages answer, with pings while the upstream is silent."""
        silent_s = 0.0
        try:
            if events:
                yield ANTHROPIC_FAST.join(events)
            while reader is not None and not stream.state.done:
                try:
                    items = reader.next(ANTHROPIC_PING_S)
                    if items is None:
                        silent_s += ANTHROPIC_PING_S
                        if silent_s >= self.config["upstream_read_timeout_s"]:
                            raise socket.timeout("no data for %.0f s" % silent_s)
                        out = ANTHROPIC_FAST.join([PING_EVENT])
                    else:
                        silent_s = 0.0
                        out = b"".join(_feed_items(stream, items, ANTHROPIC_FAST))  # all encoded
                except (OSError, http.client.HTTPException) as exc:
                    message = stream_failure_message(exc)
                    req.log["error"] = message
                    out = ANTHROPIC_FAST.join(stream.fail("api_error", message))
                if out:
                    yield out
        finally:
            finish()

    # -- OpenAI Responses (Codex CLI) ---------------------------------------------

    def responses(self, req: Request) -> Response:
        """POST /v1/responses: the Responses API over the upstream's chat completions.

        Like /v1/messages, the upstream is always asked to stream, and one state machine
        serves streaming and non-streaming clients. store (the API's default) keeps the
        answer for GET and for a later previous_response_id."""
        self._admit_client(req, "responses")
        return self.respond(req, req.json())

    def respond(self, req: Request, body) -> Response:
        """A Responses answer for an already authorised caller (the admin playground too)."""
        with client_input_errors():
            if not isinstance(body, dict):
                raise InvalidRequestError("request body must be a JSON object")
            req.log.update(route="responses", model_asked=body.get("model"))
            history = self.stored_responses.history(body.get("previous_response_id"))
            ctx = self._responses_context(req, body)
            openai_body = responses_to_openai_request(_with_history(body, history), ctx)
            if ctx.route.quirks.get("inline_image_urls"):
                openai_body = inline_image_urls(openai_body, self._image_fetcher(ctx.route).fetch)
        req.log["model"], req.log["model_used"] = _log_model(ctx.route, ctx.upstream_model), ctx.upstream_model
        is_stream = body.get("stream") is True
        stream = ResponsesStream(ctx)
        keep = _stored_input(body, history) if body.get("store", True) is not False else None
        def rebuild(route, model):
            _retarget(ctx, route, model)
            with client_input_errors():
                again = responses_to_openai_request(_with_history(body, history), ctx)
                if route.quirks.get("inline_image_urls"):
                    again = inline_image_urls(again, self._image_fetcher(route).fetch)
            return again
        reader, events, finish = self._translated_call(req, ctx, openai_body, stream,
                                                       RESPONSES_FAST if is_stream else None, rebuild)
        if is_stream:
            return Response(200, headers=list(_SSE_HEADERS),
                            stream=self._responses_events(req, reader, stream, events, finish, keep))
        finish()
        final = _final_response(stream)
        if final.get("status") == "failed":
            error = final.get("error") or {}
            raise UpstreamError(502, "api_error", error.get("message") or "the upstream failed",
                                openai_code=error.get("code"))
        if keep is not None:
            self.stored_responses.put(final, keep)
        return Response.json(final)

    def _responses_events(self, req, reader, stream, events, finish, keep):
        """The SSE body of a streaming /v1/responses answer; a comment line keeps a silent
        connection open; an upstream failure becomes response.failed, never a silent end."""
        silent_s = 0.0
        try:
            if events:
                yield RESPONSES_FAST.join(events)
            while reader is not None and not stream.state.done:
                try:
                    items = reader.next(ANTHROPIC_PING_S)
                    if items is None:
                        silent_s += ANTHROPIC_PING_S
                        if silent_s >= self.config["upstream_read_timeout_s"]:
                            raise socket.timeout("no data for %.0f s" % silent_s)
                        yield b": keep-alive\n\n"
                        continue
                    silent_s = 0.0
                    events = _feed_items(stream, items, RESPONSES_FAST)  # all encoded
                except (OSError, http.client.HTTPException) as exc:
                    message = stream_failure_message(exc)
                    req.log["error"] = message
                    events = stream.fail(message)
                if events:
                    yield RESPONSES_FAST.join(events)
            if keep is not None:
                self.stored_responses.put(_final_response(stream), keep)
        finally:
            finish()

    def _responses_context(self, req: Request, body: dict) -> TranslationContext:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidRequestError("model: expected a string")
        name = model or self.backend.default_model()
        has_images = responses_has_images(body)
        reasoning = body.get("reasoning")
        thinking = isinstance(reasoning, dict) and reasoning.get("effort") not in (None, "none", "minimal")
        route, upstream_model = self._route(
            self._routing_name(req, name, has_images, thinking, lambda: estimate_text_tokens(json.dumps(body.get("input")))),
            has_images)
        ctx = ResponsesContext(client_model=name, upstream_model=upstream_model, new_id=new_random_id,
                               profile=route.profile(upstream_model), model_info=route.model_info(upstream_model),
                               preserve_reasoning=self.config["preserve_reasoning_content"],
                               created_at=int(time.time()))
        ctx.route = route
        return ctx

    def get_response(self, req: Request) -> Response:
        self.client_keys.check(req.headers)
        return Response.json(self.stored_responses.get(req.params["response_id"])[0])

    def response_input_items(self, req: Request) -> Response:
        self.client_keys.check(req.headers)
        items = self.stored_responses.get(req.params["response_id"])[1]
        return Response.json({"object": "list", "data": items, "has_more": False,
                              "first_id": None, "last_id": None})

    def delete_response(self, req: Request) -> Response:
        self.client_keys.check(req.headers)
        response_id = req.params["response_id"]
        self.stored_responses.delete(response_id)
        return Response.json({"id": response_id, "object": "response.deleted", "deleted": True})

    def count_tokens(self, req: Request) -> Response:
        """POST /v1/messages/count_tokens: a local estimate, never an upstream call."""
        self.client_keys.check(req.headers)
        body = req.json()
        with client_input_errors():
            if not isinstance(body, dict):
                raise TranslationError("request body must be a JSON object")
            _validated_messages(body)  # the same messages checks (and words) as /v1/messages
            return Response.json({"input_tokens": estimate_tokens_anthropic(body)})

    def telemetry(self, req: Request) -> Response:
        """Claude Code's event logging: refused fast, never proxied (translation.md 6.2)."""
        raise NotFoundError("telemetry is not collected here")

    def root_post(self, req: Request) -> Response:
        """POST / and /v1: chat completions or messages, by the shape of the request."""
        if _looks_like_anthropic(req):
            req.dialect = "anthropic"
            return self.messages(req)
        return self.chat_completions(req)

    def _anthropic_context(self, req: Request, body) -> TranslationContext:
        if not isinstance(body, dict):
            raise InvalidRequestError("request body must be a JSON object")
        _validated_messages(body)  # before routing reads them (images decide the route)
        client_model = body.get("model")
        if not isinstance(client_model, str) or not client_model.strip():
            raise InvalidRequestError("model: Field required")
        has_images = anthropic_has_images(body)
        thinking = isinstance(body.get("thinking"), dict) and body["thinking"].get("type") in ("enabled", "adaptive")
        name = self._routing_name(req, client_model, has_images, thinking, lambda: estimate_tokens_anthropic(body))
        route, upstream_model = self._route(name, has_images)
        ctx = TranslationContext(client_model=client_model, upstream_model=upstream_model,
                                 new_id=new_random_id, profile=route.profile(upstream_model),
                                 model_info=route.model_info(upstream_model),
                                 preserve_reasoning=self.config["preserve_reasoning_content"])
        ctx.route = route
        return ctx

# -- Responses: stored answers --------------------------------------------------------------------

class ResponseStore:
    """Responses kept for GET /v1/responses/{id} and previous_response_id: in memory,
    bounded in count, bytes and age (the oldest go first). Each entry is the response
    object and the input items that led to it, so a follow-up can replay the turns."""

    def __init__(self, max_count: int = 256, max_bytes: int = 64 * MIB, ttl_s: float = 3600.0,
                 clock=time.monotonic):
        self.max_count, self.max_bytes, self.ttl_s, self.clock = max_count, max_bytes, ttl_s, clock
        self._entries = collections.OrderedDict()  # id -> (stored at, size, response, input items)
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict, input_items: list) -> None:
        response_id = response.get("id")
        if not response_id:
            return
        size = len(compact_json(response)) + len(compact_json(input_items))
        if size > self.max_bytes:
            return  # larger than the whole store: not kept
        with self._lock:
            self._drop(response_id)
            self._entries[response_id] = (self.clock(), size, response, input_items)
            self._bytes += size
            while len(self._entries) > self.max_count or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def get(self, response_id: str):
        """(response, input items); NotFoundError when unknown, deleted or expired."""
        with self._lock:
            self._expire()
            entry = self._entries.get(response_id)
        if entry is None:
            raise NotFoundError("no stored response %r (responses are kept in memory for %d minutes, and "
                                "only when the request had store: true)" % (str(response_id)[:100],
                                                                             self.ttl_s // 60),
                                code="response_not_found")
        return entry[2], entry[3]

    def history(self, response_id) -> list:
        """The input and output items of a stored response, for previous_response_id ([] for None)."""
        if response_id is None:
            return []
        if not isinstance(response_id, str):
            raise InvalidRequestError("previous_response_id: expected a string")
        response, input_items = self.get(response_id)
        return list(input_items) + list(response.get("output") or [])

    def delete(self, response_id: str) -> None:
        self.get(response_id)  # 404 when unknown
        with self._lock:
            self._drop(response_id)

    def _expire(self) -> None:
        cutoff = self.clock() - self.ttl_s
        while self._entries and next(iter(self._entries.values()))[0] < cutoff:
            self._drop(next(iter(self._entries)))

    def _drop(self, response_id) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self._bytes -= entry[1]


def _input_as_items(value) -> list:
    """A request's `input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    return list(value) if isinstance(value, list) else []


def _with_history(body: dict, history: list) -> dict:
    """The request with the turns of previous_response_id in front of its input."""
    if not history:
        return body
    return dict(body, input=history + _input_as_items(body.get("input")))


def _stored_input(body: dict, history: list) -> list:
    """The input items a stored response keeps (earlier turns included)."""
    return history + _input_as_items(body.get("input"))


def _final_response(stream) -> dict:
    """The response object of the stream's terminal event (completed, incomplete or failed)."""
    if stream.result is None:
        raise UpstreamError(502, "api_error", "the upstream stream ended without an answer")
    return stream.result


def responses_has_images(body: dict) -> bool:
    """Whether a Responses request carries an input_image part (for vision routing)."""
    for item in body.get("input") if isinstance(body.get("input"), list) else []:
        if isinstance(item, dict) and isinstance(item.get("content"), list):
            if any(isinstance(p, dict) and p.get("type") == "input_image" for p in item["content"]):
                return True
    return False

# -- Anthropic streaming glue ---------------------------------------------------------------------

ANTHROPIC_START_AFTER_S = 10.0  # start the stream anyway when the upstream is silent (3.4)
ANTHROPIC_PING_S = 15.0  # ping while the upstream is silent (3.8)
PING_EVENT = ("ping", {"type": "ping"})
_SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"),
                ("x-accel-buffering", "no")]


class ChunkReader:
    """Upstream SSE as a list of items per read: chunk dicts, DONE or EOF."""

    DONE = "[DONE]"
    EOF = "<eof>"

    def __init__(self, upstream: UpstreamResponse):
        self.upstream = upstream
        self.splitter = EventSplitter()

    def next(self, timeout_s):
        """Items from the next read: each event's data (bytes), DONE or EOF; None when
        nothing came within timeout_s."""
        data = self.upstream.read_some(timeout_s)
        if data is None:
            return None
        try:
            if not data:
                rest = self.splitter.pending
                return (self._items(rest + b"\n\n") if rest.strip() else []) + [self.EOF]
            return self._items(self.splitter.feed(data))
        except ValueError as exc:  # an event over the size cap
            raise UpstreamStreamError(str(exc)) from None

    def _items(self, events: bytes) -> list:
        """The data of complete events. The usual event, one "data:" line, is cut out
        directly; anything else (CR line ends, comments, named or multi-line events)
        goes through the full SSE parser."""
        if b"\r" in events:
            datas = [data.encode("utf-8") for _name, data in SSEParser().feed(events)]
        else:
            datas = []
            for event in events.split(b"\n\n"):
                if event.startswith(b"data:") and b"\n" not in event:
                    datas.append(event[6:] if event[5:6] == b" " else event[5:])
                elif event.strip():
                    datas += [data.encode("utf-8") for _name, data in SSEParser().feed(event + b"\n\n")]
        return [self.DONE if data == b"[DONE]" else data for data in datas]


class FastPath:
    """How a streamed answer of one API is sent: its event encoder, and the template of the
    rule 3.1 fast path (a chunk that only adds text skips the state machine)."""

    def __init__(self, encode, template: bytes):
        self.encode, self.template = encode, template

    def join(self, events) -> bytes:
        """Events as bytes: the ones still a structure encoded, the fast path's as they are."""
        return b"".join(event if event.__class__ is bytes else self.encode(event) for event in events)


ANTHROPIC_FAST = FastPath(encode_anthropic_event, ANTHROPIC_PLAIN_TEXT_EVENT)
RESPONSES_FAST = FastPath(encode_responses_event, RESPONSES_PLAIN_TEXT_EVENT)


def _feed_items(stream, items, fast: FastPath = None) -> list:
    """The stream's events for a reader's items (chunk data bytes, or chunk dicts of a
    replayed answer). With fast (an answer streamed as it goes), the events come back
    encoded, and a chunk that only adds text takes the fast path."""
    events = []
    target = None if fast is None else stream.plain_text_target()
    for item in items:
        if target is not None and item.__class__ is bytes:
            literal = plain_text_literal(item)
            if literal is not None:
                events.append(fast.template % (target + (literal,)))
                target = stream.took_plain_text(literal)
                continue
        if item is ChunkReader.DONE:
            new = stream.close(True)
        elif item is ChunkReader.EOF:
            new = stream.close(False)
        else:
            if isinstance(item, bytes):
                try:
                    item = json.loads(item)
                except ValueError:
                    log.debug("skipping a non-JSON upstream event: %.200r", item)
                    continue
            new = stream.feed(item)
        if fast is not None:
            events += [fast.encode(event) for event in new]
            target = stream.plain_text_target()
        else:
            events += new
    return events


def _until_started(reader: ChunkReader, stream, start_after_s, clock, fast: FastPath = None) -> list:
    """Events up to the stream's start (and the rest of that read). Errors until then
    raise, so they can still become an HTTP status (translation.md 3.4); after
    start_after_s of silence the stream is started anyway. fast: see _feed_items."""
    deadline = None if start_after_s is None else clock() + start_after_s
    events = []
    while not stream.state.started and not stream.state.done:
        items = reader.next(None if deadline is None else max(0.0, deadline - clock()))
        if items is None:
            return events + stream.start()
        events += _feed_items(stream, items, fast)
    return events


def _log_translation_notes(req: Request, ctx: TranslationContext) -> None:
    """What the translation of one request dropped or worked around, with its request id."""
    for message in ctx.notes:
        log.debug("%s: %s", req.id, message)
    for message in ctx.warnings:
        log.warning("%s: %s", req.id, message)
    ctx.notes, ctx.warnings = [], []  # logged once, also when finish() runs twice


def _log_stream_usage(req: Request, stream: AnthropicStream) -> None:
    if stream.state.started:
        req.log["input_tokens"], req.log["output_tokens"] = stream.usage_for_log()


def _looks_like_anthropic(req: Request) -> bool:
    """Whether a POST to / or /v1 is an Anthropic Messages request."""
    if req.headers.get("anthropic-version"):
        return True
    body = req.json()
    return isinstance(body, dict) and ("system" in body or "stop_sequences" in body
                                       or isinstance(body.get("thinking"), dict))


_BYTE_TO_BASE62 = bytes(ord(_BASE62[b % 62]) for b in range(256))
_BIASED_BYTES = bytes(range(4 * 62, 256))  # dropped: they would make "0".."7" likelier


def new_random_id(prefix: str) -> str:
    """prefix + 24 random base62 characters (ids of messages and tool calls). Random bytes
    mapped by one translate(): 0.8 us, where 24 rounds of divmod took 3 (a Responses
    stream makes four ids before its first event)."""
    chars = b""
    while len(chars) < 24:
        chars += os.urandom(32).translate(_BYTE_TO_BASE62, _BIASED_BYTES)
    return prefix + chars[:24].decode("ascii")

def stream_failure_message(exc: BaseException) -> str:
    """What a client is told when a stream breaks after it started: a sentence, not a
    Python exception's repr."""
    if isinstance(exc, UpstreamStreamError):
        return str(exc)
    if isinstance(exc, http.client.IncompleteRead):
        return "upstream stream failed: the upstream closed the stream before it was complete"
    if isinstance(exc, socket.timeout):
        return "upstream stream failed: the upstream sent nothing for too long (upstream_read_timeout_s)"
    if isinstance(exc, ConnectionResetError):
        return "upstream stream failed: the upstream reset the connection"
    return "upstream stream failed: %s" % (exc or type(exc).__name__)


def _before_first_byte(exc: BaseException) -> BaseException:
    """An upstream failure before anything reached the client, as an HTTP error (502/504)."""
    if isinstance(exc, socket.timeout):
        return UpstreamTimeoutError("upstream timed out while answering")
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return UpstreamError(502, "api_error", "upstream stream failed: %s" % (exc or type(exc).__name__))
    return exc


def _rewrite_events(events: bytes, parser: SSEParser, merger: ReasoningMerger) -> bytes:
    return b"".join(encode_sse_data(merger.rewrite(data)) for _event, data in parser.feed(events))


def _sse_response(stream) -> Response:
    body = stream if isinstance(stream, bytes) else b""
    return Response(200, body, list(_SSE_HEADERS), stream=None if isinstance(stream, bytes) else stream)


def _read_all(upstream: UpstreamResponse, release=None) -> bytes:
    try:
        return upstream.read()
    except socket.timeout:
        raise UpstreamTimeoutError("upstream timed out while answering") from None
    except (OSError, http.client.HTTPException) as exc:
        raise UpstreamError(502, "api_error", "upstream connection failed: %s" % exc) from None
    finally:
        upstream.close()
        if release is not None:
            release()


def _is_utf8_object(raw: bytes) -> bool:
    """Whether a body json.loads() accepted is a UTF-8 object as it stands (json.loads also
    takes UTF-16 and UTF-32, whose "{" is followed by a zero byte, and a byte order mark)."""
    return raw[:1] == b"{" and raw[1:2] != b"\x00"


def _parse_completion(raw: bytes) -> dict:
    try:
        result = json.loads(raw)
    except ValueError:
        raise UpstreamError(502, "api_error", "upstream returned a body that is not JSON: %s"
                            % redact(raw[:200].decode("utf-8", "replace"))) from None
    if isinstance(result, dict) and _is_error_body(result):
        raise _with_login_hint(upstream_error(200, result))
    if not isinstance(result, dict) or not isinstance(result.get("choices"), list):
        raise UpstreamError(502, "api_error", "upstream returned no choices")
    return result


_MODEL_FIELD_RE = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')


def _renamed_model(pieces, client_model: str):
    """Stream pieces with every chunk's "model" saying the name the client sent (only used
    when routing changed the name: a stream whose names agree is passed through untouched)."""
    field = b'"model":' + json.dumps(client_model, ensure_ascii=False).encode("utf-8")
    for piece in pieces:
        yield _MODEL_FIELD_RE.sub(lambda _m: field, piece)


def _retarget(ctx, route, model: str) -> None:
    """Point a translation context at another model (a fallback) before translating again."""
    ctx.route, ctx.upstream_model = route, model
    ctx.profile, ctx.model_info = route.profile(model), route.model_info(model)


def _worth_another_model(exc) -> bool:
    """Whether another model may do better: busy, broken, slow, or out of context room."""
    if isinstance(exc, UpstreamTimeoutError):
        return True
    return exc.status in (429, 500, 502, 503, 504, 529) or exc.openai_code == "context_length_exceeded"


def _watched(req: Request, upstream: UpstreamResponse, release):
    """(upstream, release): from now on the client leaving cuts the upstream at once
    (also before the first byte); releasing the call also ends the watch."""
    cancel = req.watch_disconnect(upstream.abort)
    req.abort_callbacks.append(upstream.abort)
    return upstream, _once(lambda: (cancel(), release()))


def _log_model(route, model: str) -> str:
    return model if route.kind == "iflow" else route.name + "/" + model


def _no_credentials_message(route, config: Config) -> str:
    if route.kind == "iflow":
        return NO_CREDENTIALS_MESSAGE % config.path
    return ("provider %s has no API key: add one with `iflow2api providers add %s --api-key KEY` "
            "or set its api_keys in %s" % (route.name, route.name, config.path))


def _once(fn):
    """fn wrapped so that only its first call runs."""
    called = []

    def wrapper():
        if not called:
            called.append(True)
            fn()
    return wrapper


def parse_retry_after(value) -> float:
    """Seconds from a Retry-After header given in seconds (dates are rare upstream); 0 if unusable."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return 0.0


def _error_in_body(data: str):
    """The error carried by one SSE data payload of a 200 answer (iFlow does this), or None."""
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    if isinstance(chunk, dict) and _is_error_body(chunk):
        return _with_login_hint(upstream_error(200, chunk))
    return None


def _with_login_hint(exc: UpstreamError) -> UpstreamError:
    """Tell the user what to do when the upstream refused the iFlow key."""
    if exc.status == 401:
        exc.args = (exc.message + " (the iFlow API key was refused: log in again with the iFlow CLI)",)
    return exc


def _log_usage(req: Request, usage) -> None:
    if isinstance(usage, dict):
        req.log["input_tokens"] = usage.get("prompt_tokens", usage.get("input_tokens"))
        req.log["output_tokens"] = usage.get("completion_tokens", usage.get("output_tokens"))
        details = usage.get("completion_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("reasoning_tokens"), int):
            req.log["reasoning_tokens"] = details["reasoning_tokens"]


def _model_entry(model_id: str, display: str, owner: str = "iflow") -> dict:
    """One model in a shape both the OpenAI and the Anthropic SDK parse."""
    return {"id": model_id, "object": "model", "created": CATALOGUE_CREATED, "owned_by": owner,
            "type": "model", "display_name": display, "created_at": "2025-01-01T00:00:00Z"}


# -- Static files, API docs -----------------------------------------------------------------------

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                  ".ico": "image/x-icon", ".json": "application/json", ".txt": "text/plain; charset=utf-8",
                  ".woff2": "font/woff2"}


def read_resource(relpath: str) -> bytes:
    """Bytes of a file shipped next to this module (static/...), from disk or from the zip."""
    path = os.path.join(_HERE, *relpath.split("/"))
    loader = globals().get("__loader__")
    if loader is not None and hasattr(loader, "get_data"):
        return loader.get_data(path)
    with open(path, "rb") as f:
        return f.read()


def static_response(relpath: str) -> Response:
    """A file under static/ (no way out of it), or 404."""
    parts = [p for p in relpath.split("/") if p]
    if not parts or any(p in (".", "..") or "\\" in p or p.startswith(".") for p in parts):
        raise NotFoundError("no such file")
    try:
        data = read_resource("static/" + "/".join(parts))
    except (OSError, KeyError):
        raise NotFoundError("no such file: /static/%s" % "/".join(parts)) from None
    content_type = _CONTENT_TYPES.get(os.path.splitext(parts[-1])[1].lower(), "application/octet-stream")
    return Response(200, data, [("content-type", content_type), ("cache-control", "no-cache"),
                                ("x-content-type-options", "nosniff")])


# The API docs viewers come from a CDN into the admin's origin: only these exact files
# (static/docs-fallback.js pins the same URLs with their SRI hashes).
DOCS_CDN_FILES = ("https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui-bundle.js",
                  "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui.css",
                  "https://cdn.jsdelivr.net/npm/redoc@2.5.4/bundles/redoc.standalone.js")
DOCS_CSP = ("default-src 'self'; script-src 'self' %s %s; style-src 'self' 'unsafe-inline' %s; "
            "img-src 'self' data:; font-src 'self' data:; worker-src blob:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            % (DOCS_CDN_FILES[0], DOCS_CDN_FILES[2], DOCS_CDN_FILES[1]))


def docs_page(name: str) -> Response:
    """/docs or /redoc: the page, with a policy that lets in only the pinned viewer files."""
    resp = static_response(name)
    resp.headers.append(("content-security-policy", DOCS_CSP))
    return resp


def _schema_ref(name: str) -> dict:
    return {"$ref": "#/components/schemas/%s" % name}


def _json_body(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document() -> dict:
    """The OpenAPI 3.0 description of every public endpoint (served at /openapi.json)."""
    error = {"description": "Error in the API's own format",
             "content": {"application/json": {"schema": _schema_ref("Error")}}}
    stream = {"text/event-stream": {"schema": {"type": "string", "description": "Server-sent events"}}}
    obj = {"type": "object"}
    schemas = {
        "Error": {"type": "object", "description": "OpenAI routes: {error: {...}}; Anthropic routes: "
                                                   "{type: 'error', error: {type, message}}",
                  "properties": {"error": {"type": "object", "properties": {
                      "message": {"type": "string"}, "type": {"type": "string"},
                      "code": {"type": "string", "nullable": True}}},
                      "type": {"type": "string"}}},
        "ChatMessage": {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"nullable": True, "oneOf": [{"type": "string"}, {"type": "array", "items": obj}]},
            "tool_calls": {"type": "array", "items": obj}, "tool_call_id": {"type": "string"}}},
        "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": {
            "model": {"type": "string", "example": "glm-5"},
            "messages": {"type": "array", "minItems": 1, "items": _schema_ref("ChatMessage")},
            "stream": {"type": "boolean"}, "temperature": {"type": "number"}, "top_p": {"type": "number"},
            "max_tokens": {"type": "integer"}, "tools": {"type": "array", "items": obj},
            "tool_choice": {}, "stop": {}}},
        "ChatCompletion": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "message": _schema_ref("ChatMessage"),
                "finish_reason": {"type": "string", "nullable": True}}}},
            "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                       "completion_tokens": {"type": "integer"},
                                                       "total_tokens": {"type": "integer"}}}}},
        "MessagesRequest": {"type": "object", "required": ["model", "messages"], "properties": {
            "model": {"type": "string", "example": "claude-sonnet-4-5"},
            "max_tokens": {"type": "integer"}, "system": {"oneOf": [{"type": "string"},
                                                                    {"type": "array", "items": obj}]},
            "messages": {"type": "array", "items": {"type": "object", "required": ["role", "content"],
                                                    "properties": {"role": {"type": "string",
                                                                            "enum": ["user", "assistant"]},
                                                                   "content": {}}}},
            "stream": {"type": "boolean"}, "tools": {"type": "array", "items": obj}, "tool_choice": obj,
            "thinking": obj, "stop_sequences": {"type": "array", "items": {"type": "string"}},
            "temperature": {"type": "number"}, "top_p": {"type": "number"}}},
        "Message": {"type": "object", "properties": {
            "id": {"type": "string"}, "type": {"type": "string", "enum": ["message"]},
            "role": {"type": "string"}, "model": {"type": "string"},
            "content": {"type": "array", "items": obj},
            "stop_reason": {"type": "string", "nullable": True},
            "stop_sequence": {"type": "string", "nullable": True}, "usage": obj}},
        "TokenCount": {"type": "object", "properties": {"input_tokens": {"type": "integer"}}},
        "ResponsesRequest": {"type": "object", "required": ["model", "input"], "properties": {
            "model": {"type": "string", "example": "glm-5"},
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": obj}]},
            "instructions": {"type": "string"}, "stream": {"type": "boolean"},
            "tools": {"type": "array", "items": obj}, "tool_choice": {}, "parallel_tool_calls": {"type": "boolean"},
            "reasoning": obj, "text": obj, "max_output_tokens": {"type": "integer"},
            "temperature": {"type": "number"}, "top_p": {"type": "number"},
            "store": {"type": "boolean", "description": "keep the answer in memory (GET, previous_response_id)"},
            "previous_response_id": {"type": "string"}}},
        "Response": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["response"]},
            "created_at": {"type": "integer"}, "model": {"type": "string"},
            "status": {"type": "string", "enum": ["completed", "incomplete", "failed", "in_progress"]},
            "output": {"type": "array", "items": obj}, "output_text": {"type": "string"},
            "incomplete_details": {"type": "object", "nullable": True}, "usage": obj}},
        "ResponseDeleted": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string"}, "deleted": {"type": "boolean"}}},
        "ResponseItemList": {"type": "object", "properties": {
            "object": {"type": "string"}, "data": {"type": "array", "items": obj}}},
        "Model": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}, "type": {"type": "string"}, "display_name": {"type": "string"},
            "created_at": {"type": "string"}}},
        "ModelList": {"type": "object", "properties": {
            "object": {"type": "string"}, "data": {"type": "array", "items": _schema_ref("Model")},
            "has_more": {"type": "boolean"}, "first_id": {"type": "string", "nullable": True},
            "last_id": {"type": "string", "nullable": True}}},
        "Health": {"type": "object", "properties": {
            "status": {"type": "string", "enum": ["ok", "no_credentials"]}, "version": {"type": "string"},
            "uptime_s": {"type": "number"}, "message": {"type": "string"}}},
    }

    def operation(summary, tag, request=None, ok=None, streams=False, params=None):
        op = {"summary": summary, "tags": [tag], "responses": {"default": error}}
        if request:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _schema_ref(request)}}}
        if ok:
            response = _json_body(_schema_ref(ok), "Success")
            if streams:
                response["content"].update(stream)
            op["responses"]["200"] = response
        if params:
            op["parameters"] = params
        return op

    model_param = [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    response_param = [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.0.3",
        "info": {"title": "iflow2api", "version": __version__,
                 "description": "OpenAI- and Anthropic-compatible API in front of the iFlow API and "
                                "other OpenAI-compatible providers. Send a client key as "
                                "`Authorization: Bearer` or `x-api-key` when keys are configured."},
        "servers": [{"url": "/"}],
        "paths": {
            "/v1/chat/completions": {"post": operation("Create a chat completion (OpenAI)", "OpenAI",
                                                       "ChatCompletionRequest", "ChatCompletion", True)},
            "/v1/models": {"get": operation("List models (OpenAI and Anthropic shape)", "Models",
                                            ok="ModelList")},
            "/v1/models/{model_id}": {"get": operation("Get one model", "Models", ok="Model",
                                                       params=model_param)},
            "/v1/vision-models": {"get": operation("List vision models", "Models", ok="ModelList")},
            "/v1/messages": {"post": operation("Create a message (Anthropic)", "Anthropic",
                                               "MessagesRequest", "Message", True)},
            "/v1/messages/count_tokens": {"post": operation("Count input tokens (local estimate)",
                                                            "Anthropic", "MessagesRequest", "TokenCount")},
            "/v1/responses": {"post": operation("Create a response (OpenAI Responses API, as Codex CLI uses)",
                                                "OpenAI", "ResponsesRequest", "Response", True)},
            "/v1/responses/{response_id}": {
                "get": operation("Get a stored response", "OpenAI", ok="Response", params=response_param),
                "delete": operation("Delete a stored response", "OpenAI", ok="ResponseDeleted",
                                    params=response_param)},
            "/v1/responses/{response_id}/input_items": {
                "get": operation("The input items of a stored response", "OpenAI", ok="ResponseItemList",
                                 params=response_param)},
            "/health": {"get": operation("Server health", "Service", ok="Health")},
        },
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "a client key (api_keys)"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
        # {} first: keys are needed only when configured (or on a non-loopback bind)
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }

# == 9. Service: instances, status, logs, accounts, providers (the CLI, GUI and admin drive it) ===
# The object the CLI, the admin API and the GUI drive: start/stop server
# instances, status snapshot, recent log lines, config. Tests: tests/integration.

class Instance:
    """One listening server with its own limiter and counters over a shared Backend."""

    def __init__(self, config: Config, name: str = "default", host: str = None, port: int = None,
                 adapter: str = None, backend: Backend = None, route_sets=(), usage=None, quota=None):
        self.name, self.config = name, config
        self.host = host or config["host"]
        self.port = config["port"] if port is None else port
        self.adapter = adapter or pick_http_adapter(config.env)
        self.backend = backend or Backend(config)
        self.accounts = self.backend.accounts
        self.credentials = self.backend.credentials
        self.limiter = ConcurrencyLimiter(config["concurrency"], config["queue_timeout_s"])
        self.stats = Stats()
        self.generated_key = ""  # a client key made for this start (remote bind), shown once
        quota = quota or DailyQuota(config, usage)
        self.api = Api(config, self.backend, self.limiter, self.stats, ClientKeys(config, self.host),
                       self.adapter, quota=quota)
        router = self.api.router()
        head_checks = [self.api.head_check]
        for route_set in route_sets:  # more routes over the same server (the web admin)
            route_set.register(router)
            head_checks.append(route_set.head_check)
            self.api.extra_endpoints.update(route_set.endpoints)
        self.app = App(router, config["cors_allow_origins"], self.stats, head_checks, usage, quota)
        self.server = None

    @property
    def url(self) -> str:
        return self.server.url if self.server else ""

    @property
    def running(self) -> bool:
        return self.server is not None

    def start(self) -> "Instance":
        if self.server is None:
            self.server = HTTPServer(self.app, self.host, self.port, Limits.from_config(self.config),
                                     self.adapter)
            self.port = self.server.port
            self.server.start()
            self.backend.refresher.start()
        return self

    def stop(self, timeout_s: float = 5.0, grace_s: float = 0.0) -> None:
        if self.server is not None:
            self.server.stop(timeout_s, grace_s)
            self.server = None

    def follow_config(self) -> None:
        """Take a changed config: concurrency, the queue wait, server limits and CORS origins
        (where it listens needs a restart: RESTART_KEYS)."""
        self.limiter.resize(self.config["concurrency"], self.config["queue_timeout_s"])
        self.app.cors_origins = list(self.config["cors_allow_origins"] or [])
        if self.server is not None:
            self.server.limits.follow(self.config)

    def status(self) -> dict:
        stats = self.stats.snapshot()
        return {"name": self.name, "running": self.running, "url": self.url, "host": self.host,
                "port": self.port, "http_adapter": self.adapter,
                "credentials": self.backend.has_credentials(), "in_flight": self.limiter.in_flight,
                "requests": stats["requests"], "errors": stats["errors"],
                "input_tokens": stats["input_tokens"], "output_tokens": stats["output_tokens"]}


class Service:
    """Server instances, accounts, login, config and recent logs: the one object
    the CLI, the GUI and the admin API drive."""

    def __init__(self, config: Config = None):
        self.config = config or Config()
        self.backend = Backend(self.config)
        self.instances = {}
        self.log_buffer = RecentLogHandler()
        logging.getLogger("iflow2api").addHandler(self.log_buffer)
        self._lock = threading.RLock()
        self.started_at = time.time()
        # Objects with register(router) and head_check(...) whose routes every instance
        # started from now on serves too (add_web_admin puts the web admin here).
        self.route_sets = []
        self._watch_stop = threading.Event()
        self._watcher = None
        self.usage = UsageStore(usage_db_path(self.config.path),
                                self.config["usage_retention_days"], self.config["usage_max_mb"]) \
            if self.config["usage_history"] else None
        self.quota = DailyQuota(self.config, self.usage)  # one count per key over every instance

    @classmethod
    def from_config(cls, overrides: dict = None, path: str = None, env=None) -> "Service":
        """A service whose config takes `overrides` as its command-line layer."""
        return cls(Config(path=path, env=env, cli=overrides))

    # -- instances --

    def start(self, name: str = "default", host: str = None, port: int = None) -> Instance:
        """Start (or return the running) instance `name`; OSError when the port is taken.

        A remote bind without client keys first gets one generated (instance.generated_key)."""
        with self._lock:
            instance = self.instances.get(name)
            if instance is None or not instance.running:
                generated = ensure_client_key(self.config, host or self.config["host"])
                instance = Instance(self.config, name, host, port, backend=self.backend,
                                    route_sets=self.route_sets, usage=self.usage, quota=self.quota)
                instance.generated_key = generated
                instance.start()
                self.instances[name] = instance
                self._watch_config_file()
            return instance

    def stop(self, name: str = None, timeout_s: float = 5.0, grace_s: float = 0.0) -> None:
        """Stop one instance, or all (and the backend) when name is None; requests being
        answered get up to grace_s to finish (all instances drain at the same time)."""
        with self._lock:
            names = [name] if name else list(self.instances)
            stopping = [self.instances.pop(n) for n in names if n in self.instances]
            threads = [threading.Thread(target=i.stop, args=(timeout_s, grace_s), daemon=True) for i in stopping]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        if name is None:
            self._watch_stop.set()
            if self._watcher is not None:
                self._watcher.join(5)
            if self.usage is not None:
                self.usage.close()
            self.backend.close()
            logging.getLogger("iflow2api").removeHandler(self.log_buffer)

    def status(self) -> dict:
        return {"version": __version__, "config_path": self.config.path,
                "instances": [i.status() for i in self.instances.values()],
                "accounts": self.accounts()}

    def check_for_update(self) -> None:
        """Ask for the newest release when allowed and due (blocks: run it in a thread)."""
        self.backend.update.check()

    def update_notice(self):
        """{"latest", "current", "url"} when a newer release exists, else None."""
        return self.backend.update.notice()

    def default_model(self) -> str:
        return self.backend.default_model()

    def usage_report(self, since: float) -> dict:
        """The usage history since a unix time: {"enabled", "since", "days", "models",
        "providers"} (rows as UsageStore.query gives them); empty lists when it is off."""
        store = self.usage
        report = {"enabled": store is not None, "since": since, "days": [], "models": [], "providers": []}
        if store is not None:
            tables = store.report(since, ("day", "model", "provider"))
            report.update(days=sorted(tables["day"], key=lambda row: row["key"]), models=tables["model"],
                          providers=tables["provider"])
        return report

    def usage_today(self) -> dict:
        """Today's totals (local time) for the desktop app: requests, errors, tokens."""
        days = self.usage_report(start_of_day(time.time()))["days"]
        return {column: sum(day[column] for day in days)
                for column in ("requests", "errors", "input_tokens", "output_tokens")}

    def has_credentials(self) -> bool:
        """Whether some enabled provider has a usable key (an iFlow login, an account or a
        provider key): the GUI shows its sign-in call to action when not."""
        return self.backend.has_credentials()

    def models(self) -> list:
        """[{"id", "name", "provider"}] of every model clients can send ("provider/model"
        for other than the default provider). May ask the upstreams (cached for
        models_cache_s): call it off a UI thread."""
        return [{"id": model_id, "name": display, "provider": owner}
                for model_id, display, owner in self.backend.public_model_ids()]

    def config_keys_set(self) -> list:
        """The keys the config file holds (chosen by the user), as opposed to defaults: the
        GUI follows the OS language until the user picked one."""
        with self.config.lock:
            return sorted(self.config.file_data)

    def recent_logs(self, count: int = 100) -> list:
        return self.log_buffer.lines(count)

    def dashboard(self) -> dict:
        """Totals over every instance, latency, per model/provider/account counters, and lists."""
        totals = {"requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0}
        counters = {"by_model": collections.Counter(), "by_provider": collections.Counter(),
                    "by_account": collections.Counter()}
        latencies = []
        for instance in list(self.instances.values()):
            stats = instance.stats.snapshot()
            for key in totals:
                totals[key] += stats[key]
            for key, counter in counters.items():
                counter.update(stats[key])
            latencies += stats["latencies_ms"]
        out = {"version": __version__, "uptime_s": round(time.time() - self.started_at, 1),
               "keys_required": ClientKeys(self.config).required,
               "latency_ms": latency_summary(latencies), "instances": self.instance_list(),
               "accounts": self.accounts(), "providers": self.providers(),
               "credentials": self.has_credentials(), "update": self.update_notice()}
        out.update(totals)
        out.update({k: dict(v) for k, v in counters.items()})
        return out

    # -- instances defined in config ---------------------------------------------

    def instance_list(self) -> list:
        """Running instances and the configured ones that are stopped."""
        listed = [i.status() for i in self.instances.values()]
        names = {i["name"] for i in listed}
        for entry in self.config.get("instances") or []:
            if isinstance(entry, dict) and entry.get("name") not in names:
                listed.append({"name": entry["name"], "running": False, "url": "",
                               "host": entry.get("host") or self.config["host"], "port": entry.get("port"),
                               "requests": 0, "errors": 0, "in_flight": 0})
        return listed

    def add_instance(self, name: str, host: str = None, port=None) -> dict:
        """Define, save and start one more server instance (another port)."""
        if not _NAME_RE.match(name) or name == "default":
            raise InvalidRequestError("name: 1-40 letters, digits, '_', '-' or '.' (not 'default')")
        if any(isinstance(e, dict) and e.get("name") == name for e in self.config.get("instances") or []):
            raise InvalidRequestError("an instance named %r exists" % name)
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidRequestError("port: a number from 1 to 65535")
        if host is not None and (not isinstance(host, str) or not is_host(host)):
            raise InvalidRequestError("host=%s: expected an IP address or a host name" % _shown(host))
        entry = {"name": name, "host": host or self.config["host"], "port": port}
        instance = self._start_entry(entry)
        self.config.update({"instances": list(self.config.get("instances") or []) + [entry]})
        status = instance.status()
        if instance.generated_key:  # a remote bind made the first client key: show it once
            status["generated_key"] = instance.generated_key
        return status

    def start_instance(self, name: str) -> dict:
        if name in self.instances:
            return self.instances[name].status()
        if name == "default":
            return self.start().status()
        entry = next((e for e in self.config.get("instances") or [] if isinstance(e, dict) and e.get("name") == name),
                     None)
        if entry is None:
            raise NotFoundError("no instance %r" % name)
        return self._start_entry(entry).status()

    def stop_instance(self, name: str) -> None:
        if name not in self.instances:
            raise NotFoundError("instance %r is not running" % name)
        threading.Thread(target=self.stop, args=(name,), daemon=True).start()  # may be the one serving us

    def remove_instance(self, name: str) -> None:
        entries = self.config.get("instances") or []
        kept = [e for e in entries if not (isinstance(e, dict) and e.get("name") == name)]
        if len(kept) == len(entries):
            raise NotFoundError("no configured instance %r" % name)
        self.config.update({"instances": kept})
        if name in self.instances:
            self.stop_instance(name)

    def start_configured(self) -> list:
        """Start every instance saved in config (serve does this after the default one)."""
        started = []
        for entry in self.config.get("instances") or []:
            if isinstance(entry, dict) and entry.get("name") not in self.instances:
                try:
                    started.append(self._start_entry(entry))
                except (OSError, Iflow2apiError) as exc:
                    log.warning("instance %s not started: %s", entry.get("name"), exc)
        return started

    def _start_entry(self, entry: dict) -> Instance:
        try:
            return self.start(str(entry["name"]), entry.get("host"), entry.get("port"))
        except OSError as exc:
            raise InvalidRequestError("cannot listen on %s:%s (%s)" % (entry.get("host") or self.config["host"],
                                                                     entry.get("port"), exc.strerror or exc))

    # -- config --

    def config_get(self) -> dict:
        """The effective config with every secret masked (a proxy URL keeps all but its password)."""
        shown = map_secrets(self.config.values, mask_secret)
        shown["upstream_proxy"] = mask_url_password(self.config["upstream_proxy"])
        return shown

    def config_set(self, changes: dict) -> None:
        before = dict(self.config.values)
        self.config.update(changes)
        self._apply_config(before)

    # -- following the config file --

    CONFIG_CHECK_S = 2.0  # how often a running server looks at its config file (one stat)

    def _watch_config_file(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch_loop, name="iflow2api-config", daemon=True)
            self._watcher.start()

    def _watch_loop(self) -> None:
        while not self._watch_stop.wait(self.CONFIG_CHECK_S):
            try:
                self.follow_config()
            except Exception:  # a bad file must not end the watching
                log.exception("could not apply the changed config file")

    def follow_config(self) -> list:
        """Apply the config file when another process changed it (`iflow2api config`, an
        editor, the admin password command); the changed keys (names only: values may be
        secrets) are logged, with those that wait for a restart. Returns the changed keys."""
        before = dict(self.config.values)
        if not self.config.refresh():
            return []
        changed = self._apply_config(before)
        for warning in self.config.warnings:
            log.warning("%s", warning)
        del self.config.warnings[:]
        if changed:
            later = [key for key in changed if key in RESTART_KEYS]
            log.info("config file changed: %s%s", ", ".join(changed) or "nothing",
                     "; after a restart: %s" % ", ".join(later) if later else "")
        return changed

    def _apply_config(self, before: dict) -> list:
        """Make the running parts follow config values that differ from `before`."""
        now = self.config.values
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if "log_level" in changed:
            logging.getLogger("iflow2api").setLevel(getattr(logging, now["log_level"].upper(), logging.INFO))
        if self.usage is not None:
            self.usage.retention_days, self.usage.max_mb = now["usage_retention_days"], now["usage_max_mb"]
        self.backend.reload()
        for instance in list(self.instances.values()):
            instance.follow_config()
        return changed

    def editable_keys(self) -> list:
        """Config keys the admin may change directly (secrets and lists with their own pages
        excluded), in the order of CONFIG_GROUPS (the admin shows them so)."""
        return [key for _group, keys in CONFIG_GROUPS for key in keys if key not in _MANAGED_KEYS]

    def config_schema(self) -> dict:
        """How each editable key is edited: {key: {"group", "type", "choices"?, "min"?, "max"?,
        "restart", "secret", "password"}} ("password": changing it needs the admin password)."""
        types = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object"}
        group_of = {key: group for group, keys in CONFIG_GROUPS for key in keys}
        schema = {}
        for key in self.editable_keys():
            entry = {"group": group_of[key], "type": types[type(DEFAULT_CONFIG[key])],
                     "restart": key in RESTART_KEYS, "secret": key in SECRET_FIELDS,
                     "password": key in CREDENTIAL_ROUTING_KEYS}
            if key in CONFIG_CHOICES:
                entry["choices"] = list(CONFIG_CHOICES[key])
            if key in CONFIG_NUMBER_BOUNDS:
                low, high, _low_allowed = CONFIG_NUMBER_BOUNDS[key]
                entry["min"] = low
                if high is not None:
                    entry["max"] = high
            schema[key] = entry
        return schema

    def config_set_editable(self, changes: dict, may_redirect_credentials: bool = False) -> None:
        """Change editable keys. Keys that decide where credentials are sent (OAuth and
        iFlow URLs, the proxy) need may_redirect_credentials: the admin asks for the
        password again, the CLI and the GUI are the user at their own machine. A value
        sent back exactly as config_get() masked it is left as it is."""
        shown = self.config_get()
        changes = {k: v for k, v in changes.items() if not (k in shown and v == shown[k] and v != self.config.get(k))}
        for key in changes:
            if key not in DEFAULT_CONFIG:
                raise unknown_key_error(key)
        refused = sorted(set(changes) - set(self.editable_keys()))
        if refused:
            raise InvalidRequestError("not editable here: %s" % ", ".join(refused))
        guarded = sorted(set(changes) & CREDENTIAL_ROUTING_KEYS)
        if guarded and not may_redirect_credentials:
            raise Iflow2apiError("changing %s needs the admin password again (or the command line)"
                                 % ", ".join(guarded), status=403, code="password_required",
                                 openai_type="permission_error", anthropic_type="permission_error")
        self.config_set(changes)

    # -- client API keys ------------------------------------------------------------

    def client_keys(self) -> list:
        """[{id, masked}] of the configured client keys (the full key is never shown again)."""
        return [{"id": client_key_id(k), "masked": mask_secret(k)}
                for k in self.config.get("api_keys") or [] if usable_secret(k)]

    def create_client_key(self) -> dict:
        key = new_client_key()
        register_secret(key)
        self.config.update({"api_keys": list(self.config.get("api_keys") or []) + [key]})
        return {"id": client_key_id(key), "key": key}

    def revoke_client_key(self, key_id: str) -> bool:
        keys = list(self.config.get("api_keys") or [])
        kept = [k for k in keys if not (usable_secret(k) and client_key_id(k) == key_id)]
        if len(kept) == len(keys):
            return False
        exposed = self._network_binds()
        if exposed and not any(usable_secret(k) for k in kept):
            raise InvalidRequestError("this is the last client key and the server listens on %s; create "
                                      "another key first (or set allow_remote_without_key)" % exposed[0],
                                      code="last_key")
        self.config.update({"api_keys": kept})
        return True

    def _network_binds(self) -> list:
        """Configured or running bind addresses that require client keys."""
        hosts = [self.config["host"]] + [i.host for i in self.instances.values()]
        hosts += [e.get("host") for e in self.config.get("instances") or [] if isinstance(e, dict)]
        return [h for h in hosts if h and needs_client_key(self.config, h)]

    # -- accounts and login --

    def accounts(self) -> list:
        """Every account with masked key, expiry, status and counters."""
        now = time.time()
        return [a.snapshot(now) for a in self.backend.accounts.accounts()]

    def login_start(self, headless: bool = False) -> LoginSession:
        """Begin an OAuth login: open session.url, then call login_finish()."""
        return LoginSession(self.backend.oauth, headless, self.config["oauth_callback_port"])

    def login_finish(self, session: LoginSession, pasted: str = None, timeout_s: float = 300.0,
                     add: bool = False) -> str:
        """Finish a login (browser: wait for the redirect; headless: the pasted URL or
        code), store it like the iFlow CLI (or as an extra account) and return its id."""
        code = session.finish(pasted) if pasted is not None else session.wait(timeout_s)
        session.close()
        result = complete_login(self.backend.oauth, code, session.redirect_uri, time.time())
        account_id = save_login(self.backend.accounts, result, add)
        log.info("logged in%s as account %s", " (%s)" % result["user"] if result["user"] else "", account_id)
        return account_id

    def login_api_key(self, api_key: str, add: bool = False, base_url: str = None, force: bool = False) -> dict:
        """Use a pasted iFlow API key instead of OAuth, after asking the iFlow API's /models
        with it: {"id": account id, "check": "ok" | "unreachable" | "refused"}. A refused key
        is saved only with force (KeyRefusedError otherwise); an unreachable API is no
        verdict on the key, so that key is saved."""
        api_key = (api_key or "").strip()
        if not api_key or any(c.isspace() for c in api_key):
            raise InvalidRequestError("that does not look like an API key")
        register_secret(api_key)
        if base_url and not is_safe_endpoint(base_url):
            raise ConfigError("base URL %s: expected %s" % (_shown(base_url), _HTTPS_TEXT), param="base_url")
        checked_at = (base_url or self.backend.credentials.base_url).rstrip("/")  # an extra account too
        account = Account("key-check")
        account.api_key, account.base_url = api_key, checked_at
        check = check_api_key(IFlowProvider(), account, self.backend.pool)
        if check == "refused" and not force:
            raise KeyRefusedError("%s refused this API key (nothing was saved)" % checked_at)
        login = {"api_key": api_key, "base_url": checked_at if add else base_url}  # None keeps settings.json's
        return {"id": save_login(self.backend.accounts, login, add), "check": check}

    def logout(self, account_id: str = Account.PRIMARY) -> bool:
        """Remove an account's credentials; False when there was no such account."""
        return self.backend.accounts.remove(account_id)

    # -- providers --

    def providers(self) -> list:
        """Presets and configured providers: name, preset, base URL, masked keys (keyless: a
        local server that needs none), notes."""
        configured = self.config.get("providers") or {}
        routes = self.backend.routes
        out = []
        for name in ["iflow"] + sorted(set(PROVIDER_PRESETS) | set(configured)):
            if name == "iflow":
                settings = {"base_url": self.backend.credentials.base_url, "key_env": "",
                            "notes": "iFlow API with the iFlow CLI's login (iflow2api login)"}
            else:
                settings = provider_settings(name, configured.get(name) or {})
                settings["notes"] = PROVIDER_PRESETS.get(settings.get("preset") or name, {}).get("notes", "")
            route = routes.get(name)
            keys = [a.api_key for a in route.accounts.accounts()] if route else []
            preset = settings.get("preset") or (name if name in PROVIDER_PRESETS else "")
            out.append({"name": name, "preset": preset, "configured": name == "iflow" or name in configured,
                        "enabled": route is not None, "default": name == self.config["default_provider"],
                        "base_url": settings["base_url"], "key_env": settings.get("key_env") or "",
                        "keys": [mask_secret(k) for k in keys if k], "keyless": bool(settings.get("keyless")),
                        "notes": settings["notes"]})
        return out

    def provider_add(self, name: str, preset: str = None, api_key: str = None, base_url: str = None,
                     models=None, make_default: bool = False) -> dict:
        """Create (or update) a provider profile; unknown names need a base URL."""
        if not _NAME_RE.match(name or "") or name == "iflow":
            raise InvalidRequestError("provider names are 1-40 letters, digits, '_', '-' or '.' (not 'iflow')")
        if (preset or name) not in PROVIDER_PRESETS and not base_url and name not in (
                self.config.get("providers") or {}):
            raise InvalidRequestError("%r is not a preset (%s): give --base-url"
                                      % (preset or name, ", ".join(sorted(PROVIDER_PRESETS))))
        if preset and preset not in PROVIDER_PRESETS:
            raise InvalidRequestError("unknown preset %r; presets: %s" % (preset, ", ".join(sorted(PROVIDER_PRESETS))))
        providers = dict(self.config.get("providers") or {})
        entry = dict(providers.get(name) or {})
        if preset:
            entry["preset"] = preset
        if base_url:
            entry["base_url"] = base_url.rstrip("/")
        if api_key:
            register_secret(api_key)
            entry["api_keys"] = [k for k in entry.get("api_keys") or [] if k != api_key] + [api_key]
        if models:
            entry["models"] = list(models)
        providers[name] = entry
        changes = {"providers": providers}
        if make_default:
            changes["default_provider"] = name
        self.config_set(changes)
        return next(p for p in self.providers() if p["name"] == name)

    def provider_remove(self, name: str) -> bool:
        providers = dict(self.config.get("providers") or {})
        if name not in providers:
            return False
        del providers[name]
        changes = {"providers": providers}
        if self.config["default_provider"] == name:
            changes["default_provider"] = "iflow"
        self.config_set(changes)
        return True


# Names of instances and providers (they appear in URLs and in "provider/model").
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")

# Config keys with their own admin pages or too sensitive for a plain form.
# Where credentials go: changing these could send tokens or keys to another host.
CREDENTIAL_ROUTING_KEYS = {"base_url", "oauth_authorize_url", "oauth_token_url", "oauth_userinfo_url",
                           "oauth_client_id", "upstream_proxy", "upstream_proxy_enabled"}
_MANAGED_KEYS = {"api_key", "custom_api_key", "api_keys", "accounts", "providers", "instances",
                 "admin_password_hash", "oauth_client_secret"}


# == 10. Admin API: the web admin's JSON API over Service =========================================
# An HTTP face over the Service of section 9 (it only calls Service methods), with
# the static pages and API docs; add_web_admin() attaches it to a Service, and every
# server instance then serves it. Tests: tests/integration/test_admin_api.py,
# tests/e2e/test_admin_browser.py.

# Drives the same Service as the CLI and the GUI. Signed-in browsers hold an HttpOnly,
# SameSite=Strict session cookie; every change also needs the X-CSRF-Token header.
# Before an admin password exists, only this machine may set one; nobody else gets in.

SESSION_COOKIE = "iflow2api_admin"
BROWSER_COOKIE = "iflow2api_browser"  # tells browsers on this machine apart for the sign-in limit


class AdminApi:
    """The web admin's JSON API over a Service (passed in: it lives in section 9)."""

    endpoints = {"admin": "/admin", "docs": "/docs", "redoc": "/redoc", "openapi": "/openapi.json"}

    def __init__(self, service, sessions: AdminSessions, limiter: LoginLimiter):
        self.service, self.sessions, self.limiter = service, sessions, limiter
        # Wrong passwords from this machine count per browser (the owner mistyping is not
        # locked out by another tab or a script), under a ceiling for the whole machine.
        self.local_limiter = LoginLimiter(attempts=50)
        self.logins = {}  # OAuth login sessions started from the browser, by id
        self._setup_lock = threading.Lock()
        self._password_hash_seen = service.config.get("admin_password_hash")

    def _follow_password_file(self) -> None:
        """A password set or reset from the command line applies at once and signs out
        every browser (the config file changed under the running server)."""
        self.service.follow_config()
        current = self.service.config.get("admin_password_hash")
        if current != self._password_hash_seen:
            self._password_hash_seen = current
            self.sessions.drop_all()

    def register(self, r: Router) -> None:
        r.add("GET", "/admin", self.page)
        r.add("GET", "/admin/", self.page)
        r.add("GET", "/static/{path:.+}", lambda req: static_response(req.params["path"]))
        r.add("GET", "/docs", lambda req: docs_page("docs.html"))
        r.add("GET", "/redoc", lambda req: docs_page("redoc.html"))
        r.add("GET", "/openapi.json", lambda req: Response.json(openapi_document()))
        r.add("GET", "/admin/api/session", self.session)
        r.add("POST", "/admin/api/setup", self.setup)
        r.add("POST", "/admin/api/login", self.login)
        for method, path, handler in (
                ("POST", "/admin/api/logout", self.logout),
                ("POST", "/admin/api/password", self.change_password),
                ("GET", "/admin/api/status", self.status),
                ("GET", "/admin/api/logs", self.logs),
                ("GET", "/admin/api/logs/stream", self.log_stream),
                ("GET", "/admin/api/instances", self.instances),
                ("POST", "/admin/api/instances", self.add_instance),
                ("POST", "/admin/api/instances/{name}/start", self.start_instance),
                ("POST", "/admin/api/instances/{name}/stop", self.stop_instance),
                ("DELETE", "/admin/api/instances/{name}", self.remove_instance),
                ("GET", "/admin/api/config", self.config),
                ("PUT", "/admin/api/config", self.set_config),
                ("GET", "/admin/api/accounts", self.accounts),
                ("POST", "/admin/api/accounts", self.add_api_key_account),
                ("DELETE", "/admin/api/accounts/{account_id}", self.remove_account),
                ("POST", "/admin/api/accounts/oauth/start", self.oauth_start),
                ("GET", "/admin/api/accounts/oauth/{login_id}", self.oauth_state),
                ("POST", "/admin/api/accounts/oauth/{login_id}", self.oauth_paste),
                ("DELETE", "/admin/api/accounts/oauth/{login_id}", self.oauth_cancel),
                ("GET", "/admin/api/providers", self.providers),
                ("POST", "/admin/api/providers", self.add_provider),
                ("DELETE", "/admin/api/providers/{name}", self.remove_provider),
                ("GET", "/admin/api/keys", self.keys),
                ("POST", "/admin/api/keys", self.create_key),
                ("DELETE", "/admin/api/keys/{key_id}", self.revoke_key),
                ("GET", "/admin/api/models", self.models),
                ("GET", "/admin/api/usage", self.usage),
                ("POST", "/admin/api/playground", self.playground)):
            r.add(method, path, self._signed_in(handler))

    # -- sign-in ---------------------------------------------------------------------

    def head_check(self, method: str, path: str, headers, has_body: bool) -> None:
        """Before a body is read: only a signed-in admin may send one (but to sign in or set up)."""
        if has_body and path.startswith("/admin/api/") and path not in ("/admin/api/setup", "/admin/api/login"):
            if self.sessions.csrf_for(_cookie_of(headers, SESSION_COOKIE)) is None:
                raise AuthenticationError("sign in to the admin first", code="admin_session")

    def _signed_in(self, handler):
        """handler behind the session check, and the CSRF check for changes."""
        def guarded(req: Request) -> Response:
            self._follow_password_file()
            csrf = self.sessions.csrf_for(_cookie(req, SESSION_COOKIE))
            if csrf is None:
                raise AuthenticationError("sign in to the admin first", code="admin_session")
            if req.method not in ("GET", "HEAD") and not hmac.compare_digest(req.headers.get("x-csrf-token") or "",
                                                                             csrf):
                raise Iflow2apiError("missing or wrong X-CSRF-Token header", status=403, code="csrf",
                                     openai_type="permission_error", anthropic_type="permission_error")
            return handler(req)
        return guarded

    def _has_password(self) -> bool:
        return bool(usable_secret(self.service.config.get("admin_password_hash")))

    def page(self, req: Request) -> Response:
        resp = static_response("admin/index.html")
        resp.headers.append(("content-security-policy", "frame-ancestors 'none'"))
        return resp

    def session(self, req: Request) -> Response:
        self._follow_password_file()
        csrf = self.sessions.csrf_for(_cookie(req, SESSION_COOKIE))
        headers = []
        if not _cookie(req, BROWSER_COOKIE):
            headers.append(("set-cookie", "%s=%s; Path=/admin; HttpOnly; SameSite=Strict"
                            % (BROWSER_COOKIE, new_token()[:16])))
        return Response.json({"logged_in": csrf is not None, "needs_setup": not self._has_password(),
                              "setup_allowed": _is_local(req), "csrf": csrf, "version": __version__},
                             headers=headers)

    def setup(self, req: Request) -> Response:
        # Loopback alone is not enough: a web page on this machine (any site, or a DNS
        # rebinding name) can reach 127.0.0.1 too. The admin page itself is same-origin,
        # sends JSON and names a loopback host.
        self._refuse_if_set()
        if not _is_local(req) or not _loopback_host(req):
            raise _forbidden("set the admin password on the server's own machine first")
        _require_same_origin_json(req)
        password = _password_field(req, "password")
        with self._setup_lock:  # two first-run setups at once: only the first wins
            self._refuse_if_set()
            self.service.config_set({"admin_password_hash": hash_password(password)})
            self._password_hash_seen = self.service.config.get("admin_password_hash")
        log.info("admin password set")
        return self._new_session()

    def _refuse_if_set(self) -> None:
        if self._has_password():
            raise Iflow2apiError("the admin password is already set; sign in", status=409,
                                 code="conflict", openai_type="invalid_request_error")

    def login(self, req: Request) -> Response:
        self._follow_password_file()
        _require_same_origin_json(req)
        self._refuse_while_limited(req, "too many sign-in attempts")
        if not self._has_password():
            raise Iflow2apiError("no admin password yet: set one first", status=409, code="needs_setup",
                                 openai_type="invalid_request_error")
        body = req.json()
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(password, str) or not verify_password(password, self.service.config["admin_password_hash"]):
            self._attempt_failed(req)
            log.warning("admin sign-in failed from %s", req.client[0] if req.client else "?")
            raise AuthenticationError("wrong password", code="wrong_password")
        self.limiter.succeeded(self._attempt_key(req))
        return self._new_session()

    def _attempt_key(self, req: Request) -> str:
        """Whose wrong passwords count together: a remote address, or one browser here."""
        if _is_local(req):
            return "local:" + (_cookie(req, BROWSER_COOKIE) or _cookie(req, SESSION_COOKIE))
        return req.client[0] if req.client else ""

    def _refuse_while_limited(self, req: Request, what: str) -> None:
        wait = self.limiter.retry_after(self._attempt_key(req))
        if _is_local(req):
            wait = max(wait, self.local_limiter.retry_after("local"))
        if wait > 0:
            raise RateLimitError("%s; try again in %d s" % (what, wait + 1),
                                 headers=[("retry-after", "%d" % (wait + 1))])

    def _attempt_failed(self, req: Request) -> None:
        self.limiter.failed(self._attempt_key(req))
        if _is_local(req):
            self.local_limiter.failed("local")

    def _new_session(self) -> Response:
        token, csrf = self.sessions.create()
        return Response.json({"csrf": csrf}, headers=[("set-cookie", "%s=%s; Path=/; HttpOnly; SameSite=Strict"
                                                       % (SESSION_COOKIE, token))])

    def logout(self, req: Request) -> Response:
        self.sessions.drop(_cookie(req, SESSION_COOKIE))
        return Response.json({"ok": True}, headers=[("set-cookie", "%s=; Path=/; HttpOnly; SameSite=Strict; "
                                                     "Max-Age=0" % SESSION_COOKIE)])

    def _password_confirmed(self, req: Request, password) -> bool:
        """Whether a re-entered admin password is right (rate limited like sign-in)."""
        if not isinstance(password, str) or not password:
            return False
        self._refuse_while_limited(req, "too many wrong passwords")
        if not verify_password(password, self.service.config["admin_password_hash"]):
            self._attempt_failed(req)
            raise AuthenticationError("the admin password is wrong", code="wrong_password")
        return True

    def change_password(self, req: Request) -> Response:
        self._refuse_while_limited(req, "too many wrong passwords")
        body = req.json()
        current = body.get("current") if isinstance(body, dict) else None
        if not isinstance(current, str) or not verify_password(current, self.service.config["admin_password_hash"]):
            self._attempt_failed(req)
            raise AuthenticationError("the current password is wrong", code="wrong_password")
        self.service.config_set({"admin_password_hash": hash_password(_password_field(req, "new"))})
        self._password_hash_seen = self.service.config.get("admin_password_hash")
        self.sessions.drop_all()
        return self._new_session()

    # -- dashboard ----------------------------------------------------------------------

    def status(self, req: Request) -> Response:
        dashboard = self.service.dashboard()
        _mark_this_page(req, dashboard["instances"])
        return Response.json(dashboard)

    def logs(self, req: Request) -> Response:
        count = _int_param(req, "n", 200)
        return Response.json({"lines": self.service.recent_logs(count)})

    def log_stream(self, req: Request) -> Response:
        buffer = self.service.log_buffer

        def events():
            number = buffer.count
            yield b": live log\n\n"
            while True:
                number, lines = buffer.since(number, 15.0)
                out = [b"event: log\ndata: " + json.dumps({"line": line}).encode("utf-8") + b"\n\n"
                       for line in lines]
                yield b"".join(out) or b": keep-alive\n\n"
        return Response(200, headers=list(_SSE_HEADERS), stream=events())

    # -- management -----------------------------------------------------------------------

    def instances(self, req: Request) -> Response:
        return Response.json({"instances": _mark_this_page(req, self.service.instance_list())})

    def add_instance(self, req: Request) -> Response:
        body = _object(req)
        return Response.json(self.service.add_instance(str(body.get("name") or ""), body.get("host"),
                                                       body.get("port")))

    def start_instance(self, req: Request) -> Response:
        return Response.json(self.service.start_instance(req.params["name"]))

    def stop_instance(self, req: Request) -> Response:
        self.service.stop_instance(req.params["name"])
        return Response.json({"ok": True})

    def remove_instance(self, req: Request) -> Response:
        self.service.remove_instance(req.params["name"])
        return Response.json({"ok": True})

    def config(self, req: Request) -> Response:
        return Response.json({"config": self.service.config_get(), "editable": self.service.editable_keys(),
                              "groups": [group for group, _keys in CONFIG_GROUPS],
                              "schema": self.service.config_schema()})

    def set_config(self, req: Request) -> Response:
        body = _object(req)
        changes = body.get("changes")
        if not isinstance(changes, dict):
            raise InvalidRequestError("changes: expected an object of config keys")
        self.service.config_set_editable(changes, self._password_confirmed(req, body.get("password")))
        return Response.json({"config": self.service.config_get()})

    def accounts(self, req: Request) -> Response:
        return Response.json({"accounts": self.service.accounts()})

    def add_api_key_account(self, req: Request) -> Response:
        body = _object(req)
        return Response.json(self.service.login_api_key(body.get("api_key"), bool(body.get("add")),
                                                        force=bool(body.get("force"))))

    def remove_account(self, req: Request) -> Response:
        if not self.service.logout(req.params["account_id"]):
            raise NotFoundError("no account %r" % req.params["account_id"])
        return Response.json({"ok": True})

    def oauth_start(self, req: Request) -> Response:
        session = self.service.login_start()
        login_id = new_token()[:12]
        state = {"session": session, "add": bool(_object(req).get("add")), "state": "waiting",
                 "account": None, "message": ""}
        self.logins[login_id] = state
        threading.Thread(target=self._wait_login, args=(state,), daemon=True).start()
        return Response.json({"session": login_id, "url": session.url})

    def _wait_login(self, state: dict) -> None:
        try:
            account = self.service.login_finish(state["session"], timeout_s=600, add=state["add"])
            state["account"], state["state"] = account, "done"
        except Iflow2apiError as exc:
            if state["state"] == "waiting" and not state.get("pasted"):
                state["state"], state["message"] = "error", str(exc)

    def oauth_state(self, req: Request) -> Response:
        state = self._login(req)
        return Response.json({k: state[k] for k in ("state", "account", "message")})

    def oauth_paste(self, req: Request) -> Response:
        state = self._login(req)
        pasted = _object(req).get("pasted")
        if not isinstance(pasted, str) or not pasted.strip():
            raise InvalidRequestError("pasted: the address the browser ended on, or the code")
        state["pasted"] = True  # the browser-wait thread now ends quietly
        try:
            state["account"] = self.service.login_finish(state["session"], pasted, add=state["add"])
            state["state"], state["message"] = "done", ""
        except Iflow2apiError as exc:
            state["state"], state["message"] = "error", str(exc)
        return Response.json({k: state[k] for k in ("state", "account", "message")})

    def oauth_cancel(self, req: Request) -> Response:
        state = self.logins.pop(req.params["login_id"], None)
        if state is None:
            raise NotFoundError("no such login")
        state["state"], state["message"] = "cancelled", "cancelled"
        state["session"].close()  # frees the callback port; the waiting thread ends
        return Response.json({"ok": True})

    def _login(self, req: Request) -> dict:
        state = self.logins.get(req.params["login_id"])
        if state is None:
            raise NotFoundError("no such login; start again")
        return state

    def providers(self, req: Request) -> Response:
        return Response.json({"providers": self.service.providers()})

    def add_provider(self, req: Request) -> Response:
        body = _object(req)
        models = body.get("models") or None
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
            raise InvalidRequestError("models: expected a list of model ids")
        return Response.json(self.service.provider_add(str(body.get("name") or ""), body.get("preset") or None,
                                                       body.get("api_key") or None, body.get("base_url") or None,
                                                       models, bool(body.get("default"))))

    def remove_provider(self, req: Request) -> Response:
        if not self.service.provider_remove(req.params["name"]):
            raise NotFoundError("no configured provider %r" % req.params["name"])
        return Response.json({"ok": True})

    def keys(self, req: Request) -> Response:
        return Response.json({"keys": self.service.client_keys()})

    def create_key(self, req: Request) -> Response:
        return Response.json(self.service.create_client_key())

    def revoke_key(self, req: Request) -> Response:
        if not self.service.revoke_client_key(req.params["key_id"]):
            raise NotFoundError("no key %r" % req.params["key_id"])
        return Response.json({"ok": True})

    def models(self, req: Request) -> Response:
        return Response.json({"models": [m for m, _d, _o in self.service.backend.public_model_ids()],
                              "default": self.service.default_model()})

    def usage(self, req: Request) -> Response:
        """The usage history for the dashboard's charts: per day, per model and per provider
        since ?since= (7d by default; 24h, 30d, or a date)."""
        query = urllib.parse.parse_qs(req.query_string)
        since = since_time((query.get("since") or ["7d"])[0], time.time())
        return Response.json(self.service.usage_report(since))

    def playground(self, req: Request) -> Response:
        """A chat completion for a signed-in admin (no client key needed), on the first instance;
        with "api": "responses" in the body, a Responses API answer instead."""
        instance = next(iter(self.service.instances.values()), None)
        if instance is None:
            raise Iflow2apiError("no server instance is running", status=503, code="unavailable")
        body = req.json()
        if isinstance(body, dict) and body.get("api") == "responses":
            return instance.api.respond(req, {k: v for k, v in body.items() if k != "api"})
        if isinstance(body, dict):
            body.pop("api", None)
        return instance.api.chat(req, body)


def _cookie(req: Request, name: str) -> str:
    return _cookie_of(req.headers, name)


def _cookie_of(headers, name: str) -> str:
    for header in headers.get_all("cookie"):
        for part in header.split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
    return ""


def _mark_this_page(req: Request, instances: list) -> list:
    """Flag the instance this request came in on ("this_page"): stopping it ends the page."""
    try:
        port = req.sock.getsockname()[1] if req.sock is not None else None
    except OSError:
        port = None
    for instance in instances:
        instance["this_page"] = bool(instance["running"]) and instance["port"] == port
    return instances


def _is_local(req: Request) -> bool:
    return bool(req.client) and req.client[0] in _LOOPBACK_CLIENTS


def _loopback_host(req: Request) -> bool:
    """The Host header names this machine (not a DNS-rebinding name pointing at it)."""
    host = (req.headers.get("host") or "").lower()
    host = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return host in ("localhost", "127.0.0.1", "::1")


def _require_same_origin_json(req: Request) -> None:
    """Refuse requests another site's page could make (forms or no-preflight fetches)."""
    origin = req.headers.get("origin")
    if origin and urllib.parse.urlsplit(origin).netloc.lower() != (req.headers.get("host") or "").lower():
        raise _forbidden("requests from another site are refused")
    if (req.headers.get("sec-fetch-site") or "same-origin") not in ("same-origin", "none"):
        raise _forbidden("requests from another site are refused")
    if not (req.headers.get("content-type") or "").lower().startswith("application/json"):
        raise InvalidRequestError("send the request as application/json")


def _forbidden(message: str) -> Iflow2apiError:
    return Iflow2apiError(message, status=403, code="forbidden", openai_type="permission_error",
                          anthropic_type="permission_error")


def _object(req: Request) -> dict:
    body = req.json()
    if not isinstance(body, dict):
        raise InvalidRequestError("expected a JSON object")
    return body


def _password_field(req: Request, field: str) -> str:
    value = _object(req).get(field)
    if not isinstance(value, str) or len(value) < 8:
        raise InvalidRequestError("%s: at least 8 characters" % field)
    return value


def _int_param(req: Request, name: str, default: int) -> int:
    try:
        return max(1, min(1000, int(req.query.get(name, [default])[0])))
    except ValueError:
        return default


def add_web_admin(service):
    """service, with the web admin, the API docs and the static files on every instance it
    starts from now on (the CLI's serve, the desktop app and the tests call this)."""
    service.route_sets.append(AdminApi(service, AdminSessions(), LoginLimiter()))
    return service


# == 11. CLI: serve, gui, claude, codex, login, accounts, providers, config =======================
# `iflow2api [serve] [--host H] [--port P] [--config FILE] [--log-level L]`,
# `iflow2api version [--verbose]`, `iflow2api models`, `iflow2api config [KEY [VALUE]]`,
# `iflow2api login [--headless | --api-key [KEY]] [--add]`, `iflow2api logout [ID]`,
# `iflow2api accounts`, `iflow2api providers [add NAME ... | remove NAME]`. --config,
# --log-level and --debug may come before the command or after it; --host, --port and config
# values go through validate_config_value (one-line errors); prompts end cleanly (see ask()).
# Tests: tests/integration/test_cli.py, tests/integration/test_auth.py, tests/e2e/test_claude_code.py.

COMMANDS = ("serve", "version", "models", "config", "login", "logout", "accounts", "providers", "admin-password",
            "usage")
LAUNCHERS = ("gui", "claude", "codex")  # commands whose options are their own
_OPTIONS_WITH_VALUES = ("--host", "--port", "--config", "--log-level")


def _global_options(parser, top: bool = False) -> None:
    """Options accepted before the command as well as after it: a subcommand's copy has
    no default (argparse.SUPPRESS), so it never undoes what was given before the command."""
    unset = None if top else argparse.SUPPRESS
    parser.add_argument("--config", metavar="FILE", default=unset,
                        help="config file (default ~/.iflow2api/config.json)")
    parser.add_argument("--log-level", metavar="LEVEL", type=str.upper, default=unset,
                        help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show tracebacks of internal errors")
    parser.add_argument("--version", action="version", version="iflow2api " + __version__)


def _listen_options(parser, top: bool = False) -> None:
    unset = None if top else argparse.SUPPRESS
    parser.add_argument("--host", default=unset, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", default=unset, help="port to listen on, 0 to 65535 (default 28000)")


def config_keys_help() -> str:
    """The keys with one line each, for `iflow2api config --help`."""
    width = max(len(key) for key in DEFAULT_CONFIG)
    return "keys (docs/configuration.md says more):\n" + "\n".join(
        "  %-*s  %s" % (width, key, CONFIG_HELP.get(key, "")) for key in DEFAULT_CONFIG)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iflow2api",
        description="Local OpenAI-compatible API bridge to the iFlow API.",
        epilog="commands: serve (default), gui, claude, codex, version, models, config, login, logout, "
               "accounts, providers, admin-password. Options may come before or after the command. "
               "Run 'iflow2api COMMAND --help' for details.")
    _listen_options(parser, top=True)
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the server (default)")
    sub.add_parser("gui", help="open the desktop window (tkinter; 'gui --help' for its options)")
    for client, name in (("claude", "Claude Code"), ("codex", "Codex CLI")):
        launch = sub.add_parser(client, help="run %s through this server: iflow2api %s [--model "
                                "provider/model] [ARGS...]" % (name, client))
        launch.add_argument("--model", help="the model %s uses (default: default_model)" % name)
        launch.add_argument("args", nargs=argparse.REMAINDER, help="passed on to %s" % client)
    _listen_options(serve)
    _global_options(serve)
    version = sub.add_parser("version", help="print the version")
    version.add_argument("--verbose", action="store_true", help="also list optional packages in use")
    models = sub.add_parser("models", help="list the models the server offers",
                            description="List the model ids clients can use (iFlow's and those of each "
                                        "configured provider), with their display names and owners.")
    config = sub.add_parser("config", help="show or change the config",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Without KEY: print every key (secrets masked). With KEY: print "
                                        "its value.\nWith KEY VALUE: check the value and save it (nothing "
                                        "is saved when it does not fit).",
                            epilog=config_keys_help())
    config.add_argument("key", nargs="?", help="a config key (listed below)")
    config.add_argument("value", nargs="?", help="new value (JSON or plain text)")
    login = sub.add_parser("login", help="log in to iFlow (browser, headless or API key)")
    login.add_argument("--headless", action="store_true",
                       help="print the login URL and read back the address the browser ended on")
    login.add_argument("--api-key", nargs="?", const="", metavar="KEY",
                       help="use an iFlow API key instead of OAuth (asked for when not given)")
    login.add_argument("--add", action="store_true",
                       help="add an extra account to the pool instead of the iFlow CLI's login")
    login.add_argument("--base-url", metavar="URL",
                       help="with --api-key: the iFlow API it belongs to (default: the current one)")
    login.add_argument("--force", action="store_true",
                       help="with --api-key: save the key even when the API refuses it")
    login.add_argument("--no-browser", action="store_true", help="do not open a browser")
    login.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the browser")
    logout = sub.add_parser("logout", help="remove an account's credentials")
    logout.add_argument("account", nargs="?", default=Account.PRIMARY,
                        help="account id from 'iflow2api accounts' (default: the iFlow CLI's login)")
    password = sub.add_parser("admin-password", help="set or reset the web admin's password "
                              "(a running server applies it at once and signs browsers out)")
    password.add_argument("--stdin", action="store_true", help="read the password from standard input "
                          "(e.g. docker compose exec -T ... admin-password --stdin)")
    accounts = sub.add_parser("accounts", help="list accounts with masked keys, expiry and status")
    accounts.add_argument("--json", action="store_true", help="print JSON")
    providers = sub.add_parser("providers", help="list, add or remove upstream providers")
    providers.add_argument("--json", action="store_true", help="print JSON")
    usage = sub.add_parser("usage", help="requests and tokens from the usage history, as a table")
    usage.add_argument("--since", default="7d", metavar="WHEN",
                       help="7d, 24h, 30m, or a date such as 2026-11-01 (default 7d)")
    usage.add_argument("--by", default="model", choices=sorted(USAGE_GROUPS), help="group rows by (default model)")
    usage.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    for command in (version, models, config, login, logout, password, accounts, providers, usage):
        _global_options(command)
    psub = providers.add_subparsers(dest="action")
    add = psub.add_parser("add", help="add or update a provider (a preset name, or any name with --base-url)")
    add.add_argument("name")
    add.add_argument("--preset", help="take base URL and quirks from this preset")
    add.add_argument("--api-key", help="API key (repeat the command to add more keys)")
    add.add_argument("--base-url", help="the provider's OpenAI-compatible base URL (.../v1)")
    add.add_argument("--model", action="append", dest="models", help="a model id to list (repeatable)")
    add.add_argument("--default", action="store_true", help="make it the default provider")
    remove = psub.add_parser("remove", help="remove a configured provider")
    remove.add_argument("name")
    return parser


def _command_index(argv: list):
    """Where the command word is: the first argument that is neither an option nor the
    value of one (None when there is none)."""
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in _OPTIONS_WITH_VALUES:
            index += 2
        elif arg.startswith("-") and arg != "-":
            index += 1
        else:
            return index
    return None


def main(argv=None) -> int:
    """Entry point of the console script and of `python iflow2api.py`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    at = _command_index(argv)
    word = argv[at] if at is not None else None
    if word == "gui":  # its options are the window's own (it has --config too)
        return _cmd_gui(argv[:at] + argv[at + 1:])
    if word in ("claude", "codex") and not argv[at + 1:at + 2] in (["-h"], ["--help"]):
        if at:
            raise SystemExit("iflow2api: options go after '%s' (iflow2api %s [--model M] [ARGS...])"
                             % (word, word))
        return _cmd_launch(word, argv[1:])
    if word is None and not any(a in ("-h", "--help", "--version") for a in argv):
        argv = ["serve"] + argv
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    if command == "version":
        return _cmd_version(args)
    cli = {}
    for key in ("host", "port", "log_level"):
        value = getattr(args, key, None)
        if value is None:
            continue
        try:
            cli[key] = validate_config_value(key, value)
        except ConfigError as exc:  # before anything starts, one line
            print("iflow2api: --%s: %s" % (key.replace("_", "-"), exc), file=sys.stderr)
            return 2
    config = Config(path=getattr(args, "config", None), cli=cli)
    setup_logging(config["log_level"])
    for warning in config.warnings:
        log.warning("config: %s", warning)
    try:
        if command == "models":
            return _cmd_models(config)
        if command == "config":
            return _cmd_config(config, args.key, args.value)
        if command == "login":
            return _cmd_login(Service(config), args)
        if command == "logout":
            return _cmd_logout(Service(config), args.account)
        if command == "accounts":
            return _cmd_accounts(Service(config), args.json)
        if command == "usage":
            return _cmd_usage(config, args)
        if command == "admin-password":
            return _cmd_admin_password(config, args.stdin)
        if command == "providers":
            return _cmd_providers(Service(config), args)
        return _cmd_serve(config)
    except Iflow2apiError as exc:
        raise SystemExit("iflow2api: %s" % exc)
    except KeyboardInterrupt:
        print("\niflow2api: interrupted", file=sys.stderr)
        return 130
    except Exception:
        if getattr(args, "debug", False):
            raise
        log.exception("internal error")
        return 1


def ask(prompt: str, secret: bool = False) -> str:
    """One line typed at a prompt (hidden when secret and typed at a terminal; read from
    standard input when that is a pipe). End of input exits with 1, Ctrl-C with 130: one
    line each, nothing changed."""
    try:
        if not secret:
            return input(prompt)
        if sys.stdin is not None and sys.stdin.isatty():
            return getpass.getpass(prompt)
        print(prompt, end="", flush=True)
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:
            raise EOFError
        return line.rstrip("\r\n")
    except KeyboardInterrupt:
        print("\niflow2api: cancelled; nothing changed", file=sys.stderr)
        raise SystemExit(130) from None
    except EOFError:
        print("\niflow2api: no input (end of input); nothing changed", file=sys.stderr)
        raise SystemExit(1) from None


def _cmd_admin_password(config: Config, from_stdin: bool) -> int:
    """Set (or reset a forgotten) admin password, typed twice or read from stdin."""
    if from_stdin:
        password = ask("", secret=True)
    else:
        password = ask("New admin password (8 characters or more): ", secret=True)
        if password != ask("The same again: ", secret=True):
            raise SystemExit("iflow2api: the two passwords differ; nothing changed")
    if len(password) < 8:
        raise SystemExit("iflow2api: the password needs at least 8 characters; nothing changed")
    config.update({"admin_password_hash": hash_password(password)})
    print("Admin password set in %s; sign in at /admin (browsers signed in before are signed out)."
          % config.path)
    return 0


def _cmd_gui(argv: list) -> int:
    """The desktop window (iflow2api_gui.py beside this file, or in the same zip)."""
    try:
        import iflow2api_gui
    except ImportError:
        print("iflow2api: the desktop window (iflow2api_gui.py) is not installed next to iflow2api; "
              "run the server with `iflow2api` and use the web admin at /admin", file=sys.stderr)
        return 2
    return iflow2api_gui.main(argv)


# -- Launchers: `iflow2api claude` and `iflow2api codex` ------------------------------------------

LAUNCHED_CLIENTS = {
    "claude": ("Claude Code", "npm install -g @anthropic-ai/claude-code"),
    "codex": ("Codex CLI", "npm install -g @openai/codex"),
}


def _cmd_launch(client: str, argv: list) -> int:
    """Run Claude Code or Codex against this server: the one already running on the
    configured port when /health says it is ours, else one started here on a free
    loopback port (stopped when the client exits). The terminal, the arguments and
    the exit code pass through; nothing is written to the client's own config."""
    model, rest = _split_model_option(argv)
    name, install = LAUNCHED_CLIENTS[client]
    binary = shutil.which(client)
    if binary is None:
        print("iflow2api: %s (%s) is not installed; install it with: %s" % (name, client, install),
              file=sys.stderr)
        return 127
    config = Config()
    setup_logging("WARNING")  # the client owns the terminal
    url, service = _running_server_url(config), None
    if url is None:
        service = Service(Config(cli={"host": "127.0.0.1", "port": 0}))
        url = service.start().url
    key = launcher_key(config)
    model = model or config.get("default_model") or DEFAULT_MODEL
    command, env = launch_command(client, binary, url, key, model, rest, os.environ)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the client's to handle
    try:
        return subprocess.call(command, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
        if service is not None:
            service.stop()


def launcher_key(config: Config) -> str:
    """The client key a launched client sends: the first usable one configured (api_keys, then
    the original's custom_api_key); any text when the server needs none."""
    keys = [usable_secret(k) for k in config.get("api_keys") or []] + [usable_secret(config.get("custom_api_key"))]
    return next((k for k in keys if k), "iflow2api")


def launch_command(client: str, binary: str, url: str, key: str, model: str, args: list, environ) -> tuple:
    """(argv, environment) that point Claude Code or Codex at url with key and model."""
    env = dict(environ)
    if client == "claude":
        env.update(ANTHROPIC_BASE_URL=url, ANTHROPIC_API_KEY=key, ANTHROPIC_MODEL=model,
                   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
        env.pop("ANTHROPIC_AUTH_TOKEN", None)  # it would be sent instead of the key
        return [binary] + list(args), env
    env["IFLOW2API_CODEX_KEY"] = key
    overrides = {"model": model, "model_provider": "iflow2api",
                 "model_providers.iflow2api.name": "iflow2api",
                 "model_providers.iflow2api.base_url": url + "/v1",
                 "model_providers.iflow2api.env_key": "IFLOW2API_CODEX_KEY",
                 "model_providers.iflow2api.wire_api": "responses",
                 # What Codex would otherwise reach out for on its own (update check,
                 # analytics, feedback, plugin sync): a session through us stays local.
                 "check_for_update_on_startup": False, "analytics.enabled": False,
                 "feedback.enabled": False, "features.plugins": False,
                 "features.remote_plugin": False, "features.apps": False}
    flags = [part for key_, value in overrides.items() for part in ("-c", "%s=%s" % (key_, json.dumps(value)))]
    return [binary] + flags + list(args), env


def _split_model_option(argv: list) -> tuple:
    """(model, the other arguments): our own leading --model VALUE / --model=VALUE."""
    model, rest = None, list(argv)
    while rest and rest[0].startswith("--model"):
        if rest[0].startswith("--model="):
            model = rest.pop(0).split("=", 1)[1]
        elif rest[0] == "--model" and len(rest) > 1:
            rest.pop(0)
            model = rest.pop(0)
        else:
            break
    return model, rest


def _running_server_url(config: Config):
    """The URL of an iflow2api already serving on the configured port, or None."""
    return _running_server(config)[0]


def _running_server(config: Config) -> tuple:
    """(URL, its /health answer) of an iflow2api serving on the configured port, or (None, None)."""
    host = config["host"] if config["host"] in LOOPBACK_HOSTS else "127.0.0.1"
    url = "http://%s:%d" % ("[%s]" % host if ":" in host else host, config["port"])
    conn = http.client.HTTPConnection(host, config["port"], timeout=2)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = json.loads(resp.read(1 << 20) or b"{}")
    except (OSError, ValueError, http.client.HTTPException):
        return None, None
    finally:
        conn.close()
    if isinstance(body, dict) and "http_adapter" in body and "version" in body:
        return url, body
    return None, None


def _cmd_version(args) -> int:
    print("iflow2api " + __version__)
    if args.verbose:
        for name, value in version_details():
            print("%-13s %s" % (name + ":", value))
    return 0


def version_details() -> list:
    """[(name, value)] for `version --verbose`: the build, Python, platform and packages."""
    details = []
    try:
        build = json.loads(read_resource("BUILD_INFO.json"))
    except (OSError, KeyError, ValueError):
        build = None
    archive = getattr(globals().get("__loader__"), "archive", None)  # set when running from the zip
    if build:
        details.append(("build", "commit %s%s, %s" % (str(build.get("git_commit", "?"))[:12],
                                                      " (dirty)" if build.get("git_dirty") else "",
                                                      build.get("build_date", "?"))))
    if archive and os.path.isfile(archive):
        with open(archive, "rb") as f:
            details.append(("file", "%s sha256 %s" % (archive, hashlib.sha256(f.read()).hexdigest())))
    else:
        details.append(("file", os.path.abspath(__file__)))
    details.append(("python", "%s (%s)" % (sys.version.split()[0], sys.executable)))
    details.append(("platform", sys.platform + " " + (os.uname().machine if hasattr(os, "uname") else "")))
    details.append(("http adapter", pick_http_adapter()))
    details.append(("h11", getattr(h11, "__version__", "yes") if h11 else "not installed (stdlib HTTP parser)"))
    details.append(("certifi", _certifi_version() or "not installed (system CA store)"))
    return details


def _certifi_version() -> str:
    try:
        import certifi
    except ImportError:
        return ""
    return getattr(certifi, "__version__", "yes")


def _cmd_models(config: Config) -> int:
    for model_id, display, owner in Backend(config).public_model_ids():
        print("%-32s %-24s %s" % (model_id, display, owner))
    return 0


def _cmd_config(config: Config, key, value) -> int:
    if key is None:
        print(json.dumps(Service(config).config_get(), indent=2, ensure_ascii=False))
        return 0
    if key not in DEFAULT_CONFIG and (value is not None or key not in config.values):
        raise SystemExit("iflow2api: %s ('iflow2api config --help' lists the keys)" % unknown_key_error(key))
    if value is None:
        print(json.dumps(map_secrets({key: config.get(key)}, mask_secret)[key]))
        return 0
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    running = _running_server_url(config)  # before the change: a new port is not where it listens
    try:
        config.update({key: parsed})
    except (TypeError, ValueError) as exc:
        raise SystemExit("iflow2api: %s; nothing changed" % exc)
    shown = map_secrets({key: config.get(key)}, mask_secret)[key]  # a secret echoes masked
    if key == "upstream_proxy":  # all but its password
        shown = mask_url_password(config.get(key))
    print("%s = %s (saved to %s)" % (key, json.dumps(shown), config.path))
    if running and key in RESTART_KEYS:
        print("The server running at %s keeps its old %s until it is restarted." % (running, key))
    elif running:
        print("The server running at %s applies it within %d s." % (running, Service.CONFIG_CHECK_S))
    return 0


def _cmd_login(service: Service, args) -> int:
    if args.api_key is not None:
        return _login_with_key(service, args)
    session = service.login_start(headless=args.headless)
    print("Open this address in a browser and log in to iFlow:\n\n  %s\n" % session.url)
    if args.headless:
        print("Your browser then ends on a page that does not load (that is expected).")
        pasted = ask("Paste that page's address (or just the code) here: ")
        account_id = service.login_finish(session, pasted, add=args.add)
    else:
        if not args.no_browser:
            try:
                import webbrowser
                webbrowser.open(session.url)
            except Exception:  # no browser here: the printed URL still works
                pass
        print("Waiting for the browser (up to %.0f s)..." % args.timeout)
        account_id = service.login_finish(session, timeout_s=args.timeout, add=args.add)
    where = "~/.iflow/settings.json (shared with the iFlow CLI)" if account_id == Account.PRIMARY \
        else "the iflow2api config"
    print("Logged in: account %s, saved in %s." % (account_id, where))
    return 0


def _login_with_key(service: Service, args) -> int:
    """Check the key with the iFlow API, then save it; a refused key only when confirmed."""
    key = args.api_key or ask("iFlow API key (input hidden): ", secret=True)
    try:
        saved = service.login_api_key(key, add=args.add, base_url=args.base_url, force=args.force)
    except KeyRefusedError as exc:
        if not sys.stdin.isatty():
            raise SystemExit("iflow2api: %s; --force saves it anyway" % exc)
        if ask("%s. Save it anyway? [y/N] " % exc).strip().lower() not in ("y", "yes"):
            print("Nothing saved.")
            return 1
        saved = service.login_api_key(key, add=args.add, base_url=args.base_url, force=True)
    verdicts = {"ok": "the iFlow API accepted it", "refused": "the iFlow API refused it (saved anyway)",
                "unreachable": "the iFlow API could not be reached to check it"}
    print("Saved the API key as account %s; %s." % (saved["id"], verdicts[saved["check"]]))
    return 0


def _cmd_logout(service: Service, account_id: str) -> int:
    if not service.logout(account_id):
        raise SystemExit("iflow2api: no account %r; see 'iflow2api accounts'" % account_id)
    print("Logged out of account %s." % account_id)
    return 0


def _cmd_accounts(service: Service, as_json: bool) -> int:
    accounts = _with_live_state(service.accounts(), _running_server(service.config)[1])
    if as_json:
        print(json.dumps(accounts, indent=2, ensure_ascii=False))
        return 0
    if not accounts:
        print("No accounts. Log in with: iflow2api login")
        return 0
    print("%-14s %-10s %-16s %-20s %s" % ("ID", "TYPE", "KEY", "EXPIRES", "STATUS"))
    for a in accounts:
        status = a["status"] + (" %.0f s" % a["cooldown_s"] if a.get("cooldown_s") else "") + \
            (": " + a["message"] if a["message"] else "")
        print("%-14s %-10s %-16s %-20s %s" % (a["id"], a["auth_type"], a["api_key"], a["expires_at"] or "-",
                                             status))
    return 0


USAGE_COLUMNS = ("requests", "errors", "input_tokens", "output_tokens", "reasoning_tokens", "p50_ms", "p95_ms")


def _cmd_usage(config: Config, args) -> int:
    since = since_time(args.since, time.time())
    store = UsageStore(usage_db_path(config.path))
    rows = store.query(since, args.by)
    if args.csv:
        import csv
        out = csv.writer(sys.stdout)
        out.writerow([args.by] + list(USAGE_COLUMNS))
        for row in rows:
            out.writerow([row["key"]] + [row[c] for c in USAGE_COLUMNS])
        return 0
    if not rows:
        print("No requests since %s (usage history: %s)." % (time.strftime("%Y-%m-%d %H:%M", time.localtime(since)),
                                                            store.path))
        return 0
    width = max(12, max(len(str(row["key"])) for row in rows))
    print("%-*s %9s %7s %12s %12s %10s %9s %9s" % (width, args.by.upper(), "REQUESTS", "ERRORS", "INPUT",
                                                   "OUTPUT", "REASONING", "P50 MS", "P95 MS"))
    total = {"key": "total", "p50_ms": "-", "p95_ms": "-"}  # percentiles do not add up
    total.update({column: sum(row[column] for row in rows) for column in USAGE_COLUMNS[:5]})
    for row in rows + [total]:
        print("%-*s %9d %7d %12d %12d %10d %9s %9s" % ((width, row["key"]) + tuple(row[c] for c in USAGE_COLUMNS[:5])
                                                      + tuple(_ms(row[c]) for c in USAGE_COLUMNS[5:])))
    return 0


def _ms(value) -> str:
    return value if isinstance(value, str) else "%.0f" % value


def _with_live_state(accounts: list, health) -> list:
    """The accounts as the running server whose /health answer this is sees them (cooling
    down, refused, counters): this process alone knows only the files."""
    try:
        live = {a["id"]: a for a in health["accounts"]["live"]}
    except (KeyError, TypeError):
        return accounts
    return [dict(a, **{k: v for k, v in live.get(a["id"], {}).items() if k != "id"}) for a in accounts]


def _cmd_providers(service: Service, args) -> int:
    if args.action == "add":
        added = service.provider_add(args.name, args.preset, args.api_key, args.base_url, args.models,
                                     args.default)
        print("Provider %s: %s, keys %s%s. Use models as %s/<model>." % (
            added["name"], added["base_url"], ", ".join(added["keys"]) or ("none needed" if added["keyless"] else "none"),
            " (default)" if added["default"] else "", added["name"]))
        return 0
    if args.action == "remove":
        if not service.provider_remove(args.name):
            raise SystemExit("iflow2api: no configured provider %r" % args.name)
        print("Removed provider %s." % args.name)
        return 0
    providers = service.providers()
    if args.json:
        print(json.dumps(providers, indent=2, ensure_ascii=False))
        return 0
    print("%-11s %-8s %-50s %-22s %s" % ("NAME", "STATE", "BASE URL", "KEYS", "NOTES"))
    for p in providers:
        state = ("default" if p["default"] else "enabled") if p["enabled"] else "preset"
        keys = ", ".join(p["keys"]) or ("none needed" if p["keyless"] else "$" + p["key_env"] if p["key_env"] else "-")
        print("%-11s %-8s %-50s %-22s %s" % (p["name"], state, p["base_url"], keys, p["notes"]))
    print("\nAdd one: iflow2api providers add deepseek --api-key sk-...   (any other: --base-url URL)")
    return 0


def release_free_memory() -> None:
    """Return memory freed after start-up to the OS.

    Compiling this large module (always, when it runs from the zip) leaves ~10 MB
    of freed heap that glibc keeps; malloc_trim hands it back. Elsewhere: no-op."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
            pass


def bind_host_problem(host: str):
    """Why this machine cannot listen on host (a name that does not resolve, an address
    of another machine), or None; the port is not involved (bound to 0 here)."""
    hint = "try --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (all interfaces)"
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host.strip("[]"), 0, 0, socket.SOCK_STREAM, 0,
                                                                socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        return "cannot listen on host %r: the name does not resolve (%s); %s" % (
            host, getattr(exc, "strerror", None) or exc, hint)
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as exc:
        return "cannot listen on host %r (%s): it is not an address of this machine; %s" % (
            host, exc.strerror or exc, hint)
    return None


def _cmd_serve(config: Config) -> int:
    if h11 is None:
        log.info("h11 not installed: using the stdlib HTTP parser")
    if not has_certifi():
        log.info("certifi not installed: using the system CA store")
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before listening: a stop may come at once
        try:
            signal.signal(sig, on_signal)
        except (ValueError, OSError):  # pragma: no cover - not the main thread
            pass
    problem = bind_host_problem(config["host"])
    if problem:  # before a key is generated for it or anything starts
        raise SystemExit("iflow2api: " + problem)
    service = add_web_admin(Service(config))
    try:
        instance = service.start()
    except OSError as exc:
        raise SystemExit("iflow2api: cannot listen on %s:%s (%s); pick another port with --port"
                         % (config["host"], config["port"], exc.strerror or exc))
    credentials = instance.credentials
    log.info("iflow2api %s listening on %s (http: %s, upstream: %s)", __version__, instance.url,
             instance.adapter, credentials.base_url)
    if instance.generated_key:
        # Printed on purpose, once: the user needs it for their clients (stored sealed in config).
        print("\nThis server listens on %s, so clients need an API key. Generated one (shown once):\n\n"
              "  %s\n\nSend it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'. "
              "'iflow2api config api_keys' lists keys (masked).\n" % (config["host"], instance.generated_key),
              flush=True)
    elif instance.host not in LOOPBACK_HOSTS and not ClientKeys(config).required:
        log.warning("listening on %s without client keys (allow_remote_without_key is set)", instance.host)
    if instance.backend.has_credentials():
        log.info("credentials: %s (%s)", credentials.source(), credentials.auth_type or "api-key")
    else:
        log.warning(NO_CREDENTIALS_MESSAGE, config.path)
    log.info("OpenAI clients: base_url=%s/v1  Claude Code: ANTHROPIC_BASE_URL=%s  admin: %s/admin",
             instance.url, instance.url, instance.url)
    for extra in service.start_configured():
        log.info("instance %s listening on %s", extra.name, extra.url)
    threading.Thread(target=service.check_for_update, name="iflow2api-update-check", daemon=True).start()
    release_free_memory()
    while not stop.wait(0.5):
        pass
    log.info("shutting down (requests being answered get %.0f s to finish)", config["shutdown_grace_s"])
    service.stop(grace_s=config["shutdown_grace_s"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    # `python iflow2api.py gui` imports iflow2api_gui, which imports iflow2api; register
    # this module under its real name so that import does not load a second copy.
    sys.modules.setdefault("iflow2api", sys.modules[__name__])
    raise SystemExit(main())
