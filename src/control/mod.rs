//! The control socket: every running lkvm listens on `~/.lkvm/NAME.sock` (the directory is
//! private to its user), and `lkvm list|stop|pause|resume|debug` talk to it.
//!
//! Protocol: one JSON object per line each way, request then response, then the connection
//! closes. Every message carries `"version": 1`. Requests: `{"version":1,"command":C}` with C
//! one of `status` (which names the vsock socket), `stop`, `pause`, `resume`, `registers`, ...,
//! and `fork`, whose response carries descriptors (the state file, then `fork.memory_files`
//! memory files). Responses: `{"version":1,"ok":true, ...}` with command-specific fields, or
//! `{"version":1,"ok":false,"error":"..."}`; a request of another version, malformed or
//! unknown, gets such an error. Clients give up after 5 s.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::host::{bind_replacing_stale, check_name, ensure_lkvm_dir, lkvm_dir, socket_path, ACCEPT_BACKOFF};
use crate::vmm::action::{Action, ActionError, Answer};
pub use crate::vmm::action::{RunState, SnapshotReport};
use crate::vmm::Frontend;

pub const PROTOCOL_VERSION: u32 = 1;
pub const TIMEOUT: Duration = Duration::from_secs(5);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_MESSAGE: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Status,
    Stop,
    Pause,
    Resume,
    Registers,
    /// Moves the balloon target by `mib` (positive inflates).
    Balloon,
    Stats,
    /// Injects an NMI into vCPU `cpu`.
    Nmi,
    /// Sends magic SysRq `key` through the serial console.
    Sysrq,
    /// Writes a snapshot into directory `path`, then resumes the guest (or ends it, `stop`).
    Snapshot,
    /// Writes an ELF core of the guest (memory and vCPU registers) to file `path`.
    Dump,
    /// Shares the guest's state and memory with children to be started: the response carries
    /// the state file, then the memory files (`fork.memory_files` of them), as descriptors.
    Fork,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    pub command: Command,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mib: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<char>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop: bool,
}

impl Request {
    pub fn new(command: Command) -> Self {
        Request { version: PROTOCOL_VERSION, command, mib: None, cpu: None, key: None, path: None, stop: false }
    }
}

#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RunState>,
    /// One register dump per vCPU, for `registers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<Vec<String>>,
    /// The balloon's target and what the guest has given back, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_target_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_actual_mib: Option<u64>,
    /// Guest memory statistics from the balloon driver, in bytes or counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<std::collections::BTreeMap<String, u64>>,
    /// `dump`: the bytes written (guest RAM that is all zeros is a hole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump_bytes: Option<u64>,
    /// `status`: the guest's vsock socket (`lkvm exec` connects there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_uds: Option<PathBuf>,
    /// What a snapshot wrote: state and memory file sizes in bytes, and how long it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<ForkReport>,
}

/// What a fork handed over besides its descriptors.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkReport {
    /// How long the guest was paused.
    pub paused_micros: u64,
    pub memory_files: usize,
}

impl Response {
    pub fn ok() -> Self {
        Response { version: PROTOCOL_VERSION, ok: true, ..Default::default() }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Response { version: PROTOCOL_VERSION, ok: false, error: Some(message.into()), ..Default::default() }
    }
}

/// Answers one request line: the request as an action the VMM thread runs (`ask`), its answer
/// as the response.
pub fn handle(line: &str, name: &str, ask: &dyn Fn(Action) -> Result<Answer, ActionError>) -> Response {
    handle_with_files(line, name, ask).0
}

/// As `handle`, with the files the response hands over (a fork's).
fn handle_with_files(
    line: &str,
    name: &str,
    ask: &dyn Fn(Action) -> Result<Answer, ActionError>,
) -> (Response, Vec<File>) {
    let request: Request = match serde_json::from_str(line) {
        Ok(request) => request,
        Err(e) => {
            // Say what is wrong with the version before anything else: a newer client's
            // commands may not parse here.
            let version = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["version"].as_u64());
            let response = match version {
                Some(v) if v != u64::from(PROTOCOL_VERSION) => Response::error(format!(
                    "protocol version {v} is not supported (this lkvm speaks {PROTOCOL_VERSION})"
                )),
                _ => Response::error(format!("malformed request: {e}")),
            };
            return (response, Vec::new());
        }
    };
    if request.version != PROTOCOL_VERSION {
        let response = Response::error(format!(
            "protocol version {} is not supported (this lkvm speaks {PROTOCOL_VERSION})",
            request.version
        ));
        return (response, Vec::new());
    }
    let ends_vm = matches!(request.command, Command::Stop) || (request.command == Command::Snapshot && request.stop);
    let mut files = Vec::new();
    let mut response = match action(&request) {
        Ok(action) => answer(request.command, ask(action), &mut files).unwrap_or_else(Response::error),
        Err(missing) => Response::error(missing),
    };
    response.pid = Some(std::process::id());
    response.name = Some(name.to_string());
    // A VM that is ending answers nothing more.
    if !ends_vm {
        if let Ok(Answer::Status { state, .. }) = ask(Action::Status) {
            response.state = Some(state);
        }
    }
    (response, files)
}

