//! How the user asked for a shared directory: over 9p (`--9p`) or virtio-fs (`--fs`).

use std::path::PathBuf;

/// virtio-9p limits a mount tag to what fits in its config space; Linux reads it as a string.
pub const MAX_9P_TAG_LEN: usize = 255;
/// virtio-fs puts the tag in a 36-byte config field.
pub const MAX_FS_TAG_LEN: usize = 36;

/// How the user asked for a share (`--9p DIR,TAG[,ro]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShareSpec {
    pub path: PathBuf,
    pub tag: String,
    pub read_only: bool,
    /// Host paths the guest may reach under `path` (empty: all of it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub view: Vec<PathBuf>,
}

impl ShareSpec {
    pub fn parse(arg: &str) -> Result<ShareSpec, String> {
        let (path, tag, read_only) = parse_dir_tag("--9p", arg)?;
        Ok(ShareSpec { read_only, ..ShareSpec::new(path, tag)? })
    }

    pub fn new(path: impl Into<PathBuf>, tag: &str) -> Result<ShareSpec, String> {
        if tag.is_empty() || tag.len() > MAX_9P_TAG_LEN {
            return Err(format!("9p mount tag '{tag}' must be 1 to {MAX_9P_TAG_LEN} bytes"));
        }
        Ok(ShareSpec { path: path.into(), tag: tag.to_string(), read_only: false, view: Vec::new() })
    }
}

/// `DIR,TAG[,ro]`, as `--9p` and `--fs` (`flag`) take it: the directory, tag and read-only.
pub fn parse_dir_tag<'a>(flag: &str, arg: &'a str) -> Result<(&'a str, &'a str, bool), String> {
    let mut parts = arg.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| format!("{flag} needs DIR,TAG"))?;
    let tag = parts.next().ok_or_else(|| format!("{flag} {arg}: needs a mount tag, as in {flag} DIR,TAG"))?;
    let mut read_only = false;
    for option in parts {
        match option {
            "ro" => read_only = true,
            other => return Err(format!("{flag} {arg}: unknown option '{other}' (known: ro)")),
        }
    }
    Ok((path, tag, read_only))
}

/// How the user asked for a virtio-fs share.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsSpec {
    pub path: PathBuf,
    pub tag: String,
    pub read_only: bool,
}

impl FsSpec {
    /// `--fs DIR,TAG[,ro]`.
    pub fn parse(arg: &str) -> Result<FsSpec, String> {
        let (path, tag, read_only) = parse_dir_tag("--fs", arg)?;
        if tag.is_empty() || tag.len() > MAX_FS_TAG_LEN {
            return Err(format!("--fs {arg}: the mount tag must be 1 to {MAX_FS_TAG_LEN} bytes"));
        }
        Ok(FsSpec { path: path.into(), tag: tag.to_string(), read_only })
    }
}
