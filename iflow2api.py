#!/usr/bin/env python3
# == 0. Module header ===========================================================
"""iflow2api: a local OpenAI- and Anthropic-compatible API bridge in one file.

Run it:   python3 iflow2api.py [--host 127.0.0.1] [--port 28000]
Help:     python3 iflow2api.py --help

Clients talk OpenAI (`/v1/chat/completions`, `/v1/models`) to 127.0.0.1:28000 and
the server forwards to the iFlow API with the credentials the iFlow CLI keeps in
~/.iflow/settings.json. Standard library only (CPython >= 3.8); h11 and certifi
are used when importable.

Sections (search for "# == N."), lowest layer first; a section only uses names
from sections above it:
  0. module header            6. auth: client API keys
  1. constants, logging       7. HTTP server: Request/Response, adapters, limits
  2. config and credentials   8. routes: OpenAI API, health, models
  3. translation (sans-IO)    9. service: instances, status, logs
  4. SSE codec (sans-IO)     10. CLI
  5. upstream: pool, providers, model catalogue
"""
from __future__ import annotations

__version__ = "0.1.0"

import argparse
import collections
import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import select
import selectors
import signal
import socket
import socketserver
import ssl
import sys
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
try:
    import certifi
except ImportError:  # the system CA store is used instead
    certifi = None

__all__ = [
    "__version__", "main", "Service", "Instance", "Config", "Iflow2apiError",
    "SSEParser", "normalize_reasoning_message", "ReasoningMerger",
    "iflow_signature", "iflow_model_tweaks", "write_json_atomic", "redact",
    "pick_http_adapter",
]


# == 1. Constants, logging, secret redaction ====================================
# Defaults shared by every section, the logger, and the redaction that keeps
# keys and tokens out of every log line. Tests: tests/unit/test_core_units.py.

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 28000
IFLOW_BASE_URL = "https://apis.iflow.cn/v1"
IFLOW_USER_AGENT = "iFlow-Cli"
DEFAULT_MODEL = "glm-5"
MIB = 1024 * 1024

log = logging.getLogger("iflow2api")

_SECRET_PATTERNS = [
    # "Authorization: Bearer xyz" and similar
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]{4,}"), r"\1***"),
    # key=value and "key": "value" for names that hold secrets
    (re.compile(r"(?i)(\"?(?:api_?key|apikey|access_token|refresh_token|password|secret|"
                r"token|x-api-key)\"?\s*[:=]\s*\"?)([^\"\s,&}]{4,})"), r"\1***"),
    # OpenAI-style keys anywhere
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), "sk-***"),
]
_known_secrets = set()
_known_secrets_lock = threading.Lock()


def register_secret(value) -> None:
    """Remember a secret so that it is masked wherever it appears in a log line."""
    if isinstance(value, str) and len(value) >= 6:
        with _known_secrets_lock:
            _known_secrets.add(value)


def mask_secret(value: str) -> str:
    """Show a secret as its first 3 and last 4 characters, for UIs and listings."""
    if not value:
        return ""
    if len(value) < 12:
        return "***"
    return value[:3] + "..." + value[-4:]


def redact(text: str) -> str:
    """Return text with every known secret and secret-looking token masked."""
    with _known_secrets_lock:
        secrets_now = sorted(_known_secrets, key=len, reverse=True)
    for secret in secrets_now:
        if secret in text:
            text = text.replace(secret, "***")
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class _RedactingFilter(logging.Filter):
    """Masks secrets in the final message before any handler sees the record."""

    def filter(self, record):
        message = record.getMessage()
        cleaned = redact(message)
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


class RecentLogHandler(logging.Handler):
    """Keeps the last N formatted log lines in memory (status pages, the GUI)."""

    def __init__(self, capacity: int = 500):
        super().__init__()
        self.lines = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record):
        try:
            self.lines.append(self.format(record))
        except Exception:  # a broken record must never break serving
            self.handleError(record)


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr at the given level (once per process)."""
    root = logging.getLogger("iflow2api")
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    if not any(getattr(h, "_iflow2api_stderr", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._iflow2api_stderr = True
        root.addHandler(handler)


class Iflow2apiError(Exception):
    """Base error: carries the HTTP status and both API dialects' error types."""

    status = 500
    code = "internal_error"
    openai_type = "server_error"
    anthropic_type = "api_error"

    def __init__(self, message: str = "", status: int = None, code: str = None,
                 openai_type: str = None, anthropic_type: str = None, headers=None):
        super().__init__(message or self.__class__.__name__)
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


class RateLimitError(Iflow2apiError):
    status, code = 429, "rate_limit_exceeded"
    openai_type, anthropic_type = "rate_limit_error", "rate_limit_error"


class UpstreamError(Iflow2apiError):
    status, code = 502, "upstream_error"


class UpstreamTimeoutError(Iflow2apiError):
    status, code = 504, "timeout"


# == 2. Config and credentials ==================================================
# App config (~/.iflow2api/config.json, keys compatible with the original) with
# precedence CLI > environment > file > defaults; the iFlow CLI's
# ~/.iflow/settings.json; atomic 0600 writes. Tests: tests/unit/test_config.py.

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
    # ours
    "log_level": "INFO",
    "concurrency": 64,
    "queue_timeout_s": 30.0,
    "max_body_bytes": 32 * MIB,
    "header_timeout_s": 20.0,
    "idle_timeout_s": 75.0,
    "max_connections": 1024,
    "upstream_connect_timeout_s": 10.0,
    "upstream_read_timeout_s": 600.0,
    "models_cache_s": 600.0,
    "cors_allow_origins": ["*"],
    "api_keys": [],
    "default_model": "",
}

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
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, "cannot read %s: %s" % (path, exc)
    try:
        data = json.loads(text) if text.strip() else {}
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        return data, None
    except ValueError as exc:
        backup = path + ".bak"
        try:
            os.replace(path, backup)
        except OSError:
            backup = "(could not move it aside)"
        return {}, "%s is not valid JSON (%s); kept it as %s and used defaults" % (path, exc, backup)


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
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
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
            if key not in DEFAULT_CONFIG:
                merged[key] = value
                continue
            try:
                merged[key] = _coerce(value, DEFAULT_CONFIG[key])
            except (TypeError, ValueError) as exc:
                warnings.append("%s: %s=%r ignored (%s)" % (source, key, value, exc))
    for key, low in (("port", 0), ("concurrency", 1), ("max_connections", 1)):
        if merged[key] < low or (key == "port" and merged[key] > 65535):
            warnings.append("%s=%r out of range, using %r" % (key, merged[key], DEFAULT_CONFIG[key]))
            merged[key] = DEFAULT_CONFIG[key]
    return merged, warnings


