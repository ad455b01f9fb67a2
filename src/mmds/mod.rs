//! Firecracker's microVM metadata service (MMDS): a JSON document the host puts (`PUT /mmds`,
//! `PATCH /mmds`, the config file's `mmds-config`, `--metadata FILE`) and the guest reads over
//! HTTP at 169.254.169.254 (or the configured address) through the NICs named in its config.
//! The guest's side is `stack` (frames to the address never reach the host's network); this
//! module answers its requests as Firecracker's docs/mmds describe: paths walk the document,
//! IMDS-style text unless the guest asks for JSON, and in V2 a session token from
//! `PUT /latest/api/token` on every read.
//!
//! One VM per process: the document is the process's (`store`), as in Firecracker. A snapshot
//! keeps the MMDS configuration, not the document, which the host puts again after a load.

pub mod stack;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::mmds::Version;
use crate::http::{Method, Request, Response, JSON};

pub(crate) const TEXT: &str = "text/plain";
const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "X-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-metadata-token";
const MAX_TTL_SECONDS: u64 = 21600;
/// Live session tokens at most: a guest asking for more loses its oldest.
const MAX_TOKENS: usize = 1024;

/// The document and the guest's session tokens.
pub struct Mmds {
    data: Option<Value>,
    /// Largest document, serialized, in bytes (`--mmds-size-limit`).
    limit: usize,
    version: Version,
    tokens: HashMap<String, Instant>,
}

/// The process's MMDS.
pub fn store() -> MutexGuard<'static, Mmds> {
    static STORE: OnceLock<Mutex<Mmds>> = OnceLock::new();
    let store = STORE.get_or_init(|| Mutex::new(Mmds::new(crate::http::DEFAULT_MAX_BODY)));
    store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Mmds {
    pub fn new(limit: usize) -> Mmds {
        Mmds { data: None, limit, version: Version::V1, tokens: HashMap::new() }
    }

    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    pub fn set_version(&mut self, version: Version) {
        self.version = version;
        self.tokens.clear();
    }

    /// The document (`GET /mmds`): `{}` before any was put.
    pub fn get(&self) -> Value {
        self.data.clone().unwrap_or_else(|| Value::Object(Default::default()))
    }

    /// Replaces the document (`PUT /mmds`).
    pub fn put(&mut self, data: Value) -> Result<(), String> {
        self.check_size(&data)?;
        self.data = Some(data);
        Ok(())
    }

    /// Merges `patch` into the document (`PATCH /mmds`, RFC 7396 JSON merge patch).
    pub fn patch(&mut self, patch: &Value) -> Result<(), String> {
        let mut data = self.data.clone().ok_or("The MMDS data store is not initialized.")?;
        merge(&mut data, patch);
        self.put(data)
    }

    fn check_size(&self, data: &Value) -> Result<(), String> {
        let size = serde_json::to_vec(data).map_or(usize::MAX, |bytes| bytes.len());
        if size > self.limit {
            return Err(format!("The MMDS data store is {size} bytes, over its limit of {} bytes.", self.limit));
        }
        Ok(())
    }

    /// Answers one HTTP request from the guest.
    pub fn answer(&mut self, request: &Request) -> Response {
        let text = |status, message: &str| Response::with_body(status, TEXT, message);
        match (&request.method, request.path.as_str()) {
            (Method::Put, TOKEN_PATH) => self.new_token(request),
            (Method::Get, _) => {
                if self.version == Version::V2 {
                    match request.header(TOKEN_HEADER) {
                        None => {
                            return text(
                                401,
                                "No MMDS token provided. Use `X-metadata-token` header to specify the session token.",
                            )
                        }
                        Some(token) if !self.valid_token(token) => return text(401, "MMDS token not valid."),
                        Some(_) => {}
                    }
                }
                let json = request.header("Accept").is_some_and(|a| a.eq_ignore_ascii_case(JSON.as_bytes()));
                self.read(&request.path, json)
            }
            _ => text(405, "Not allowed HTTP method."),
        }
    }

    fn new_token(&mut self, request: &Request) -> Response {
        let text = |status, message: String| Response::with_body(status, TEXT, message);
        if request.header("X-Forwarded-For").is_some() {
            return text(400, "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For".into());
        }
        let Some(ttl) = request.header(TTL_HEADER) else {
            return text(400, "Token time to live value not found. Use `X-metadata-token-ttl-seconds` header to specify the token's lifetime.".into());
        };
        let ttl = std::str::from_utf8(ttl).ok().and_then(|t| t.parse::<u64>().ok());
        let Some(ttl) = ttl.filter(|t| (1..=MAX_TTL_SECONDS).contains(t)) else {
            return text(
                400,
                format!("Invalid time to live value provided for token. Please provide a value between 1 and {MAX_TTL_SECONDS}."),
            );
        };
        let now = Instant::now();
        self.tokens.retain(|_, expiry| *expiry > now);
        if self.tokens.len() >= MAX_TOKENS {
            if let Some(oldest) = self.tokens.iter().min_by_key(|(_, expiry)| **expiry).map(|(t, _)| t.clone()) {
                self.tokens.remove(&oldest);
            }
        }
        let mut bytes = [0u8; 32];
        if rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).is_err() {
            return text(500, "no randomness for a token".into());
        }
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens.insert(token.clone(), now + Duration::from_secs(ttl));
        text(200, token)
    }

    fn valid_token(&self, token: &[u8]) -> bool {
        let token = String::from_utf8_lossy(token);
        self.tokens.get(token.as_ref()).is_some_and(|expiry| *expiry > Instant::now())
    }

    /// The value at `path` (`/latest/meta-data/ami-id`), as text or JSON.
    fn read(&self, path: &str, json: bool) -> Response {
        let not_found = || Response::with_body(404, TEXT, format!("Resource not found: {path}."));
        let Some(data) = &self.data else { return not_found() };
        let mut value = data;
        for key in path.split('/').filter(|k| !k.is_empty()) {
            match value.get(key) {
                Some(inner) => value = inner,
                None => return not_found(),
            }
        }
        if json {
            return Response::with_body(200, JSON, value.to_string());
        }
        match value {
            Value::String(text) => Response::with_body(200, TEXT, text.clone()),
            Value::Object(map) => {
                let keys: Vec<String> =
                    map.iter().map(|(k, v)| if v.is_object() { format!("{k}/") } else { k.clone() }).collect();
                Response::with_body(200, TEXT, keys.join("\n"))
            }
            _ => Response::with_body(400, TEXT, "Cannot retrieve value. The value has an unsupported type."),
        }
    }
}

/// RFC 7396: objects merge key by key, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(target) = target else { return };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests;
