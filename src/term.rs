//! The host terminal as the guest console: raw mode while the guest runs, and the Ctrl-A
//! escape (Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A).

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

const CTRL_A: u8 = 0x01;

/// What one input byte means after the escape is interpreted.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Bytes for the guest (possibly none, when the byte started an escape).
    Guest(Vec<u8>),
    Quit,
}

#[derive(Default)]
pub struct EscapeParser {
    after_ctrl_a: bool,
}

impl EscapeParser {
    /// Feeds a chunk of terminal input; stops at a quit request.
    pub fn feed(&mut self, bytes: &[u8]) -> Input {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => return Input::Quit,
                    CTRL_A => out.push(CTRL_A),
                    // Not an escape: the guest gets both bytes.
                    other => out.extend_from_slice(&[CTRL_A, other]),
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        Input::Guest(out)
    }
}

/// Puts a terminal in raw mode and restores its exact previous settings when dropped.
pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on stdin if it is a terminal; `None` otherwise (pipes, /dev/null in CI).
    pub fn stdin() -> Option<RawMode> {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty/tcgetattr/tcsetattr only read or write the termios we pass.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            // Keep output post-processing so host-side messages still start at column 0.
            raw.c_oflag |= libc::OPOST;
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Whether stdin has already ended, so that a thread reading it would only see end-of-file.
/// (Programs that start VMs often give them no input.)
pub fn stdin_has_ended() -> bool {
    has_ended(io::stdin().as_fd())
}

/// Whether `input` has nothing more to give: the null device, a regular file read to its end,
/// or an empty pipe or socket whose writer is gone.
fn has_ended(input: BorrowedFd) -> bool {
    let Ok(stat) = rustix::fs::fstat(input) else { return false };
    match rustix::fs::FileType::from_raw_mode(stat.st_mode) {
        rustix::fs::FileType::CharacterDevice => {
            (rustix::fs::major(stat.st_rdev), rustix::fs::minor(stat.st_rdev)) == NULL_DEVICE
        }
        rustix::fs::FileType::RegularFile => {
            rustix::fs::seek(input, rustix::fs::SeekFrom::Current(0)).is_ok_and(|at| at >= stat.st_size as u64)
        }
        rustix::fs::FileType::Fifo | rustix::fs::FileType::Socket => {
            let mut fds = [rustix::event::PollFd::new(&input, rustix::event::PollFlags::IN)];
            let hung_up = rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())).is_ok()
                && fds[0].revents().contains(rustix::event::PollFlags::HUP);
            hung_up && !fds[0].revents().contains(rustix::event::PollFlags::IN)
        }
        _ => false,
    }
}

/// /dev/null's device number.
const NULL_DEVICE: (u32, u32) = (1, 3);

/// Reads stdin until EOF or a quit escape, handing guest bytes to `deliver`; calls `quit` on
/// Ctrl-A x.
pub fn pump_stdin(mut deliver: impl FnMut(&[u8]), quit: impl FnOnce()) {
    let mut parser = EscapeParser::default();
    let mut buf = [0u8; 64];
    let mut stdin = io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => match parser.feed(&buf[..n]) {
                Input::Guest(bytes) => deliver(&bytes),
                Input::Quit => return quit(),
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_has_ended_only_when_nothing_more_can_come() {
        use std::io::{Seek, Write};
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(has_ended(null.as_fd()), "/dev/null");

        let (reader, writer) = std::io::pipe().unwrap();
        assert!(!has_ended(reader.as_fd()), "an empty pipe whose writer may still write");
        (&writer).write_all(b"ls\n").unwrap();
        drop(writer);
        assert!(!has_ended(reader.as_fd()), "a closed pipe with bytes left to read");
        let (reader, writer) = std::io::pipe().unwrap();
        drop(writer);
        assert!(has_ended(reader.as_fd()), "an empty pipe whose writer is gone");

        let path = std::env::temp_dir().join(format!("lkvm-term-test-{}", std::process::id()));
        std::fs::write(&path, b"input").unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        assert!(!has_ended(file.as_fd()), "a file not yet read");
        file.seek(std::io::SeekFrom::End(0)).unwrap();
        assert!(has_ended(file.as_fd()), "a file read to its end");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn plain_bytes_pass_through() {
        assert_eq!(EscapeParser::default().feed(b"ls\r"), Input::Guest(b"ls\r".to_vec()));
    }

    #[test]
    fn ctrl_a_x_quits_even_across_reads() {
        let mut p = EscapeParser::default();
        assert_eq!(p.feed(b"a\x01"), Input::Guest(b"a".to_vec()));
        assert_eq!(p.feed(b"x"), Input::Quit);
    }

    #[test]
    fn ctrl_a_twice_sends_one_and_other_escapes_pass_both() {
        let mut p = EscapeParser::default();
        assert_eq!(p.feed(b"\x01\x01"), Input::Guest(vec![CTRL_A]));
        assert_eq!(p.feed(b"\x01c"), Input::Guest(vec![CTRL_A, b'c']));
        assert_eq!(p.feed(b"x"), Input::Guest(b"x".to_vec()));
    }
}