class Config:
    """The app config: file contents plus environment and CLI overrides."""

    def __init__(self, path: str = None, env=None, cli: dict = None, data: dict = None):
        self.env = dict(os.environ if env is None else env)
        self.path = path or self.env.get("IFLOW2API_CONFIG") or os.path.join(app_home(self.env), "config.json")
        self.cli = dict(cli or {})
        self.lock = threading.RLock()
        self.warnings = []
        if data is None:
            data, problem = read_json_file(self.path)
            if problem:
                self.warnings.append(problem)
        self.file_data = data
        self._resolve()

    def _resolve(self):
        self.values, warnings = resolve_config(self.file_data, self.env, self.cli)
        self.warnings.extend(warnings)

    def get(self, key, default=None):
        return self.values.get(key, default)

    def __getitem__(self, key):
        return self.values[key]

    def update(self, changes: dict, save: bool = True) -> None:
        """Change keys in the file layer (validated), then write the file atomically."""
        with self.lock:
            for key, value in changes.items():
                if key in DEFAULT_CONFIG:
                    _coerce(value, DEFAULT_CONFIG[key])  # raises ValueError on a bad value
            self.file_data = dict(self.file_data, **changes)
            self._resolve()
            if save:
                write_json_atomic(self.path, self.file_data)


class IFlowCredentials:
    """What the iFlow CLI stores in settings.json, re-read when the file changes.

    Keys as the CLI writes them: selectedAuthType, apiKey (fallback searchApiKey),
    baseUrl, modelName, oauth_* tokens. Our config's api_key/base_url are the
    fallback when settings.json has none."""

    def __init__(self, config: Config, path: str = None):
        self.config = config
        self.path = path or iflow_settings_path()
        self._stamp = None
        self._data = {}
        self._lock = threading.Lock()

    def _load(self) -> dict:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                data, problem = ({}, None) if stamp is None else _read_settings(self.path)
                if problem:
                    log.warning("%s", problem)
                self._data, self._stamp = data, stamp
                register_secret(self._data.get("apiKey"))
                register_secret(self._data.get("searchApiKey"))
                for key in ("oauth_access_token", "oauth_refresh_token"):
                    register_secret(self._data.get(key))
            return self._data

    @property
    def api_key(self) -> str:
        data = self._load()
        key = data.get("apiKey") or data.get("searchApiKey") or self.config.get("api_key") or ""
        register_secret(key)
        return key

    @property
    def base_url(self) -> str:
        data = self._load()
        return (data.get("baseUrl") or self.config.get("base_url") or IFLOW_BASE_URL).rstrip("/")

    @property
    def auth_type(self) -> str:
        return self._load().get("selectedAuthType") or ("api-key" if self.config.get("api_key") else "")

    @property
    def model_name(self) -> str:
        return self._load().get("modelName") or ""

    def source(self) -> str:
        data = self._load()
        if data.get("apiKey") or data.get("searchApiKey"):
            return self.path
        return self.config.path if self.config.get("api_key") else ""


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


# == 3. Translation (sans-IO) ===================================================
# Pure functions over dicts: reasoning handling for the OpenAI route. No sockets,
# clocks, files or randomness here. Tests: tests/unit/test_translation.py.

def normalize_reasoning_message(message: dict, preserve: bool) -> dict:
    """Apply `preserve_reasoning_content` to a non-streaming assistant message.

    preserve=False (default): reasoning and answer merged into `content` as
    "reasoning\\n\\nanswer" (the original's README), `reasoning_content` removed.
    preserve=True: `reasoning_content` kept; `content` filled with the reasoning
    when the model answered only there (GLM-5 does), so content-only clients work."""
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        return message
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
    """Streaming form of preserve_reasoning_content=False: reasoning deltas become
    content deltas, with one blank line between the reasoning and the answer.

    The relay asks wants() about the raw bytes of complete events first, so that
    chunks without reasoning are forwarded untouched and never parsed."""

    def __init__(self):
        self.seen_reasoning = False
        self.separated = False

    def wants(self, events: bytes) -> bool:
        return b"reasoning_content" in events or (self.seen_reasoning and not self.separated)

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
            if isinstance(delta, dict) and self._merge_delta(delta):
                changed = True
        return json.dumps(chunk, ensure_ascii=False, separators=(",", ":")) if changed else data

    def _merge_delta(self, delta: dict) -> bool:
        if "reasoning_content" not in delta and not (self.seen_reasoning and delta.get("content")):
            return False
        reasoning = delta.pop("reasoning_content", None) or ""
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
    exc = InvalidRequestError(message)
    exc.param = param
    return exc