/// The action a request asks for, or what it lacks.
fn action(request: &Request) -> Result<Action, String> {
    let absolute = |what: &str| match &request.path {
        Some(path) if path.is_absolute() => Ok(path.clone()),
        _ => Err(format!("{what} needs an absolute \"path\"")),
    };
    Ok(match request.command {
        Command::Status => Action::Status,
        Command::Stop => Action::Stop,
        Command::Pause => Action::Pause,
        Command::Resume => Action::Resume,
        Command::Registers => Action::Registers,
        Command::Balloon => Action::ResizeBalloon(request.mib.ok_or("balloon needs \"mib\"")?),
        Command::Stats => Action::BalloonControl,
        Command::Sysrq => Action::Sysrq(request.key.ok_or("sysrq needs \"key\"")?),
        Command::Snapshot => Action::SnapshotInto { dir: absolute("snapshot")?, stop: request.stop },
        Command::Dump => Action::Dump(absolute("dump")?),
        Command::Nmi => Action::InjectNmi(request.cpu.ok_or("nmi needs \"cpu\"")?),
        Command::Fork => Action::Fork,
    })
}

/// The response to `command`'s answer, and the files it hands over.
fn answer(command: Command, answer: Result<Answer, ActionError>, files: &mut Vec<File>) -> Result<Response, String> {
    let ok = Response::ok();
    Ok(match answer {
        Ok(Answer::Status { vsock_uds, .. }) => Response { vsock_uds, ..ok },
        Ok(Answer::Changed(false)) if command == Command::Pause => return Err("the guest is already paused".into()),
        Ok(Answer::Changed(false)) => return Err("the guest is not paused".into()),
        Ok(Answer::Registers(dumps)) => Response { vcpus: Some(dumps), ..ok },
        Ok(Answer::Balloon { target_mib, actual_mib }) => {
            Response { balloon_target_mib: Some(target_mib), balloon_actual_mib: Some(actual_mib), ..ok }
        }
        // The guest's statistics are waited for here, not on the VMM thread.
        Ok(Answer::BalloonControl(balloon)) => Response { stats: Some(balloon.stats()?), ..ok },
        Ok(Answer::Snapshot(report)) => Response { snapshot: Some(report), ..ok },
        Ok(Answer::Dumped(bytes)) => Response { dump_bytes: Some(bytes), ..ok },
        Ok(Answer::Forked(image)) => {
            let report = ForkReport { paused_micros: image.paused_micros, memory_files: image.memory.len() };
            files.push(image.state);
            files.extend(image.memory);
            Response { fork: Some(report), ..ok }
        }
        Ok(_) => ok,
        Err(e @ ActionError::NoBalloon) => return Err(format!("{e} (run it with --balloon)")),
        Err(e) => return Err(e.to_string()),
    })
}

/// Sends one request to the guest listening at `path` and returns its response.
pub fn request(path: &Path, command: Command) -> io::Result<Response> {
    request_with(path, Request::new(command))
}

pub fn request_with(path: &Path, request: Request) -> io::Result<Response> {
    // Writing a snapshot takes as long as writing guest memory.
    let timeout = if matches!(request.command, Command::Snapshot | Command::Dump) { SNAPSHOT_TIMEOUT } else { TIMEOUT };
    let stream = send(path, &request, timeout)?;
    let listener_pid = peer_pid(&stream);
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_MESSAGE)).read_line(&mut reply).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {} s", timeout.as_secs()))
        } else {
            e
        }
    })?;
    let mut response: Response = serde_json::from_str(&reply)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad response: {e}")))?;
    // A jailed lkvm knows only its pid in its own PID namespace (1); the kernel gives its
    // listener's pid as this process numbers it.
    if response.pid.is_some() {
        response.pid = listener_pid.or(response.pid);
    }
    Ok(response)
}

/// Connects to the guest listening at `path` and sends `request`; its answer may take `timeout`.
fn send(path: &Path, request: &Request, timeout: Duration) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    Ok(stream)
}

