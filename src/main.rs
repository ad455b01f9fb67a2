//! lkvm: boot Linux under KVM in one command, with kvmtool's command line.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use lkvm::cli::{self, control as ctl, Command};
use lkvm::control::Command as Request;
use lkvm::vmm;

/// Exit status for bad input, a VM that could not be built, or a control request that failed.
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

fn run(args: cli::run::RunArgs, started: Instant) -> ExitCode {
    init_logging(&args.loglevel);
    let config = match args.into_config(started) {
        Ok(config) => config,
        Err(msg) => return fail(&msg),
    };
    match vmm::run(&config) {
        Ok(exit) if exit.exit_code() == 0 => {
            tracing::info!("{exit}");
            ExitCode::SUCCESS
        }
        Ok(exit) => {
            eprintln!("lkvm: error: {exit}");
            ExitCode::from(exit.exit_code() as u8)
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("lkvm: error: {msg}");
    ExitCode::from(EXIT_SETUP_FAILED)
}

fn done(result: Result<(), String>) -> ExitCode {
    result.map_or_else(|msg| fail(&msg), |()| ExitCode::SUCCESS)
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
        Command::Run(args) => run(args, started),
        Command::List => done(ctl::list()),
        Command::Stop(target) => done(ctl::act(&target, Request::Stop, |_, _| {})),
        Command::Pause(target) => done(ctl::act(&target, Request::Pause, |name, _| println!("{name}: paused"))),
        Command::Resume(target) => done(ctl::act(&target, Request::Resume, |name, _| println!("{name}: resumed"))),
        Command::Debug(args) => match (args.action.nmi, args.action.sysrq) {
            (Some(cpu), _) => done(ctl::act_with(&args.target, Request::Nmi, None, Some(cpu), None, |name, _| {
                println!("{name}: NMI sent to vCPU {cpu}")
            })),
            (_, Some(key)) => done(ctl::act_with(&args.target, Request::Sysrq, None, None, Some(key), |name, _| {
                println!("{name}: SysRq {key} sent")
            })),
            _ => done(ctl::act(&args.target, Request::Registers, |name, response| {
                for line in response.vcpus.iter().flatten() {
                    println!("{name}: {line}");
                }
            })),
        },
        Command::Balloon(args) => {
            let delta = args.change.delta_mib();
            done(ctl::act_with(&args.target, Request::Balloon, Some(delta), None, None, |name, r| {
                let (target, actual) = (r.balloon_target_mib.unwrap_or(0), r.balloon_actual_mib.unwrap_or(0));
                println!("{name}: balloon target {target} MiB (the guest has given back {actual} MiB)");
            }))
        }
        Command::Stat(args) => done(ctl::act(&args.target, Request::Stats, |name, r| {
            println!("{name}: guest memory statistics");
            for (key, value) in r.stats.iter().flatten() {
                println!("  {key:20} {value}");
            }
        })),
        Command::Version => {
            println!("lkvm {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
