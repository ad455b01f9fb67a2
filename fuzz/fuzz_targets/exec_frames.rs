//! Feeds fuzzed bytes to `lkvm exec`'s host end as the guest's stream (frames of output and the
//! exit status) and as a request. A hostile guest gets an error, never a panic or an allocation
//! past the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lkvm::exec::{protocol, relay};

fuzz_target!(|data: &[u8]| {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let _ = relay(&mut &data[..], &mut out, &mut err);
    assert!(out.len() + err.len() <= data.len(), "only what the guest sent is written");
    if let Ok(request) = protocol::Request::decode(data) {
        assert_eq!(protocol::Request::decode(&request.encode()), Ok(request));
    }
});
