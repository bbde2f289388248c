#!/usr/bin/env python3
"""What a non-streamed request costs under each server model, with the Python work held fixed.

    python3 bench/server_models.py [--rounds 3] [--duration 3]

The same minimal proxy is served three ways: a thread per connection with blocking sockets
(iflow2api's model), one thread with a selectors event loop, and asyncio streams. Each does
only what every chat call must: read the client's request, parse its JSON body, send a JSON
body upstream on a kept-alive connection, parse the answer and send it back. The proxy CPU
per request at 1 and 32 clients, medians of alternating rounds, shows what the server model
alone costs: iflow2api's own work per request comes on top of it (bench/README.md, Results).
"""

import argparse
import asyncio
import json
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

from run import Fake, build_tools, cpu_seconds, loadgen, log, stop_group

MODELS = ("threads", "selectors", "asyncio")
UPSTREAM_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n")
ANSWER_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"


def take_message(buf: bytearray):
    """The body of the first whole message in buf (taken out of it), or None: not all here yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    length = 0
    for line in bytes(buf[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if len(buf) < end + 4 + length:
        return None
    body = bytes(buf[end + 4:end + 4 + length])
    del buf[:end + 4 + length]
    return body


def upstream_request(body: bytes) -> bytes:
    call = json.loads(body)
    data = json.dumps(dict(call, model=call.get("model") or "glm-5")).encode()
    return UPSTREAM_HEAD % len(data) + data


def client_answer(body: bytes) -> bytes:
    data = json.dumps(json.loads(body), ensure_ascii=False, separators=(",", ":")).encode()
    return ANSWER_HEAD % len(data) + data


def connect(port: int, blocking: bool = True) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(blocking)
    return sock


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    print(sock.getsockname()[1], flush=True)
    return sock


def serve_threads(upstream_port: int) -> None:
    idle, lock = [], threading.Lock()

    def read(sock, buf):
        while True:
            body = take_message(buf)
            if body is not None:
                return body
            data = sock.recv(65536)
            if not data:
                return None
            buf += data

    def connection(client):
        buf = bytearray()
        while True:
            body = read(client, buf)
            if body is None:
                client.close()
                return
            with lock:
                up = idle.pop() if idle else None
            up = up or connect(upstream_port)
            up.sendall(upstream_request(body))
            answer = read(up, bytearray())
            with lock:
                idle.append(up)
            client.sendall(client_answer(answer))

    sock = listener()
    while True:
        client, _ = sock.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=connection, args=(client,), daemon=True).start()


def serve_selectors(upstream_port: int) -> None:
    sel, idle = selectors.DefaultSelector(), []

    def on_client(client, buf):
        data = client.recv(65536)
        if not data:
            sel.unregister(client)
            client.close()
            return
        buf += data
        body = take_message(buf)
        if body is not None:
            up = idle.pop() if idle else connect(upstream_port, blocking=False)
            up.send(upstream_request(body))  # small: the kernel takes it whole
            sel.register(up, selectors.EVENT_READ, (on_upstream, (up, bytearray(), client)))

    def on_upstream(up, buf, client):
        buf += up.recv(65536)
        body = take_message(buf)
        if body is not None:
            sel.unregister(up)
            idle.append(up)
            client.send(client_answer(body))

    def on_accept(sock):
        client, _ = sock.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setblocking(False)
        sel.register(client, selectors.EVENT_READ, (on_client, (client, bytearray())))

    sock = listener()
    sock.setblocking(False)
    sel.register(sock, selectors.EVENT_READ, (on_accept, (sock,)))
    while True:
        for key, _events in sel.select():
            handler, args = key.data
            handler(*args)


def serve_asyncio(upstream_port: int) -> None:
    idle = []

    async def read(reader):
        head = await reader.readuntil(b"\r\n\r\n")
        buf = bytearray(head)
        while True:
            body = take_message(buf)
            if body is not None:
                return body
            buf += await reader.read(65536)

    async def connection(reader, writer):
        try:
            while True:
                body = await read(reader)
                up = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", upstream_port)
                up[1].write(upstream_request(body))
                answer = await read(up[0])
                idle.append(up)
                writer.write(client_answer(answer))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main():
        server = await asyncio.start_server(connection, sock=listener())
        await server.serve_forever()
    asyncio.run(main())


def measure(model: str, fake: Fake, concurrency: int, duration: float) -> float:
    """Proxy CPU ms per request of one model at one concurrency, on a fresh process."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve", model, str(fake.port)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = "http://127.0.0.1:%s/v1/chat/completions" % proc.stdout.readline().strip()
        loadgen("nonstream", "--url", url, "--concurrency", concurrency, "--duration", 0.3)  # warm-up
        before = cpu_seconds(proc.pid)
        result = loadgen("nonstream", "--url", url, "--concurrency", concurrency, "--duration", duration)
        if result["errors"]:
            raise RuntimeError("%s: %d errors" % (model, result["errors"]))
        return 1000 * (cpu_seconds(proc.pid) - before) / max(result["ok"], 1)
    finally:
        stop_group(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0, help="seconds of load per measurement")
    p.add_argument("--serve", nargs=2, metavar=("MODEL", "UPSTREAM_PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        model, port = args.serve
        {"threads": serve_threads, "selectors": serve_selectors, "asyncio": serve_asyncio}[model](int(port))
        return
    build_tools()
    fake = Fake(pace_us=0)
    results = {(m, c): [] for m in MODELS for c in (1, 32)}
    try:
        for number in range(args.rounds):
            log("round %d/%d" % (number + 1, args.rounds))
            for model in MODELS[number % len(MODELS):] + MODELS[:number % len(MODELS)]:  # order rotated
                for concurrency in (1, 32):
                    results[model, concurrency].append(measure(model, fake, concurrency, args.duration))
    finally:
        fake.stop()
    print("| server model | CPU ms per request, 1 client | CPU ms per request, 32 clients |")
    print("|---|---|---|")
    for model in MODELS:
        print("| %s | %.3f | %.3f |" % (model, statistics.median(results[model, 1]),
                                        statistics.median(results[model, 32])))
    print("\n%s, %d round(s), medians" % (time.strftime("%Y-%m-%d %H:%M"), args.rounds))


if __name__ == "__main__":
    main()