def upstream_error_message(body: bytes) -> str:
    """The human text of an upstream error body (OpenAI, iFlow or plain), shortened."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        for candidate in ((error or {}).get("message") if isinstance(error, dict) else error,
                          data.get("message"), data.get("msg"), data.get("detail")):
            if isinstance(candidate, str) and candidate:
                text = candidate
                break
    text = redact(text or "(empty body)")
    return text if len(text) <= 1000 else text[:1000] + "..."


# HTTP status from upstream -> (status to client, OpenAI type, code); anything
# else >= 500 becomes 502. Permanent errors stay 4xx so SDKs do not retry them.
_UPSTREAM_STATUS = {
    400: (400, "invalid_request_error", "invalid_request_error"),
    401: (401, "invalid_request_error", "invalid_api_key"),
    402: (402, "insufficient_quota", "insufficient_quota"),
    403: (403, "permission_error", "permission_error"),
    404: (404, "invalid_request_error", "model_not_found"),
    408: (504, "server_error", "timeout"),
    413: (413, "invalid_request_error", "request_too_large"),
    422: (400, "invalid_request_error", "invalid_request_error"),
    429: (429, "rate_limit_error", "rate_limit_exceeded"),
    500: (500, "server_error", "upstream_error"),
    503: (529, "server_error", "overloaded"),
    504: (504, "server_error", "timeout"),
}
_ANTHROPIC_TYPE = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 529: "overloaded_error"}


def upstream_http_error(status: int, body: bytes, retry_after: str = None) -> Iflow2apiError:
    """The error to answer when the upstream refused a call with an HTTP status."""
    to_client, openai_type, code = _UPSTREAM_STATUS.get(
        status, (400, "invalid_request_error", "invalid_request_error") if 400 <= status < 500
        else (502, "server_error", "upstream_error"))
    message = "upstream %d: %s" % (status, upstream_error_message(body))
    if status == 401:
        message += " (the iFlow API key was refused: log in again with the iFlow CLI)"
    headers = [("retry-after", retry_after)] if retry_after and to_client == 429 else []
    return Iflow2apiError(message, status=to_client, code=code, openai_type=openai_type,
                          anthropic_type=_ANTHROPIC_TYPE.get(to_client, "api_error"), headers=headers)


def error_in_body(data) -> Iflow2apiError:
    """An error carried inside a 200 answer (iFlow sends {"status": "434", "msg": ...}), or None."""
    if not isinstance(data, dict) or data.get("choices"):
        return None
    if isinstance(data.get("error"), (dict, str)):
        error = data["error"]
        code = error.get("code") if isinstance(error, dict) else None
        status = int(code) if isinstance(code, (int, str)) and str(code).isdigit() else 502
        raw = json.dumps(data).encode("utf-8")
        return upstream_http_error(status if 400 <= status < 600 else 502, raw)
    if "status" in data and "msg" in data:
        status, msg = str(data.get("status")), str(data.get("msg"))
        if status == "434" or "apikey" in msg.lower().replace(" ", ""):
            return upstream_http_error(401, json.dumps({"msg": msg}).encode("utf-8"))
        if status == "429" or status == "8211":
            return upstream_http_error(429, json.dumps({"msg": msg}).encode("utf-8"))
        return Iflow2apiError("upstream error %s: %s" % (status, redact(msg)), status=502,
                              code="upstream_error")
    return None


def completion_to_chunks(resp: dict) -> list:
    """A complete chat.completion replayed as chunks, for a stream request that the
    upstream answered with one JSON body."""
    base = {"id": resp.get("id") or "chatcmpl-proxy", "object": "chat.completion.chunk",
            "created": resp.get("created") or 0, "model": resp.get("model") or ""}
    chunks = []
    for choice in resp.get("choices") or []:
        message = dict(choice.get("message") or {})
        message.setdefault("role", "assistant")
        delta = {k: v for k, v in message.items() if v is not None}
        chunks.append(dict(base, choices=[{"index": choice.get("index", 0), "delta": delta,
                                            "finish_reason": None}]))
        chunks.append(dict(base, choices=[{"index": choice.get("index", 0), "delta": {},
                                            "finish_reason": choice.get("finish_reason") or "stop"}]))
    if resp.get("usage"):
        chunks.append(dict(base, choices=[], usage=resp["usage"]))
    return chunks


# == 4. SSE codec (sans-IO) =====================================================
# Incremental text/event-stream parser and encoder. Pure: bytes in, events out.
# Tests: tests/unit/test_sse.py (including byte-at-a-time feeding).

class SSEParser:
    """Split a text/event-stream into (event, data) pairs as bytes arrive.

    Lines may end in \\n, \\r\\n or \\r; `data:` with or without a space (iFlow
    sends none); comments and id/retry fields are ignored. UTF-8 is decoded per
    complete line, so a character split across reads arrives intact."""

    def __init__(self):
        self._buf = b""
        self._event = None
        self._data = []

    def feed(self, chunk: bytes) -> list:
        self._buf += chunk
        out = []
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
        out = []
        if self._buf:
            self._line(self._buf, out)
            self._buf = b""
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list) -> None:
        if not line:
            if self._data:
                out.append((self._event, "\n".join(self._data)))
            self._event, self._data = None, []
        elif line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
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


def split_complete_events(buf: bytes):
    """(complete events, remainder): cut after the last blank line in buf."""
    i = buf.rfind(b"\n\n")
    j = buf.rfind(b"\n\r\n")
    end = max(i + 2 if i != -1 else -1, j + 3 if j != -1 else -1)
    if end == -1:
        return b"", buf
    return buf[:end], buf[end:]


def last_usage_in_stream(tail: bytes):
    """The `usage` object of the last chunk in the tail of an SSE stream that has one."""
    usage = None
    for _event, data in SSEParser().feed(tail[tail.find(b"data:"):] + b"\n\n") if b"data:" in tail else []:
        if '"usage"' not in data:
            continue
        try:
            found = json.loads(data).get("usage")
        except (ValueError, AttributeError):
            continue
        if isinstance(found, dict):
            usage = found
    return usage


# == 5. Upstream: connection pool, iFlow provider, model catalogue ===============
# Keep-alive HTTP(S) connections per host over http.client (TCP_NODELAY, certifi
# when present), the iFlow provider (headers, HMAC signature, per-model tweaks)
# and the model list. System proxy variables are never read.
# Tests: tests/integration/test_upstream.py, tests/unit/test_core_units.py.

IFLOW_TEXT_MODELS = [
    ("glm-4.6", "GLM-4.6"), ("glm-4.7", "GLM-4.7"), ("glm-5", "GLM-5"),
    ("iFlow-ROME-30BA3B", "iFlow-ROME-30BA3B"), ("deepseek-v3.2-chat", "DeepSeek-V3.2"),
    ("qwen3-coder-plus", "Qwen3-Coder-Plus"), ("kimi-k2", "Kimi-K2"),
    ("kimi-k2-thinking", "Kimi-K2-Thinking"), ("kimi-k2.5", "Kimi-K2.5"),
    ("kimi-k2-0905", "Kimi-K2-0905"), ("minimax-m2.5", "MiniMax-M2.5"),
]
IFLOW_VISION_MODELS = [("qwen-vl-max", "Qwen-VL-Max")]
# Unix time of 2025-01-01, the `created` stamp of catalogue entries (stable output).
CATALOGUE_CREATED = 1735689600


def make_tls_context() -> ssl.SSLContext:
    """TLS with certifi's CA bundle when importable (works inside a zip), else the system store."""
    if certifi is not None:
        try:
            return ssl.create_default_context(cadata=certifi.contents())
        except (AttributeError, OSError, ssl.SSLError):
            pass
    return ssl.create_default_context()


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


def _tune_socket(sock, read_timeout_s):
    # Without TCP_NODELAY, Nagle + delayed ACK adds ~40 ms to small SSE writes.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(read_timeout_s)


