//! `lkvm exec` and `lkvm sandbox`'s host end: runs a command in a guest booted on an lkvm root
//! filesystem, whose init serves `protocol` on vsock, relaying stdin, stdout, stderr and the
//! exit status through the VM's vsock socket.

pub mod protocol;

use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::thread::{self as threads, ThreadKind};
use protocol::Request;

/// How long the guest's vsock may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the guest's exec server through the VM's vsock socket at `uds`.
pub fn connect(uds: &Path) -> Result<UnixStream, String> {
    let not_served = || {
        format!(
            "the guest does not serve lkvm exec on vsock port {}: it runs on guests booted on an lkvm root \
             filesystem (lkvm run with no disk, lkvm setup, lkvm sandbox) whose kernel has CONFIG_VIRTIO_VSOCKETS",
            protocol::EXEC_PORT
        )
    };
    let mut stream = UnixStream::connect(uds).map_err(|e| format!("{}: {e}", uds.display()))?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT)).map_err(|e| e.to_string())?;
    // The VM's vsock end closes a connection it cannot serve, maybe before this is written.
    stream.write_all(format!("CONNECT {}\n", protocol::EXEC_PORT).as_bytes()).map_err(|_| not_served())?;
    // Byte by byte: what follows the line is the guest's.
    let mut line = Vec::new();
    let mut reader = io::BufReader::with_capacity(1, &stream);
    reader.by_ref().take(64).read_until(b'\n', &mut line).map_err(|_| not_served())?;
    if !line.starts_with(b"OK ") || !line.ends_with(b"\n") {
        return Err(not_served());
    }
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Sends `request`, then forwards `stdin` (on a thread of its own, left blocked in read when
/// the command ends first) while relaying the command's output; returns its exit status.
pub fn run(
    stream: UnixStream,
    request: &Request,
    stdin: impl Read + Send + 'static,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<u8, String> {
    let mut input = stream.try_clone().map_err(|e| e.to_string())?;
    protocol::write_frame(&mut input, protocol::REQUEST, &request.encode()).map_err(|e| e.to_string())?;
    threads::spawn(ThreadKind::Exec, "exec-stdin".into(), move || forward_stdin(stdin, input))
        .map_err(|e| format!("spawn exec input thread: {e}"))?;
    let status = relay(&mut &stream, stdout, stderr);
    // Tells the guest its status arrived (a sandbox's init waits for it before it reboots), and
    // ends the input thread's connection while it still waits for the host's stdin.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    status
}

fn forward_stdin(mut stdin: impl Read, mut to_guest: UnixStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        // An empty frame is the end of input.
        if protocol::write_frame(&mut to_guest, protocol::STDIN, &buf[..n]).is_err() || n == 0 {
            return;
        }
    }
}

