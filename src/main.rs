//! lkvm: boot Linux under KVM in one command, with kvmtool's command line.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use lkvm::api::{self, Api};
use lkvm::cli::run::RootfsTransports;
use lkvm::cli::warm::WarmCache;
use lkvm::cli::{self, control as ctl, Command};
use lkvm::config::firecracker::FullConfig;
use lkvm::config::{ConsoleDevice, VmConfig};
use lkvm::control::{self, Command as Request};
use lkvm::jail::{landlock, namespaces, User};
use lkvm::thread::{self as threads, ThreadKind};
use lkvm::vmm::exit::VmExit;
use lkvm::vmm::Vm;
use lkvm::{exec, logging, rootfs};
use std::path::Path;
use std::sync::mpsc;

/// Exit status for bad input, a VM that could not be built, or a control request that failed.
const EXIT_SETUP_FAILED: u8 = 1;
/// Exit status for a command line clap could not parse.
const EXIT_USAGE: u8 = 2;

fn run(args: cli::run::RunArgs, started: Instant) -> ExitCode {
    logging::init(lkvm::config::parse_log_level(&args.loglevel).unwrap_or(2));
    if let Err(msg) = threads::confine_with(args.seccomp) {
        return fail(&msg);
    }
    let user = match User::target(args.uid, args.gid) {
        Ok(user) => user,
        Err(msg) => return fail(&msg),
    };
    // SAFETY: geteuid has no preconditions.
    if args.jail.is_some() && user.is_none() && unsafe { libc::geteuid() } == 0 {
        // A jail keeps lkvm from the host's files; root in it could still act as root.
        return fail(
            "--jail: give --uid and --gid, the unprivileged user the jailed lkvm runs as (e.g. --uid 65534 --gid 65534), \
             or run lkvm through sudo as that user",
        );
    }
    let api_sock = args.api_sock.clone();
    let restoring = match (&args.restore, args.restore_fork) {
        (Some(dir), _) => Some(args.restore_spec(dir)),
        (None, Some(memory_files)) => Some(args.fork_spec(memory_files)),
        (None, None) => None,
    };
    if let Some(spec) = restoring {
        let vm = spec.and_then(|spec| Vm::restore(&spec, started).map_err(|e| e.to_string()));
        return match vm {
            Ok(vm) => serve(vm, api_sock.as_deref(), user),
            Err(msg) => fail(&msg),
        };
    }
    let landlock_rules = match args.landlock_rules() {
        Ok(rules) => rules,
        Err(msg) => return fail(&msg),
    };
    let jail = args.jail.clone();
    let config = prepare(args, RootfsTransports::VirtioFsOr9p)
        .and_then(|config| enter_jail(jail.as_deref(), api_sock.as_deref(), &config).map(|()| config))
        .and_then(|config| confine_files(landlock_rules, &config).map(|()| config));
    match config.and_then(|config| Vm::build(config, started).map_err(|e| e.to_string())) {
        Ok(vm) => serve(vm, api_sock.as_deref(), user),
        Err(msg) => fail(&msg),
    }
}

/// Validates the options and creates or refreshes the `lkvm setup` root directory booted.
fn prepare(args: cli::run::RunArgs, rootfs_transports: RootfsTransports) -> Result<VmConfig, String> {
    let config = args.into_config_with(rootfs_transports)?;
    control::check_name_free(&config.name)?;
    if let Some(root) = config.lkvm_rootfs() {
        lkvm::host::ensure_lkvm_dir()?;
        rootfs::populate(root).map_err(|e| format!("{}: {e}", root.display()))?;
    }
    Ok(config)
}

/// With --jail, moves lkvm into its jail on `dir`, holding what `config` uses; the process that
/// started waits outside.
fn enter_jail(dir: Option<&Path>, api_sock: Option<&Path>, config: &VmConfig) -> Result<(), String> {
    let Some(dir) = dir else { return Ok(()) };
    lkvm::host::ensure_lkvm_dir()?; // bound into the jail, for the control socket
    if config.nets.iter().any(|n| n.spec.mode == lkvm::config::NetMode::User) {
        lkvm::net::slirp::load()?;
    }
    namespaces::enter(dir, &namespaces::paths_for(config, api_sock)?)
}

