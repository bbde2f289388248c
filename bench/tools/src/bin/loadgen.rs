//! Load generator for chat completion proxies. One thread per connection,
//! keep-alive, prints one JSON object with the results on stdout.
//!
//! loadgen nonstream --url URL [--concurrency 32] [--duration 2]
//!     Closed loop of non-streaming requests for `duration` seconds.
//!     -> requests/s, p50/p99 latency
//! loadgen stream --url URL [--concurrency 32] [--streams 32] [--expect 2000]
//!     `streams` streaming requests spread over `concurrency` connections.
//!     SSE events are counted at blank-line boundaries, content chunks by the
//!     fake upstream's "tok" token; a stream is an error if its status is not
//!     200 or it delivered fewer than `expect` content chunks.
//!     -> events/s and chunks/s over the whole run, time to first event, errors
//!     (with --concurrency 1 this measures time to first chunk)
//!     --api responses: POST /v1/responses; only response.output_text.delta
//!     events count (first event = first delta), and a stream is also an error
//!     without a response.completed event or with a response.failed one.
//! Common: --api openai|anthropic|responses (request body shape), --chunks N (sends the
//! x-bench-chunks header, only honoured by the fake upstream), --timeout SECS,
//! --show-tail (error samples include the last 300 bytes of the stream body).

use benchtools::{read_body, read_head, BodyKind, Reader, SseCounter};
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use std::{env, process, thread};

struct Opts {
    mode: String,
    host_port: String,
    path: String,
    api: String,
    concurrency: usize,
    duration: f64,
    streams: usize,
    expect: u64,
    chunks: Option<u64>,
    timeout: f64,
    tail: bool,
}

fn parse_args() -> Opts {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: loadgen nonstream|stream --url URL [options]");
        process::exit(2);
    }
    let mut o = Opts {
        mode: args[0].clone(),
        host_port: String::new(),
        path: String::new(),
        api: "openai".into(),
        concurrency: 32,
        duration: 2.0,
        streams: 32,
        expect: 1,
        chunks: None,
        timeout: 120.0,
        tail: false,
    };
    let mut i = 1;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--url" => {
                let rest = val.strip_prefix("http://").expect("--url must start with http://");
                let (hp, p) = rest.split_once('/').unwrap_or((rest, ""));
                o.host_port = hp.to_string();
                o.path = format!("/{}", p);
            }
            "--api" => o.api = val,
            "--concurrency" => o.concurrency = val.parse().expect("--concurrency"),
            "--duration" => o.duration = val.parse().expect("--duration"),
            "--streams" => o.streams = val.parse().expect("--streams"),
            "--expect" => o.expect = val.parse().expect("--expect"),
            "--chunks" => o.chunks = Some(val.parse().expect("--chunks")),
            "--timeout" => o.timeout = val.parse().expect("--timeout"),
            "--show-tail" => {
                o.tail = true;
                i -= 1; // a flag without a value
            }
            other => {
                eprintln!("unknown argument {}", other);
                process::exit(2);
            }
        }
        i += 2;
    }
    if o.host_port.is_empty() {
        eprintln!("--url is required");
        process::exit(2);
    }
    o
}

fn build_request(o: &Opts, stream: bool) -> Vec<u8> {
    let body = if o.api == "anthropic" {
        format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{{"role":"user","content":"Say hello."}}],"stream":{}}}"#,
            stream
        )
    } else if o.api == "responses" {
        format!(r#"{{"model":"glm-4.6","input":"hi","stream":{}}}"#, stream)
    } else {
        format!(
            r#"{{"model":"glm-4.6","messages":[{{"role":"user","content":"Say hello."}}],"stream":{}}}"#,
            stream
        )
    };
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-bench\r\nx-api-key: sk-bench\r\nanthropic-version: 2023-06-01\r\nAccept: {}\r\nContent-Length: {}\r\n",
        o.path,
        o.host_port,
        if stream { "text/event-stream" } else { "application/json" },
        body.len()
    );
    if let Some(n) = o.chunks {
        req.push_str(&format!("x-bench-chunks: {}\r\n", n));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    req.into_bytes()
}

/// A keep-alive HTTP/1.1 connection that reconnects when needed.
struct Client {
    addr: String,
    request: Vec<u8>,
    timeout: Duration,
    conn: Option<(TcpStream, Reader<TcpStream>)>,
}

impl Client {
    fn connect(&mut self) -> io::Result<()> {
        let sock = TcpStream::connect(&self.addr)?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(self.timeout))?;
        let reader = Reader::new(sock.try_clone()?);
        self.conn = Some((sock, reader));
        Ok(())
    }

    /// Sends the request, passes the decoded body to `on_body`, returns the status.
    fn request(&mut self, on_body: &mut dyn FnMut(&[u8])) -> io::Result<u16> {
        let reused = self.conn.is_some();
        match self.try_request(on_body) {
            // A reused keep-alive connection may have been closed by the server.
            Err(_) if reused => {
                self.conn = None;
                self.try_request(on_body)
            }
            other => other,
        }
    }

    fn try_request(&mut self, on_body: &mut dyn FnMut(&[u8])) -> io::Result<u16> {
        if self.conn.is_none() {
            self.connect()?;
        }
        let result = self.exchange(on_body);
        if result.is_err() {
            self.close();
        }
        result
    }

    fn exchange(&mut self, on_body: &mut dyn FnMut(&[u8])) -> io::Result<u16> {
        let (sock, reader) = self.conn.as_mut().unwrap();
        sock.write_all(&self.request)?;
        let head = read_head(reader)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before response"))?;
        let status: u16 = head
            .start_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
        let mut close = head.wants_close();
        let kind = if status == 204 || status == 304 {
            BodyKind::Empty
        } else if head.is_chunked() {
            BodyKind::Chunked
        } else if let Some(n) = head.content_length() {
            BodyKind::Length(n)
        } else {
            close = true;
            BodyKind::UntilClose
        };
        read_body(reader, kind, on_body)?;
        if close {
            self.close();
        }
        Ok(status)
    }

    fn close(&mut self) {
        if let Some((sock, _)) = self.conn.take() {
            let _ = sock.shutdown(Shutdown::Both);
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{:.6}", x)
    } else {
        "null".into()
    }
}

