//! Firecracker's MMDS configuration (`PUT /mmds/config`, the config file's `mmds-config`).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub const DEFAULT_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    #[default]
    V1,
    V2,
}

/// `PUT /mmds/config`, the config file's `mmds-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: Version,
    /// The ids of the NICs the guest reaches MMDS through.
    pub network_interfaces: Vec<String>,
    #[serde(default = "default_address")]
    pub ipv4_address: Ipv4Addr,
    /// Accepted (newer Firecrackers' field): lkvm answers IMDS-style unless asked for JSON.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub imds_compat: bool,
}

fn default_address() -> Ipv4Addr {
    DEFAULT_ADDRESS
}

impl MmdsConfig {
    pub fn check(&self, nic_ids: &[&str]) -> Result<(), String> {
        // Firecracker's words, its "MMMDS" too: clients match them.
        if self.network_interfaces.is_empty() {
            return Err("MMMDS config error: The list of network interface IDs that allow forwarding MMDS requests \
                        is empty."
                .into());
        }
        if !self.network_interfaces.iter().all(|id| nic_ids.contains(&id.as_str())) {
            return Err("MMMDS config error: The list of network interface IDs provided contains at least one ID \
                        that does not correspond to any existing network interface."
                .into());
        }
        if !self.ipv4_address.is_link_local() {
            return Err("MMMDS config error: The MMDS IPv4 address is not link local.".into());
        }
        Ok(())
    }
}