/// With --landlock, confines the threads lkvm spawns from now on, and the main thread once the
/// VM is built, to the files `config` uses and the `extra` paths.
fn confine_files(extra: Option<Vec<landlock::Rule>>, config: &VmConfig) -> Result<(), String> {
    let Some(extra) = extra else { return Ok(()) };
    let mut rules = landlock::rules_for(config);
    rules.extend(extra);
    landlock::prepare(&rules)
}

/// Runs a built VM until it ends, reachable through the control socket (and Firecracker's API
/// on `api_sock`).
fn serve(vm: Vm, api_sock: Option<&Path>, user: Option<User>) -> ExitCode {
    serve_with(vm, api_sock, user, |_| Ok(()))
}

/// Like `serve`, running `on_running` once the VM runs; if it fails, the VM is stopped. Once
/// every host resource is open (the sockets too), lkvm becomes `user`, before the guest runs.
fn serve_with(
    mut vm: Vm,
    api_sock: Option<&Path>,
    user: Option<User>,
    on_running: impl FnOnce(&mut Vm) -> Result<(), String>,
) -> ExitCode {
    let config = vm.handle().config();
    let (name, transport, described) = (config.name.clone(), config.transport, FullConfig::describe(&config));
    match control::Server::start(&name) {
        Ok(server) => vm.serve(Box::new(server)),
        Err(msg) => return fail(&msg),
    }
    let _api_socket = match api_sock {
        Some(path) => {
            let api = Api::for_running(&name, transport, described, vm.client());
            match api::serve(path, api, lkvm::http::DEFAULT_MAX_BODY) {
                Ok(socket) => Some(socket),
                Err(msg) => return fail(&msg),
            }
        }
        None => None,
    };
    let vsock_uds = vm.handle().vsock_uds();
    let control_socket = lkvm::host::socket_path(&name);
    let sockets: Vec<&Path> =
        [Some(control_socket.as_path()), api_sock, vsock_uds.as_deref()].into_iter().flatten().collect();
    let confined = user
        .map_or(Ok(()), |user| user.become_user(&sockets))
        .and_then(|()| landlock::enter())
        .and_then(|()| threads::confine_current(ThreadKind::Vmm, "lkvm").map_err(|e| format!("seccomp: {e}")));
    if let Err(msg) = confined {
        return fail(&msg);
    }
    if let Err(e) = vm.start() {
        return fail(&e.to_string());
    }
    if let Err(e) = on_running(&mut vm) {
        vm.handle().end(VmExit::Stopped);
        vm.wait();
        return fail(&e);
    }
    exit_status(&vm.wait())
}

/// lkvm's exit status for how the VM ended (0 for the guest's own poweroff or reboot).
fn exit_status(exit: &VmExit) -> ExitCode {
    if exit.exit_code() == 0 {
        tracing::info!("{exit}");
        ExitCode::SUCCESS
    } else if let VmExit::Signal(_) = exit {
        tracing::info!("{exit}");
        ExitCode::from(exit.exit_code() as u8)
    } else {
        eprintln!("lkvm: error: {exit}");
        ExitCode::from(exit.exit_code() as u8)
    }
}

/// What `lkvm sandbox` shows of the host's / by default, besides the current and --rw
/// directories: the system's programs, libraries and configuration (secrets hidden).
const SANDBOX_VIEW: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"];

