//! Builds the 9p root filesystem's init (src/rootfs/init/, with src/exec/protocol.rs) as a static x86_64 binary,
//! which lkvm embeds: `lkvm setup` needs no compiler at run time.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "src/rootfs/init/main.rs";
    println!("cargo:rerun-if-changed=src/rootfs/init");
    println!("cargo:rerun-if-changed=src/exec/protocol.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("lkvm-init");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args(["--edition=2021", "--crate-name=lkvm_init", "--crate-type=bin", "--target=x86_64-unknown-linux-gnu"])
        .args(["-C", "opt-level=s", "-C", "panic=abort", "-C", "target-feature=+crt-static", "-C", "strip=symbols"])
        .arg("-o")
        .arg(&out)
        .arg(source)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run rustc for the guest init");
    assert!(status.success(), "building the guest init ({source}) failed");
}
