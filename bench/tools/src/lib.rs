//! Minimal HTTP/1.1 and SSE helpers shared by the fake upstream and the load
//! generator. std only; blocking sockets, one thread per connection.

use std::io::{self, Read};
use std::time::Instant;

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")
}

/// A buffered reader that hands out lines and byte ranges without copying.
pub struct Reader<R: Read> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader { inner, buf: vec![0; 64 * 1024], pos: 0, end: 0 }
    }

    /// Reads more bytes into the buffer. Returns false at EOF.
    fn fill(&mut self) -> io::Result<bool> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            } else {
                let n = self.buf.len();
                self.buf.resize(n * 2, 0);
            }
        }
        let n = self.inner.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n > 0)
    }

    /// True if the peer closed the connection before sending anything more.
    pub fn at_eof(&mut self) -> io::Result<bool> {
        Ok(self.pos == self.end && !self.fill()?)
    }

    /// One line without its trailing CRLF / LF.
    pub fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf[self.pos..self.end].iter().position(|&b| b == b'\n') {
                let mut line = &self.buf[self.pos..self.pos + i];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                let s = String::from_utf8_lossy(line).into_owned();
                self.pos += i + 1;
                return Ok(s);
            }
            if !self.fill()? {
                return Err(eof());
            }
        }
    }

    /// Passes exactly `n` bytes to `f`, in as many pieces as they arrive.
    pub fn read_exact_with(&mut self, mut n: usize, f: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        while n > 0 {
            if self.pos == self.end && !self.fill()? {
                return Err(eof());
            }
            let take = n.min(self.end - self.pos);
            f(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
            n -= take;
        }
        Ok(())
    }

    /// Passes everything up to EOF to `f`.
    pub fn read_to_eof_with(&mut self, f: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        loop {
            if self.pos < self.end {
                f(&self.buf[self.pos..self.end]);
                self.pos = self.end;
            }
            if !self.fill()? {
                return Ok(());
            }
        }
    }
}

/// The start line and headers of a request or response.
pub struct Head {
    pub start_line: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .map_or(false, |v| v.to_ascii_lowercase().contains("chunked"))
    }

    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length").and_then(|v| v.trim().parse().ok())
    }

    /// Connection: close, or HTTP/1.0 without keep-alive.
    pub fn wants_close(&self) -> bool {
        let conn = self.header("connection").unwrap_or("").to_ascii_lowercase();
        if conn.contains("close") {
            return true;
        }
        self.start_line.contains("HTTP/1.0") && !conn.contains("keep-alive")
    }
}

/// Reads a start line plus headers. Ok(None) if the peer closed cleanly first.
pub fn read_head<R: Read>(r: &mut Reader<R>) -> io::Result<Option<Head>> {
    if r.at_eof()? {
        return Ok(None);
    }
    let start_line = r.read_line()?;
    let mut headers = Vec::new();
    loop {
        let line = r.read_line()?;
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some(Head { start_line, headers }))
}

pub enum BodyKind {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// Reads a body of the given kind, passing the decoded bytes to `f`.
pub fn read_body<R: Read>(r: &mut Reader<R>, kind: BodyKind, f: &mut dyn FnMut(&[u8])) -> io::Result<()> {
    match kind {
        BodyKind::Empty => Ok(()),
        BodyKind::Length(n) => r.read_exact_with(n, f),
        BodyKind::UntilClose => r.read_to_eof_with(f),
        BodyKind::Chunked => loop {
            let line = r.read_line()?;
            let hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(hex, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {:?}", line)))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !r.read_line()?.is_empty() {}
                return Ok(());
            }
            r.read_exact_with(size, f)?;
            r.read_line()?; // CRLF after the chunk data
        },
    }
}

/// Counts server-sent events by their blank-line boundaries ("\n\n", "\r\n\r\n");
/// blocks holding only whitespace/newlines are not events. Also counts the
/// fake upstream's content token "tok" (not followed by "e", so "_tokens" keys
/// don't count): delivered content chunks, even if a proxy merged events.
///
/// `SseCounter::responses()` is for OpenAI Responses streams: only
/// `response.output_text.delta` events count, as events and for tokens (the
/// closing events repeat the whole text), and `completed` / `failed` tell
/// whether a `response.completed` / `response.failed` event arrived. An
/// event's name is looked for in its first bytes (`event:` line or `"type"`).
pub struct SseCounter {
    pub events: u64,
    pub tokens: u64,
    pub first_event: Option<Instant>,
    pub completed: bool,
    pub failed: bool,
    responses: bool,
    head: Vec<u8>,
    event_tokens: u64,
    prev_newline: bool,
    has_content: bool,
    last2: [u8; 2],
    after_tok: bool,
}

const HEAD_BYTES: usize = 96;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

impl SseCounter {
    pub fn new() -> Self {
        SseCounter {
            events: 0,
            tokens: 0,
            first_event: None,
            completed: false,
            failed: false,
            responses: false,
            head: Vec::new(),
            event_tokens: 0,
            prev_newline: false,
            has_content: false,
            last2: [0, 0],
            after_tok: false,
        }
    }

