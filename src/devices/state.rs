//! A device's saved state: a typed struct that names what it is and its own format version,
//! encoded as that version then the struct (bincode, bounded). A state of another version is
//! refused with one line naming both, so a snapshot from an lkvm whose device changed fails
//! to load instead of restoring a device from misread bytes.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// No device's state comes near this; a larger length is a corrupt snapshot.
const MAX_STATE_LEN: u64 = 16 << 20;

/// A device state's struct.
pub trait Versioned: Serialize + DeserializeOwned {
    /// What the state is of, as messages name it.
    const KIND: &'static str;
    /// Bumped whenever the struct changes.
    const VERSION: u16;
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("{kind} state format version {found}, this lkvm reads version {reads}")]
    Version { kind: &'static str, found: u16, reads: u16 },
    #[error("undecodable {kind} state: {reason}")]
    Undecodable { kind: &'static str, reason: String },
    /// The state decodes but does not fit the device it is restored into.
    #[error("{0}")]
    Mismatch(String),
}

impl From<String> for StateError {
    fn from(reason: String) -> StateError {
        StateError::Mismatch(reason)
    }
}

impl From<&str> for StateError {
    fn from(reason: &str) -> StateError {
        StateError::Mismatch(reason.into())
    }
}

/// bincode with a size limit, so a hostile length field cannot make the decoder allocate.
fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(MAX_STATE_LEN)
}

pub fn encode<T: Versioned>(state: &T) -> Vec<u8> {
    let mut bytes = T::VERSION.to_le_bytes().to_vec();
    codec().serialize_into(&mut bytes, state).expect("device states serialise");
    bytes
}

pub fn decode<T: Versioned>(bytes: &[u8]) -> Result<T, StateError> {
    let undecodable = |reason: String| StateError::Undecodable { kind: T::KIND, reason };
    let (version, body) = bytes.split_first_chunk::<2>().ok_or_else(|| undecodable("no version".into()))?;
    let found = u16::from_le_bytes(*version);
    if found != T::VERSION {
        return Err(StateError::Version { kind: T::KIND, found, reads: T::VERSION });
    }
    codec().deserialize(body).map_err(|e| undecodable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Example {
        registers: Vec<u8>,
    }

    impl Versioned for Example {
        const KIND: &'static str = "example";
        const VERSION: u16 = 3;
    }

    #[test]
    fn states_round_trip_and_another_version_is_refused_by_name() {
        let state = Example { registers: vec![1, 2, 3] };
        let mut bytes = encode(&state);
        assert_eq!(decode::<Example>(&bytes), Ok(state));
        bytes[0] = 2;
        let refused = decode::<Example>(&bytes).unwrap_err().to_string();
        assert_eq!(refused, "example state format version 2, this lkvm reads version 3");
        assert!(matches!(decode::<Example>(&[3]), Err(StateError::Undecodable { .. })));
        let huge_length = [3, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode::<Example>(&huge_length), Err(StateError::Undecodable { .. })));
    }
}
