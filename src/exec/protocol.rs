//! `lkvm exec`'s wire protocol, shared by the host client and the rootfs init (which is built
//! alone, with std only: this file uses no crate).
//!
//! A host program connects to the VM's vsock socket, writes `CONNECT 1022\n`, reads `OK ...\n`
//! and then exchanges frames: a kind byte, a little-endian u32 payload length (at most
//! `MAX_PAYLOAD`), the payload. The first frame is the host's `REQUEST`; then the host sends
//! `STDIN` (an empty one is end of input) and `WINDOW`, the guest sends `STDOUT`, `STDERR` and,
//! last, `EXIT`. Closing the connection before `EXIT` kills the command.

use std::io::{self, Read, Write};

/// The guest's vsock port: below 1024, so only root in the guest can serve it.
pub const EXEC_PORT: u32 = 1022;
/// The host's vsock port a sandbox guest's init connects to when it is ready for its command.
pub const READY_PORT: u32 = 1023;
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Host to guest: NUL-terminated `key=value` fields: `tty=1` (a pty instead of pipes),
/// `rows=N`, `cols=N`, `cwd=DIR`, `env=NAME=VALUE` (repeated), `arg=ARG` (repeated, argv[0]
/// first). Unknown keys are ignored.
pub const REQUEST: u8 = b'R';
/// Host to guest: bytes for the command's stdin; empty: end of input.
pub const STDIN: u8 = b'I';
/// Host to guest: the terminal's size changed: rows and columns, u16 little-endian each.
pub const WINDOW: u8 = b'W';
/// Guest to host: the command's output (with a pty, both streams come as STDOUT).
pub const STDOUT: u8 = b'O';
pub const STDERR: u8 = b'E';
/// Guest to host: the exit status as a shell reports it (128+N for signal N), i32
/// little-endian; 126 or 127 (with a message on STDERR) when the command could not start.
pub const EXIT: u8 = b'X';

/// A command to run in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// The terminal's (rows, columns) when the command gets a pty.
    pub tty: Option<(u16, u16)>,
    pub cwd: String,
    pub env: Vec<String>,
    pub argv: Vec<String>,
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut fields = Vec::new();
        if let Some((rows, cols)) = self.tty {
            fields.extend(["tty=1".to_string(), format!("rows={rows}"), format!("cols={cols}")]);
        }
        fields.push(format!("cwd={}", self.cwd));
        fields.extend(self.env.iter().map(|e| format!("env={e}")));
        fields.extend(self.argv.iter().map(|a| format!("arg={a}")));
        let mut out = Vec::new();
        for field in fields {
            out.extend_from_slice(field.as_bytes());
            out.push(0);
        }
        out
    }

    pub fn decode(payload: &[u8]) -> Result<Request, String> {
        let mut request = Request::default();
        let (mut tty, mut rows, mut cols) = (false, 24, 80);
        let payload = payload.strip_suffix(&[0]).ok_or("the request does not end in a NUL")?;
        for field in payload.split(|&b| b == 0) {
            let field = std::str::from_utf8(field).map_err(|_| "a request field is not UTF-8")?;
            let (key, value) = field.split_once('=').ok_or_else(|| format!("request field {field:?} has no '='"))?;
            match key {
                "tty" => tty = value == "1",
                "rows" => rows = value.parse().map_err(|_| format!("rows={value}"))?,
                "cols" => cols = value.parse().map_err(|_| format!("cols={value}"))?,
                "cwd" => request.cwd = value.to_string(),
                "env" if value.contains('=') => request.env.push(value.to_string()),
                "arg" => request.argv.push(value.to_string()),
                _ => {}
            }
        }
        if request.argv.is_empty() {
            return Err("the request has no command".into());
        }
        request.tty = tty.then_some((rows, cols));
        Ok(request)
    }
}

pub fn write_frame(out: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    out.write_all(&frame)
}

/// Reads one frame; `None` at a clean end of the stream. A length over `MAX_PAYLOAD` is an
/// error, so a peer cannot make the reader allocate more.
pub fn read_frame(input: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    loop {
        match input.read(&mut head[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    input.read_exact(&mut head[1..])?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    let mut payload = vec![0; len];
    input.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}