/// Boots (or restores) a guest on lkvm's root filesystem, runs the command in it over vsock
/// and exits with the command's status.
fn sandbox(mut args: cli::run::SandboxArgs, started: Instant) -> ExitCode {
    logging::init(lkvm::config::parse_log_level(&args.run.loglevel).unwrap_or(2));
    if let Err(msg) = threads::confine_with(args.run.seccomp) {
        return fail(&msg);
    }
    // The sandbox's guest reaches lkvm through sockets in the starting user's ~/.lkvm, which
    // another user may not enter: it runs as the user who started it.
    if args.run.uid.is_some() {
        return fail("lkvm sandbox runs as the user who starts it: drop --uid and --gid");
    }
    if args.run.jail.is_some() {
        return fail("lkvm sandbox runs on lkvm's root filesystem, the host's /, which --jail would hide: drop --jail");
    }
    if args.run.initrd.is_some() || args.run.nodefaults {
        return fail("lkvm sandbox runs the command from lkvm's root filesystem: drop -i and --nodefaults");
    }
    // Only the command's output, unless the user asks the kernel for more.
    args.run.params = Some(format!("quiet {}", args.run.params.as_deref().unwrap_or("")));
    let landlock_rules = match args.run.landlock_rules() {
        Ok(rules) => rules,
        Err(msg) => return fail(&msg),
    };
    let cwd = match std::env::current_dir().and_then(std::fs::canonicalize) {
        Ok(cwd) => cwd,
        Err(e) => return fail(&format!("the current directory: {e}")),
    };
    // Its warm start restores a snapshot, which virtio-fs shares cannot be part of.
    let mut config = match prepare(args.run, RootfsTransports::NinePOnly) {
        Ok(config) => config,
        Err(msg) => return fail(&msg),
    };
    if args.host_view == "system" {
        let writable = config.root_share.as_ref().map(|r| r.writable.clone()).unwrap_or_default();
        let view = SANDBOX_VIEW.iter().map(std::path::PathBuf::from).chain([cwd]).chain(writable).collect::<Vec<_>>();
        for share in config.shares.iter_mut().filter(|s| s.spec.tag == lkvm::rootfs::HOST_TAG) {
            share.spec.view = view.clone();
        }
    }
    // The command reaches the internet, not the host's network neighbours, unless asked
    // (`-n mode=user,lan=on`).
    for net in config.nets.iter_mut().filter(|n| n.spec.mode == lkvm::config::NetMode::User) {
        net.spec.lan.get_or_insert(false);
    }
    let (Some(_), Some(vsock)) = (config.lkvm_rootfs(), config.vsock.clone()) else {
        return fail(
            "lkvm sandbox needs lkvm's root filesystem: give no disk image, or -d NAME of an `lkvm setup` guest",
        );
    };
    // A warm start writes its snapshot into the cache, which must exist for Landlock to allow it.
    let landlock_rules = match landlock_rules {
        Some(mut rules) if !args.cold => {
            let root = lkvm::host::sandbox_cache_root();
            if let Err(e) = std::fs::create_dir_all(&root) {
                return fail(&format!("{}: {e}", root.display()));
            }
            rules.push(landlock::Rule { path: root, access: landlock::Access::ReadWrite });
            Some(rules)
        }
        rules => rules,
    };
    if let Err(msg) = confine_files(landlock_rules, &config) {
        return fail(&msg);
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin()).then(exec::terminal_size);
    let request = match rootfs::sandbox_request(&args.command, tty) {
        Ok(request) => request,
        Err(e) => return fail(&format!("the current directory: {e}")),
    };
    // The command's stdin, stdout and stderr are its own, not the console's.
    let (mut job, mut raw_terminal) = (None, None);
    let start_job = |vm: &mut Vm| {
        if vm.has_ended() {
            return Ok(()); // before it was ready: no status, and the VM says why
        }
        if tty.is_some() {
            raw_terminal = lkvm::term::RawMode::stdin(); // until lkvm exits, however the VM ends
        }
        job = Some(start_sandbox_job(vsock.uds_path.clone(), request)?);
        Ok(())
    };
    let vm_status = if args.cold || config.console != ConsoleDevice::Serial {
        boot_sandbox(config, started, |_| Ok(()), start_job)
    } else {
        warm_sandbox(config, started, start_job)
    };
    // The guest sends the status before it reboots; it may still be on its way.
    let _raw_terminal = raw_terminal;
    match job.and_then(|job| job.recv_timeout(std::time::Duration::from_secs(5)).ok()) {
        Some(Ok(status)) => ExitCode::from(status),
        Some(Err(msg)) => fail(&msg),
        None if vm_status != ExitCode::SUCCESS => vm_status,
        None => fail("the guest ended before the command did: no exit status"),
    }
}

