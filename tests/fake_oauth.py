"""A fake iFlow OAuth server (authorize, token, user info) that tests start on 127.0.0.1.

It behaves like the endpoints described in docs/original.md:

- GET  /oauth?client_id&loginMethod&type&redirect&state: the login page. The fake
  "logs the user in" at once and answers 302 to `redirect` with `code` and the same
  `state` (or `error=access_denied` when told to deny). An unknown client_id or a
  missing redirect/state is a 400 page, not a redirect.
- POST /oauth/token: form body, `Authorization: Basic base64(client_id:secret)`.
  grant_type=authorization_code (code single-use, redirect_uri must match the one
  the code was issued for) or grant_type=refresh_token (rotating refresh tokens:
  the old one stops working). Answers access_token, refresh_token, expires_in
  (`expires_in` attribute, read at issue time). `fail_refresh = True` makes
  refresh grants fail with 400 invalid_grant (the description quotes the refresh
  token, so tests can prove it is redacted).
- GET  /api/oauth/getUserInfo?accessToken=: {"success": true, "data": {"apiKey", ...}};
  every token issue (login or refresh) maps to a new apiKey unless
  `new_key_per_refresh` is False.

Every request is recorded (`requests`, with lowercased headers, parsed query/form).
`urls()` returns the three config keys pointing here; `secrets()` lists every
token, code and key handed out (for "no secret in any log line" checks).
"""
import base64
import collections
import itertools
import json
import secrets
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLIENT_ID = "10009311001"
CLIENT_SECRET = "4Z3YjXycVsQvyGF1etiNlIBB4RsqSDtW"

OAuthRequest = collections.namedtuple("OAuthRequest", "method path headers query form")


def _token(prefix):
    # Random and unlike "sk-..." keys, so only the server's own secret registry can hide them.
    return prefix + secrets.token_hex(16)


