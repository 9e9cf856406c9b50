//! `cidlb node`'s file: how a node of a tunnel VIP is set up (docs/forwarding.md, "Tunnel mode nodes"). Apart
//! from the balancer's config: a node runs no balancer.
//!
//! ```yaml
//! interface: eth0                                       # where tunnelled packets arrive
//! tunnel_addresses: [203.0.113.11, "2001:db8:1::11"]    # this node in the balancers' nodes[]
//! vips: [192.0.2.10, "2001:db8:ffff::10"]               # put on lo; the DTLS server binds them
//! gue_port: 6080                                        # the balancers' vips[].tunnel.gue_port
//! xdp_mode: auto
//! pin_dir: /sys/fs/bpf/cidlb-node
//! ```

use std::{
    collections::HashSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{ConfigError, XdpModeCfg};

/// Where `cidlb node` pins its program, link and maps unless `pin_dir` says otherwise.
pub const DEFAULT_NODE_PIN_DIR: &str = "/sys/fs/bpf/cidlb-node";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub interface: String,
    pub tunnel_addresses: Vec<IpAddr>,
    pub vips: Vec<IpAddr>,
    #[serde(default)]
    pub gue_port: Option<u16>,
    #[serde(default)]
    pub xdp_mode: XdpModeCfg,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_NODE_PIN_DIR)
}

impl NodeConfig {
    /// Reads and checks `file`; errors name the file, the key and the problem.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Read {
            file: file.to_owned(),
            source: e,
        })?;
        Self::parse(&text, file)
    }

    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        cfg.check().map_err(|(key, problem)| ConfigError::Invalid {
            file: file.to_owned(),
            key,
            problem,
        })?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), (String, String)> {
        let err = |k: &str, p: &str| Err((k.to_owned(), p.to_owned()));
        if self.interface.is_empty() || self.interface.len() > 15 || self.interface.contains('/') {
            return err("interface", "not a valid interface name");
        }
        if self.tunnel_addresses.is_empty() {
            return err(
                "tunnel_addresses",
                "list the node's addresses the balancers tunnel to (its nodes[].address there)",
            );
        }
        if self.vips.is_empty() {
            return err("vips", "list the VIPs this node serves in tunnel mode");
        }
        for (key, list) in [
            ("tunnel_addresses", &self.tunnel_addresses),
            ("vips", &self.vips),
        ] {
            let mut seen = HashSet::new();
            for (i, a) in list.iter().enumerate() {
                if !seen.insert(a) {
                    return Err((format!("{key}[{i}]"), format!("{a} is listed twice")));
                }
            }
        }
        if let Some((i, a)) = self
            .vips
            .iter()
            .enumerate()
            .find(|(_, v)| self.tunnel_addresses.contains(v))
        {
            return Err((
                format!("vips[{i}]"),
                format!("{a} is also a tunnel address: a VIP is not the node's own address"),
            ));
        }
        if self.gue_port == Some(0) {
            return err("gue_port", "0 is no port; leave it out for IPIP only");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "interface: eth0\ntunnel_addresses: [203.0.113.11]\nvips: [192.0.2.10]\n";

    #[test]
    fn node_files_parse_and_errors_name_the_key() {
        let c = NodeConfig::parse(GOOD, Path::new("node.yaml")).unwrap();
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_NODE_PIN_DIR));
        for (text, want) in [
            (GOOD.replace("[203.0.113.11]", "[]"), "tunnel_addresses"),
            (GOOD.replace("[192.0.2.10]", "[203.0.113.11]"), "vips[0]"),
            (GOOD.replace("eth0", "a/b"), "interface"),
            (format!("{GOOD}gue_port: 0\n"), "gue_port"),
            (format!("{GOOD}vxlan: 1\n"), "unknown field"),
        ] {
            let e = NodeConfig::parse(&text, Path::new("node.yaml"))
                .expect_err(&text)
                .to_string();
            assert!(e.contains(want) && e.contains("node.yaml"), "{text}: {e}");
        }
    }
}
