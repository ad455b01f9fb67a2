//! What confines lkvm as a whole, beyond each thread's seccomp filter (`crate::thread`): the
//! namespaces and root it runs in (`--jail`), the user it runs as once the VM's host resources
//! are open, and the files it may still reach; and Firecracker's jailer, on the same parts.

mod credentials;
pub mod jailer;
pub mod landlock;
pub mod namespaces;

pub use credentials::User;