class UpstreamResponse:
    """An upstream HTTP response bound to its pooled connection.

    read1() returns what is available (for streaming); read() everything.
    close() hands a fully read connection back to the pool, or closes it;
    abort() may be called from another thread to stop a blocked read at once."""

    def __init__(self, pool, key, conn, resp):
        self._pool, self._key, self._conn, self._resp = pool, key, conn, resp
        self.status = resp.status
        self.headers = resp.headers
        self._closed = False

    @property
    def content_type(self) -> str:
        return (self.headers.get("content-type") or "").lower()

    def read(self) -> bytes:
        return self._resp.read()

    def read1(self, n: int = 65536) -> bytes:
        return self._resp.read1(n)

    def wait_readable(self, timeout_s: float) -> bool:
        """True when read1() can return data now or within timeout_s (False: still silent).

        select() alone is wrong here: http.client may already hold the next bytes in
        its buffer (or TLS in its own), invisible to select. So first look into the
        buffer without blocking; for a chunked body, the bytes must include the next
        chunk-size line, or read1() would still block."""
        sock, fp = self._conn.sock, self._resp.fp
        if sock is None or fp is None:
            return True  # closed: read1() returns at once
        sock.settimeout(0.0)
        try:
            buffered = fp.peek(1)
        except (BlockingIOError, ssl.SSLWantReadError):
            buffered = b""
        except OSError:
            return True  # let read1() raise the real error
        finally:
            sock.settimeout(self._conn.read_timeout_s)
        if self._resp.chunked and not self._resp.chunk_left:
            if self._resp.chunk_left == 0 and buffered.startswith(b"\r\n"):
                buffered = buffered[2:]
            if b"\n" in buffered:
                return True
        elif buffered:
            return True
        readable, _w, _x = select.select([sock], [], [], timeout_s)
        return bool(readable)

    def abort(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        reusable = self._resp.isclosed() and not self._resp.will_close
        if reusable:
            self._pool.put(self._key, self._conn)
        else:
            self._conn.close()


class ConnectionPool:
    """Keep-alive connections per (scheme, host, port), taken LIFO."""

    def __init__(self, connect_timeout_s=10.0, read_timeout_s=600.0, max_idle_per_host=64):
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self._idle = collections.defaultdict(list)
        self._lock = threading.Lock()
        self._tls = None

    def _new(self, key):
        scheme, host, port = key
        if scheme == "https":
            if self._tls is None:
                self._tls = make_tls_context()
            return _TLSConnection(host, port, self.connect_timeout_s, self.read_timeout_s, self._tls)
        return _Connection(host, port, self.connect_timeout_s, self.read_timeout_s)

    def put(self, key, conn) -> None:
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
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError("invalid upstream URL %r" % url)
        key = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        conn = self._take(key)
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._new(key)
            try:
                conn.request(method, path, body=body, headers=headers)
                return UpstreamResponse(self, key, conn, conn.getresponse())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if not reused:
                    raise UpstreamError("upstream closed the connection: %s" % exc) from None
                reused, conn = False, None  # stale keep-alive connection: try once on a new one
            except socket.timeout:
                conn.close()
                raise UpstreamTimeoutError("upstream timed out (%s)" % parts.hostname) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise UpstreamError("cannot reach upstream %s: %s" % (parts.netloc, exc)) from None

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class IFlowProvider:
    """The iFlow API as the iFlow CLI calls it: signed headers, per-model tweaks."""

    name = "iflow"

    def __init__(self, credentials: IFlowCredentials, session_id: str = None, clock=time.time):
        self.credentials = credentials
        # One session id per process, as the CLI does; conversation ids per call.
        self.session_id = session_id or str(uuid.uuid4())
        self.clock = clock

    @property
    def has_credentials(self) -> bool:
        return bool(self.credentials.api_key)

    def headers(self, is_stream: bool) -> dict:
        api_key = self.credentials.api_key
        timestamp_ms = int(self.clock() * 1000)
        headers = {
            "Content-Type": "application/json",
            "Authorization": "Bearer " + api_key,
            "User-Agent": IFLOW_USER_AGENT,
            "session-id": self.session_id,
            "conversation-id": str(uuid.uuid4()),
            "x-iflow-timestamp": str(timestamp_ms),
            "x-iflow-signature": iflow_signature(api_key, self.session_id, timestamp_ms),
        }
        if not is_stream:
            # Streaming calls send no Accept: with one the upstream may answer JSON, not SSE.
            headers["Accept"] = "application/json"
        return headers

    def prepare(self, body: dict):
        """(url, headers, body bytes) for a chat completion call."""
        body = iflow_model_tweaks(body)
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return (self.credentials.base_url + "/chat/completions",
                self.headers(bool(body.get("stream"))), data)

    def models_request(self):
        headers = self.headers(False)
        headers.pop("Content-Type", None)
        return self.credentials.base_url + "/models", headers


class ModelCatalogue:
    """The known iFlow models merged with the upstream /models answer (cached)."""

    def __init__(self, provider, pool: ConnectionPool, ttl_s: float = 600.0, clock=time.monotonic):
        self.provider, self.pool, self.ttl_s, self.clock = provider, pool, ttl_s, clock
        self._fetched_at = None
        self._upstream_ids = []
        self._lock = threading.Lock()

    def models(self) -> list:
        """[(id, display name, kind)] with kind "text" or "vision", catalogue first."""
        entries = [(m, d, "text") for m, d in IFLOW_TEXT_MODELS]
        entries += [(m, d, "vision") for m, d in IFLOW_VISION_MODELS]
        known = {m for m, _d, _k in entries}
        entries += [(m, m, "text") for m in self._upstream() if m not in known]
        return entries

    def _upstream(self) -> list:
        with self._lock:
            now = self.clock()
            if self._fetched_at is not None and now - self._fetched_at < self.ttl_s:
                return self._upstream_ids
            self._fetched_at = now
            if self.provider.has_credentials:
                self._upstream_ids = self._fetch() or self._upstream_ids
            return self._upstream_ids

    def _fetch(self) -> list:
        url, headers = self.provider.models_request()
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


# == 6. Auth: client API keys ===================================================
# Which keys a client must present (Bearer or x-api-key). With none configured,
# every local client is accepted. Tests: tests/integration/test_server.py.

def client_key_of(headers) -> str:
    """The key a client sent: x-api-key first, then Authorization: Bearer."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return ""


class ClientKeys:
    """Configured client keys (`api_keys` list plus the original's `custom_api_key`)."""

    def __init__(self, config: Config):
        keys = [k for k in config.get("api_keys") or [] if isinstance(k, str) and k]
        if config.get("custom_api_key"):
            keys.append(config.get("custom_api_key"))
        for key in keys:
            register_secret(key)
        self._digests = {hashlib.sha256(k.encode("utf-8")).digest() for k in keys}

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def check(self, headers) -> None:
        """Raise AuthenticationError unless the request carries a configured key."""
        if not self._digests:
            return
        key = client_key_of(headers)
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        if not key or not any(hmac.compare_digest(digest, d) for d in self._digests):
            raise AuthenticationError("invalid or missing API key: send it as 'Authorization: Bearer <key>' "
                                      "or 'x-api-key: <key>'")


# == 7. HTTP server =============================================================
# Request/Response types, a router, the app wrapper (errors, CORS, access log),
# two socket adapters (h11 when importable, else http.server) with limits on
# body size, header/idle timeouts and connections, and a watcher that notices
# clients leaving mid-stream. Tests: tests/integration/test_server.py (both adapters).

class Headers:
    """Case-insensitive, multi-valued request headers in arrival order."""

    __slots__ = ("_items",)

    def __init__(self, items=()):
        self._items = [(k.lower(), v) for k, v in items]

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
        self.id = "req_" + uuid.uuid4().hex[:24]
        self.log = {}  # model, tokens, ... for the access log line
        self._watcher = watcher

    @property
    def query(self) -> dict:
        return urllib.parse.parse_qs(self.query_string)

    def json(self):
        """The body parsed as JSON (whatever the content-type says), or a 400."""
        if not self.body:
            raise InvalidRequestError("request body is empty; expected a JSON object")
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequestError("request body is not valid JSON: %s" % exc) from None

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
        self._on_close = []
        self._closed = False

    @classmethod
    def json(cls, obj, status=200, headers=None):
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
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
    status = exc.status
    if dialect == "anthropic":
        body = {"type": "error", "error": {"type": exc.anthropic_type, "message": str(exc)}}
        if request_id:
            body["request_id"] = request_id
    else:
        if status == 529:  # Anthropic's "overloaded" has no OpenAI equivalent: 503
            status = 503
        body = {"error": {"message": str(exc), "type": exc.openai_type, "param": getattr(exc, "param", None),
                          "code": exc.code}}
    return Response.json(body, status, exc.headers)


class Router:
    """Maps (method, path) to handlers; `{name}` segments become req.params."""

    def __init__(self):
        self._exact = {}
        self._patterns = []

    def add(self, methods, path: str, handler, dialect: str = "openai") -> None:
        for method in methods.split():
            if "{" in path:
                regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
                self._patterns.append((method, regex, handler, dialect))
            else:
                self._exact[(method, path)] = (handler, dialect)

    def match(self, method: str, path: str):
        """(handler, params, dialect); NotFoundError or MethodNotAllowedError otherwise."""
        found = self._exact.get((method, path))
        if found is None and method == "HEAD":
            found = self._exact.get(("GET", path))
        if found is not None:
            return found[0], {}, found[1]
        path_known = any(p == path for (_m, p) in self._exact)
        for m, regex, handler, dialect in self._patterns:
            hit = regex.match(path)
            if hit and (m == method or (method == "HEAD" and m == "GET")):
                return handler, hit.groupdict(), dialect
            path_known = path_known or bool(hit)
        if path_known:
            raise MethodNotAllowedError("method %s is not allowed on %s" % (method, path))
        raise NotFoundError("no route for %s %s" % (method, path))


class App:
    """Routing, error handling, CORS and the one access-log line per request."""

    def __init__(self, router: Router, cors_origins=("*",), stats=None):
        self.router = router
        self.cors_origins = list(cors_origins or [])
        self.stats = stats
        self.access_log = get_logger("access")

    def handle(self, req: Request) -> Response:
        started = time.monotonic()
        dialect = "anthropic" if req.path.startswith(("/v1/messages", "/messages")) else "openai"
        try:
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
        resp.on_close(lambda: self._log(req, resp, started))
        return resp

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
        self.access_log.info("%s %s model=%s status=%d ms=%.0f%s%s", req.method, req.path,
                             info.get("model", "-"), resp.status, ms, tokens,
                             " error=%r" % info["error"][:200] if info.get("error") else "")
        if self.stats is not None:
            self.stats.record(resp.status, info, ms)


class DisconnectWatcher:
    """One thread that notices clients closing their connection mid-stream.

    A streaming handler is usually blocked reading the upstream; it only learns
    the client left at its next write, which may be long. This thread polls the
    client sockets of active streams and runs their callback (which aborts the
    upstream read) as soon as a socket reports EOF."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._pending = []  # ("add"|"remove", sock, callback) applied by the thread
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="iflow2api-disconnects", daemon=True)
        self._running = True
        self._thread.start()

    def watch(self, sock, callback):
        token = object()
        self._post(("add", sock, (token, callback)))

        def cancel():
            self._post(("remove", sock, token))
        return cancel

    def close(self) -> None:
        self._running = False
        self._post(None)

    def _post(self, item) -> None:
        with self._lock:
            self._pending.append(item)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _apply(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for item in pending:
            if item is None:
                continue
            action, sock, payload = item
            try:
                if action == "add":
                    self._selector.register(sock, selectors.EVENT_READ, payload)
                else:
                    key = self._selector.get_key(sock)
                    if key.data[0] is payload:
                        self._selector.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass  # socket already closed or never registered

    def _run(self) -> None:
        while self._running:
            for key, _mask in self._selector.select(timeout=1.0):
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except OSError:
                        pass
                    continue
                self._check(key)
            self._apply()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _check(self, key) -> None:
        sock = key.fileobj
        try:
            gone = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            gone = True
        try:
            self._selector.unregister(sock)  # readable but not gone: pipelined data; stop polling
        except (KeyError, ValueError):
            pass
        if gone:
            try:
                key.data[1]()
            except Exception:
                log.exception("disconnect callback failed")


class Limits:
    """Server limits (from config): body size, timeouts, connection count."""

    def __init__(self, max_body_bytes=32 * MIB, header_timeout_s=20.0, idle_timeout_s=75.0,
                 max_connections=1024):
        self.max_body_bytes = max_body_bytes
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections

    @classmethod
    def from_config(cls, config) -> "Limits":
        return cls(config["max_body_bytes"], config["header_timeout_s"], config["idle_timeout_s"],
                   config["max_connections"])


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
    def __init__(self, conn):
        self.conn = conn

    def head(self, status: int, headers: list) -> bytes:
        return self.conn.send(h11.Response(status_code=status, headers=headers,
                                           reason=http.client.responses.get(status, "Unknown")))

    def data(self, piece: bytes) -> bytes:
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
                sock.sendall(head + framer.end())
            else:
                sock.sendall(head + framer.data(body) + framer.end())
            return True
        pieces = iter(resp.stream)
        first = b""
        for first in pieces:
            if first:
                break
        sock.sendall(framer.head(resp.status, headers) + (framer.data(first) if first else b""))
        for piece in pieces:
            if piece:
                sock.sendall(framer.data(piece))
        sock.sendall(framer.end())
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
    request_queue_size = 256

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
        self.timeout = self.server.limits.idle_timeout_s  # applied by StreamRequestHandler.setup
        super().setup()

    def parse_request(self):
        # The request line has arrived: the rest of the head must follow promptly.
        self.connection.settimeout(self.server.limits.header_timeout_s)
        return super().parse_request()

    def log_message(self, format, *args):  # noqa: A002 - name fixed by http.server
        pass  # App logs one line per request

    def send_error(self, code, message=None, explain=None):
        """Protocol errors found by http.server, answered in JSON."""
        self.close_connection = True
        exc = Iflow2apiError(message or http.client.responses.get(code, "error"), status=code,
                             code="bad_request" if code < 500 else "server_error",
                             openai_type="invalid_request_error" if code < 500 else "server_error")
        framer = _PlainFramer(True, False)
        send_response(self.connection, framer, error_response(exc, "openai"))

    def _read_body(self) -> bytes:
        limit = self.server.limits.max_body_bytes
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            return _read_chunked(self.rfile, limit)
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            raise InvalidRequestError("invalid Content-Length") from None
        if length < 0:
            raise InvalidRequestError("invalid Content-Length")
        if length > limit:
            raise RequestTooLargeError("request body is %d bytes; the limit is %d" % (length, limit))
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionError("client closed during the body")
        return body

    def _dispatch(self):
        try:
            body = self._read_body()
        except (RequestTooLargeError, InvalidRequestError) as exc:
            self.close_connection = True  # the unread body makes the connection unusable
            dialect = "anthropic" if self.path.startswith(("/v1/messages", "/messages")) else "openai"
            send_response(self.connection, _PlainFramer(True, False), error_response(exc, dialect))
            _drain(self.connection)
            return
        except (OSError, ConnectionError):
            self.close_connection = True
            return
        self.connection.settimeout(self.server.limits.idle_timeout_s)
        req = Request(self.command, self.path, Headers(self.headers.items()), body,
                      self.client_address, self.connection, self.server.watcher)
        resp = self.server.app.handle(req)
        framer = _PlainFramer(self.request_version == "HTTP/1.1", not self.close_connection)
        if not send_response(self.connection, framer, resp, head_only=self.command == "HEAD"):
            self.close_connection = True
        elif not framer.keep_alive:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _dispatch


def _read_chunked(rfile, limit: int) -> bytes:
    """Decode a chunked request body, refusing more than limit bytes."""
    parts, total = [], 0
    while True:
        line = rfile.readline(1024)
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise InvalidRequestError("malformed chunked body") from None
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        total += size
        if total > limit:
            raise RequestTooLargeError("request body exceeds the limit of %d bytes" % limit)
        parts.append(rfile.read(size))
        rfile.readline(1024)


class _H11Handler(socketserver.BaseRequestHandler):
    """The h11 adapter: h11 parses and frames, we route."""

    def handle(self):
        sock, server = self.request, self.server
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        while True:
            try:
                req = self._read_request(conn, sock, server.limits)
            except Iflow2apiError as exc:
                self._refuse(conn, sock, exc)
                return
            except h11.RemoteProtocolError as exc:
                self._refuse(conn, sock, InvalidRequestError("malformed HTTP request: %s" % exc,
                                                             status=exc.error_status_hint))
                return
            except (OSError, socket.timeout):
                return
            if req is None:
                return
            sock.settimeout(server.limits.idle_timeout_s)
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
        head, body, size = None, [], 0
        got_bytes = conn.trailing_data[0] != b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if head is not None and conn.they_are_waiting_for_100_continue:
                    sock.sendall(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                sock.settimeout(limits.header_timeout_s if got_bytes else limits.idle_timeout_s)
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    if got_bytes:
                        raise Iflow2apiError("request head or body too slow", status=408,
                                             code="timeout", openai_type="invalid_request_error",
                                             anthropic_type="timeout_error") from None
                    return None
                got_bytes = True
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
                length = _header_value(event.headers, b"content-length")
                if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
                    raise RequestTooLargeError("request body is %s bytes; the limit is %d"
                                               % (length, limits.max_body_bytes))
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limits.max_body_bytes:
                    raise RequestTooLargeError("request body exceeds the limit of %d bytes"
                                               % limits.max_body_bytes)
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                headers = Headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers)
                return Request(head.method.decode("ascii"), head.target.decode("latin-1"), headers,
                               b"".join(body), self.client_address, sock, self.server.watcher)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def _refuse(self, conn, sock, exc: Iflow2apiError) -> None:
        """Answer a request we will not read (too large, malformed) and close."""
        resp = error_response(exc, "openai")
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


def _header_value(headers, name: bytes):
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


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
        self.host = host
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

    def stop(self, timeout_s: float = 5.0) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.close_all_connections()
        self.watcher.close()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def connection_count(self) -> int:
        return self._server.connection_count


# == 8. Routes: OpenAI API, health, models =======================================
# Every public endpoint is registered in Api.router(), one table. Handlers turn
# a Request into a Response using the upstream (section 5) and translation
# (section 3). Tests: tests/integration/test_openai_api.py.

NO_CREDENTIALS_MESSAGE = (
    "no iFlow credentials: log in with the iFlow CLI (run `iflow` and choose 'Login with iFlow' "
    "or 'API key'), which writes ~/.iflow/settings.json, or put \"api_key\" in %s; then retry")


class ConcurrencyLimiter:
    """At most `limit` upstream calls at once; others wait up to timeout_s, then 429."""

    def __init__(self, limit: int, timeout_s: float):
        self.limit, self.timeout_s = limit, timeout_s
        self._sem = threading.Semaphore(limit)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.waiting = 0
        self.rejected = 0

    def acquire(self):
        """A release function for the taken slot; RateLimitError after the wait."""
        with self._lock:
            self.waiting += 1
        try:
            ok = self._sem.acquire(timeout=self.timeout_s)
        finally:
            with self._lock:
                self.waiting -= 1
                if ok:
                    self.in_flight += 1
                else:
                    self.rejected += 1
        if not ok:
            raise RateLimitError("too many concurrent requests (limit %d); retry shortly" % self.limit,
                                 headers=[("retry-after", "1")])
        released = []

        def release():
            if not released:
                released.append(True)
                with self._lock:
                    self.in_flight -= 1
                self._sem.release()
        return release


class Stats:
    """Request counters for /health and the status snapshot."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.by_model = collections.Counter()

    def record(self, status: int, info: dict, ms: float) -> None:
        with self._lock:
            self.requests += 1
            if status >= 400:
                self.errors += 1
            self.input_tokens += int(info.get("input_tokens") or 0)
            self.output_tokens += int(info.get("output_tokens") or 0)
            if info.get("model"):
                self.by_model[info["model"]] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "errors": self.errors, "input_tokens": self.input_tokens,
                    "output_tokens": self.output_tokens, "by_model": dict(self.by_model)}


class Api:
    """The HTTP API of one server instance."""

    def __init__(self, config: Config, credentials: IFlowCredentials, provider: IFlowProvider,
                 pool: ConnectionPool, catalogue: ModelCatalogue, limiter: ConcurrencyLimiter,
                 stats: Stats, client_keys: ClientKeys, adapter: str, clock=time.monotonic):
        self.config, self.credentials, self.provider = config, credentials, provider
        self.pool, self.catalogue, self.limiter, self.stats = pool, catalogue, limiter, stats
        self.client_keys, self.adapter, self.clock = client_keys, adapter, clock
        self.started_at = clock()

    def router(self) -> Router:
        r = Router()
        r.add("GET", "/", self.root)
        r.add("GET", "/health", self.health)
        for path in ("/v1/models", "/models"):
            r.add("GET", path, self.list_models)
        r.add("GET", "/v1/models/{model_id}", self.get_model)
        r.add("GET", "/v1/vision-models", self.list_vision_models)
        for path in ("/v1/chat/completions", "/v1/chat/completions/", "/chat/completions",
                     "/chat/completions/", "/api/v1/chat/completions", "/api/v1/chat/completions/",
                     "/", "/v1", "/v1/"):
            r.add("POST", path, self.chat_completions)
        return r

    # -- small endpoints -------------------------------------------------------

    def root(self, req: Request) -> Response:
        return Response.json({"name": "iflow2api", "version": __version__, "status": "running",
                              "endpoints": {"openai": "/v1/chat/completions", "models": "/v1/models",
                                            "health": "/health"}})

    def health(self, req: Request) -> Response:
        has_key = self.provider.has_credentials
        body = {
            "status": "ok" if has_key else "no_credentials",
            "version": __version__,
            "uptime_s": round(self.clock() - self.started_at, 1),
            "credentials": {"present": has_key, "auth_type": self.credentials.auth_type or None},
            "upstream": self.credentials.base_url,
            "http_adapter": self.adapter,
            "concurrency": {"limit": self.limiter.limit, "in_flight": self.limiter.in_flight,
                            "waiting": self.limiter.waiting},
            "requests": self.stats.snapshot()["requests"],
        }
        if not has_key:
            body["message"] = NO_CREDENTIALS_MESSAGE % self.config.path
        return Response.json(body)

    def _model_entries(self, kinds=("text", "vision")) -> list:
        return [_model_entry(model_id, display) for model_id, display, kind in self.catalogue.models()
                if kind in kinds]

    def list_models(self, req: Request) -> Response:
        self.client_keys.check(req.headers)
        data = self._model_entries()
        return Response.json({"object": "list", "data": data, "has_more": False,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})

    def list_vision_models(self, req: Request) -> Response:
        self.client_keys.check(req.headers)
        return Response.json({"object": "list", "data": self._model_entries(("vision",))})

    def get_model(self, req: Request) -> Response:
        self.client_keys.check(req.headers)
        for entry in self._model_entries():
            if entry["id"] == req.params["model_id"]:
                return Response.json(entry)
        raise NotFoundError("model %r not found" % req.params["model_id"], code="model_not_found")

    # -- chat completions ------------------------------------------------------

    def chat_completions(self, req: Request) -> Response:
        self.client_keys.check(req.headers)
        body = validate_chat_request(req.json())
        if not body.get("model"):
            body["model"] = (self.config.get("default_model") or self.credentials.model_name
                             or DEFAULT_MODEL)
        req.log["model"] = body["model"]
        if not self.provider.has_credentials:
            raise AuthenticationError(NO_CREDENTIALS_MESSAGE % self.config.path)
        is_stream = bool(body.get("stream"))
        release = self.limiter.acquire()
        try:
            url, headers, data = self.provider.prepare(body)
            upstream = self.pool.request("POST", url, headers, data)
        except BaseException:
            release()
            raise
        if not 200 <= upstream.status < 300:
            raw = _read_all(upstream, release)
            raise upstream_http_error(upstream.status, raw, upstream.headers.get("retry-after"))
        if is_stream and "text/event-stream" in upstream.content_type:
            return self._stream_response(req, upstream, release)
        result = _parse_completion(_read_all(upstream, release))
        _log_usage(req, result.get("usage"))
        if is_stream:  # the upstream answered a stream request with one JSON body
            chunks = completion_to_chunks(result)
            return _sse_response(b"".join(encode_sse_data(json.dumps(c, ensure_ascii=False))
                                          for c in chunks) + encode_sse_data("[DONE]"))
        preserve = self.config.get("preserve_reasoning_content")
        for choice in result.get("choices") or []:
            if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
                normalize_reasoning_message(choice["message"], preserve)
        return Response.json(result)

    def _stream_response(self, req: Request, upstream: UpstreamResponse, release) -> Response:
        """Relay the upstream SSE stream; an error in the first event is still an HTTP error."""
        try:
            first = upstream.read1(65536)
        except BaseException:
            upstream.close()
            release()
            raise
        if b'"choices"' not in first[:4096] and (b'"error"' in first or b'"msg"' in first):
            for _event, data in SSEParser().feed(first + b"\n\n"):
                try:
                    problem = error_in_body(json.loads(data))
                except ValueError:
                    continue
                if problem is not None:
                    upstream.close()
                    release()
                    raise problem
        merger = None if self.config.get("preserve_reasoning_content") else ReasoningMerger()
        return _sse_response(self._relay(req, upstream, release, first, merger))

    def _relay(self, req, upstream, release, first: bytes, merger):
        """Forward upstream bytes as they arrive; only rewrite events that need it."""
        cancel = req.watch_disconnect(upstream.abort)
        parser = SSEParser()
        pending, older, previous, data = b"", b"", b"", first
        try:
            try:
                while data:
                    if merger is None:
                        out = data
                    else:
                        events, pending = split_complete_events(pending + data)
                        out = _rewrite_events(events, parser, merger) if merger.wants(events) else events
                    if out:
                        yield out
                    older, previous = previous, data
                    data = upstream.read1(65536)
                if pending:
                    yield _rewrite_events(pending + b"\n\n", parser, merger)
            except (OSError, http.client.HTTPException) as exc:
                message = "upstream stream failed: %s" % (exc or exc.__class__.__name__)
                req.log["error"] = message
                yield encode_sse_data(json.dumps({"error": {"message": message, "type": "server_error",
                                                            "code": "upstream_error"}}))
        finally:
            cancel()
            upstream.close()
            release()
            # Usage comes in the last chunks: look only there, once, at the end.
            _log_usage(req, last_usage_in_stream(older + previous + data))


def _rewrite_events(events: bytes, parser: SSEParser, merger: ReasoningMerger) -> bytes:
    return b"".join(encode_sse_data(merger.rewrite(data)) for _event, data in parser.feed(events))


def _sse_response(stream) -> Response:
    body = stream if isinstance(stream, bytes) else b""
    return Response(200, body, [("content-type", "text/event-stream; charset=utf-8"),
                                ("cache-control", "no-cache"), ("x-accel-buffering", "no")],
                    stream=None if isinstance(stream, bytes) else stream)


def _read_all(upstream: UpstreamResponse, release) -> bytes:
    try:
        return upstream.read()
    except socket.timeout:
        raise UpstreamTimeoutError("upstream timed out while answering") from None
    except (OSError, http.client.HTTPException) as exc:
        raise UpstreamError("upstream connection failed: %s" % exc) from None
    finally:
        upstream.close()
        release()


def _parse_completion(raw: bytes) -> dict:
    try:
        result = json.loads(raw)
    except ValueError:
        raise UpstreamError("upstream returned a body that is not JSON: %s"
                            % upstream_error_message(raw)[:200]) from None
    problem = error_in_body(result)
    if problem is not None:
        raise problem
    if not isinstance(result, dict) or not isinstance(result.get("choices"), list):
        raise UpstreamError("upstream returned no choices")
    return result


def _log_usage(req: Request, usage) -> None:
    if isinstance(usage, dict):
        req.log["input_tokens"] = usage.get("prompt_tokens", usage.get("input_tokens"))
        req.log["output_tokens"] = usage.get("completion_tokens", usage.get("output_tokens"))


def _model_entry(model_id: str, display: str) -> dict:
    """One model in a shape both the OpenAI and the Anthropic SDK parse."""
    return {"id": model_id, "object": "model", "created": CATALOGUE_CREATED, "owned_by": "iflow",
            "type": "model", "display_name": display, "created_at": "2025-01-01T00:00:00Z"}


# == 9. Service: instances, status, logs =========================================
# The object the CLI, the admin API and the GUI drive: start/stop server
# instances, status snapshot, recent log lines, config. Tests: tests/integration.

class Instance:
    """One listening server with its own upstream pool, limiter and counters."""

    def __init__(self, config: Config, name: str = "default", host: str = None, port: int = None,
                 adapter: str = None):
        self.name, self.config = name, config
        self.host = host or config["host"]
        self.port = config["port"] if port is None else port
        self.adapter = adapter or pick_http_adapter(config.env)
        self.credentials = IFlowCredentials(config)
        self.pool = ConnectionPool(config["upstream_connect_timeout_s"], config["upstream_read_timeout_s"])
        self.provider = IFlowProvider(self.credentials)
        self.catalogue = ModelCatalogue(self.provider, self.pool, config["models_cache_s"])
        self.limiter = ConcurrencyLimiter(config["concurrency"], config["queue_timeout_s"])
        self.stats = Stats()
        self.api = Api(config, self.credentials, self.provider, self.pool, self.catalogue,
                       self.limiter, self.stats, ClientKeys(config), self.adapter)
        self.app = App(self.api.router(), config["cors_allow_origins"], self.stats)
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
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.server is not None:
            self.server.stop(timeout_s)
            self.server = None
        self.pool.close()

    def status(self) -> dict:
        return {"name": self.name, "running": self.running, "url": self.url, "host": self.host,
                "port": self.port, "http_adapter": self.adapter,
                "credentials": self.provider.has_credentials,
                "in_flight": self.limiter.in_flight, **self.stats.snapshot()}


class Service:
    """Server instances plus config and recent logs: what the CLI/GUI/admin drive."""

    def __init__(self, config: Config = None):
        self.config = config or Config()
        self.instances = {}
        self.log_buffer = RecentLogHandler()
        logging.getLogger("iflow2api").addHandler(self.log_buffer)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, overrides: dict = None, path: str = None, env=None) -> "Service":
        """A service whose config takes `overrides` as its command-line layer."""
        return cls(Config(path=path, env=env, cli=overrides))

    def start(self, name: str = "default", host: str = None, port: int = None) -> Instance:
        """Start (or return the running) instance `name`; OSError when the port is taken."""
        with self._lock:
            instance = self.instances.get(name)
            if instance is None or not instance.running:
                instance = Instance(self.config, name, host, port)
                instance.start()
                self.instances[name] = instance
            return instance

    def stop(self, name: str = None, timeout_s: float = 5.0) -> None:
        """Stop one instance, or all when name is None."""
        with self._lock:
            names = [name] if name else list(self.instances)
            for n in names:
                instance = self.instances.pop(n, None)
                if instance is not None:
                    instance.stop(timeout_s)
        if name is None:
            logging.getLogger("iflow2api").removeHandler(self.log_buffer)

    def status(self) -> dict:
        return {"version": __version__, "config_path": self.config.path,
                "instances": [i.status() for i in self.instances.values()]}

    def recent_logs(self, count: int = 100) -> list:
        return list(self.log_buffer.lines)[-count:]

    def config_get(self) -> dict:
        """The effective config with secrets masked."""
        return {k: (mask_secret(v) if k in _SECRET_KEYS and isinstance(v, str) else v)
                for k, v in self.config.values.items()}

    def config_set(self, changes: dict) -> None:
        self.config.update(changes)


