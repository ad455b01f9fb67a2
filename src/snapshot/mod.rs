//! Snapshot files: a VM's state (config, vCPUs, irqchip and timers, every device by id) in one
//! versioned, checksummed file, and its memory in another. Memory is restored by mapping that
//! file privately (copy-on-write), so restoring costs the same for any guest size and clones of
//! one snapshot share the host's page cache.

pub mod memory;
pub mod trust;
pub mod uffd;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::state::{KvmVmState, VcpuState};
use crate::config::VmConfig;

/// The files of a snapshot directory (`lkvm snapshot`, `lkvm run --restore`).
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

const MAGIC: &[u8; 8] = b"LKVMSNAP";
/// Bumped whenever the state file's own structure (config, vCPUs, irqchip) changes: an older
/// or newer lkvm's snapshot is refused. Each device's state has a version of its own
/// (`devices::state`). Version 2: device states carry their versions.
pub const FORMAT_VERSION: u32 = 2;
/// magic, version, payload length, CRC-64 of the payload.
const HEADER_LEN: usize = 8 + 4 + 8 + 8;
/// No real VM's state comes near this; a larger length is a corrupt header.
const MAX_STATE_LEN: u64 = 64 << 20;

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// As JSON: the config uses serde features (flatten) that bincode cannot carry.
    #[serde(with = "as_json")]
    pub config: VmConfig,
    pub vcpus: Vec<VcpuState>,
    pub kvm: KvmVmState,
    /// Each device's own versioned state (`devices::state`), by registry id.
    pub devices: BTreeMap<String, Vec<u8>>,
}

mod as_json {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::VmConfig;

    pub fn serialize<S: Serializer>(config: &VmConfig, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&serde_json::to_string(config).map_err(serde::ser::Error::custom)?)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VmConfig, D::Error> {
        serde_json::from_str(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}{hint}", hint = crate::jail::landlock::hint(.1))]
    Io(PathBuf, io::Error),
    #[error("{0}: not an lkvm snapshot")]
    NotASnapshot(PathBuf),
    #[error("{0}: snapshot format version {1}, this lkvm reads version {FORMAT_VERSION}")]
    Version(PathBuf, u32),
    #[error("{0}: truncated snapshot")]
    Truncated(PathBuf),
    #[error("{0}: corrupt snapshot ({1})")]
    Corrupt(PathBuf, String),
    #[error("{path}: the memory file holds {found} bytes, the snapshot's guest has {expected}")]
    MemorySize { path: PathBuf, expected: u64, found: u64 },
    #[error("{0}: Uffd memory backend: {1}")]
    Uffd(PathBuf, String),
}

/// bincode with a size limit, so a hostile length field cannot make the decoder allocate.
fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(MAX_STATE_LEN)
}

/// A state file's bytes: the header (magic, version, length, checksum), then `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc64::crc64(0, payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// Writes the state file (to a temporary name first, so a failed snapshot leaves no half file);
/// returns its size.
pub fn write_state(path: &Path, state: &VmState) -> Result<u64, Error> {
    let bytes = frame(&codec().serialize(state).expect("VM states serialise"));
    let partial = path.with_extension("partial");
    let fail = |e| Error::Io(path.to_path_buf(), e);
    let mut file = private_file(&partial).map_err(fail)?;
    file.write_all(&bytes).and_then(|()| file.sync_all()).map_err(fail)?;
    std::fs::rename(&partial, path).map_err(fail)?;
    Ok(bytes.len() as u64)
}

/// The state file's bytes in a memfd (a fork's, handed to its children).
pub fn state_memfd(state: &VmState) -> io::Result<File> {
    let file = memory::memfd("lkvm-fork-state")?;
    (&file).write_all(&frame(&codec().serialize(state).expect("VM states serialise")))?;
    Ok(file)
}