    pub fn responses() -> Self {
        SseCounter { responses: true, ..Self::new() }
    }

    /// At the end of an event: does it count?
    fn counts(&mut self) -> bool {
        if !self.responses {
            return true;
        }
        self.completed |= contains(&self.head, b"response.completed");
        self.failed |= contains(&self.head, b"response.failed");
        contains(&self.head, b"response.output_text.delta")
    }

    pub fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if self.after_tok {
                self.after_tok = false;
                if b != b'e' {
                    self.event_tokens += 1;
                }
            }
            if b == b'k' && self.last2 == *b"to" {
                self.after_tok = true;
            }
            self.last2 = [self.last2[1], b];
            if self.responses && self.head.len() < HEAD_BYTES {
                self.head.push(b);
            }
            match b {
                b'\n' => {
                    if self.prev_newline && self.has_content {
                        if self.counts() {
                            self.events += 1;
                            self.tokens += self.event_tokens;
                            if self.first_event.is_none() {
                                self.first_event = Some(Instant::now());
                            }
                        }
                        self.event_tokens = 0;
                        self.head.clear();
                        self.has_content = false;
                    }
                    self.prev_newline = true;
                }
                b'\r' => {}
                _ => {
                    self.prev_newline = false;
                    self.has_content = true;
                }
            }
        }
    }

    /// Call at the end of the body.
    pub fn finish(&mut self) {
        if self.after_tok {
            self.after_tok = false;
            self.event_tokens += 1;
        }
        if !self.responses {
            self.tokens += self.event_tokens; // a last block without a blank line
        }
        self.event_tokens = 0;
    }
}

impl Default for SseCounter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_events() {
        let mut c = SseCounter::new();
        c.feed(b"data: a\n\n\ndata: b\r\n\r\nevent: x\ndata:");
        assert_eq!(c.events, 2);
        c.feed(b" c\n");
        c.feed(b"\n");
        assert_eq!(c.events, 3);
    }

    #[test]
    fn counts_tokens() {
        let mut c = SseCounter::new();
        c.feed(br#"data: {"content":"tok"} "prompt_tokens":1 "toktok"#);
        c.feed(b"to");
        c.feed(b"k");
        c.finish();
        assert_eq!(c.tokens, 4);
    }

    #[test]
    fn responses_events() {
        let mut c = SseCounter::responses();
        c.feed(b"event: response.created\ndata: {\"type\":\"response.created\"}\n\n");
        c.feed(b"event: response.output_text.delta\ndata: {\"delta\":\"tok\"}\n\n");
        c.feed(b"data: {\"type\":\"response.output_text.delta\",\"delta\":\"toktok\"}\n\n");
        c.feed(b"event: response.output_text.done\ndata: {\"text\":\"toktoktok\"}\n\n");
        assert!(!c.completed);
        c.feed(b"event: response.completed\ndata: {\"text\":\"toktoktok\"}\n\n");
        c.finish();
        assert_eq!((c.events, c.tokens, c.completed, c.failed), (2, 3, true, false));
    }

    #[test]
    fn chunked_body() {
        let raw: &[u8] = b"5\r\nhello\r\n3;x=y\r\n ab\r\n0\r\n\r\nrest";
        let mut r = Reader::new(raw);
        let mut out = Vec::new();
        read_body(&mut r, BodyKind::Chunked, &mut |d| out.extend_from_slice(d)).unwrap();
        assert_eq!(out, b"hello ab");
    }
}
