//! Firecracker's jailer command line (this binary invoked as `jailer`, or `lkvm jailer`): what
//! `crate::jail::jailer` builds and then execs the Firecracker binary in.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct JailerArgs {
    /// The microVM's id: letters, digits and '-', at most 64
    #[arg(long)]
    pub id: String,
    /// The Firecracker binary to copy into the jail and run (its name must contain
    /// "firecracker"; a static lkvm named so)
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// The user the binary runs as
    #[arg(long)]
    pub uid: u32,
    /// The group the binary runs as
    #[arg(long)]
    pub gid: u32,
    /// Where jails are made: <BASE>/<exec file name>/<id>/root
    #[arg(long, value_name = "BASE", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (e.g. /var/run/netns/NAME)
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Detach: a new session, standard input and output on /dev/null
    #[arg(long)]
    pub daemonize: bool,
    /// Run the binary in a new PID namespace (its pid is in <exec file name>.pid)
    #[arg(long)]
    pub new_pid_ns: bool,
    /// 1 or 2
    #[arg(long, value_name = "VERSION", default_value_t = 1)]
    pub cgroup_version: u8,
    /// FILE=VALUE written in the microVM's cgroup (e.g. cpuset.cpus=0), repeatable
    #[arg(long, value_name = "FILE=VALUE")]
    pub cgroup: Vec<String>,
    /// The cgroup the microVM's cgroup is made in (default: the exec file's name)
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<PathBuf>,
    /// fsize=BYTES or no-file=N, repeatable (no-file is 2048 unless given)
    #[arg(long, value_name = "RESOURCE=VALUE")]
    pub resource_limit: Vec<String>,
    /// Arguments for the binary, after `--`
    #[arg(last = true)]
    pub exec_args: Vec<String>,
}
