//! The kernel command line: kvmtool's generated defaults, what devices add, then the user's `-p`.

/// kvmtool's generated x86 command line, less what does not apply here: `noapic` (the guest
/// gets an IOAPIC), `noacpi` (not a kernel parameter) and `earlyprintk` (a second, slow copy of
/// the boot log on the serial port).
pub const DEFAULT_PARAMS: &[&str] = &[
    "console=ttyS0",
    "reboot=k",
    "panic=1",
    "pci=conf1",
    "i8042.direct=1",
    "i8042.dumbkbd=1",
    "i8042.nopnp=1",
    "i8042.noaux=1",
];

/// Linux x86's COMMAND_LINE_SIZE, including the terminating NUL.
pub const MAX_LEN: usize = 2048;

#[derive(Clone, Debug, Default)]
pub struct KernelCmdline {
    params: Vec<String>,
}

impl KernelCmdline {
    /// Starts from kvmtool's defaults, or from nothing with `--nodefaults`.
    pub fn new(defaults: bool) -> Self {
        let params = if defaults { DEFAULT_PARAMS.iter().map(|p| p.to_string()).collect() } else { Vec::new() };
        KernelCmdline { params }
    }

    /// Points the generated `console=` at another device (hvc0 for virtio-console).
    pub fn set_console(&mut self, device: &str) {
        for param in &mut self.params {
            if param.starts_with("console=") {
                *param = format!("console={device}");
            }
        }
    }

    pub fn push(&mut self, param: impl Into<String>) {
        self.params.push(param.into());
    }

    /// Appends the user's `-p` text verbatim, after everything generated, so it wins.
    pub fn push_user(&mut self, params: &str) {
        let params = params.trim();
        if !params.is_empty() {
            self.params.push(params.to_string());
        }
    }

    /// Whether any parameter so far sets `key` (as `key` or `key=...`).
    pub fn has_key(&self, key: &str) -> bool {
        self.params.iter().flat_map(|p| p.split_whitespace()).any(|word| word.split('=').next() == Some(key))
    }

    pub fn as_string(&self) -> String {
        self.params.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_generated_then_user() {
        let mut cmdline = KernelCmdline::new(true);
        cmdline.push("root=/dev/vda rw");
        cmdline.push_user("  quiet  init=/bin/sh ");
        let s = cmdline.as_string();
        assert!(cmdline.has_key("init") && cmdline.has_key("root") && cmdline.has_key("quiet"));
        assert!(!cmdline.has_key("roo"));
        assert!(s.starts_with("console=ttyS0 reboot=k panic=1"));
        assert!(s.ends_with("i8042.noaux=1 root=/dev/vda rw quiet  init=/bin/sh"));
        assert!(!s.contains("noapic"));
        cmdline.set_console("hvc0");
        assert!(cmdline.as_string().starts_with("console=hvc0 reboot=k"));
    }

    #[test]
    fn nodefaults_keeps_only_the_user_params() {
        let mut cmdline = KernelCmdline::new(false);
        cmdline.push_user("console=hvc0");
        assert_eq!(cmdline.as_string(), "console=hvc0");
        let mut empty = KernelCmdline::new(false);
        empty.push_user("   ");
        assert_eq!(empty.as_string(), "");
    }
}
