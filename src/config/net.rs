//! How the user asked for a network device (`-n`, Firecracker's network interfaces).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::RateLimit;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    User,
    Tap,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortForward {
    pub protocol: Protocol,
    /// The host address the forward listens on: loopback unless the user names another, so a
    /// guest's service is not offered to the network by surprise.
    #[serde(default = "loopback")]
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
}

fn loopback() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}

/// One `-n` option.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetSpec {
    pub mode: NetMode,
    pub tapif: Option<String>,
    pub guest_mac: Option<[u8; 6]>,
    pub host_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
    pub script: Option<PathBuf>,
    pub forwards: Vec<PortForward>,
    /// Queue pairs (`mq=N`, tap only): one tap queue and one host thread each.
    pub queue_pairs: u16,
    /// Token buckets on received and sent frames (`rx_bw=`, `tx_ops=`, ...; Firecracker's
    /// `rx_rate_limiter`, `tx_rate_limiter`), per queue pair.
    #[serde(default)]
    pub rx_rate_limit: RateLimit,
    #[serde(default)]
    pub tx_rate_limit: RateLimit,
    /// User mode: the guest reaches nothing outside, DNS included (DHCP and forwarded ports
    /// still work).
    #[serde(default)]
    pub restrict: bool,
    /// User mode: whether the host address reaches the host's loopback (unset: no).
    #[serde(default)]
    pub host_loopback: Option<bool>,
    /// User mode: whether the guest reaches the host's network neighbours (private, link-local
    /// and metadata addresses, the host's own); unset, yes for `run` and no for `sandbox`.
    #[serde(default)]
    pub lan: Option<bool>,
    /// Tap: the caller set the tap up (Firecracker's `host_dev_name`): lkvm neither addresses
    /// nor brings it up, where kvmtool's `-n mode=tap` gives it `host_ip`.
    #[serde(default)]
    pub tap_as_given: bool,
}

/// The most queue pairs `mq=` takes, as a 16-vCPU guest would use.
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// kvmtool's user-mode network: guest 192.168.33.15, host (gateway) 192.168.33.1.
pub const DEFAULT_HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 33, 1);
pub const DEFAULT_GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 33, 15);
/// The first NIC's MAC; later NICs count up in the last byte.
pub const DEFAULT_GUEST_MAC: [u8; 6] = [0x02, 0x15, 0x15, 0x15, 0x15, 0x15];