/// Runs the sandbox's command in the ready guest on a thread of its own; its status (or why
/// there is none) comes on the channel.
fn start_sandbox_job(
    uds: std::path::PathBuf,
    request: exec::protocol::Request,
) -> Result<mpsc::Receiver<Result<u8, String>>, String> {
    let (sender, receiver) = mpsc::channel();
    let relay = move || {
        let outcome = exec::connect(&uds).and_then(|stream| {
            exec::run(stream, &request, std::io::stdin(), &mut std::io::stdout(), &mut std::io::stderr())
        });
        let _ = sender.send(outcome);
    };
    threads::spawn(ThreadKind::Exec, "sandbox-job".into(), relay).map_err(|e| format!("spawn sandbox thread: {e}"))?;
    Ok(receiver)
}

/// Boots the guest, waits until its init is ready for the command, runs `on_ready` (the warm
/// cache's snapshot), then `start_job`.
fn boot_sandbox(
    mut config: VmConfig,
    started: Instant,
    on_ready: impl FnOnce(&mut Vm) -> Result<(), String>,
    start_job: impl FnOnce(&mut Vm) -> Result<(), String>,
) -> ExitCode {
    let Some(vsock) = &config.vsock else { return fail("lkvm sandbox needs a vsock device") };
    let ready = match rootfs::SandboxReady::listen(&vsock.uds_path) {
        Ok(ready) => ready,
        Err(e) => return fail(&e.to_string()),
    };
    let params = config.boot.params.take().unwrap_or_default();
    config.boot.params = Some(format!("{params} {}", ready.param()));
    let mut vm = match Vm::build(config, started) {
        Ok(vm) => vm,
        Err(e) => return fail(&e.to_string()),
    };
    vm.hold_console_input();
    serve_with(vm, None, None, |vm| {
        let is_ready = ready.wait(|| vm.has_ended());
        drop(ready); // nothing more to hear on it
        if is_ready {
            on_ready(vm)?;
        }
        start_job(vm)
    })
}

/// Runs a sandbox from the snapshot of a guest ready for its command, taking that snapshot
/// first if the cache has none for this configuration.
fn warm_sandbox(config: VmConfig, started: Instant, start_job: impl FnOnce(&mut Vm) -> Result<(), String>) -> ExitCode {
    let cache = match WarmCache::for_config(&config) {
        Ok(cache) => cache,
        Err(e) => return fail(&e.to_string()),
    };
    if cache.is_filled() {
        if let Err(why) = cache.check() {
            tracing::warn!("warm sandbox cache entry {}: {why}; dropped", cache.dir().display());
            cache.discard();
        }
    }
    if cache.is_filled() {
        match Vm::restore(&cache.restore_spec(&config), started) {
            Ok(mut vm) => {
                vm.hold_console_input();
                return serve_with(vm, None, None, start_job);
            }
            Err(e) => {
                tracing::warn!("{}: {e}; booting instead", cache.dir().display());
                cache.discard();
            }
        }
    }
    let take_snapshot = |vm: &mut Vm| {
        let staging = cache.staging().map_err(|e| format!("{}: {e}", cache.dir().display()))?;
        // Pauses, writes and resumes, as `lkvm snapshot` does.
        let written = vm.handle().snapshot_into(&staging, false);
        let sealed = written.and_then(|_| cache.seal(&staging).map_err(|e| e.to_string()));
        match sealed.and_then(|()| cache.publish(&staging).map_err(|e| e.to_string())) {
            Ok(()) => tracing::info!("warm sandbox snapshot in {}", cache.dir().display()),
            Err(e) => tracing::warn!("no warm sandbox snapshot: {e}"),
        }
        if vm.handle().paused() {
            return Err("the guest could not be resumed after its snapshot".to_string());
        }
        Ok(())
    };
    boot_sandbox(config, started, take_snapshot, start_job)
}

