//! lkvm: boot Linux under KVM in one command, with kvmtool's command line.

use lkvm::{cli, vmm};

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

/// Exit status for bad input or a VM that could not be built.
const EXIT_SETUP_FAILED: u8 = 1;
/// Exit status for a command line clap could not parse.
const EXIT_USAGE: u8 = 2;

fn init_logging(level: &str) {
    let level = match level {
        "error" => tracing::Level::ERROR,
        "info" => tracing::Level::INFO,
        "debug" => tracing::Level::DEBUG,
        _ => tracing::Level::WARN,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .without_time()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line: clap's first line names the problem; the usage text is a --help away.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid command line");
            eprintln!("lkvm: {} (see lkvm --help)", first.trim_start_matches("error: "));
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match cli.command {
        cli::Command::Version => {
            println!("lkvm {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        cli::Command::Run(args) => {
            init_logging(&args.loglevel);
            let config = match args.into_config(started) {
                Ok(config) => config,
                Err(msg) => {
                    eprintln!("lkvm: error: {msg}");
                    return ExitCode::from(EXIT_SETUP_FAILED);
                }
            };
            match vmm::run(&config) {
                Ok(exit) => {
                    let code = exit.exit_code();
                    if code == 0 {
                        tracing::info!("{exit}");
                    } else {
                        eprintln!("lkvm: error: {exit}");
                    }
                    ExitCode::from(code as u8)
                }
                Err(e) => {
                    eprintln!("lkvm: error: {e}");
                    ExitCode::from(EXIT_SETUP_FAILED)
                }
            }
        }
    }
}