impl Default for NetSpec {
    fn default() -> Self {
        NetSpec {
            mode: NetMode::User,
            tapif: None,
            guest_mac: None,
            host_ip: DEFAULT_HOST_IP,
            guest_ip: DEFAULT_GUEST_IP,
            script: None,
            forwards: Vec::new(),
            queue_pairs: 1,
            rx_rate_limit: RateLimit::default(),
            tx_rate_limit: RateLimit::default(),
            restrict: false,
            host_loopback: None,
            lan: None,
            tap_as_given: false,
        }
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> =
        s.split(':').map(|b| u8::from_str_radix(b, 16).ok().filter(|_| b.len() == 2)).collect::<Option<_>>()?;
    let mac: [u8; 6] = bytes.try_into().ok()?;
    // A multicast address cannot be a NIC's own.
    (mac[0] & 1 == 0).then_some(mac)
}

/// `tcp|udp:[HOSTADDR:]HOSTPORT:GUESTPORT`.
fn parse_forward(s: &str) -> Option<PortForward> {
    let parts: Vec<&str> = s.split(':').collect();
    let protocol = match parts[0] {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    let (host_addr, ports) = match &parts[1..] {
        [addr, ports @ ..] if ports.len() == 2 => (addr.parse().ok()?, ports),
        ports => (loopback(), ports),
    };
    let [host_port, guest_port] = ports else { return None };
    Some(PortForward { protocol, host_addr, host_port: host_port.parse().ok()?, guest_port: guest_port.parse().ok()? })
}

impl NetSpec {
    pub fn parse(arg: &str) -> Result<NetSpec, String> {
        let mut spec = NetSpec::default();
        let bad = |what: &str| format!("-n {arg}: {what}");
        for item in arg.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| bad(&format!("'{item}' is not key=value")))?;
            match key {
                "mode" => {
                    spec.mode = match value {
                        "user" => NetMode::User,
                        "tap" => NetMode::Tap,
                        "none" => NetMode::None,
                        _ => return Err(bad(&format!("unknown mode '{value}' (user, tap or none)"))),
                    }
                }
                "tapif" => spec.tapif = Some(value.to_string()),
                "guest_mac" => {
                    spec.guest_mac = Some(parse_mac(value).ok_or_else(|| bad(&format!("bad MAC address '{value}'")))?)
                }
                "host_ip" => spec.host_ip = value.parse().map_err(|_| bad(&format!("bad IPv4 address '{value}'")))?,
                "guest_ip" => spec.guest_ip = value.parse().map_err(|_| bad(&format!("bad IPv4 address '{value}'")))?,
                "script" => spec.script = Some(PathBuf::from(value)),
                "hostfwd" => spec.forwards.push(
                    parse_forward(value)
                        .ok_or_else(|| bad(&format!("bad forward '{value}' (tcp:[HOSTADDR:]HOSTPORT:GUESTPORT)")))?,
                ),
                "mq" => {
                    spec.queue_pairs = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUE_PAIRS).contains(n))
                        .ok_or_else(|| bad(&format!("mq={value}: queue pairs must be 1 to {MAX_QUEUE_PAIRS}")))?
                }
                "vhost" => return Err(bad("vhost is not supported yet (lkvm's own virtio-net serves the tap)")),
                "restrict" | "host_loopback" | "lan" => {
                    let on = match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad(&format!("{key}={value}: use on or off"))),
                    };
                    match key {
                        "restrict" => spec.restrict = on,
                        "lan" => spec.lan = Some(on),
                        _ => spec.host_loopback = Some(on),
                    }
                }
                _ if key.starts_with("rx_") || key.starts_with("tx_") => {
                    let limit = if key.starts_with("rx_") { &mut spec.rx_rate_limit } else { &mut spec.tx_rate_limit };
                    if !limit.parse_option(&key[3..], value).map_err(|e| bad(&e))? {
                        return Err(bad(&format!("unknown option '{key}' (rx_bw, rx_ops, tx_bw, tx_ops)")));
                    }
                }
                _ => return Err(bad(&format!("unknown option '{key}'"))),
            }
        }
        if spec.mode != NetMode::User && !spec.forwards.is_empty() {
            return Err(bad("hostfwd needs mode=user"));
        }
        if spec.mode != NetMode::User && (spec.restrict || spec.host_loopback.is_some() || spec.lan.is_some()) {
            return Err(bad("restrict, host_loopback and lan need mode=user"));
        }
        if spec.mode != NetMode::Tap && spec.queue_pairs > 1 {
            return Err(bad("mq needs mode=tap"));
        }
        if spec.tapif.as_ref().is_some_and(|name| name.is_empty() || name.len() >= libc::IFNAMSIZ) {
            return Err(bad("tapif must be 1 to 15 characters"));
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kvmtool_style_network_options() {
        assert_eq!(NetSpec::parse("mode=user").unwrap(), NetSpec::default());
        let tap = NetSpec::parse("mode=tap,tapif=tap0,guest_mac=02:00:00:00:00:01,host_ip=10.0.0.1,script=/bin/true")
            .unwrap();
        assert_eq!(tap.mode, NetMode::Tap);
        assert_eq!(tap.tapif.as_deref(), Some("tap0"));
        assert_eq!(tap.guest_mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(tap.host_ip, Ipv4Addr::new(10, 0, 0, 1));
        let fwd = NetSpec::parse("mode=user,hostfwd=tcp:8080:80,hostfwd=udp:0.0.0.0:5353:53").unwrap();
        let local = Ipv4Addr::LOCALHOST;
        assert_eq!(
            fwd.forwards[0],
            PortForward { protocol: Protocol::Tcp, host_addr: local, host_port: 8080, guest_port: 80 }
        );
        let everywhere = Ipv4Addr::UNSPECIFIED;
        assert_eq!(
            fwd.forwards[1],
            PortForward { protocol: Protocol::Udp, host_addr: everywhere, host_port: 5353, guest_port: 53 }
        );
        // Configs written before the address existed forward from loopback.
        let old: PortForward = serde_json::from_str(r#"{"protocol":"tcp","host_port":1,"guest_port":2}"#).unwrap();
        assert_eq!(old.host_addr, local);
        assert_eq!(NetSpec::parse("mode=none").unwrap().mode, NetMode::None);
        assert_eq!(NetSpec::parse("mode=tap,mq=4").unwrap().queue_pairs, 4);
    }

    #[test]
    fn rejects_bad_network_options() {
        assert!(NetSpec::parse("mode=bridge").unwrap_err().contains("unknown mode 'bridge'"));
        assert!(NetSpec::parse("guest_mac=02:00:00:00:00").unwrap_err().contains("bad MAC"));
        assert!(NetSpec::parse("guest_mac=01:00:00:00:00:01").unwrap_err().contains("bad MAC"), "multicast");
        assert!(NetSpec::parse("guest_mac=zz:00:00:00:00:01").unwrap_err().contains("bad MAC"));
        assert!(NetSpec::parse("host_ip=300.1.1.1").unwrap_err().contains("bad IPv4"));
        assert!(NetSpec::parse("hostfwd=tcp:80").unwrap_err().contains("bad forward"));
        assert!(NetSpec::parse("hostfwd=tcp:localhost:80:80").unwrap_err().contains("bad forward"));
        assert!(NetSpec::parse("hostfwd=tcp:1:2:3:4").unwrap_err().contains("bad forward"));
        assert!(NetSpec::parse("mode=tap,hostfwd=tcp:1:2").unwrap_err().contains("needs mode=user"));
        let confined = NetSpec::parse("mode=user,restrict=on,host_loopback=off").unwrap();
        assert_eq!((confined.restrict, confined.host_loopback), (true, Some(false)));
        assert_eq!(NetSpec::parse("mode=user").unwrap().host_loopback, None, "off unless asked");
        assert!(NetSpec::parse("restrict=yes").unwrap_err().contains("use on or off"));
        assert!(NetSpec::parse("mode=tap,restrict=on").unwrap_err().contains("need mode=user"));
        let limited = NetSpec::parse("mode=tap,rx_bw=1M/100,tx_ops=10/1000").unwrap();
        assert!(limited.rx_rate_limit.limits() && limited.tx_rate_limit.limits());
        assert!(NetSpec::parse("rx_speed=1/1").unwrap_err().contains("unknown option"));
        assert!(NetSpec::parse("mode=tap,tapif=averyveryverylongname").unwrap_err().contains("tapif"));
        assert!(NetSpec::parse("vhost=1").unwrap_err().contains("not supported"));
        assert!(NetSpec::parse("mode=user,mq=2").unwrap_err().contains("mq needs mode=tap"));
        assert!(NetSpec::parse("mode=tap,mq=0").unwrap_err().contains("1 to 16"));
        assert!(NetSpec::parse("mode=tap,mq=99").unwrap_err().contains("1 to 16"));
        assert!(NetSpec::parse("colour=blue").unwrap_err().contains("unknown option 'colour'"));
    }
}
