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
pub struct DebugArgs {
    #[command(flatten)]
    pub target: Target,
    /// Dump every vCPU's registers and the code bytes at RIP
    #[arg(short = 'd', long = "dump", required = true)]
    pub dump: bool,
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
    if let Ok(entries) = std::fs::read_dir(control::lkvm_dir()) {
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
    let names: Vec<String> = if target.all {
        control::running_guests().into_iter().map(|(name, _)| name).collect()
    } else {
        let name = target.name.clone().expect("clap requires -n without -a");
        control::check_name(&name)?;
        vec![name]
    };
    let mut failures = Vec::new();
    for name in &names {
        match control::request(&control::socket_path(name), command) {
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
