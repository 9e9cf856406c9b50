//! What the balancer host itself looks like to the datapath, read again every second by the
//! agent (and at every provision): its own addresses (`LOCAL_ADDRS`, impossible sources of
//! packets to a VIP) and its VLAN devices (`VLAN_IFACES`, for the origin check of tagged
//! replies).
//!
//! Polled with `getifaddrs(3)` and `/proc/net/vlan/config` rather than followed over netlink:
//! the agent's loop already ticks every second, a poll costs one syscall walk, and it cannot
//! miss an event or fall out of sync after a netlink buffer overrun. An address added is
//! refused as a source within a second.

use std::{fs, net::IpAddr};

use lb_common::VlanKey;
use tracing::warn;

/// The host's addresses and VLAN devices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    /// Every address on every interface (sorted, deduplicated).
    pub addrs: Vec<IpAddr>,
    /// (parent ifindex, VLAN id) → VLAN device ifindex (sorted).
    pub vlans: Vec<(VlanKey, u32)>,
}

impl Host {
    /// The host as it is now, in the calling thread's network namespace. What cannot be read
    /// is logged and left out (an address left out is not refused; a VLAN device left out
    /// makes its replies fail the origin check: closed, not open).
    pub fn read() -> Self {
        let mut addrs = addresses().unwrap_or_else(|e| {
            warn!("reading the host's addresses (getifaddrs): {e}");
            Vec::new()
        });
        addrs.sort();
        addrs.dedup();
        let mut vlans = match fs::read_to_string("/proc/net/vlan/config") {
            Ok(text) => vlan_devices(&text, &|name| ifindex(name)),
            // No VLAN device was ever made (or no 802.1Q support): none.
            Err(_) => Vec::new(),
        };
        vlans.sort();
        Self { addrs, vlans }
    }
}

/// Every address of every interface, by `getifaddrs(3)`.
fn addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it names.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: AF_INET: a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                }
                libc::AF_INET6 => {
                    // SAFETY: AF_INET6: a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// An interface's index by name (0: none).
fn ifindex(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr() as *const libc::c_char) }
}

/// The VLAN devices of `/proc/net/vlan/config` (two header lines, then `name | vid | parent`
/// per device), with `index` naming interfaces; devices whose index cannot be found are left
/// out.
fn vlan_devices(text: &str, index: &dyn Fn(&str) -> u32) -> Vec<(VlanKey, u32)> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let mut f = line.split('|').map(str::trim);
            let (name, vid, parent) = (f.next()?, f.next()?, f.next()?);
            let vid: u16 = vid.parse().ok()?;
            let (dev, parent) = (index(name), index(parent));
            (dev != 0 && parent != 0).then_some((
                VlanKey {
                    parent,
                    vid,
                    _pad: 0,
                },
                dev,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_config_is_parsed() {
        let text = "VLAN Dev name\t | VLAN ID\nName-Type: VLAN_NAME_TYPE_RAW_PLUS_VID_NO_PAD\n\
                    eth0.100       | 100  | eth0\nqinq.7 | 7 | eth0.100\nbad | x | eth0\n";
        let index = |n: &str| match n {
            "eth0" => 2,
            "eth0.100" => 5,
            "qinq.7" => 9,
            _ => 0,
        };
        let v = vlan_devices(text, &index);
        let key = |parent, vid| VlanKey {
            parent,
            vid,
            _pad: 0,
        };
        assert_eq!(v, vec![(key(2, 100), 5), (key(5, 7), 9)]);
    }

    #[test]
    fn the_loopback_address_is_ours() {
        let h = Host::read();
        assert!(h.addrs.iter().any(IpAddr::is_loopback), "{:?}", h.addrs);
    }
}
