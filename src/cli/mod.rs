//! Command line: kvmtool's subcommands and options, one file per subcommand.

pub mod run;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "lkvm", version, about = "Boot Linux under KVM in one command (a Rust kvmtool)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest: `lkvm run -k bzImage -i initrd -p "params" -m 512 -c 2`
    Run(run::RunArgs),
    /// Print the version
    Version,
}