/// Shares hold a descriptor per file the guest has looked up: allow as many as the hard limit.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write this struct only.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("lkvm: error: {msg}");
    ExitCode::from(EXIT_SETUP_FAILED)
}

fn done(result: Result<(), String>) -> ExitCode {
    result.map_or_else(|msg| fail(&msg), |()| ExitCode::SUCCESS)
}

/// Parses the command line as `C`, or exits with one line saying what is wrong.
fn parse<C: Parser>(program: &str) -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        if e.use_stderr() {
            // One line: clap's first paragraph names the problem (a missing argument on the lines
            // after the first); the usage text is a --help away.
            let rendered = e.render().to_string();
            let problem: Vec<&str> = rendered.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            let problem = if problem.is_empty() { "invalid command line".to_string() } else { problem.join(" ") };
            eprintln!("{program}: {} (see {program} --help)", problem.trim_start_matches("error: "));
            ExitCode::from(EXIT_USAGE)
        } else {
            let _ = e.print();
            ExitCode::SUCCESS
        }
    })
}

fn firecracker(args: cli::firecracker::FirecrackerArgs, started: Instant) -> ExitCode {
    if args.version {
        println!("Firecracker v{} (lkvm {})", lkvm::api::FIRECRACKER_API_VERSION, env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    match cli::firecracker::run(args, started) {
        Ok(exit) => exit_status(&exit),
        Err(msg) => fail(&msg),
    }
}

fn jailer(args: &cli::jailer::JailerArgs) -> ExitCode {
    match cli::jailer::run(args) {
        Ok(never) => match never {},
        Err(msg) => fail(&msg),
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    // Nothing lkvm runs (a tap script, a guest-triggered helper) gains privileges through
    // set-id binaries or file capabilities.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return fail(&format!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error()));
    }
    raise_open_file_limit();
    // Named `firecracker` (or a name with it, as the jailer requires) this binary is a drop-in
    // for Firecracker; named `jailer`, for its jailer.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let program = std::path::Path::new(&argv0).file_name().unwrap_or_default().to_string_lossy();
    if program.contains("firecracker") {
        return match parse::<cli::FirecrackerCli>("firecracker") {
            Ok(cli) => firecracker(cli.args, started),
            Err(code) => code,
        };
    }
    if program == "jailer" {
        return match parse::<cli::JailerCli>("jailer") {
            Ok(cli) => jailer(&cli.args),
            Err(code) => code,
        };
    }
    let cli = match parse::<cli::Cli>("lkvm") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Command::Run(args) => run(args, started),
        Command::Sandbox(args) => sandbox(args, started),
        Command::Setup { name } => done(
            rootfs::create(&name).map(|root| println!("{}: ready; boot it with lkvm run -d {name}", root.display())),
        ),
        Command::List => done(ctl::list()),
        Command::Stop(target) => done(ctl::act(&target, Request::Stop, |_, _| {})),
        Command::Pause(target) => done(ctl::act(&target, Request::Pause, |name, _| println!("{name}: paused"))),
        Command::Resume(target) => done(ctl::act(&target, Request::Resume, |name, _| println!("{name}: resumed"))),
        Command::Debug(args) => match (args.action.nmi, args.action.sysrq, &args.action.dump) {
            (_, _, Some(Some(file))) => done(ctl::dump_core(&args.target, file)),
            (Some(cpu), _, _) => done(ctl::act_with(&args.target, Request::Nmi, None, Some(cpu), None, |name, _| {
                println!("{name}: NMI sent to vCPU {cpu}")
            })),
            (_, Some(key), _) => done(ctl::act_with(&args.target, Request::Sysrq, None, None, Some(key), |name, _| {
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
        Command::Snapshot(args) => done(ctl::snapshot(&args)),
        Command::Fork(args) => done(cli::fork::run(&args)),
        Command::Exec(args) => match cli::exec::run(args) {
            Ok(status) => ExitCode::from(status),
            Err(msg) => fail(&msg),
        },
        Command::Firecracker(args) => firecracker(args, started),
        Command::Jailer(args) => jailer(&args),
        Command::Version => {
            println!("lkvm {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