#[derive(Default)]
struct Totals {
    ok: u64,
    errors: u64,
    events: u64,
    tokens: u64,
    latencies: Vec<f64>,
    first_event: Vec<f64>,
    error_samples: Vec<String>,
}

impl Totals {
    fn error(&mut self, msg: String) {
        self.errors += 1;
        if self.error_samples.len() < 5 {
            self.error_samples.push(msg);
        }
    }
}

fn main() {
    let o = Arc::new(parse_args());
    let stream = match o.mode.as_str() {
        "nonstream" => false,
        "stream" => true,
        m => {
            eprintln!("unknown mode {}", m);
            process::exit(2);
        }
    };
    let request = build_request(&o, stream);
    let totals = Arc::new(Mutex::new(Totals::default()));
    let barrier = Arc::new(Barrier::new(o.concurrency + 1));
    let mut handles = Vec::new();

    for worker in 0..o.concurrency {
        let o = o.clone();
        let totals = totals.clone();
        let barrier = barrier.clone();
        let request = request.clone();
        handles.push(thread::spawn(move || {
            let mut client = Client {
                addr: o.host_port.clone(),
                request,
                timeout: Duration::from_secs_f64(o.timeout),
                conn: None,
            };
            let mut local = Totals::default();
            barrier.wait();
            let start = Instant::now();
            if stream {
                // Streams worker, worker + concurrency, ... of `streams`.
                let mut n = worker;
                while n < o.streams {
                    let responses = o.api == "responses";
                    let mut sse = if responses { SseCounter::responses() } else { SseCounter::new() };
                    let mut tail: Vec<u8> = Vec::new();
                    let t0 = Instant::now();
                    let result = client.request(&mut |d| {
                        sse.feed(d);
                        if o.tail {
                            tail.extend_from_slice(d);
                            let cut = tail.len().saturating_sub(300);
                            tail.drain(..cut);
                        }
                    });
                    sse.finish();
                    let tail = if o.tail {
                        format!("; body ends {}", String::from_utf8_lossy(&tail))
                    } else {
                        String::new()
                    };
                    match result {
                        Ok(200) if responses && (sse.failed || !sse.completed) => local.error(format!(
                            "{} after {} deltas, {} chunks{}",
                            if sse.failed { "response.failed" } else { "no response.completed" },
                            sse.events, sse.tokens, tail
                        )),
                        Ok(200) if sse.tokens >= o.expect => local.ok += 1,
                        Ok(status) => local.error(format!(
                            "status {} with {} events, {} chunks{}",
                            status, sse.events, sse.tokens, tail
                        )),
                        Err(e) => local.error(format!("{} after {} events, {} chunks{}", e, sse.events, sse.tokens, tail)),
                    }
                    local.events += sse.events;
                    local.tokens += sse.tokens;
                    local.latencies.push(t0.elapsed().as_secs_f64());
                    if let Some(t) = sse.first_event {
                        local.first_event.push((t - t0).as_secs_f64());
                    }
                    n += o.concurrency;
                }
            } else {
                let deadline = Duration::from_secs_f64(o.duration);
                while start.elapsed() < deadline {
                    let t0 = Instant::now();
                    match client.request(&mut |_| {}) {
                        Ok(200) => {
                            local.ok += 1;
                            local.latencies.push(t0.elapsed().as_secs_f64());
                        }
                        Ok(status) => local.error(format!("status {}", status)),
                        Err(e) => {
                            local.error(e.to_string());
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            }
            let mut t = totals.lock().unwrap();
            t.ok += local.ok;
            t.errors += local.errors;
            t.events += local.events;
            t.tokens += local.tokens;
            t.latencies.extend(local.latencies);
            t.first_event.extend(local.first_event);
            for s in local.error_samples {
                if t.error_samples.len() < 5 {
                    t.error_samples.push(s);
                }
            }
        }));
    }

    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().expect("worker panicked");
    }
    let elapsed = start.elapsed().as_secs_f64();

    let mut t = totals.lock().unwrap();
    t.latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t.first_event.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let ms = |v: &[f64], p: f64| json_num(percentile(v, p) * 1000.0);
    let samples: Vec<String> = t.error_samples.iter().map(|s| json_str(s)).collect();
    println!(
        "{{\"mode\":\"{}\",\"concurrency\":{},\"ok\":{},\"errors\":{},\"elapsed_s\":{},\"requests_per_s\":{},\
\"events\":{},\"events_per_s\":{},\"chunks\":{},\"chunks_per_s\":{},\"latency_p50_ms\":{},\"latency_p99_ms\":{},\
\"first_event_p50_ms\":{},\"first_event_p99_ms\":{},\"first_event_min_ms\":{},\"error_samples\":[{}]}}",
        o.mode,
        o.concurrency,
        t.ok,
        t.errors,
        json_num(elapsed),
        json_num(t.ok as f64 / elapsed),
        t.events,
        json_num(t.events as f64 / elapsed),
        t.tokens,
        json_num(t.tokens as f64 / elapsed),
        ms(&t.latencies, 50.0),
        ms(&t.latencies, 99.0),
        ms(&t.first_event, 50.0),
        ms(&t.first_event, 99.0),
        ms(&t.first_event, 0.0),
        samples.join(",")
    );
}
