//! How the user asked for a disk.

use std::path::PathBuf;

use super::RateLimit;

/// How requests reach a raw image: one at a time on the device's thread, or many in flight
/// through io_uring (Firecracker's `io_engine`). lkvm's command line defaults to io_uring
/// where the host has it; Firecracker's API defaults to Sync, as Firecracker does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IoEngine {
    Sync,
    #[default]
    Async,
}

/// An image's format as the user named it. Without one, lkvm probes the image's first bytes,
/// as QEMU does, and guards a probed raw image against writes that would change what it probes as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl std::str::FromStr for DiskFormat {
    type Err = String;

    fn from_str(name: &str) -> Result<DiskFormat, String> {
        match name {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            other => Err(format!("unknown disk format '{other}' (known: raw, qcow2)")),
        }
    }
}

/// How the user asked for a disk (`-d PATH[,format=F][,ro][,direct][,snapshot][,backing=PATH][,sync|,async]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// None: probed from the image's first bytes.
    #[serde(default)]
    pub format: Option<DiskFormat>,
    pub read_only: bool,
    pub direct: bool,
    /// The guest writes to a temporary overlay, discarded at exit; the image is not written.
    #[serde(default)]
    pub snapshot: bool,
    /// A qcow2 image's backing file, instead of the one it names.
    #[serde(default)]
    pub backing: Option<PathBuf>,
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Token buckets on the guest's requests (`bw=`, `ops=`; Firecracker's `rate_limiter`).
    #[serde(default)]
    pub rate_limit: RateLimit,
}

impl DiskSpec {
    pub fn new(path: impl Into<PathBuf>) -> DiskSpec {
        DiskSpec { path: path.into(), ..DiskSpec::default() }
    }

    pub fn parse(arg: &str) -> Result<DiskSpec, String> {
        let mut parts = arg.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or("-d needs an image path")?;
        let mut spec = DiskSpec::new(path);
        for option in parts {
            match option.split_once('=') {
                None if option == "ro" => spec.read_only = true,
                None if option == "direct" => spec.direct = true,
                None if option == "snapshot" => spec.snapshot = true,
                None if option == "async" => spec.io_engine = IoEngine::Async,
                None if option == "sync" => spec.io_engine = IoEngine::Sync,
                Some(("backing", file)) if !file.is_empty() => spec.backing = Some(file.into()),
                Some(("format", name)) => spec.format = Some(name.parse().map_err(|e| format!("-d {arg}: {e}"))?),
                Some((key, value)) if spec.rate_limit.parse_option(key, value).map_err(|e| format!("-d {arg}: {e}"))? => {}
                _ => {
                    return Err(format!(
                    "-d {arg}: unknown disk option '{option}' (known: format=raw|qcow2, ro, direct, snapshot, backing=PATH, async, sync, bw=SIZE/MS, ops=N/MS)"
                ))
                }
            }
        }
        Ok(spec)
    }
}
