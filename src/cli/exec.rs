//! `lkvm exec -n NAME [-t] -- cmd args...`: runs a command in a running guest booted on an
//! lkvm root filesystem, over vsock (`crate::exec`).

use clap::Args;

use crate::control::{self, Command};
use crate::exec::{self, protocol::Request};

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Guest name
    #[arg(short = 'n', long = "name")]
    pub name: String,
    /// Run the command on a pseudo-terminal (an interactive shell); lkvm's terminal goes raw
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
    /// The guest directory the command runs in
    #[arg(short = 'w', long = "workdir", value_name = "DIR", default_value = "/")]
    pub workdir: String,
    /// The command to run in the guest, and its arguments
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Runs the command; returns its exit status.
pub fn run(args: ExecArgs) -> Result<u8, String> {
    crate::host::check_name(&args.name)?;
    let response = match control::request(&crate::host::socket_path(&args.name), Command::Status) {
        Ok(response) => response,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Err(format!("{}: no such running guest", args.name))
        }
        Err(e) => return Err(format!("{}: {e}", args.name)),
    };
    let uds = response.vsock_uds.ok_or_else(|| format!("{}: the guest has no vsock device", args.name))?;
    let stream = exec::connect(&uds).map_err(|e| format!("{}: {e}", args.name))?;
    let tty = args.tty.then(exec::terminal_size);
    let env = exec::terminal_env(tty);
    let request = Request { tty, cwd: args.workdir, env, argv: args.command };
    let _raw_terminal = if args.tty { crate::term::RawMode::stdin() } else { None };
    exec::run(stream, &request, std::io::stdin(), &mut std::io::stdout(), &mut std::io::stderr())
        .map_err(|e| format!("{}: {e}", args.name))
}
