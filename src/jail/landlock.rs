//! Landlock: once the VM is built, lkvm's threads open only what the VM uses: its shares (the
//! read-only ones for reading), its images, lkvm's own directory, and the paths the user adds.
//! Landlock confines a thread and the threads it creates, so every thread lkvm spawns enters
//! the domain as it starts (`crate::thread`), and the main thread once the VM is built.

use std::path::PathBuf;
use std::sync::Mutex;

use landlock::{
    Access as _, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, ABI,
};

use crate::config::VmConfig;

/// The newest Landlock ABI lkvm knows; older kernels enforce what they have.
const ABI_KNOWN: ABI = ABI::V5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// One file or directory tree lkvm may still open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub path: PathBuf,
    pub access: Access,
}

impl Rule {
    /// `path=PATH,access=r|rw`, as Cloud Hypervisor's `--landlock-rules`.
    pub fn parse(arg: &str) -> Result<Rule, String> {
        let (mut path, mut access) = (None, None);
        for part in arg.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                Some(("access", "r")) => access = Some(Access::Read),
                Some(("access", "rw")) => access = Some(Access::ReadWrite),
                _ => return Err(format!("--landlock-rules {arg}: '{part}' is not path=PATH or access=r|rw")),
            }
        }
        match (path, access) {
            (Some(path), Some(access)) => Ok(Rule { path, access }),
            _ => Err(format!("--landlock-rules {arg}: give path=PATH,access=r|rw")),
        }
    }
}

/// What the VM `config` describes reaching once it runs: its shares and images, lkvm's
/// directory (control and vsock sockets, the warm sandbox snapshot), and, with a user-mode NIC,
/// what libslirp reads.
pub fn rules_for(config: &VmConfig) -> Vec<Rule> {
    let access = |read_only: bool| if read_only { Access::Read } else { Access::ReadWrite };
    let shares = config.shares.iter().map(|s| (&s.spec.path, s.spec.read_only));
    let shares = shares.chain(config.fs.iter().map(|f| (&f.spec.path, f.spec.read_only)));
    let images = config.drives.iter().map(|d| (&d.spec.path, d.spec.read_only));
    let mut rules: Vec<Rule> =
        shares.chain(images).map(|(path, read_only)| Rule { path: path.clone(), access: access(read_only) }).collect();
    rules.push(Rule { path: crate::host::lkvm_dir(), access: Access::ReadWrite });
    if let Some(dir) = config.vsock.as_ref().and_then(|v| v.uds_path.parent()) {
        rules.push(Rule { path: dir.to_path_buf(), access: Access::ReadWrite });
    }
    if config.nets.iter().any(|n| n.spec.mode == crate::config::NetMode::User) {
        // glib seeds libslirp's random numbers from /dev/urandom as the network starts.
        for file in ["/etc/resolv.conf", "/dev/urandom"] {
            rules.push(Rule { path: file.into(), access: Access::Read });
        }
    }
    rules
}

static DOMAIN: Mutex<Option<RulesetCreated>> = Mutex::new(None);

/// Builds the domain of `rules`: threads spawned from now on enter it as they start, and
/// `enter` puts the calling thread in it. Fails where the kernel has no Landlock.
pub fn prepare(rules: &[Rule]) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("landlock: {e}");
    if kernel_abi() == 0 {
        return Err(
            "--landlock: this kernel has no Landlock (Linux 5.13 or later, with landlock in its LSM list)".into()
        );
    }
    let handled = AccessFs::from_all(ABI_KNOWN);
    let mut ruleset =
        Ruleset::default().handle_access(handled).map_err(|e| fail(&e))?.create().map_err(|e| fail(&e))?;
    for rule in rules {
        // A missing path (a share or image not made yet) has nothing to allow.
        let Ok(fd) = PathFd::new(&rule.path) else { continue };
        let allowed = match rule.access {
            Access::Read => AccessFs::ReadFile | AccessFs::ReadDir,
            Access::ReadWrite => handled,
        };
        let allowed = if rule.path.is_dir() { allowed } else { allowed & AccessFs::from_file(ABI_KNOWN) };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, allowed))
            .map_err(|e| fail(&format!("{}: {e}", rule.path.display())))?;
    }
    *DOMAIN.lock().unwrap() = Some(ruleset);
    Ok(())
}

/// A handle on the domain for a thread about to start, if there is one.
pub fn for_new_thread() -> std::io::Result<Option<Domain>> {
    DOMAIN.lock().unwrap().as_ref().map(|r| r.try_clone().map(Domain)).transpose()
}

/// The calling thread enters the domain, if there is one.
pub fn enter() -> Result<(), String> {
    match for_new_thread().map_err(|e| format!("landlock: {e}"))? {
        Some(domain) => domain.enter(),
        None => Ok(()),
    }
}

/// A copy of the domain, for one thread to enter.
pub struct Domain(RulesetCreated);

impl Domain {
    pub fn enter(self) -> Result<(), String> {
        self.0.restrict_self().map(drop).map_err(|e| format!("landlock: {e}"))
    }
}

/// What to add to a refused open's message, under Landlock.
pub fn hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::PermissionDenied && DOMAIN.lock().unwrap().is_some() {
        " (lkvm runs under --landlock: allow the directory with --landlock-rules path=DIR,access=rw)"
    } else {
        ""
    }
}

/// The kernel's Landlock ABI version; 0 without Landlock.
fn kernel_abi() -> i64 {
    // SAFETY: landlock_create_ruleset with LANDLOCK_CREATE_RULESET_VERSION reads no memory.
    let version = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32) };
    version.max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_as_cloud_hypervisor_writes_them() {
        assert_eq!(
            Rule::parse("path=/srv/snapshots,access=rw").unwrap(),
            Rule { path: "/srv/snapshots".into(), access: Access::ReadWrite }
        );
        assert_eq!(Rule::parse("access=r,path=/etc/hosts").unwrap().access, Access::Read);
        assert!(Rule::parse("path=/srv").unwrap_err().contains("give path=PATH,access=r|rw"));
        assert!(Rule::parse("path=/srv,access=x").unwrap_err().contains("'access=x'"));
    }
}
