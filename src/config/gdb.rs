//! `--gdb PORT|unix:PATH`: where the gdb stub listens.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GdbAddress {
    /// A TCP port on 127.0.0.1.
    Tcp(u16),
    Unix(PathBuf),
}

impl std::fmt::Display for GdbAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GdbAddress::Tcp(port) => write!(f, "127.0.0.1:{port}"),
            GdbAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GdbConfig {
    pub address: GdbAddress,
    /// Whether the guest waits before its first instruction until gdb lets it go.
    pub wait: bool,
}

impl GdbConfig {
    /// `--gdb PORT` or `--gdb unix:PATH`.
    pub fn parse(arg: &str, wait: bool) -> Result<GdbConfig, String> {
        let address = match arg.strip_prefix("unix:") {
            Some("") => return Err("--gdb unix:PATH: the path is empty".into()),
            Some(path) => GdbAddress::Unix(path.into()),
            None => match arg.parse::<u16>() {
                Ok(port) if port > 0 => GdbAddress::Tcp(port),
                _ => return Err(format!("--gdb {arg}: expected a TCP port (1-65535) or unix:PATH")),
            },
        };
        Ok(GdbConfig { address, wait })
    }
}
