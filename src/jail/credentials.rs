//! Dropping root: lkvm started as root (for a tap, a block device) runs the guest as the
//! invoking user, once the host resources that need root are open.

use std::io;
use std::path::Path;

/// The user and group lkvm becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl User {
    /// The user to become: `--uid`/`--gid`, else, when lkvm runs as root under sudo, the user
    /// who ran sudo. None: stay who lkvm is.
    pub fn target(uid: Option<u32>, gid: Option<u32>) -> Result<Option<User>, String> {
        let chosen = match (uid, gid) {
            (Some(uid), Some(gid)) => Some(User { uid, gid }),
            (None, None) => None,
            _ => return Err("--uid and --gid go together".into()),
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let Some(user) = chosen.or_else(|| root.then(sudo_user).flatten()) else { return Ok(None) };
        // SAFETY: getuid and getgid have no preconditions.
        let current = unsafe { User { uid: libc::getuid(), gid: libc::getgid() } };
        if user == current {
            Ok(None)
        } else if root {
            Ok(Some(user))
        } else {
            Err(format!(
                "--uid {} --gid {}: only root can run as another user (lkvm runs as uid {} gid {})",
                user.uid, user.gid, current.uid, current.gid
            ))
        }
    }

    /// Hands the `sockets` lkvm listens on to this user (who may then connect to them), then
    /// becomes this user for good, every thread: no supplementary groups, and real, effective
    /// and saved ids all changed, which also clears every capability.
    pub fn become_user(self, sockets: &[&Path]) -> Result<(), String> {
        for socket in sockets {
            std::os::unix::fs::lchown(socket, Some(self.uid), Some(self.gid))
                .map_err(|e| format!("handing {} to uid {}: {e}", socket.display(), self.uid))?;
        }
        let fail = |what: &str| {
            format!("running as uid {} gid {}: {what}: {}", self.uid, self.gid, io::Error::last_os_error())
        };
        // glibc applies each call to all of lkvm's threads (its set*id broadcast).
        // SAFETY: setgroups with an empty list reads no memory; the others take integers.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(fail("setgroups"));
            }
            if libc::setresgid(self.gid, self.gid, self.gid) != 0 {
                return Err(fail("setresgid"));
            }
            if libc::setresuid(self.uid, self.uid, self.uid) != 0 {
                return Err(fail("setresuid"));
            }
        }
        tracing::info!("running as uid {} gid {} from now on", self.uid, self.gid);
        Ok(())
    }
}

/// SUDO_UID and SUDO_GID, as sudo sets them for the command it runs.
fn sudo_user() -> Option<User> {
    let id = |name| std::env::var(name).ok()?.parse().ok();
    Some(User { uid: id("SUDO_UID")?, gid: id("SUDO_GID")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_and_gid_go_together() {
        assert_eq!(User::target(Some(1000), None).unwrap_err(), "--uid and --gid go together");
        assert_eq!(User::target(None, Some(1000)).unwrap_err(), "--uid and --gid go together");
    }

    #[test]
    fn the_current_user_is_no_change_and_others_need_root() {
        // SAFETY: getuid and getgid have no preconditions.
        let (uid, gid, root) = unsafe { (libc::getuid(), libc::getgid(), libc::geteuid() == 0) };
        if root {
            assert_eq!(User::target(Some(0), Some(0)).unwrap(), None);
            assert_eq!(User::target(Some(65534), Some(65534)).unwrap(), Some(User { uid: 65534, gid: 65534 }));
        } else {
            assert_eq!(User::target(Some(uid), Some(gid)).unwrap(), None);
            assert!(User::target(Some(uid + 1), Some(gid)).unwrap_err().contains("only root"));
        }
    }
}
