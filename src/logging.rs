//! lkvm's log: tracing to stderr, or to the file Firecracker's `PUT /logger` names, at a level
//! that can change while lkvm runs. Run as `firecracker`, lines look like Firecracker's and go
//! to stdout, as tools that scrape Firecracker's log expect.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

static LEVEL: AtomicU8 = AtomicU8::new(2);
static FILE: Mutex<Option<File>> = Mutex::new(None);
static FIRECRACKER_STYLE: Mutex<Option<FirecrackerStyle>> = Mutex::new(None);

/// Firecracker's line: `TIME [instance:thread(:LEVEL)(:file:line)] message`.
#[derive(Clone, Debug, Default)]
pub struct FirecrackerStyle {
    pub instance_id: String,
    pub show_level: bool,
    pub show_origin: bool,
    /// Only events from modules whose path starts with this are logged.
    pub module: Option<String>,
}

/// Levels by rank; 0 logs nothing.
const LEVELS: [Option<Level>; 6] =
    [None, Some(Level::ERROR), Some(Level::WARN), Some(Level::INFO), Some(Level::DEBUG), Some(Level::TRACE)];

fn enabled(meta: &tracing::Metadata) -> bool {
    let level_on = LEVELS[usize::from(LEVEL.load(Ordering::Relaxed))].is_some_and(|max| *meta.level() <= max);
    level_on && module_on(meta.module_path())
}

fn module_on(path: Option<&str>) -> bool {
    match FIRECRACKER_STYLE.lock().unwrap().as_ref().and_then(|style| style.module.as_deref()) {
        Some(prefix) => path.is_some_and(|path| path.starts_with(prefix)),
        None => true,
    }
}

struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut *FILE.lock().unwrap() {
            Some(file) => file.write(buf),
            None if FIRECRACKER_STYLE.lock().unwrap().is_some() => io::stdout().write(buf),
            None => io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut *FILE.lock().unwrap() {
            Some(file) => file.flush(),
            None => io::stdout().flush().and(io::stderr().flush()),
        }
    }
}

/// Formats events as Firecracker does when a style is set, else as tracing's compact default.
struct LineFormat<Default>(Default);

impl<S, N, Default> FormatEvent<S, N> for LineFormat<Default>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    Default: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        // Formatting writes to a buffer; the line reaches `Sink` (which takes this lock too) after.
        let style = FIRECRACKER_STYLE.lock().unwrap();
        let Some(style) = style.as_ref() else {
            return self.0.format_event(ctx, writer, event);
        };
        let meta = event.metadata();
        let thread = std::thread::current();
        write!(writer, "{} [{}:{}", local_time(), style.instance_id, thread.name().unwrap_or("-"))?;
        if style.show_level {
            write!(writer, ":{}", meta.level())?;
        }
        if style.show_origin {
            write!(
                writer,
                ":{}:{}",
                meta.file().unwrap_or("?"),
                meta.line().map_or("?".to_string(), |l| l.to_string())
            )?;
        }
        write!(writer, "] ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// The local time as Firecracker prints it: `2026-12-07T16:58:03.123456789`.
fn local_time() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    // SAFETY: localtime_r writes only the tm it is given; zeroes are a valid tm.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let seconds = now.as_secs() as libc::time_t;
    // SAFETY: both pointers are valid for the call.
    unsafe { libc::localtime_r(&seconds, &mut tm) };
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        now.subsec_nanos()
    )
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

/// Starts logging to stderr at level `rank` (see `config::parse_log_level`).
pub fn init(rank: u8) {
    set_level(rank);
    let to_terminal = FILE.lock().unwrap().is_none() && io::IsTerminal::is_terminal(&io::stderr());
    let compact = tracing_subscriber::fmt::format().without_time().with_target(false).with_ansi(to_terminal);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(|| Sink)
        .with_ansi(to_terminal)
        .event_format(LineFormat(compact))
        .with_filter(filter_fn(enabled));
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

/// Starts logging as Firecracker does: to stdout, in its line format.
pub fn init_firecracker(rank: u8, style: FirecrackerStyle) {
    // libc reads the time zone on its first local time only: before any thread is confined.
    local_time();
    *FIRECRACKER_STYLE.lock().unwrap() = Some(style);
    init(rank);
}

/// `PUT /logger`'s format fields: those given replace the current ones.
pub fn update_firecracker_style(show_level: Option<bool>, show_origin: Option<bool>, module: Option<String>) {
    if let Some(style) = FIRECRACKER_STYLE.lock().unwrap().as_mut() {
        style.show_level = show_level.unwrap_or(style.show_level);
        style.show_origin = show_origin.unwrap_or(style.show_origin);
        style.module = module.or(style.module.take());
    }
}

pub fn set_level(rank: u8) {
    LEVEL.store(rank.min(5), Ordering::Relaxed);
}

/// Sends the log to `path` (appending) from now on.
pub fn set_file(path: &Path) -> io::Result<()> {
    *FILE.lock().unwrap() = Some(open_for_lines(path)?);
    Ok(())
}

/// Opens a log or metrics file for appending. As Firecracker does, a FIFO is opened read-write
/// and non-blocking: lkvm neither waits for its reader nor stalls when it lags (the line is lost
/// instead).
pub fn open_for_lines(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).read(true).append(true).custom_flags(libc::O_NONBLOCK).open(path)
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
