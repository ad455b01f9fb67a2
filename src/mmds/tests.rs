use super::*;
use crate::config::mmds::DEFAULT_ADDRESS;
use crate::config::MmdsConfig;

fn request(method: Method, path: &str, headers: &[(&str, &str)]) -> Request {
    let headers = headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect();
    Request { method, path: path.into(), body: Vec::new(), keep_alive: true, headers }
}

fn body(response: &Response) -> String {
    String::from_utf8_lossy(response.body.as_deref().unwrap_or_default()).into_owned()
}

fn document() -> Value {
    serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-12345678", "reservation-id": "r-1", "local": {"a": "b"}},
                      "count": 3}})
}

#[test]
fn paths_walk_the_document_as_imds_text_or_json() {
    let mut mmds = Mmds::new(51200);
    let get = |mmds: &mut Mmds, path: &str, headers: &[(&str, &str)]| mmds.answer(&request(Method::Get, path, headers));
    assert_eq!(get(&mut mmds, "/latest", &[]).status, 404, "nothing put yet");
    mmds.put(document()).unwrap();
    let keys = get(&mut mmds, "/latest/meta-data/", &[]);
    assert_eq!((keys.status, keys.content_type), (200, TEXT));
    assert_eq!(body(&keys), "ami-id\nlocal/\nreservation-id");
    assert_eq!(body(&get(&mut mmds, "/latest/meta-data/ami-id", &[])), "ami-12345678");
    let json = get(&mut mmds, "/latest/meta-data/local", &[("Accept", "application/json")]);
    assert_eq!((json.content_type, body(&json)), (JSON, r#"{"a":"b"}"#.to_string()));
    assert_eq!(get(&mut mmds, "/latest/count", &[]).status, 400, "a number has no IMDS form");
    assert_eq!(body(&get(&mut mmds, "/latest/count", &[("accept", "application/json")])), "3");
    let missing = get(&mut mmds, "/latest/nope", &[]);
    assert_eq!((missing.status, body(&missing)), (404, "Resource not found: /latest/nope.".to_string()));
    assert_eq!(mmds.answer(&request(Method::Patch, "/latest", &[])).status, 405);
}

#[test]
fn v2_reads_need_a_live_session_token() {
    let mut mmds = Mmds::new(51200);
    mmds.put(document()).unwrap();
    mmds.set_version(Version::V2);
    let read = |mmds: &mut Mmds, token: Option<&str>| {
        let headers: Vec<(&str, &str)> = token.map(|t| (TOKEN_HEADER, t)).into_iter().collect();
        mmds.answer(&request(Method::Get, "/latest/meta-data/ami-id", &headers))
    };
    assert_eq!(read(&mut mmds, None).status, 401);
    assert_eq!(read(&mut mmds, Some("made-up")).status, 401);
    let token_request = |ttl: &str| request(Method::Put, TOKEN_PATH, &[(TTL_HEADER, ttl)]);
    assert_eq!(mmds.answer(&token_request("0")).status, 400);
    assert_eq!(mmds.answer(&token_request("21601")).status, 400);
    assert_eq!(mmds.answer(&request(Method::Put, TOKEN_PATH, &[])).status, 400, "no TTL");
    let forwarded = request(Method::Put, TOKEN_PATH, &[(TTL_HEADER, "60"), ("X-Forwarded-For", "1.2.3.4")]);
    assert_eq!(mmds.answer(&forwarded).status, 400);
    let token = body(&mmds.answer(&token_request("60")));
    let answer = read(&mut mmds, Some(&token));
    assert_eq!((answer.status, body(&answer)), (200, "ami-12345678".to_string()));
    // Expired tokens fail; a guest minting tokens without end keeps a bounded number.
    mmds.tokens.insert("old".into(), Instant::now() - Duration::from_secs(1));
    assert_eq!(read(&mut mmds, Some("old")).status, 401);
    for _ in 0..MAX_TOKENS + 10 {
        assert_eq!(mmds.answer(&token_request("60")).status, 200);
    }
    assert!(mmds.tokens.len() <= MAX_TOKENS);
    // V1: no token needed.
    mmds.set_version(Version::V1);
    assert_eq!(read(&mut mmds, None).status, 200);
}

#[test]
fn the_host_puts_and_merge_patches_the_document_within_its_limit() {
    let mut mmds = Mmds::new(64);
    assert_eq!(mmds.get(), serde_json::json!({}));
    assert!(mmds.patch(&serde_json::json!({"a": 1})).unwrap_err().contains("not initialized"));
    mmds.put(serde_json::json!({"a": {"b": 1, "c": 2}, "d": 3})).unwrap();
    mmds.patch(&serde_json::json!({"a": {"b": null, "e": "x"}, "d": [1]})).unwrap();
    assert_eq!(mmds.get(), serde_json::json!({"a": {"c": 2, "e": "x"}, "d": [1]}));
    assert!(mmds.put(serde_json::json!({"big": "x".repeat(64)})).unwrap_err().contains("limit"));
    assert!(mmds.patch(&serde_json::json!({"big": "x".repeat(64)})).is_err());
    assert_eq!(mmds.get(), serde_json::json!({"a": {"c": 2, "e": "x"}, "d": [1]}), "a refused change changes nothing");
}

#[test]
fn mmds_config_names_existing_nics_and_a_link_local_address() {
    let config: MmdsConfig = serde_json::from_str(r#"{"network_interfaces": ["eth0"]}"#).unwrap();
    assert_eq!((config.version, config.ipv4_address), (Version::V1, DEFAULT_ADDRESS));
    assert!(config.check(&["eth0"]).is_ok());
    assert!(config.check(&["eth1"]).unwrap_err().contains("does not correspond to any existing network interface"));
    let bad: MmdsConfig =
        serde_json::from_str(r#"{"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#)
            .unwrap();
    assert!(bad.check(&["eth0"]).unwrap_err().contains("not link local"));
    assert!(serde_json::from_str::<MmdsConfig>(r#"{"network_interfaces": [], "bogus": 1}"#).is_err());
}