/// Copies the guest's output frames until its `EXIT`; what the guest sends is checked, and a
/// stream that ends first, or breaks the protocol, is an error.
pub fn relay(from_guest: &mut impl Read, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<u8, String> {
    loop {
        let frame = protocol::read_frame(from_guest).map_err(|e| format!("the guest's exec stream: {e}"))?;
        let Some((kind, data)) = frame else {
            return Err("the guest closed the connection before the command's exit status".into());
        };
        let out: &mut dyn Write = match kind {
            protocol::EXIT => {
                let status: [u8; 4] =
                    data.try_into().map_err(|_| "the guest's exit status is not 4 bytes".to_string())?;
                let status = i32::from_le_bytes(status);
                // As a shell reports it: 0-255.
                return u8::try_from(status).map_err(|_| format!("the guest's exit status {status} is out of range"));
            }
            protocol::STDOUT => &mut *stdout,
            protocol::STDERR => &mut *stderr,
            other => return Err(format!("the guest sent an unknown exec frame {other:#04x}")),
        };
        // The reader may have gone (a closed pipe): the command still runs to its status.
        let _ = out.write_all(&data).and_then(|()| out.flush());
    }
}

/// The environment a command run on a pty gets from the host: its TERM.
pub fn terminal_env(tty: Option<(u16, u16)>) -> Vec<String> {
    match (tty, std::env::var("TERM")) {
        (Some(_), Ok(term)) => vec![format!("TERM={term}")],
        _ => Vec::new(),
    }
}

/// The host terminal's size as (rows, columns), or 24x80 when stdout is not a terminal.
pub fn terminal_size() -> (u16, u16) {
    // SAFETY: TIOCGWINSZ writes one struct winsize.
    unsafe {
        let mut size: libc::winsize = std::mem::zeroed();
        if libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) == 0 && size.ws_row > 0 {
            (size.ws_row, size.ws_col)
        } else {
            (24, 80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(list: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, payload) in list {
            protocol::write_frame(&mut out, *kind, payload).unwrap();
        }
        out
    }

    #[test]
    fn output_is_split_by_stream_and_the_status_comes_last() {
        let stream = frames(&[
            (protocol::STDOUT, b"out1 "),
            (protocol::STDERR, b"err"),
            (protocol::STDOUT, b"out2"),
            (protocol::EXIT, &42i32.to_le_bytes()),
            (protocol::STDOUT, b"never read"),
        ]);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(relay(&mut stream.as_slice(), &mut out, &mut err), Ok(42));
        assert_eq!((out.as_slice(), err.as_slice()), (&b"out1 out2"[..], &b"err"[..]));
    }

    #[test]
    fn a_guest_that_breaks_the_protocol_gets_an_error_not_a_status() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut relay_of = |bytes: Vec<u8>| relay(&mut bytes.as_slice(), &mut out, &mut err).unwrap_err();
        assert!(relay_of(frames(&[(protocol::STDOUT, b"x")])).contains("before the command's exit status"));
        assert!(relay_of(frames(&[(protocol::EXIT, b"\x01")])).contains("not 4 bytes"));
        assert!(relay_of(frames(&[(protocol::EXIT, &(-1i32).to_le_bytes())])).contains("out of range"));
        assert!(relay_of(frames(&[(b'?', b"")])).contains("unknown exec frame"));
        // A length past the limit is refused before anything is allocated for it.
        let mut huge = vec![protocol::STDOUT];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(relay_of(huge).contains("frame of 4294967295 bytes"));
        assert!(relay_of(vec![protocol::STDOUT, 5, 0]).contains("exec stream"), "a cut header");
    }

    #[test]
    fn a_request_round_trips_and_a_bad_one_is_refused() {
        let request = Request {
            tty: Some((50, 132)),
            cwd: "/host/src".into(),
            env: vec!["TERM=xterm".into()],
            argv: vec!["sh".into(), "-c".into(), "echo a=b".into(), "".into()],
        };
        assert_eq!(Request::decode(&request.encode()), Ok(request));
        let pipes = Request { argv: vec!["true".into()], ..Request::default() };
        assert_eq!(Request::decode(&pipes.encode()).unwrap().tty, None);
        assert!(Request::decode(b"cwd=/\0").unwrap_err().contains("no command"));
        assert!(Request::decode(b"arg=ls").unwrap_err().contains("NUL"));
        assert!(Request::decode(b"rows=x\0arg=ls\0").is_err());
        assert!(Request::decode(b"junk\0arg=ls\0").unwrap_err().contains("no '='"));
    }

    #[test]
    fn connect_speaks_firecrackers_handshake_and_explains_a_refusal() {
        let dir = std::env::temp_dir().join(format!("lkvm-exec-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let listener = std::os::unix::net::UnixListener::bind(&uds).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            conn.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"CONNECT 1022\n");
            conn.write_all(b"OK 1073741824\n").unwrap();
            protocol::write_frame(&mut conn, protocol::EXIT, &0i32.to_le_bytes()).unwrap();
            // The second connection is refused as the muxer refuses a port nobody serves.
            drop(listener.accept().unwrap());
        });
        let mut stream = connect(&uds).unwrap();
        assert_eq!(protocol::read_frame(&mut stream).unwrap().unwrap().0, protocol::EXIT, "nothing was over-read");
        assert!(connect(&uds).unwrap_err().contains("does not serve lkvm exec"));
        server.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
