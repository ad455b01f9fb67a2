//! `lkvm list|stop|pause|resume|debug`: talk to running guests over their control sockets.

use clap::Args;

use crate::control::{self, Command, Response, RunState};

/// Which guests a command acts on.
#[derive(Args, Debug)]
pub struct Target {
    /// Guest name
    #[arg(short = 'n', long = "name", conflicts_with = "all", required_unless_present = "all")]
    pub name: Option<String>,
    /// Every running guest of this user
    #[arg(short = 'a', long = "all")]
    pub all: bool,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct DebugAction {
    /// Dump every vCPU's registers and the code bytes at RIP; with FILE, write an ELF core of
    /// the guest (memory and registers) there instead, for `gdb vmlinux FILE` and `crash`
    #[arg(short = 'd', long = "dump", value_name = "FILE", num_args = 0..=1)]
    pub dump: Option<Option<std::path::PathBuf>>,
    /// Inject an NMI into vCPU N
    #[arg(short = 'm', long = "nmi", value_name = "N")]
    pub nmi: Option<u32>,
    /// Send magic SysRq key C through the serial console (break, then C)
    #[arg(short = 's', long = "sysrq", value_name = "C")]
    pub sysrq: Option<char>,
}

#[derive(Args, Debug)]
pub struct DebugArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub action: DebugAction,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct BalloonChange {
    /// Inflate the balloon by MB (the guest gives that memory back)
    #[arg(short = 'i', long = "inflate", value_name = "MB")]
    pub inflate: Option<u32>,
    /// Deflate the balloon by MB
    #[arg(short = 'd', long = "deflate", value_name = "MB")]
    pub deflate: Option<u32>,
}

#[derive(Args, Debug)]
pub struct BalloonArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub change: BalloonChange,
}

#[derive(Args, Debug)]
pub struct StatArgs {
    #[command(flatten)]
    pub target: Target,
    /// Guest memory statistics (from the balloon driver)
    #[arg(short = 'm', long = "memory", required = true)]
    pub memory: bool,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// Guest name
    #[arg(short = 'n', long = "name")]
    pub name: String,
    /// Directory to write the snapshot into (files `state` and `memory`); created if missing
    #[arg(value_name = "DIR")]
    pub dir: std::path::PathBuf,
    /// End the guest after the snapshot instead of resuming it
    #[arg(long)]
    pub stop: bool,
}

/// `lkvm debug -n NAME --dump FILE`: an ELF core of the guest.
pub fn dump_core(target: &Target, file: &std::path::Path) -> Result<(), String> {
    let name = target.name.as_deref().ok_or("--dump FILE takes one guest: -n NAME")?;
    crate::host::check_name(name)?;
    // The guest's lkvm writes it: an absolute path, whatever its working directory.
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let parent = std::fs::canonicalize(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let path = parent.join(file.file_name().ok_or_else(|| format!("{}: not a file name", file.display()))?);
    let request = control::Request { path: Some(path.clone()), ..control::Request::new(Command::Dump) };
    match control::request_with(&crate::host::socket_path(name), request) {
        Ok(response) if response.ok => {
            let bytes = response.dump_bytes.unwrap_or(0);
            println!("{name}: core in {} ({} MiB written)", path.display(), bytes >> 20);
            Ok(())
        }
        Ok(response) => Err(format!("{name}: {}", response.error.unwrap_or_default())),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            Err(format!("{name}: no such running guest"))
        }
        Err(e) => Err(format!("{name}: {e}")),
    }
}

/// `lkvm snapshot`: asks the guest to write itself into DIR; prints what was written.
pub fn snapshot(args: &SnapshotArgs) -> Result<(), String> {
    crate::host::check_name(&args.name)?;
    crate::snapshot::create_private_dir(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let request =
        control::Request { path: Some(dir.clone()), stop: args.stop, ..control::Request::new(Command::Snapshot) };
    let response = match control::request_with(&crate::host::socket_path(&args.name), request) {
        Ok(response) => response,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Err(format!("{}: no such running guest", args.name))
        }
        Err(e) => return Err(format!("{}: {e}", args.name)),
    };
    match (response.ok, response.snapshot) {
        (true, Some(r)) => {
            println!(
                "{}: snapshot in {} ({} KiB state, {} MiB memory, {} ms){}",
                args.name,
                dir.display(),
                r.state_bytes >> 10,
                r.memory_bytes >> 20,
                r.millis,
                if args.stop { "; guest stopped" } else { "" }
            );
            Ok(())
        }
        _ => Err(format!("{}: {}", args.name, response.error.unwrap_or_else(|| "no snapshot written".into()))),
    }
}

impl BalloonChange {
    pub fn delta_mib(&self) -> i64 {
        i64::from(self.inflate.unwrap_or(0)) - i64::from(self.deflate.unwrap_or(0))
    }
}

fn state_name(state: Option<RunState>) -> &'static str {
    match state {
        Some(RunState::Paused) => "paused",
        _ => "running",
    }
}

/// Prints running guests, and rootfs directories from `lkvm setup` as "shut off".
pub fn list() -> Result<(), String> {
    let guests = control::running_guests();
    println!("  PID NAME                 STATE");
    println!("------------------------------------");
    for (name, response) in &guests {
        println!("{:5} {:20} {}", response.pid.unwrap_or(0), name, state_name(response.state));
    }
    if let Ok(entries) = std::fs::read_dir(crate::host::lkvm_dir()) {
        let mut rootfs: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|name| !guests.iter().any(|(g, _)| g == name))
            .collect();
        rootfs.sort();
        for name in rootfs {
            println!("{:5} {:20} shut off", "", name);
        }
    }
    Ok(())
}

/// Sends `command` to the target guests; prints what `show` makes of each answer.
pub fn act(target: &Target, command: Command, show: impl Fn(&str, &Response)) -> Result<(), String> {
    act_with(target, command, None, None, None, show)
}

/// Like `act`, with the balloon size change (`mib`) or vCPU (`cpu`) the command needs.
pub fn act_with(
    target: &Target,
    command: Command,
    mib: Option<i64>,
    cpu: Option<u32>,
    key: Option<char>,
    show: impl Fn(&str, &Response),
) -> Result<(), String> {
    let names: Vec<String> = if target.all {
        control::running_guests().into_iter().map(|(name, _)| name).collect()
    } else {
        let name = target.name.clone().expect("clap requires -n without -a");
        crate::host::check_name(&name)?;
        vec![name]
    };
    let mut failures = Vec::new();
    for name in &names {
        let request = control::Request { mib, cpu, key, ..control::Request::new(command) };
        match control::request_with(&crate::host::socket_path(name), request) {
            Ok(response) if response.ok => show(name, &response),
            Ok(response) => failures.push(format!("{name}: {}", response.error.unwrap_or_default())),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                failures.push(format!("{name}: no such running guest"))
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}
