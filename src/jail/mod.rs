//! What confines lkvm as a whole, beyond each thread's seccomp filter (`crate::thread`): the
//! user it runs as once the VM's host resources are open, and the files it may still reach.

mod credentials;
pub mod landlock;

pub use credentials::User;