_SECRET_KEYS = {"api_key", "custom_api_key", "oauth_access_token", "oauth_refresh_token"}


# == 10. CLI ====================================================================
# `iflow2api [serve] [--host H] [--port P] [--config FILE] [--log-level L]`,
# `iflow2api version [--verbose]`, `iflow2api models`, `iflow2api config [KEY [VALUE]]`.
# Tests: tests/integration/test_cli.py.

COMMANDS = ("serve", "version", "models", "config")


def _common_options(parser) -> None:
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 28000)")
    parser.add_argument("--config", metavar="FILE", help="config file (default ~/.iflow2api/config.json)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        type=str.upper, help="log level (default INFO)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iflow2api",
        description="Local OpenAI-compatible API bridge to the iFlow API.",
        epilog="commands: serve (default), version, models, config. "
               "Run 'iflow2api COMMAND --help' for details.")
    _common_options(parser)
    parser.add_argument("--version", action="version", version="iflow2api " + __version__)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the server (default)")
    _common_options(serve)
    version = sub.add_parser("version", help="print the version")
    version.add_argument("--verbose", action="store_true", help="also list optional packages in use")
    models = sub.add_parser("models", help="list the models the server offers")
    _common_options(models)
    config = sub.add_parser("config", help="show or change the config")
    config.add_argument("--config", metavar="FILE")
    config.add_argument("key", nargs="?")
    config.add_argument("value", nargs="?", help="new value (JSON or plain text)")
    return parser


