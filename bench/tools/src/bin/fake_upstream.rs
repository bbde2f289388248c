//! Fake iFlow upstream: an OpenAI-style chat completions server that is much
//! faster than the proxies it feeds.
//!
//! POST .../chat/completions  "stream": true  -> N SSE chunks, each its own
//!                                                socket write (TCP_NODELAY),
//!                                                chunked transfer encoding
//!                            otherwise        -> small chat.completion JSON
//! GET  .../models                             -> model list
//! GET  /health                                -> 200
//! POST /_bench/config?chunks=N&pace_us=U      -> change the defaults at run time
//! GET  /_bench/stats                          -> request / chunk counters
//!
//! Chunk count and pacing per request: headers x-bench-chunks / x-bench-pace-us,
//! else the run-time config, else the CLI flags --chunks / --pace-us.
//!
//! Usage: fake_upstream [--host 127.0.0.1] [--port 0] [--chunks 2000] [--pace-us 0]
//! Prints the port it listens on as the first line of stdout.

use benchtools::{read_body, read_head, BodyKind, Reader};
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;
use std::{env, thread};

static CHUNKS: AtomicU64 = AtomicU64::new(2000);
static PACE_US: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static STREAMS: AtomicU64 = AtomicU64::new(0);
static CHUNKS_SENT: AtomicU64 = AtomicU64::new(0);

const CREATED: u64 = 1_700_000_000;

/// Pre-encoded pieces of a streamed response (HTTP chunk framing included).
struct StreamParts {
    head_and_first: Vec<u8>,
    middle: Vec<u8>,
    last: Vec<u8>,
    done_and_end: Vec<u8>,
}

/// One SSE event wrapped in one HTTP/1.1 chunk.
fn http_chunk(payload: &str) -> Vec<u8> {
    let event = format!("data: {}\n\n", payload);
    format!("{:x}\r\n{}\r\n", event.len(), event).into_bytes()
}

fn chunk_json(delta: &str, finish: &str, usage: &str) -> String {
    format!(
        r#"{{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":{},"model":"bench-model","choices":[{{"index":0,"delta":{},"finish_reason":{}}}]{}}}"#,
        CREATED, delta, finish, usage
    )
}

