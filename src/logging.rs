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
