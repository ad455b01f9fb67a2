//! Command line: kvmtool's subcommands and options, one file per subcommand.

pub mod control;
pub mod exec;
pub mod firecracker;
pub mod fork;
pub mod jailer;
pub mod run;
pub mod warm;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "lkvm", version, about = "Boot Linux under KVM in one command (a Rust kvmtool)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The command line when this binary is invoked as `firecracker`.
#[derive(Parser, Debug)]
#[command(
    name = "firecracker",
    disable_version_flag = true,
    about = "lkvm speaking Firecracker's command line and API"
)]
pub struct FirecrackerCli {
    #[command(flatten)]
    pub args: firecracker::FirecrackerArgs,
}

/// The command line when this binary is invoked as `jailer`.
#[derive(Parser, Debug)]
#[command(name = "jailer", about = "lkvm speaking Firecracker's jailer command line")]
pub struct JailerCli {
    #[command(flatten)]
    pub args: jailer::JailerArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest: `lkvm run -k bzImage -i initrd -p "params" -m 512 -c 2`
    Run(run::RunArgs),
    /// Run a command in a fresh guest that sees the host's files; exits with its status:
    /// `lkvm sandbox [run options] -- cmd args...`
    Sandbox(run::SandboxArgs),
    /// Create ~/.lkvm/NAME, a root directory for `lkvm run -d NAME` and `lkvm sandbox -d NAME`
    Setup { name: String },
    /// List running guests (and `lkvm setup` directories)
    List,
    /// Stop a guest
    Stop(control::Target),
    /// Pause a guest's vCPUs
    Pause(control::Target),
    /// Resume a paused guest
    Resume(control::Target),
    /// Inspect a running guest
    Debug(control::DebugArgs),
    /// Inflate or deflate a guest's memory balloon
    Balloon(control::BalloonArgs),
    /// Guest statistics
    Stat(control::StatArgs),
    /// Run a command in a running guest booted on an lkvm root filesystem, over vsock:
    /// `lkvm exec -n NAME [-t] -- cmd args...`; exits with its status
    Exec(exec::ExecArgs),
    /// Snapshot a running guest into DIR (then `lkvm run --restore DIR`)
    Snapshot(control::SnapshotArgs),
    /// Fork a running guest into N more running guests that share its memory copy-on-write:
    /// `lkvm fork -n NAME --count N --prefix P` makes P-0 .. P-(N-1)
    Fork(fork::ForkArgs),
    /// Behave as Firecracker: its command line and REST API (also when invoked as `firecracker`)
    Firecracker(firecracker::FirecrackerArgs),
    /// Behave as Firecracker's jailer (also when invoked as `jailer`)
    Jailer(jailer::JailerArgs),
    /// Print the version
    Version,
}
