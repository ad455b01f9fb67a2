//! HTTP/1.1 for the Firecracker-compatible API socket: requests are parsed with `httparse`, with
//! every size bounded (64 headers, an 8 KiB header section, a body of at most `max_body`
//! bytes) so a client cannot make the VMM buffer much, and bodies come only with a
//! Content-Length: like Firecracker's server, chunked transfer encoding is refused. Connections
//! are kept alive for HTTP/1.1 clients unless they send `Connection: close`; HTTP/1.0 ones get
//! one response.

use std::io::{self, Read, Write};

use serde::Serialize;

/// Firecracker's default limit on a request body (its `--http-api-max-payload-size`).
pub const DEFAULT_MAX_BODY: usize = 51200;
const MAX_HEADERS: usize = 64;
pub const JSON: &str = "application/json";
const MAX_HEADER_BYTES: usize = 8 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The request target without its query string.
    pub path: String,
    pub body: Vec<u8>,
    /// Whether the client wants the connection kept open after the response.
    pub keep_alive: bool,
    /// Every header, names as sent (at most 64).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    /// The first header named `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim_ascii())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the connection closed in the middle of a request")]
    Incomplete,
    #[error("the header section is larger than {} bytes", MAX_HEADER_BYTES)]
    HeadersTooLarge,
    #[error("more than {} headers", MAX_HEADERS)]
    TooManyHeaders,
    /// Firecracker's words: clients match them.
    #[error("Request payload with size {size} is larger than the limit of {limit} allowed by server.")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("invalid Content-Length: {0}")]
    BadContentLength(String),
    #[error("Transfer-Encoding `{0}` is not supported: send the body with a Content-Length")]
    TransferEncoding(String),
    #[error("malformed request: {0}")]
    Malformed(String),
}

/// A complete header section: what `parse_request` needs to wait for and cut out the body.
struct Head {
    method: Method,
    path: String,
    keep_alive: bool,
    expect_continue: bool,
    headers: Vec<(String, Vec<u8>)>,
    /// Where the header section ends and the body starts.
    body_start: usize,
    /// Where the body, and so the request, ends.
    end: usize,
}

impl Head {
    fn into_request(self, buf: &[u8]) -> Request {
        let body = buf[self.body_start..self.end].to_vec();
        Request { method: self.method, path: self.path, body, keep_alive: self.keep_alive, headers: self.headers }
    }
}

/// Parses the header section at the start of `buf`, checking the body's size against
/// `max_body` before any of the body has to be buffered.
fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<Head>, ParseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    // Parsing only the first 8 KiB bounds the work, and a section that needs more is too large.
    let body_start = match req.parse(&buf[..buf.len().min(MAX_HEADER_BYTES)]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEADER_BYTES => return Err(ParseError::HeadersTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ParseError::TooManyHeaders),
        Err(e) => return Err(ParseError::Malformed(e.to_string())),
    };
    // Complete requests always have these three.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(ParseError::Malformed("incomplete request line".into()));
    };
    let mut body_len: Option<usize> = None;
    let mut close = false;
    let mut expect_continue = false;
    for header in req.headers.iter() {
        let value = header.value.trim_ascii();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let len = parse_content_length(value)?;
            if body_len.is_some_and(|old| old != len) {
                return Err(ParseError::BadContentLength("conflicting values".into()));
            }
            body_len = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ParseError::TransferEncoding(String::from_utf8_lossy(value).into_owned()));
        } else if name.eq_ignore_ascii_case("connection") {
            close |= value.split(|&b| b == b',').any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    let body_len = body_len.unwrap_or(0);
    if body_len > max_body {
        return Err(ParseError::BodyTooLarge { size: body_len, limit: max_body });
    }
    let method = match method {
        "GET" => Method::Get,
        "PUT" => Method::Put,
        "PATCH" => Method::Patch,
        other => Method::Other(other.to_string()),
    };
    let path = target.split('?').next().unwrap_or_default().to_string();
    // HTTP/1.0 clients get one response: keeping their connections alive is not worth the
    // `Connection: keep-alive` negotiation.
    let http11 = version == 1;
    Ok(Some(Head {
        method,
        path,
        keep_alive: http11 && !close,
        expect_continue: http11 && expect_continue,
        headers: req.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect(),
        body_start,
        end: body_start.checked_add(body_len).ok_or(ParseError::BodyTooLarge { size: body_len, limit: max_body })?,
    }))
}

