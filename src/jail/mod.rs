//! What confines lkvm as a whole, beyond each thread's seccomp filter (`crate::thread`): the
//! namespaces and root it runs in (`--jail`), the user it runs as once the VM's host resources
//! are open, and the files it may still reach (Firecracker's jailer, `cli::jailer`, builds on the same parts).

mod credentials;
pub mod landlock;
pub mod namespaces;

pub use credentials::User;