/// Asks the guest listening at `path` to fork: its response, and the files it hands over (the
/// state file, then the memory files).
pub fn request_fork(path: &Path) -> io::Result<(Response, Vec<File>)> {
    /// The most descriptors one message carries (the kernel's SCM_MAX_FD).
    const MAX_FILES: usize = 253;
    let stream = send(path, &Request::new(Command::Fork), SNAPSHOT_TIMEOUT)?;
    let mut reply = vec![0u8; 64 * 1024];
    let mut fds = [-1 as RawFd; MAX_FILES];
    let mut iov = [libc::iovec { iov_base: reply.as_mut_ptr().cast(), iov_len: reply.len() }];
    // SAFETY: the iovec points into `reply`, which outlives the call.
    let (read, count) =
        unsafe { stream.recv_with_fds(&mut iov, &mut fds) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: recvmsg gave this process these `count` descriptors; nothing else owns them.
    let files: Vec<File> = fds[..count].iter().map(|&fd| unsafe { File::from_raw_fd(fd) }).collect();
    for file in &files {
        // Not inherited by whatever this process starts, unless it says so.
        // SAFETY: fcntl on a descriptor `file` owns.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    reply.truncate(read);
    if !reply.ends_with(b"\n") {
        BufReader::new((&stream).take(MAX_MESSAGE)).read_until(b'\n', &mut reply)?;
    }
    let response: Response = serde_json::from_slice(&reply)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad response: {e}")))?;
    Ok((response, files))
}

/// The pid of the process that listens at `stream`'s other end, in this process's PID
/// namespace; None where that process is not visible from here.
fn peer_pid(stream: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which lives across the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// The sockets of guests that answer, by name; stale sockets of dead guests are removed.
pub fn running_guests() -> Vec<(String, Response)> {
    let Ok(entries) = std::fs::read_dir(lkvm_dir()) else { return Vec::new() };
    let mut guests: Vec<(String, Response)> = entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".sock")?.to_string();
            match request(&path, Command::Status) {
                Ok(response) => Some((name, response)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    let _ = std::fs::remove_file(&path);
                    None
                }
                Err(_) => None,
            }
        })
        .collect();
    guests.sort_by(|a, b| a.0.cmp(&b.0));
    guests
}

/// Refuses a name a running guest has, before anything (sockets, devices) is made for it.
pub fn check_name_free(name: &str) -> Result<(), String> {
    let path = socket_path(name);
    match UnixStream::connect(&path) {
        Ok(_) => Err(format!("a guest named '{name}' is already running ({})", path.display())),
        Err(_) => Ok(()),
    }
}

/// The control socket of guest `name`. The VMM thread serves it while it waits for the VM's
/// end (`vmm::Frontend`): each request becomes an action it runs, the answer the response.
pub struct Server {
    path: PathBuf,
    listener: UnixListener,
    name: String,
}

impl Server {
    pub fn start(name: &str) -> Result<Server, String> {
        check_name(name)?;
        ensure_lkvm_dir()?;
        let path = socket_path(name);
        let listener = bind_replacing_stale(&path).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => format!("a guest named '{name}' is already running ({})", path.display()),
            _ => format!("{}: {e}", path.display()),
        })?;
        listener.set_nonblocking(true).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Server { path, listener, name: name.to_string() })
    }
}

