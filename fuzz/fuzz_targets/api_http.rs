//! Feeds fuzzed bytes to the API socket: parsed as a buffer, request after request, and served
//! as a connection to its end by the real router, so the JSON bodies reach every endpoint's
//! handler (with no VMM thread behind it: InstanceStart fails cleanly). Any panic is a crash.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use lkvm::api::Api;
use lkvm::config::Transport;
use lkvm::http::{parse_request, serve_connection, Response};

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
    let (vmm, _) = std::sync::mpsc::channel();
    let api = Api::new("fuzz", "fuzz", Transport::Mmio, vmm, std::time::Instant::now());
    serve_connection(&mut conn, max_body, |request| {
        // These two open the host files their bodies name: not something to do with random paths.
        if request.path.starts_with("/logger") || request.path.starts_with("/metrics") {
            return Response::no_content();
        }
        api.handle(request)
    })
    .unwrap();
});
