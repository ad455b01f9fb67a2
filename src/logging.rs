//! lkvm's log: tracing to stderr, or to the file Firecracker's `PUT /logger` names, at a level
//! that can change while lkvm runs.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use tracing::Level;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;

static LEVEL: AtomicU8 = AtomicU8::new(2);
static FILE: Mutex<Option<File>> = Mutex::new(None);

/// Levels by rank; 0 logs nothing.
const LEVELS: [Option<Level>; 6] =
    [None, Some(Level::ERROR), Some(Level::WARN), Some(Level::INFO), Some(Level::DEBUG), Some(Level::TRACE)];

/// Parses kvmtool's and Firecracker's level names (any case).
pub fn parse_level(name: &str) -> Option<u8> {
    match name.to_ascii_lowercase().as_str() {
        "off" => Some(0),
        "error" => Some(1),
        "warn" | "warning" => Some(2),
        "info" => Some(3),
        "debug" => Some(4),
        "trace" => Some(5),
        _ => None,
    }
}

fn enabled(level: &Level) -> bool {
    LEVELS[usize::from(LEVEL.load(Ordering::Relaxed))].is_some_and(|max| *level <= max)
}

struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut *FILE.lock().unwrap() {
            Some(file) => file.write(buf),
            None => io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut *FILE.lock().unwrap() {
            Some(file) => file.flush(),
            None => io::stderr().flush(),
        }
    }
}

pub const INFO: u8 = 3;

/// Lines a guest can cause, and so repeat at will, are held to this many a second: a guest must
/// not fill the host's disk or journal through lkvm's log.
const GUEST_LINES_PER_SECOND: u32 = 20;

/// This second's guest-caused lines: when it began, how many were logged and how many not.
static GUEST_LINES: Mutex<Option<(std::time::Instant, u32, u64)>> = Mutex::new(None);

/// Whether a line the guest caused may be logged now; once a second passes, says how many
/// were left out.
pub fn guest_line_allowed() -> bool {
    let mut window = GUEST_LINES.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    let (start, logged, dropped) = window.get_or_insert((now, 0, 0));
    if now.duration_since(*start) >= std::time::Duration::from_secs(1) {
        if *dropped > 0 {
            tracing::warn!("{dropped} more log lines the guest caused were left out");
        }
        (*start, *logged, *dropped) = (now, 0, 0);
    }
    if *logged < GUEST_LINES_PER_SECOND {
        *logged += 1;
        true
    } else {
        *dropped += 1;
        false
    }
}

/// `tracing::warn!` for a line the guest can cause (see `guest_line_allowed`).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {
        if $crate::logging::guest_line_allowed() {
            tracing::warn!($($arg)*)
        }
    };
}

/// `tracing::info!` for a line the guest can cause (see `guest_line_allowed`).
#[macro_export]
macro_rules! guest_info {
    ($($arg:tt)*) => {
        if tracing::enabled!(tracing::Level::INFO) && $crate::logging::guest_line_allowed() {
            tracing::info!($($arg)*)
        }
    };
}

/// Starts logging to stderr at level `rank` (see `parse_level`).
pub fn init(rank: u8) {
    set_level(rank);
    let to_terminal = FILE.lock().unwrap().is_none() && io::IsTerminal::is_terminal(&io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(|| Sink)
        .without_time()
        .with_target(false)
        .with_ansi(to_terminal)
        .with_filter(filter_fn(|meta| enabled(meta.level())));
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

pub fn set_level(rank: u8) {
    LEVEL.store(rank.min(5), Ordering::Relaxed);
}

/// Sends the log to `path` (appending; a FIFO works too) from now on.
pub fn set_file(path: &Path) -> io::Result<()> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    *FILE.lock().unwrap() = Some(file);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_guest_gets_at_most_its_lines_a_second() {
        let allowed = (0..1000).filter(|_| super::guest_line_allowed()).count();
        assert!(allowed <= super::GUEST_LINES_PER_SECOND as usize * 2, "{allowed} of 1000 lines logged");
        assert!(allowed > 0);
    }
}
