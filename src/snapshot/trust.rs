//! A snapshot's VM config is data anyone who could write the state file chose: on restore it
//! may not run host programs, listen beyond loopback, or give the guest host paths with more
//! access than the user restoring it has and the command line would grant.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::config::VmConfig;

/// Checks the host resources a snapshot's config (after the loader's overrides) names.
pub fn check_host_resources(config: &VmConfig) -> Result<(), String> {
    let kvm = std::fs::metadata(&config.kvm_device).map_err(|e| format!("{}: {e}", config.kvm_device.display()))?;
    if !kvm.file_type().is_char_device() {
        return Err(format!("{} is not a KVM device", config.kvm_device.display()));
    }
    for net in &config.nets {
        if let Some(script) = &net.spec.script {
            return Err(format!(
                "network interface '{}': a snapshot may not run a host script ({})",
                net.id,
                script.display()
            ));
        }
        if let Some(forward) = net.spec.forwards.iter().find(|f| !f.host_addr.is_loopback()) {
            return Err(format!(
                "network interface '{}': a snapshot's forwards listen on loopback only, not {}:{}",
                net.id, forward.host_addr, forward.host_port
            ));
        }
    }
    let shares = config.shares.iter().map(|s| (&s.id, &s.spec.path, s.spec.read_only));
    for (id, path, read_only) in shares.chain(config.fs.iter().map(|f| (&f.id, &f.spec.path, f.spec.read_only))) {
        let canonical = std::fs::canonicalize(path).map_err(|e| format!("share '{id}': {}: {e}", path.display()))?;
        if !read_only {
            crate::host::check_guest_writable(&canonical).map_err(|e| format!("share '{id}': {e}"))?;
        }
        accessible(&canonical, read_only, true).map_err(|e| format!("share '{id}': {e}"))?;
    }
    for drive in &config.drives {
        accessible(&drive.spec.path, drive.spec.read_only, false).map_err(|e| format!("drive '{}': {e}", drive.id))?;
    }
    Ok(())
}

/// Whether the user who started lkvm (its real ids) may read `path`, and write it unless
/// `read_only`: a snapshot gives the guest nothing its loader could not open.
fn accessible(path: &Path, read_only: bool, directory: bool) -> Result<(), String> {
    let mut mode = libc::R_OK;
    if !read_only {
        mode |= libc::W_OK;
    }
    if directory {
        mode |= libc::X_OK;
    }
    let c_path =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{}: a NUL in the path", path.display()))?;
    // SAFETY: access reads a NUL-terminated path and nothing else.
    if unsafe { libc::access(c_path.as_ptr(), mode) } != 0 {
        let e = std::io::Error::last_os_error();
        let access = if read_only { "read" } else { "write" };
        return Err(format!("{}: you may not {access} it ({e})", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        tests::base, CmdlinePolicy, NetConfig, NetMode, NetSpec, PortForward, Protocol, ShareConfig, ShareSpec,
    };

    #[test]
    fn a_snapshot_runs_no_scripts_listens_on_loopback_and_writes_no_host_root() {
        let mut config = base(CmdlinePolicy::Bare, None);
        assert_eq!(check_host_resources(&config), Ok(()));

        let script = NetSpec { mode: NetMode::Tap, script: Some("/tmp/x.sh".into()), ..NetSpec::default() };
        config.nets = vec![NetConfig { id: "eth0".into(), spec: script }];
        assert!(check_host_resources(&config).unwrap_err().contains("may not run a host script"));
        let forward = PortForward {
            protocol: Protocol::Tcp,
            host_addr: std::net::Ipv4Addr::UNSPECIFIED,
            host_port: 8080,
            guest_port: 80,
        };
        config.nets =
            vec![NetConfig { id: "eth0".into(), spec: NetSpec { forwards: vec![forward], ..NetSpec::default() } }];
        assert!(check_host_resources(&config).unwrap_err().contains("loopback only, not 0.0.0.0:8080"));
        config.nets[0].spec.forwards[0].host_addr = std::net::Ipv4Addr::LOCALHOST;
        assert_eq!(check_host_resources(&config), Ok(()));

        let slash = ShareSpec { read_only: false, ..ShareSpec::new("/", "root").unwrap() };
        config.shares = vec![ShareConfig { id: "root".into(), spec: slash }];
        assert!(check_host_resources(&config).unwrap_err().contains("the host's / stays read-only"));
        config.shares[0].spec.read_only = true;
        assert_eq!(check_host_resources(&config), Ok(()), "/ read-only is what a warm sandbox shares");
    }
}
