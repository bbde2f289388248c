"""Test doubles around the fake upstream: an HTTP proxy (CONNECT tunnels and plain-http
forwarding in absolute form, optionally over TLS), a SOCKS5 proxy (no login or
user/password; IPv4, IPv6 and domain address types), a TLS front that puts HTTPS in
front of a plain fake upstream, and a tiny image server.

All listen on 127.0.0.1 port 0, serve each connection on its own daemon thread and
record what they did, so tests can prove which way traffic went. Every socket has a
timeout: nothing here can hang a test run.

The TLS material is a test-only CA and a leaf certificate for localhost and
127.0.0.1 (valid 2020-2120), so no tool is needed to make certificates at test time;
client_tls_context() trusts that CA.
"""
import base64
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SOCKET_TIMEOUT_S = 20.0

TEST_CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBbTCCARKgAwIBAgICEAAwCgYIKoZIzj0EAwIwHDEaMBgGA1UEAwwRaWZsb3cy
YXBpIHRlc3QgQ0EwIBcNMjAwMTAxMDAwMDAwWhgPMjEyMDAxMDEwMDAwMDBaMBwx
GjAYBgNVBAMMEWlmbG93MmFwaSB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAEQNUY+zLDoJoV9/kxOkZmKluMch3eGQA+WQG/UvaIfDW/nKcubMhld7q7
brPP/7u7LIO7kRhKQGI1OWVESWIZgaNCMEAwDwYDVR0TAQH/BAUwAwEB/zAOBgNV
HQ8BAf8EBAMCAQYwHQYDVR0OBBYEFNWwSnQL4haqkNRu26OtF74v7ViEMAoGCCqG
SM49BAMCA0kAMEYCIQDES7/eQMG/sXz7CfZnKGTqCe8+5SS3eNrtXEjiKpqsQQIh
AJcP+cgVavBNmSY+m4zl5tsTfCnaIc+12Lxqmv1STBk6
-----END CERTIFICATE-----
"""

LOCALHOST_CERT_PEM = """-----BEGIN CERTIFICATE-----
MIIBtTCCAVugAwIBAgICEAEwCgYIKoZIzj0EAwIwHDEaMBgGA1UEAwwRaWZsb3cy
YXBpIHRlc3QgQ0EwIBcNMjAwMTAxMDAwMDAwWhgPMjEyMDAxMDEwMDAwMDBaMBQx
EjAQBgNVBAMMCWxvY2FsaG9zdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABLXk
byP7mtGrwVbKaIquCABc+gzDcHimGUvpT0PIvBYg6ftSkR8SkM1ZuK2YXk4OzgDo
AsOhdXap/MjPDC/g+V2jgZIwgY8wDAYDVR0TAQH/BAIwADAOBgNVHQ8BAf8EBAMC
BaAwEwYDVR0lBAwwCgYIKwYBBQUHAwEwGgYDVR0RBBMwEYIJbG9jYWxob3N0hwR/
AAABMB0GA1UdDgQWBBQ4S0cdy0UMJ+2cD8W02qfD0k+MTjAfBgNVHSMEGDAWgBTV
sEp0C+IWqpDUbtujrRe+L+1YhDAKBggqhkjOPQQDAgNIADBFAiA/POw2BJ34Q3XL
192yc0c/paaKwes81jxHX4cWkLSeQgIhAKbD2J1OOPRwXHSz/zlB0lK7/xj8juhu
znwi/qN6Yn99
-----END CERTIFICATE-----
"""

LOCALHOST_KEY_PEM = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg2QJqVfbNBs1PpZtN
Rj6nMLGH9q+4WZNLHhGpi/l613ehRANCAAS15G8j+5rRq8FWymiKrggAXPoMw3B4
phlL6U9DyLwWIOn7UpEfEpDNWbitmF5ODs4A6ALDoXV2qfzIzwwv4Pld
-----END PRIVATE KEY-----
"""

