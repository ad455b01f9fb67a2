//! Feeds fuzzed bytes to the API socket's HTTP layer: parsed as a buffer, request after
//! request, and served as a connection to its end. Any panic is a crash.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use lkvm::api::http::{parse_request, serve_connection, Response};

/// A client that sent the input and reads nothing back.
struct Connection<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Connection<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Connection<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|input: &[u8]| {
    // The first byte is the body limit: small, so that bodies both within and over it are reachable.
    let Some((&max_body, input)) = input.split_first() else { return };
    let max_body = usize::from(max_body);
    let mut rest = input;
    while let Ok(Some((request, used))) = parse_request(rest, max_body) {
        assert!(used > 0 && used <= rest.len() && request.body.len() <= max_body);
        rest = &rest[used..];
    }
    let mut conn = Connection { input, output: Vec::new() };
    serve_connection(&mut conn, max_body, |_| Response::no_content()).unwrap();
});