class FakeOAuth:
    def __init__(self, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, expires_in=3600, host="127.0.0.1"):
        self.client_id, self.client_secret = client_id, client_secret
        self.expires_in = expires_in
        self.fail_refresh = False
        self.deny = False
        self.new_key_per_refresh = True
        self.requests = []
        self.lock = threading.Lock()
        self._codes = {}  # code -> (redirect_uri, user)
        self._access = {}  # access token -> (api key, user)
        self._refresh = {}  # live refresh token -> (api key, user)
        self._issued = []  # every secret handed out
        self._users = itertools.count(1)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                parts = urllib.parse.urlsplit(self.path)
                query = {k: v[0] for k, v in urllib.parse.parse_qs(parts.query).items()}
                fake._record(self, "GET", parts.path, query, {})
                if parts.path == "/oauth":
                    return fake._authorize(self, query)
                if parts.path == "/api/oauth/getUserInfo":
                    return fake._user_info(self, query)
                return fake._send_json(self, 404, {"error": "not_found"})

            def do_POST(self):
                parts = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length).decode("utf-8", "replace")
                form = {k: v[0] for k, v in urllib.parse.parse_qs(raw, keep_blank_values=True).items()}
                fake._record(self, "POST", parts.path, {}, form)
                if parts.path == "/oauth/token":
                    return fake._token_endpoint(self, form)
                return fake._send_json(self, 404, {"error": "not_found"})

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base = "http://%s:%d" % (host, self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    # -- what tests use ---------------------------------------------------------

    def urls(self) -> dict:
        return {"oauth_authorize_url": self.base + "/oauth",
                "oauth_token_url": self.base + "/oauth/token",
                "oauth_userinfo_url": self.base + "/api/oauth/getUserInfo"}

    def token_requests(self, grant_type=None) -> list:
        with self.lock:
            return [r for r in self.requests if r.path == "/oauth/token"
                    and (grant_type is None or r.form.get("grant_type") == grant_type)]

    def user_info_requests(self) -> list:
        with self.lock:
            return [r for r in self.requests if r.path == "/api/oauth/getUserInfo"]

    def api_key_for(self, access_token):
        with self.lock:
            entry = self._access.get(access_token)
        return entry[0] if entry else None

    def live_refresh_tokens(self) -> list:
        with self.lock:
            return list(self._refresh)

    def secrets(self) -> list:
        with self.lock:
            return list(self._issued)

    def api_keys(self) -> list:
        """Every apiKey handed out, oldest first."""
        with self.lock:
            keys = []
            for api_key, _user in self._access.values():
                if api_key not in keys:
                    keys.append(api_key)
            return keys

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- endpoints ---------------------------------------------------------------

    def _authorize(self, handler, query):
        if query.get("client_id") != self.client_id:
            return self._send_html(handler, 400, "unknown client_id")
        redirect, state = query.get("redirect"), query.get("state")
        if not redirect or not state:
            return self._send_html(handler, 400, "redirect and state are required")
        if self.deny:
            params = {"error": "access_denied", "state": state}
        else:
            code = _token("code-")
            with self.lock:
                self._codes[code] = (redirect, "user%d" % next(self._users))
                self._issued.append(code)
            params = {"code": code, "state": state}
        sep = "&" if "?" in redirect else "?"
        handler.send_response(302)
        handler.send_header("location", redirect + sep + urllib.parse.urlencode(params))
        handler.send_header("content-length", "0")
        handler.end_headers()

    def _token_endpoint(self, handler, form):
        expected = "Basic " + base64.b64encode(("%s:%s" % (self.client_id, self.client_secret))
                                               .encode()).decode()
        if handler.headers.get("authorization") != expected:
            return self._send_json(handler, 401, {"error": "invalid_client",
                                                  "error_description": "bad client credentials"})
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return self._send_json(handler, 401, {"error": "invalid_client",
                                                  "error_description": "client_id/client_secret mismatch"})
        grant = form.get("grant_type")
        if grant == "authorization_code":
            with self.lock:
                found = self._codes.pop(form.get("code", ""), None)
            if found is None:
                return self._send_json(handler, 400, {"error": "invalid_grant",
                                                      "error_description": "unknown or used code"})
            redirect, user = found
            if form.get("redirect_uri") != redirect:
                return self._send_json(handler, 400, {"error": "invalid_grant",
                                                      "error_description": "redirect_uri mismatch"})
            return self._send_json(handler, 200, self._issue(user, None))
        if grant == "refresh_token":
            refresh = form.get("refresh_token", "")
            if self.fail_refresh:
                return self._send_json(handler, 400, {
                    "error": "invalid_grant",
                    "error_description": "refresh token %s has expired" % refresh})
            with self.lock:
                found = self._refresh.pop(refresh, None)
            if found is None:
                return self._send_json(handler, 400, {"error": "invalid_grant",
                                                      "error_description": "unknown refresh token"})
            api_key, user = found
            return self._send_json(handler, 200, self._issue(user, None if self.new_key_per_refresh
                                                             else api_key))
        return self._send_json(handler, 400, {"error": "unsupported_grant_type"})

    def _issue(self, user, api_key):
        access, refresh = _token("at-"), _token("rt-")
        api_key = api_key or _token("ifk-")
        with self.lock:
            self._access[access] = (api_key, user)
            self._refresh[refresh] = (api_key, user)
            self._issued.extend([access, refresh, api_key])
        return {"access_token": access, "refresh_token": refresh, "expires_in": self.expires_in,
                "token_type": "bearer", "scope": "read"}

    def _user_info(self, handler, query):
        with self.lock:
            entry = self._access.get(query.get("accessToken", ""))
        if entry is None:
            return self._send_json(handler, 401, {"success": False, "code": "401",
                                                  "message": "invalid access token"})
        api_key, user = entry
        return self._send_json(handler, 200, {"success": True, "code": "200", "message": "ok",
                                              "data": {"apiKey": api_key, "username": user,
                                                       "userId": user, "phone": "138****0000"}})

    # -- plumbing ------------------------------------------------------------------

    def _record(self, handler, method, path, query, form):
        with self.lock:
            self.requests.append(OAuthRequest(method, path, {k.lower(): v for k, v in handler.headers.items()},
                                              query, form))

    @staticmethod
    def _send_json(handler, status, body):
        data = json.dumps(body).encode("utf-8")
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _send_html(handler, status, text):
        data = ("<!doctype html><title>iFlow</title><p>%s</p>" % text).encode("utf-8")
        handler.send_response(status)
        handler.send_header("content-type", "text/html; charset=utf-8")
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