fn stream_parts() -> &'static StreamParts {
    static PARTS: OnceLock<StreamParts> = OnceLock::new();
    PARTS.get_or_init(|| {
        let mut head_and_first = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        head_and_first.extend(http_chunk(&chunk_json(r#"{"role":"assistant","content":"tok"}"#, "null", "")));
        let usage = r#","usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}"#;
        let mut done_and_end = http_chunk("[DONE]");
        done_and_end.extend_from_slice(b"0\r\n\r\n");
        StreamParts {
            head_and_first,
            middle: http_chunk(&chunk_json(r#"{"content":"tok"}"#, "null", "")),
            last: http_chunk(&chunk_json("{}", r#""stop""#, usage)),
            done_and_end,
        }
    })
}

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the fake upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
const MODELS: &str = r#"{"object":"list","data":[{"id":"glm-4.6","object":"model","created":1700000000,"owned_by":"bench"},{"id":"qwen3-coder-plus","object":"model","created":1700000000,"owned_by":"bench"}]}"#;

/// True if the JSON body has "stream": true (whitespace tolerant).
fn wants_stream(body: &[u8]) -> bool {
    let key = b"\"stream\"";
    let mut i = 0;
    while i + key.len() <= body.len() {
        if &body[i..i + key.len()] == key {
            let mut j = i + key.len();
            while j < body.len() && body[j].is_ascii_whitespace() {
                j += 1;
            }
            if j < body.len() && body[j] == b':' {
                j += 1;
                while j < body.len() && body[j].is_ascii_whitespace() {
                    j += 1;
                }
                if body[j..].starts_with(b"true") {
                    return true;
                }
            }
        }
        i += 1;
    }
    false
}

fn send(w: &mut TcpStream, status: &str, ctype: &str, body: &str, close: bool) -> io::Result<()> {
    let conn = if close { "close" } else { "keep-alive" };
    let msg = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{}",
        status,
        ctype,
        body.len(),
        conn,
        body
    );
    w.write_all(msg.as_bytes())
}

fn stream(w: &mut TcpStream, chunks: u64, pace_us: u64) -> io::Result<()> {
    let parts = stream_parts();
    STREAMS.fetch_add(1, Relaxed);
    let pace = Duration::from_micros(pace_us);
    w.write_all(&parts.head_and_first)?;
    for _ in 1..chunks {
        if pace_us > 0 {
            thread::sleep(pace);
        }
        w.write_all(&parts.middle)?;
    }
    w.write_all(&parts.last)?;
    w.write_all(&parts.done_and_end)?;
    CHUNKS_SENT.fetch_add(chunks, Relaxed);
    Ok(())
}

fn query_param(query: &str, name: &str) -> Option<u64> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn handle(sock: TcpStream) -> io::Result<()> {
    sock.set_nodelay(true)?;
    let mut w = sock.try_clone()?;
    let mut r = Reader::new(sock);
    while let Some(head) = read_head(&mut r)? {
        let kind = if head.is_chunked() {
            BodyKind::Chunked
        } else {
            head.content_length().map_or(BodyKind::Empty, BodyKind::Length)
        };
        let mut body = Vec::new();
        read_body(&mut r, kind, &mut |d| body.extend_from_slice(d))?;
        REQUESTS.fetch_add(1, Relaxed);

        let close = head.wants_close();
        let mut parts = head.start_line.split_whitespace();
        let method = parts.next().unwrap_or("");
        let target = parts.next().unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let json = "application/json";

        match (method, path) {
            ("GET", "/health") => send(&mut w, "200 OK", json, r#"{"status":"ok"}"#, close)?,
            ("GET", p) if p.ends_with("/models") => send(&mut w, "200 OK", json, MODELS, close)?,
            ("POST", p) if p.ends_with("/chat/completions") => {
                if wants_stream(&body) {
                    let chunks = head
                        .header("x-bench-chunks")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| CHUNKS.load(Relaxed))
                        .max(1);
                    let pace = head
                        .header("x-bench-pace-us")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| PACE_US.load(Relaxed));
                    stream(&mut w, chunks, pace)?;
                } else {
                    send(&mut w, "200 OK", json, COMPLETION, close)?;
                }
            }
            ("POST", "/_bench/config") => {
                if let Some(n) = query_param(query, "chunks") {
                    CHUNKS.store(n.max(1), Relaxed);
                }
                if let Some(p) = query_param(query, "pace_us") {
                    PACE_US.store(p, Relaxed);
                }
                let out = format!(r#"{{"chunks":{},"pace_us":{}}}"#, CHUNKS.load(Relaxed), PACE_US.load(Relaxed));
                send(&mut w, "200 OK", json, &out, close)?;
            }
            ("GET", "/_bench/stats") => {
                let out = format!(
                    r#"{{"requests":{},"streams":{},"chunks_sent":{}}}"#,
                    REQUESTS.load(Relaxed),
                    STREAMS.load(Relaxed),
                    CHUNKS_SENT.load(Relaxed)
                );
                send(&mut w, "200 OK", json, &out, close)?;
            }
            _ => send(&mut w, "404 Not Found", json, r#"{"error":{"message":"not found"}}"#, close)?,
        }
        if close {
            break;
        }
    }
    Ok(())
}

/// std listens with a backlog of 128, too small for 256 clients connecting at
/// once (the overflow waits for a 1 s SYN retry). Listening again raises it.
fn raise_backlog(listener: &TcpListener) {
    use std::os::unix::io::AsRawFd;
    extern "C" {
        fn listen(fd: i32, backlog: i32) -> i32;
    }
    // SAFETY: plain syscall on a socket we own.
    unsafe {
        listen(listener.as_raw_fd(), 4096);
    }
}

fn main() {
    let mut host = "127.0.0.1".to_string();
    let mut port = 0u16;
    let args: Vec<String> = env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--host" => host = val,
            "--port" => port = val.parse().expect("--port"),
            "--chunks" => CHUNKS.store(val.parse().expect("--chunks"), Relaxed),
            "--pace-us" => PACE_US.store(val.parse().expect("--pace-us"), Relaxed),
            other => {
                eprintln!("unknown argument {}", other);
                std::process::exit(2);
            }
        }
        i += 2;
    }
    let listener = TcpListener::bind((host.as_str(), port)).expect("bind");
    raise_backlog(&listener);
    println!("{}", listener.local_addr().unwrap().port());
    io::stdout().flush().unwrap();
    for conn in listener.incoming() {
        match conn {
            Ok(sock) => {
                thread::spawn(move || {
                    let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    if let Err(e) = handle(sock) {
                        eprintln!("fake upstream: connection from {}: {}", peer, e);
                    }
                });
            }
            Err(e) => eprintln!("accept: {}", e),
        }
    }
}