_server_context = None
_server_context_lock = threading.Lock()


def client_tls_context() -> ssl.SSLContext:
    """A client context that trusts the test CA (and nothing else)."""
    return ssl.create_default_context(cadata=TEST_CA_PEM)


def server_tls_context() -> ssl.SSLContext:
    """The server context for localhost / 127.0.0.1 (built once; load_cert_chain needs a file)."""
    global _server_context
    with _server_context_lock:
        if _server_context is None:
            fd, path = tempfile.mkstemp(suffix=".pem")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(LOCALHOST_CERT_PEM + LOCALHOST_KEY_PEM)
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(path)
            finally:
                os.unlink(path)
            _server_context = context
        return _server_context


# -- plumbing -------------------------------------------------------------------------------

def relay(a, b, timeout_s=SOCKET_TIMEOUT_S):
    """Copy bytes both ways until either side closes (or nothing moves for timeout_s)."""
    socks = [a, b]
    try:
        while True:
            # SSL sockets may hold decrypted bytes that select() cannot see.
            ready = [s for s in socks if isinstance(s, ssl.SSLSocket) and s.pending()]
            if not ready:
                ready, _w, _x = select.select(socks, [], [], timeout_s)
                if not ready:
                    return
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)
    except (OSError, ValueError):
        return