/// A new file only its owner can read: a snapshot holds the guest's memory and secrets.
pub fn private_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// Creates `dir` (and its parents) for a snapshot; what is created is its owner's alone.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Reads and checks a state file: magic, version, length and checksum before decoding.
pub fn read_state(path: &Path) -> Result<VmState, Error> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|f| f.take(MAX_STATE_LEN + HEADER_LEN as u64).read_to_end(&mut bytes)).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::Io(path.to_path_buf(), io::Error::new(e.kind(), "no such snapshot file"))
        } else {
            Error::Io(path.to_path_buf(), e)
        }
    })?;
    parse_state(&bytes).map_err(|e| e.at(path))
}

/// What is wrong with a state file, before it is tied to its path.
#[derive(Debug)]
pub enum ParseError {
    NotASnapshot,
    Version(u32),
    Truncated,
    Corrupt(String),
}

impl ParseError {
    fn at(self, path: &Path) -> Error {
        let path = path.to_path_buf();
        match self {
            ParseError::NotASnapshot => Error::NotASnapshot(path),
            ParseError::Version(v) => Error::Version(path, v),
            ParseError::Truncated => Error::Truncated(path),
            ParseError::Corrupt(why) => Error::Corrupt(path, why),
        }
    }
}

/// Decodes a state file's bytes; never panics, whatever they are (see the fuzz target).
pub fn parse_state(bytes: &[u8]) -> Result<VmState, ParseError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(ParseError::NotASnapshot);
    }
    let header = bytes.get(..HEADER_LEN).ok_or(ParseError::Truncated)?;
    let field = |at: usize, len: usize| {
        let mut word = [0u8; 8];
        word[..len].copy_from_slice(&header[at..at + len]);
        u64::from_le_bytes(word)
    };
    let version = field(8, 4) as u32;
    if version != FORMAT_VERSION {
        return Err(ParseError::Version(version));
    }
    let (len, crc) = (field(12, 8), field(20, 8));
    if len > MAX_STATE_LEN {
        return Err(ParseError::Corrupt(format!("state length {len}")));
    }
    let payload = &bytes[HEADER_LEN..];
    match (payload.len() as u64).cmp(&len) {
        std::cmp::Ordering::Less => return Err(ParseError::Truncated),
        std::cmp::Ordering::Greater => return Err(ParseError::Corrupt("trailing bytes".into())),
        std::cmp::Ordering::Equal => {}
    }
    if crc64::crc64(0, payload) != crc {
        return Err(ParseError::Corrupt("checksum mismatch".into()));
    }
    let state: VmState = codec().deserialize(payload).map_err(|e| ParseError::Corrupt(e.to_string()))?;
    state.config.validate().map_err(|e| ParseError::Corrupt(format!("its VM config: {e}")))?;
    if state.vcpus.len() != usize::from(state.config.machine.vcpu_count) {
        return Err(ParseError::Corrupt("vCPU count does not match its config".into()));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let config = crate::config::tests::base(crate::config::CmdlinePolicy::Bare, None);
        let state = VmState {
            config,
            vcpus: vec![VcpuState::default()],
            kvm: KvmVmState::default(),
            devices: BTreeMap::from([("com1".to_string(), vec![1, 2, 3])]),
        };
        let dir = std::env::temp_dir().join(format!("lkvm-snap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        write_state(&path, &state).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        bytes
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let bytes = sample();
        let state = parse_state(&bytes).unwrap();
        assert_eq!(state.devices["com1"], vec![1, 2, 3]);
        assert!(matches!(parse_state(b"#!/bin/sh\n"), Err(ParseError::NotASnapshot)));
        assert!(matches!(parse_state(&bytes[..bytes.len() - 1]), Err(ParseError::Truncated)));
        assert!(matches!(parse_state(&bytes[..HEADER_LEN - 3]), Err(ParseError::Truncated)));
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(parse_state(&flipped), Err(ParseError::Corrupt(_))));
        let mut newer = bytes.clone();
        newer[8] = 3;
        assert!(matches!(parse_state(&newer), Err(ParseError::Version(3))));
        let mut huge = bytes;
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse_state(&huge), Err(ParseError::Corrupt(_))));
    }
}