impl Frontend for Server {
    /// Answers every connection waiting, one after the other; returns when none is left.
    fn serve_waiting(&mut self, act: &dyn Fn(Action) -> Result<Answer, ActionError>) {
        loop {
            match self.listener.accept() {
                // The accepted socket blocks (Linux does not pass O_NONBLOCK on); `serve` bounds it.
                Ok((stream, _)) => serve(stream, &self.name, act),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of descriptors, say: the socket stays readable, so wait before the next try.
                    tracing::debug!("accept: {e}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }
}

impl std::os::fd::AsFd for Server {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers one request. A client that does not send or read its line within `TIMEOUT` is
/// dropped, so that it cannot hold the VMM thread for longer.
fn serve(stream: UnixStream, name: &str, ask: &dyn Fn(Action) -> Result<Answer, ActionError>) {
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let mut line = String::new();
    let (response, files) = match BufReader::new((&stream).take(MAX_MESSAGE)).read_line(&mut line) {
        Ok(_) => handle_with_files(line.trim(), name, ask),
        Err(e) => (Response::error(format!("reading request: {e}")), Vec::new()),
    };
    if let Ok(mut text) = serde_json::to_string(&response) {
        text.push('\n');
        let _ = send_line(&stream, text.as_bytes(), &files);
    }
}

/// Writes `line`, its first bytes with `files` attached.
fn send_line(stream: &UnixStream, line: &[u8], files: &[File]) -> io::Result<()> {
    if files.is_empty() {
        return (&*stream).write_all(line);
    }
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let sent = stream.send_with_fds(&[line], &fds).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    (&*stream).write_all(&line[sent..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A VMM thread that records what it was asked.
    #[derive(Default)]
    struct Fake {
        paused: Cell<bool>,
        asked: RefCell<Vec<String>>,
    }

    impl Fake {
        fn ask(&self, action: Action) -> Result<Answer, ActionError> {
            let was_paused = self.paused.get();
            Ok(match action {
                Action::Status => Answer::Status {
                    state: if was_paused { RunState::Paused } else { RunState::Running },
                    vsock_uds: Some("/run/v.sock".into()),
                },
                Action::Stop => {
                    self.asked.borrow_mut().push("stop".into());
                    Answer::Done
                }
                Action::Pause => {
                    self.paused.set(true);
                    Answer::Changed(!was_paused)
                }
                Action::Resume => {
                    self.paused.set(false);
                    Answer::Changed(was_paused)
                }
                Action::Registers => Answer::Registers(vec!["vCPU 0: rip=0x1000".into()]),
                Action::ResizeBalloon(mib) => Answer::Balloon { target_mib: mib.max(0) as u64, actual_mib: 0 },
                Action::BalloonControl => return Err(ActionError::NoBalloon),
                Action::InjectNmi(0) => Answer::Done,
                Action::InjectNmi(_) => return Err("no vCPU".into()),
                Action::SnapshotInto { dir, stop } => {
                    self.asked.borrow_mut().push(format!("snapshot {} {stop}", dir.display()));
                    Answer::Snapshot(SnapshotReport { state_bytes: 1, memory_bytes: 2, millis: 3 })
                }
                Action::Dump(_) => Answer::Dumped(4096),
                _ => Answer::Done,
            })
        }
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let request = Request::new(Command::Registers);
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(text, r#"{"version":1,"command":"registers"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        let response = Response { state: Some(RunState::Paused), ..Response::ok() };
        let text = serde_json::to_string(&response).unwrap();
        assert_eq!(text, r#"{"version":1,"ok":true,"state":"paused"}"#);
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), response);
    }

    #[test]
    fn commands_become_actions_and_answers_responses() {
        let vmm = Fake::default();
        let fake = |action| vmm.ask(action);
        let r = handle(r#"{"version":1,"command":"pause"}"#, "g", &fake);
        assert!(r.ok && r.state == Some(RunState::Paused) && r.name.as_deref() == Some("g"));
        let r = handle(r#"{"version":1,"command":"status"}"#, "g", &fake);
        assert_eq!(r.vsock_uds.as_deref(), Some(Path::new("/run/v.sock")));
        let r = handle(r#"{"version":1,"command":"registers"}"#, "g", &fake);
        assert_eq!(r.vcpus.unwrap(), vec!["vCPU 0: rip=0x1000"]);
        assert!(handle(r#"{"version":1,"command":"resume"}"#, "g", &fake).ok);
        let again = handle(r#"{"version":1,"command":"resume"}"#, "g", &fake);
        assert_eq!((again.ok, again.error.as_deref()), (false, Some("the guest is not paused")));
        let balloon = handle(r#"{"version":1,"command":"balloon","mib":64}"#, "g", &fake);
        assert_eq!(balloon.balloon_target_mib, Some(64));
        assert!(handle(r#"{"version":1,"command":"balloon"}"#, "g", &fake).error.unwrap().contains("needs"));
        assert_eq!(
            handle(r#"{"version":1,"command":"stats"}"#, "g", &fake).error.as_deref(),
            Some("the guest has no balloon device (run it with --balloon)")
        );
        let snapshot = handle(r#"{"version":1,"command":"snapshot","path":"/s","stop":true}"#, "g", &fake);
        assert_eq!(snapshot.snapshot.map(|r| r.memory_bytes), Some(2));
        assert_eq!(snapshot.state, None, "a VM that is ending is not asked its state");
        let relative = handle(r#"{"version":1,"command":"dump","path":"core"}"#, "g", &fake);
        assert!(relative.error.unwrap().contains("absolute"));
        assert_eq!(handle(r#"{"version":1,"command":"nmi","cpu":1}"#, "g", &fake).error.as_deref(), Some("no vCPU"));
        assert!(handle(r#"{"version":1,"command":"stop"}"#, "g", &fake).ok);
        assert_eq!(*vmm.asked.borrow(), ["snapshot /s true", "stop"]);
    }

    #[test]
    fn malformed_unknown_and_other_versions_get_errors() {
        let vmm = Fake::default();
        let fake = |action| vmm.ask(action);
        let bad = handle("not json", "g", &fake);
        assert!(!bad.ok && bad.error.unwrap().contains("malformed"));
        let unknown = handle(r#"{"version":1,"command":"explode"}"#, "g", &fake);
        assert!(!unknown.ok && unknown.error.unwrap().contains("malformed"));
        let future = handle(r#"{"version":2,"command":"teleport"}"#, "g", &fake);
        assert!(future.error.unwrap().contains("version 2 is not supported"));
        let old = handle(r#"{"version":0,"command":"status"}"#, "g", &fake);
        assert!(old.error.unwrap().contains("version 0"));
        assert!(vmm.asked.borrow().is_empty());
    }
}