def main(argv=None) -> int:
    """Entry point of the console script and of `python iflow2api.py`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in COMMANDS for a in argv[:1]) and not any(a in ("-h", "--help", "--version") for a in argv):
        argv = ["serve"] + argv
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    if command == "version":
        return _cmd_version(args)
    cli = {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
           "log_level": getattr(args, "log_level", None)}
    config = Config(path=getattr(args, "config", None), cli=cli)
    setup_logging(config["log_level"])
    for warning in config.warnings:
        log.warning("config: %s", warning)
    try:
        if command == "models":
            return _cmd_models(config)
        if command == "config":
            return _cmd_config(config, args.key, args.value)
        return _cmd_serve(config)
    except Iflow2apiError as exc:
        raise SystemExit("iflow2api: %s" % exc)
    except Exception:
        if getattr(args, "debug", False):
            raise
        log.exception("internal error")
        return 1


def _cmd_version(args) -> int:
    print("iflow2api " + __version__)
    if args.verbose:
        print("python %s" % sys.version.split()[0])
        print("h11: %s" % (getattr(h11, "__version__", "yes") if h11 else "not installed (stdlib HTTP parser)"))
        print("certifi: %s" % (getattr(certifi, "__version__", "yes") if certifi else
                                "not installed (system CA store)"))
    return 0


def _cmd_models(config: Config) -> int:
    instance = Instance(config)
    for model_id, display, kind in instance.catalogue.models():
        print("%-24s %-24s %s" % (model_id, display, kind))
    return 0


def _cmd_config(config: Config, key, value) -> int:
    if key is None:
        print(json.dumps(Service(config).config_get(), indent=2, ensure_ascii=False))
        return 0
    if value is None:
        shown = config.get(key)
        print(json.dumps(mask_secret(shown) if key in _SECRET_KEYS and isinstance(shown, str) else shown))
        return 0
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    try:
        config.update({key: parsed})
    except (TypeError, ValueError) as exc:
        raise SystemExit("iflow2api: %s: %s; see 'iflow2api config' for current values" % (key, exc))
    print("%s = %s (saved to %s)" % (key, json.dumps(config.get(key)), config.path))
    return 0


def _cmd_serve(config: Config) -> int:
    if h11 is None:
        log.info("h11 not installed: using the stdlib HTTP parser")
    if certifi is None:
        log.info("certifi not installed: using the system CA store")
    service = Service(config)
    try:
        instance = service.start()
    except OSError as exc:
        raise SystemExit("iflow2api: cannot listen on %s:%s (%s); pick another port with --port"
                         % (config["host"], config["port"], exc.strerror or exc))
    credentials = instance.credentials
    log.info("iflow2api %s listening on %s (http: %s, upstream: %s)", __version__, instance.url,
             instance.adapter, credentials.base_url)
    if instance.provider.has_credentials:
        log.info("credentials: %s (%s)", credentials.source(), credentials.auth_type or "api-key")
    else:
        log.warning(NO_CREDENTIALS_MESSAGE, config.path)
    log.info("OpenAI clients: base_url=%s/v1", instance.url)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, on_signal)
        except (ValueError, OSError):  # pragma: no cover - not the main thread
            pass
    while not stop.wait(0.5):
        pass
    log.info("shutting down")
    service.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    # `python iflow2api.py gui` imports iflow2api_gui, which imports iflow2api; register
    # this module under its real name so that import does not load a second copy.
    sys.modules.setdefault("iflow2api", sys.modules[__name__])
    raise SystemExit(main())