/// Digits only: a sign, spaces inside or a list (`5, 5`) make the framing ambiguous.
fn parse_content_length(value: &[u8]) -> Result<usize, ParseError> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::BadContentLength(format!("`{}`", String::from_utf8_lossy(value))));
    }
    // Saturating: a number too large for usize is over any limit.
    let len = value.iter().try_fold(0usize, |n, d| n.checked_mul(10)?.checked_add(usize::from(d - b'0')));
    Ok(len.unwrap_or(usize::MAX))
}

/// Tries to parse one request from the start of `buf`; `Ok(Some((request, consumed_bytes)))`
/// when a whole request (headers + Content-Length body) is present, `Ok(None)` when more bytes
/// are needed.
pub fn parse_request(buf: &[u8], max_body: usize) -> Result<Option<(Request, usize)>, ParseError> {
    match parse_head(buf, max_body)? {
        Some(head) if buf.len() >= head.end => {
            let end = head.end;
            Ok(Some((head.into_request(buf), end)))
        }
        _ => Ok(None),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Vec<u8>>,
    /// The body's Content-Type.
    pub content_type: &'static str,
    /// lkvm ends after this answer (Firecracker's failed snapshot load): the connection closes.
    pub ends_process: bool,
}

impl Response {
    pub fn no_content() -> Self {
        Response { status: 204, body: None, content_type: JSON, ends_process: false }
    }

    /// A body in `content_type` (MMDS answers the guest in text or JSON).
    pub fn with_body(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response { status, body: Some(body.into()), content_type, ends_process: false }
    }

    pub fn json(status: u16, body: &impl Serialize) -> Self {
        match serde_json::to_vec(body) {
            Ok(body) => Response { status, body: Some(body), content_type: JSON, ends_process: false },
            // Only a type that cannot be JSON (a map with non-string keys) fails: a bug here.
            Err(e) => Response::fault(500, &format!("cannot encode the response: {e}")),
        }
    }

    /// Firecracker's error body: `{"fault_message": message}`.
    pub fn fault(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "fault_message": message }).to_string();
        Response { status, body: Some(body.into_bytes()), content_type: JSON, ends_process: false }
    }

    /// Writes the response for a connection that stays open.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        self.write(w, false)
    }

    /// Writes the response; `close` says the connection ends after it.
    pub fn write(&self, w: &mut impl Write, close: bool) -> io::Result<()> {
        let mut out = format!("HTTP/1.1 {} {}\r\nServer: lkvm\r\n", self.status, reason(self.status));
        // 1xx, 204 and 304 responses have neither a body nor a Content-Length (RFC 9110).
        let body = if matches!(self.status, 100..=199 | 204 | 304) {
            None
        } else {
            let body = self.body.as_deref().unwrap_or_default();
            if !body.is_empty() {
                out.push_str(&format!("Content-Type: {}\r\n", self.content_type));
            }
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
            Some(body)
        };
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(body.unwrap_or_default());
        // One write, so a response never reaches the client in pieces.
        w.write_all(&out)?;
        w.flush()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        // The reason phrase may be empty.
        _ => "",
    }
}

