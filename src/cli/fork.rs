//! `lkvm fork`: asks a running guest for its state and memory (descriptors, no files on disk)
//! and starts each child as an lkvm process of its own that restores from them, in the
//! background; returns once every child answers on its control socket.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::control::{self, Command as Request};
use crate::host::{check_name, lkvm_dir, socket_path};

/// How long a child may take to answer once started (a restore maps memory; it does not read it).
const CHILD_READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args, Debug)]
pub struct ForkArgs {
    /// The running guest to fork
    #[arg(short = 'n', long = "name")]
    pub name: String,
    /// How many children
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub count: u32,
    /// Children are named PREFIX-0, PREFIX-1, ... (default: the guest's name)
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// A host resource each child gets instead of the parent's, by device id, as `lkvm run
    /// --restore` takes it; `{}` in VALUE is the child's number (`eth0=tap-child{}`)
    #[arg(long = "override", value_name = "ID=VALUE")]
    pub overrides: Vec<String>,
}

/// The children's names, each checked and free.
fn child_names(args: &ForkArgs) -> Result<Vec<String>, String> {
    let prefix = args.prefix.as_deref().unwrap_or(&args.name);
    let names: Vec<String> = (0..args.count).map(|k| format!("{prefix}-{k}")).collect();
    for name in &names {
        check_name(name).map_err(|e| format!("--prefix {prefix}: {e}"))?;
        control::check_name_free(name)?;
    }
    Ok(names)
}

pub fn run(args: &ForkArgs) -> Result<(), String> {
    check_name(&args.name)?;
    let names = child_names(args)?;
    let (response, files) = match control::request_fork(&socket_path(&args.name)) {
        Ok(reply) => reply,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Err(format!("{}: no such running guest", args.name))
        }
        Err(e) => return Err(format!("{}: {e}", args.name)),
    };
    let report = match (response.ok, response.fork) {
        (true, Some(report)) => report,
        _ => return Err(format!("{}: {}", args.name, response.error.unwrap_or_else(|| "no fork".into()))),
    };
    if files.len() != report.memory_files + 1 || report.memory_files == 0 {
        return Err(format!(
            "{}: the guest handed over {} files for {} memory files",
            args.name,
            files.len(),
            report.memory_files
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("the lkvm binary: {e}"))?;
    let mut children = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let overrides: Vec<String> = args.overrides.iter().map(|o| o.replace("{}", &index.to_string())).collect();
        let child = start_child(&exe, name, &overrides, &files).map_err(|e| format!("{name}: {e}"))?;
        children.push((name, child));
    }
    drop(files);
    let mut failures = Vec::new();
    for (name, child) in &mut children {
        if let Err(e) = wait_until_serving(name, child) {
            failures.push(format!("{name}: {e}"));
        }
    }
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    println!(
        "{}: forked into {} (paused {} ms; consoles in {})",
        args.name,
        names.join(" "),
        report.paused_micros / 1000,
        lkvm_dir().join("NAME.log").display()
    );
    Ok(())
}

/// Starts `lkvm run --restore-fork` in a session of its own, its console written to
/// ~/.lkvm/NAME.log, the state on descriptor 3 and memory on those after it.
fn start_child(exe: &Path, name: &str, overrides: &[String], files: &[File]) -> std::io::Result<Child> {
    let log = console_log(name);
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(log)?
    };
    let mut command = Command::new(exe);
    command.args(["run", "--restore-fork", &(files.len() - 1).to_string(), "--name", name]);
    for o in overrides {
        command.args(["--override", o]);
    }
    command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    // Above every descriptor given and every number they go to.
    let high = fds.iter().copied().max().unwrap_or(0).max(3 + fds.len() as i32) + 1;
    // SAFETY: only async-signal-safe calls between fork and exec. Each descriptor is first
    // moved above every target number, so that no dup2 overwrites one still to be placed.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            for (i, &fd) in fds.iter().enumerate() {
                if libc::dup2(fd, high + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for i in 0..fds.len() as i32 {
                if libc::dup2(high + i, 3 + i) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(high + i);
            }
            Ok(())
        });
    }
    command.spawn()
}

fn console_log(name: &str) -> PathBuf {
    lkvm_dir().join(format!("{name}.log"))
}

/// Waits until the child answers on its control socket; if it ends first, says why (the
/// last line of its log).
fn wait_until_serving(name: &str, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + CHILD_READY_TIMEOUT;
    loop {
        if let Ok(response) = control::request(&socket_path(name), Request::Status) {
            if response.ok {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(console_log(name)).unwrap_or_default();
            let why = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").to_string();
            return Err(format!("the child ended ({status}): {why}"));
        }
        if Instant::now() > deadline {
            return Err(format!("did not answer within {} s", CHILD_READY_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