def recv_head(sock, limit=65536):
    """(head bytes up to and including the blank line, extra bytes read after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            raise OSError("connection closed before the end of the head")
        data += piece
        if len(data) > limit:
            raise OSError("head too long")
    head, _sep, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def recv_exact(sock, count):
    data = b""
    while len(data) < count:
        piece = sock.recv(count - len(data))
        if not piece:
            raise OSError("connection closed")
        data += piece
    return data


def parse_head(head):
    """(first line, [(name, value)]) of an HTTP head."""
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if ":" in line:
            name, _sep, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def header(headers, name):
    for k, v in headers:
        if k.lower() == name.lower():
            return v
    return None


class _Listener:
    """Accept loop on 127.0.0.1:0; handle(conn) runs on a daemon thread per connection."""

    def __init__(self):
        self.lock = threading.Lock()
        self.log = []  # one dict per connection or request, see subclasses
        self._conns = set()
        self._closed = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self):
        while not self._closed:
            try:
                ready, _w, _x = select.select([self.sock], [], [], 0.05)
                if not ready:
                    continue
                conn, _addr = self.sock.accept()
            except (OSError, ValueError):
                return
            conn.settimeout(SOCKET_TIMEOUT_S)
            with self.lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self.handle(conn)
        except (OSError, ValueError, ssl.SSLError):
            pass
        finally:
            with self.lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def handle(self, conn):
        raise NotImplementedError

    def record(self, **entry):
        with self.lock:
            self.log.append(entry)

    def entries(self, **match):
        with self.lock:
            return [e for e in self.log if all(e.get(k) == v for k, v in match.items())]

    @property
    def targets(self):
        """"host:port" of every target this proxy connected to."""
        with self.lock:
            return [e["target"] for e in self.log if e.get("ok")]

    def close(self):
        self._closed = True
        self._thread.join(1.0)
        self.sock.close()
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass


def _connect(host, port):
    sock = socket.create_connection((host, port), SOCKET_TIMEOUT_S)
    sock.settimeout(SOCKET_TIMEOUT_S)
    return sock


def _url(scheme, host, port, auth):
    if auth is None:
        return "%s://%s:%d" % (scheme, host, port)
    user, password = auth
    return "%s://%s:%s@%s:%d" % (scheme, urllib.parse.quote(user, safe=""),
                                 urllib.parse.quote(password, safe=""), host, port)


# -- HTTP proxy ------------------------------------------------------------------------------

class HttpProxy(_Listener):
    """An HTTP proxy: CONNECT host:port tunnels, and plain-http requests in absolute form
    (`GET http://host:port/path`) forwarded one per connection (Connection: close both ways).

    auth=(user, password) requires a matching `Proxy-Authorization: Basic`; anything else
    gets a 407. tls=True: clients reach the proxy itself over TLS (an https:// proxy).
    log entries: {"kind": "CONNECT"|"forward"|"rejected", "target": "host:port",
    "method", "path" (forward only), "user", "ok"}."""

    def __init__(self, auth=None, tls=False):
        self.auth, self.tls = auth, tls
        super().__init__()

    def url(self, auth=None, host="127.0.0.1"):
        """The proxy URL, with these credentials (default: none)."""
        return _url("https" if self.tls else "http", host, self.port, auth)

    def handle(self, conn):
        if not self.tls:
            return self._handle(conn)
        with server_tls_context().wrap_socket(conn, server_side=True) as tls:
            return self._handle(tls)

    def _handle(self, conn):
        head, rest = recv_head(conn)
        first, headers = parse_head(head)
        method, target, _version = (first.split(" ") + ["", "", ""])[:3]
        user = self._user(header(headers, "Proxy-Authorization"))
        if self.auth is not None and user != self.auth[0]:
            self.record(kind="rejected", method=method, target=target, user=user, ok=False)
            # read the request body first, as real proxies do: the client sees the 407, not a reset
            length = int(header(headers, "Content-Length") or 0)
            recv_exact(conn, max(0, length - len(rest)))
            body = b"Proxy Authentication Required"
            conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                         b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            return
        if method == "CONNECT":
            host, _sep, port = target.rpartition(":")
            try:
                upstream = _connect(host.strip("[]"), int(port))
            except OSError:
                self.record(kind="CONNECT", target=target, user=user, ok=False)
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            self.record(kind="CONNECT", target=target, user=user, ok=True)
            with upstream:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
                relay(conn, upstream)
            return
        self._forward(conn, method, target, headers, rest, user)

    def _user(self, value):
        """The user name of a valid Proxy-Authorization value, else None."""
        if not value or not value.lower().startswith("basic "):
            return None
        try:
            user, _sep, password = base64.b64decode(value[6:].strip()).decode("utf-8").partition(":")
        except ValueError:
            return None
        if self.auth is not None and (user, password) != tuple(self.auth):
            return None
        return user

    def _forward(self, conn, method, target, headers, rest, user):
        parts = urllib.parse.urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            self.record(kind="forward", method=method, target=target, user=user, ok=False)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        port = parts.port or 80
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        self.record(kind="forward", method=method, target="%s:%d" % (parts.hostname, port), path=path,
                    user=user, ok=True)
        length = int(header(headers, "Content-Length") or 0)
        body = rest + recv_exact(conn, max(0, length - len(rest)))
        drop = ("proxy-authorization", "proxy-connection", "connection", "keep-alive")
        lines = ["%s %s HTTP/1.1" % (method, path)]
        lines += ["%s: %s" % (k, v) for k, v in headers if k.lower() not in drop]
        lines.append("Connection: close")
        with _connect(parts.hostname, port) as upstream:
            upstream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            resp_head, resp_rest = recv_head(upstream)
            status_line, resp_headers = parse_head(resp_head)
            out = [status_line] + ["%s: %s" % (k, v) for k, v in resp_headers
                                   if k.lower() not in ("connection", "keep-alive")]
            out.append("Connection: close")
            conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + resp_rest)
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                conn.sendall(data)


# -- SOCKS5 proxy --------------------------------------------------------------------------

class Socks5Proxy(_Listener):
    """A SOCKS5 proxy (RFC 1928) with optional user/password login (RFC 1929).

    log entries: {"kind": "connect"|"rejected", "atyp": "ipv4"|"domain"|"ipv6", "host",
    "port", "target": "host:port", "user", "ok"}."""

    def __init__(self, auth=None):
        self.auth = auth
        super().__init__()

    def url(self, auth=None, scheme="socks5", host="127.0.0.1"):
        return _url(scheme, host, self.port, auth)

    def handle(self, conn):
        version, count = recv_exact(conn, 2)
        methods = recv_exact(conn, count)
        if version != 5:
            return
        wanted = 2 if self.auth is not None else 0
        if wanted not in methods:
            self.record(kind="rejected", reason="no acceptable method", ok=False, target=None)
            conn.sendall(b"\x05\xff")
            return
        conn.sendall(bytes([5, wanted]))
        user = None
        if wanted == 2:
            _v, ulen = recv_exact(conn, 2)
            user = recv_exact(conn, ulen).decode("utf-8", "replace")
            plen = recv_exact(conn, 1)[0]
            password = recv_exact(conn, plen).decode("utf-8", "replace")
            if (user, password) != tuple(self.auth):
                self.record(kind="rejected", reason="bad login", user=user, ok=False, target=None)
                conn.sendall(b"\x01\x01")
                return
            conn.sendall(b"\x01\x00")
        _v, cmd, _rsv, atyp = recv_exact(conn, 4)
        if atyp == 1:
            kind, host = "ipv4", socket.inet_ntoa(recv_exact(conn, 4))
        elif atyp == 4:
            kind, host = "ipv6", socket.inet_ntop(socket.AF_INET6, recv_exact(conn, 16))
        elif atyp == 3:
            kind, host = "domain", recv_exact(conn, recv_exact(conn, 1)[0]).decode("idna")
        else:
            conn.sendall(b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00")
            return
        port = struct.unpack(">H", recv_exact(conn, 2))[0]
        target = ("[%s]:%d" if kind == "ipv6" else "%s:%d") % (host, port)
        if cmd != 1:
            conn.sendall(b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00")
            return
        try:
            upstream = _connect(host, port)
        except OSError:
            self.record(kind="connect", atyp=kind, host=host, port=port, target=target, user=user, ok=False)
            conn.sendall(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
            return
        self.record(kind="connect", atyp=kind, host=host, port=port, target=target, user=user, ok=True)
        with upstream:
            bound_host, bound_port = upstream.getsockname()[:2]
            conn.sendall(b"\x05\x00\x00\x01" + socket.inet_aton(bound_host) + struct.pack(">H", bound_port))
            relay(conn, upstream)


# -- TLS front ----------------------------------------------------------------------------------

class TLSFront(_Listener):
    """HTTPS in front of a plain HTTP server: TLS is terminated here (certificate for
    localhost and 127.0.0.1, see client_tls_context) and the bytes relayed to
    target_host:target_port. log entries: {"target", "ok"} per connection."""

    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        super().__init__()

    def url(self, host="localhost", path="/v1"):
        return "https://%s:%d%s" % (host, self.port, path)

    def handle(self, conn):
        with server_tls_context().wrap_socket(conn, server_side=True) as tls, \
                _connect(*self.target) as upstream:
            self.record(target="%s:%d" % self.target, ok=True)
            relay(tls, upstream)


# -- images -------------------------------------------------------------------------------------

def tiny_png(width=2, height=1, rgb=(255, 0, 0)):
    """A valid PNG of width x height pixels of one colour."""
    def block(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + block(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + block(b"IDAT", zlib.compress(raw)) + block(b"IEND", b""))


class ImageServer:
    """Serves files {path: (content type, bytes)} over plain HTTP; records requested paths."""

    def __init__(self, files, redirects=None, host="127.0.0.1"):
        self.files, self.requests, self.host = dict(files), [], host
        self.redirects = dict(redirects or {})  # path -> Location
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("location", server.redirects[self.path])
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                content_type, data = server.files.get(self.path, ("text/plain", None))
                status = 200 if data is not None else 404
                data = data if data is not None else b"not found"
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path):
        return "http://%s:%d%s" % (self.host, self.port, path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