/// Serves one connection: reads requests (bounded buffer), calls `handle` for each, writes
/// responses; a parse error gets a 400 with a fault_message and the
/// connection is closed.
pub fn serve_connection(
    stream: &mut (impl Read + Write),
    max_body: usize,
    mut handle: impl FnMut(Request) -> Response,
) -> io::Result<()> {
    // Holds at most one request's header section and body, plus what one read brought of the
    // next: parse_head refuses anything larger before it is buffered.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // The current request's header section, once complete, so its body's arrival does not
    // parse it again on every read.
    let mut head: Option<Head> = None;
    loop {
        if head.is_none() {
            head = match parse_head(&buf, max_body) {
                Ok(head) => head,
                Err(e) => return reject(stream, &e),
            };
            // curl waits a second for this before sending a large body.
            if head.as_ref().is_some_and(|h| h.expect_continue && buf.len() < h.end) {
                stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
        }
        if let Some(complete) = head.take_if(|h| buf.len() >= h.end) {
            let end = complete.end;
            let request = complete.into_request(&buf);
            buf.drain(..end);
            let keep_alive = request.keep_alive;
            let response = handle(request);
            response.write(stream, !keep_alive || response.ends_process)?;
            if !keep_alive || response.ends_process {
                return Ok(());
            }
            continue;
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(()),
            Ok(0) => return reject(stream, &ParseError::Incomplete),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// As Firecracker, a request that cannot be parsed (a too-large body too) gets a 400.
fn reject(stream: &mut impl Write, error: &ParseError) -> io::Result<()> {
    Response::fault(400, &error.to_string()).write(stream, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose client sent `input`, delivered at most `chunk` bytes per read.
    struct Connection {
        input: io::Cursor<Vec<u8>>,
        chunk: usize,
        output: Vec<u8>,
    }

    impl Connection {
        fn new(input: &[u8], chunk: usize) -> Self {
            Connection { input: io::Cursor::new(input.to_vec()), chunk, output: Vec::new() }
        }

        fn output(&self) -> String {
            String::from_utf8(self.output.clone()).unwrap()
        }
    }

    impl Read for Connection {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.chunk);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Connection {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const PUT: &[u8] = b"PUT /machine-config?verbose=1 HTTP/1.1\r\nHost: localhost\r\n\
        Content-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"vcpu\": 2}\r\n";
    const GET: &[u8] = b"GET /vm HTTP/1.1\r\n\r\n";

    fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, ParseError> {
        parse_request(buf, DEFAULT_MAX_BODY)
    }

    /// Serves `input` with a handler that answers every request with its path and body, and
    /// returns what was written and the requests handled.
    fn serve(input: &[u8], chunk: usize) -> (String, Vec<Request>) {
        let mut conn = Connection::new(input, chunk);
        let mut requests = Vec::new();
        serve_connection(&mut conn, DEFAULT_MAX_BODY, |request| {
            let body = serde_json::json!({ "path": request.path, "len": request.body.len() });
            requests.push(request);
            Response::json(200, &body)
        })
        .unwrap();
        (conn.output(), requests)
    }

    fn header(with: &str) -> Vec<u8> {
        format!("PUT /vm HTTP/1.1\r\n{with}\r\n\r\n").into_bytes()
    }

    #[test]
    fn whole_request() {
        let (request, used) = parse(PUT).unwrap().unwrap();
        assert_eq!(used, PUT.len());
        assert_eq!(request.method, Method::Put);
        assert_eq!(request.path, "/machine-config");
        assert_eq!(request.body, b"{\"vcpu\": 2}\r\n");
        assert!(request.keep_alive);
        let (request, _) = parse(b"PATCH /vm HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!((request.method, request.body), (Method::Patch, Vec::new()));
        let (request, _) = parse(b"DELETE /vm HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(request.method, Method::Other("DELETE".into()));
    }

    #[test]
    fn split_request_waits_for_every_byte() {
        for len in 0..PUT.len() {
            assert_eq!(parse(&PUT[..len]), Ok(None), "prefix of {len} bytes");
        }
        let (output, requests) = serve(PUT, 1);
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].body, b"{\"vcpu\": 2}\r\n");
        assert!(output.starts_with("HTTP/1.1 200 OK\r\n"), "{output}");
    }

    #[test]
    fn pipelined_requests() {
        let input = [PUT, GET, PUT].concat();
        let (first, used) = parse(&input).unwrap().unwrap();
        assert_eq!(first.path, "/machine-config");
        let (second, used2) = parse(&input[used..]).unwrap().unwrap();
        assert_eq!((second.method, second.path.as_str(), used2), (Method::Get, "/vm", GET.len()));
        for chunk in [1, 7, 4096] {
            let (output, requests) = serve(&input, chunk);
            let paths: Vec<_> = requests.iter().map(|r| r.path.as_str()).collect();
            assert_eq!(paths, ["/machine-config", "/vm", "/machine-config"]);
            assert_eq!(output.matches("HTTP/1.1 200 OK\r\n").count(), 3);
            assert!(!output.contains("Connection: close"));
        }
    }

    #[test]
    fn body_over_the_limit_is_refused_before_it_arrives() {
        let head = header("Content-Length: 51201");
        assert_eq!(parse(&head), Err(ParseError::BodyTooLarge { size: 51201, limit: 51200 }));
        assert_eq!(parse(&header("Content-Length: 51200")), Ok(None));
        assert_eq!(parse_request(&header("Content-Length: 3"), 2), Err(ParseError::BodyTooLarge { size: 3, limit: 2 }));
        let huge = header("Content-Length: 99999999999999999999999999");
        assert!(matches!(parse(&huge), Err(ParseError::BodyTooLarge { .. })));
        // The server answers from the headers alone, with the body still unsent.
        let (output, requests) = serve(&head, 4096);
        assert!(requests.is_empty());
        assert!(output.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{output}");
        assert!(output.contains("Connection: close\r\n"));
        let message = "Request payload with size 51201 is larger than the limit of 51200 allowed by server.";
        assert!(output.ends_with(&format!(r#"{{"fault_message":"{message}"}}"#)), "{output}");
    }

    #[test]
    fn bad_content_length() {
        for value in ["abc", "-1", "+5", "1 2", "5, 5", "0x10", ""] {
            let result = parse(&header(&format!("Content-Length: {value}")));
            assert!(matches!(result, Err(ParseError::BadContentLength(_))), "{value:?}: {result:?}");
        }
        let conflicting = header("Content-Length: 5\r\nContent-Length: 6");
        assert!(matches!(parse(&conflicting), Err(ParseError::BadContentLength(_))));
        let repeated = [header("Content-Length: 2\r\ncontent-length: 2"), b"{}".to_vec()].concat();
        assert_eq!(parse(&repeated).unwrap().unwrap().0.body, b"{}");
        let (output, _) = serve(&header("Content-Length: x"), 4096);
        assert!(output.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{output}");
    }

    #[test]
    fn chunked_is_refused() {
        let input = [header("Transfer-Encoding: chunked"), b"2\r\n{}\r\n0\r\n\r\n".to_vec()].concat();
        assert_eq!(parse(&input), Err(ParseError::TransferEncoding("chunked".into())));
        let (output, requests) = serve(&input, 4096);
        assert!(requests.is_empty());
        assert!(output.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{output}");
        assert!(output.contains("`chunked` is not supported"), "{output}");
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        for input in
            [&b"\x00\x01\x02\r\n\r\n"[..], b"GET /vm HTTP/2.0\r\n\r\n", b"GET /vm\r\n\r\n", b"GET  HTTP/1.1\r\n"]
        {
            assert!(matches!(parse(input), Err(ParseError::Malformed(_))), "{input:?}");
        }
        let (output, _) = serve(b"\xff\xfe garbage\r\n\r\n", 4096);
        assert!(output.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{output}");
        // Pseudo-random bytes, some with a valid request in front.
        const ALPHABET: &[u8] = b"GET /?\r\n: HTTP/1.0Content-Length0123456789";
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..2000 {
            let mut input = if round % 2 == 0 { PUT.to_vec() } else { Vec::new() };
            for _ in 0..round % 300 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Mostly bytes that make up requests, so that some of them nearly parse.
                let any = (state >> 8) as u8;
                input.push(if state & 7 == 0 { any } else { ALPHABET[usize::from(any) % ALPHABET.len()] });
            }
            let mut rest = &input[..];
            while let Ok(Some((_, used))) = parse_request(rest, 16) {
                rest = &rest[used..];
            }
            let mut conn = Connection::new(&input, 1 + round % 5);
            serve_connection(&mut conn, 16, |_| Response::no_content()).unwrap();
        }
    }

    #[test]
    fn header_overflow() {
        let many = (0..65).map(|i| format!("X-{i}: y")).collect::<Vec<_>>().join("\r\n");
        assert_eq!(parse(&header(&many)), Err(ParseError::TooManyHeaders));
        let long = format!("X-Long: {}", "y".repeat(MAX_HEADER_BYTES));
        assert_eq!(parse(&header(&long)), Err(ParseError::HeadersTooLarge));
        // Refused before the end of the section arrives, however it is split.
        let unfinished = &header(&long)[..MAX_HEADER_BYTES];
        assert_eq!(parse(unfinished), Err(ParseError::HeadersTooLarge));
        assert_eq!(parse(&unfinished[..MAX_HEADER_BYTES - 1]), Ok(None));
        let (output, _) = serve(&header(&long), 100);
        assert!(output.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{output}");
        // A section of exactly the limit is accepted.
        let fits = format!("X-Long: {}", "y".repeat(MAX_HEADER_BYTES - header("X-Long: ").len()));
        assert_eq!(header(&fits).len(), MAX_HEADER_BYTES);
        assert!(parse(&header(&fits)).unwrap().is_some());
    }

    #[test]
    fn keep_alive_and_close() {
        let keep_alive = |input: &[u8]| parse(input).unwrap().unwrap().0.keep_alive;
        assert!(keep_alive(GET));
        assert!(keep_alive(b"GET /vm HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!keep_alive(b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!keep_alive(b"GET /vm HTTP/1.1\r\nconnection: Keep-Alive, CLOSE\r\n\r\n"));
        assert!(!keep_alive(b"GET /vm HTTP/1.0\r\n\r\n"));
        assert!(!keep_alive(b"GET /vm HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        // Nothing after a closing request is read.
        let input = [&b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n"[..], GET].concat();
        let (output, requests) = serve(&input, 4096);
        assert_eq!(requests.len(), 1);
        assert!(output.contains("Connection: close\r\n"), "{output}");
        let (output, requests) = serve(&[&b"GET /a HTTP/1.0\r\n\r\n"[..], GET].concat(), 4096);
        assert_eq!(requests.len(), 1);
        assert!(output.contains("Connection: close\r\n"), "{output}");
    }

    #[test]
    fn serve_connection_writes_responses() {
        let mut conn = Connection::new(&[GET, PUT].concat(), 4096);
        serve_connection(&mut conn, DEFAULT_MAX_BODY, |request| match request.method {
            Method::Get => Response::json(200, &serde_json::json!({ "state": "Running" })),
            _ => Response::no_content(),
        })
        .unwrap();
        let state = r#"{"state":"Running"}"#;
        let expected = format!(
            "HTTP/1.1 200 OK\r\nServer: lkvm\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{state}\
             HTTP/1.1 204 No Content\r\nServer: lkvm\r\n\r\n",
            state.len()
        );
        assert_eq!(conn.output(), expected);
    }

    #[test]
    fn expect_continue_is_answered_before_the_body() {
        let head = header("Content-Length: 2\r\nExpect: 100-continue");
        let (output, requests) = serve(&[head.clone(), b"{}".to_vec()].concat(), head.len());
        assert_eq!(requests[0].body, b"{}");
        assert!(output.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), "{output}");
        // Not when the body came with the headers.
        let (output, _) = serve(&[head, b"{}".to_vec()].concat(), 4096);
        assert!(output.starts_with("HTTP/1.1 200 OK\r\n"), "{output}");
    }

    #[test]
    fn connection_closed_mid_request() {
        let (output, requests) = serve(&PUT[..PUT.len() - 1], 4096);
        assert!(requests.is_empty());
        assert!(output.contains("closed in the middle of a request"), "{output}");
        let (output, _) = serve(b"", 4096);
        assert_eq!(output, "");
    }

    #[test]
    fn responses() {
        let fault = Response::fault(400, "bad \"vcpu\"");
        assert_eq!(fault.body.unwrap(), br#"{"fault_message":"bad \"vcpu\""}"#);
        let mut out = Vec::new();
        Response { status: 404, body: None, content_type: JSON, ends_process: false }.write_to(&mut out).unwrap();
        assert_eq!(out, b"HTTP/1.1 404 Not Found\r\nServer: lkvm\r\nContent-Length: 0\r\n\r\n");
        let bad = std::collections::HashMap::from([((1, 2), 3)]);
        assert_eq!(Response::json(200, &bad).status, 500);
    }
}
