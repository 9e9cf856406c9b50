//! Address and port rewrites, where the checksums are fixed.
//!
//! To a node: destination VIP:port → node address:port. To a client (a node's reply): source
//! node address:port → VIP:port, with no connection state: the `REVERSE` map entry says which
//! VIP. A rewrite is planned first ([`Rewrite`]), so the FIB lookup and shadow mode can see
//! where the packet would go before anything is written.
//!
//! The IPv4 header checksum and the UDP checksum (whose pseudo-header covers both addresses)
//! are updated incrementally. A zero IPv4 UDP checksum means "none" and stays zero; IPv6 UDP
//! always has one (RFC 8200 §8.1).

use aya_ebpf::programs::XdpContext;
use lb_common::{csum::CsumDelta, Counter, Node, Reverse, FAMILY_V4};
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    flow::node_serves,
    parse::{ptr_at, Packet, Udp},
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

/// A planned rewrite of one side's address and port.
pub struct Rewrite {
    pub side: Side,
    pub addr: [u32; 4],
    pub port: u16,
}

/// The packet's addressing after a rewrite (for the FIB lookup).
pub struct Addressing {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

impl Rewrite {
    /// To `node`: destination address, and port if the node's differs.
    #[inline(always)]
    pub fn to_node(pkt: &Packet, udp: &Udp, node: &Node) -> Result<Self, Counter> {
        if !node_serves(node, pkt) {
            return Err(Counter::DropCidNodeFamily);
        }
        let addr = if pkt.family == FAMILY_V4 {
            [node.addr4, 0, 0, 0]
        } else {
            node.addr6
        };
        let port = if node.port != 0 { node.port } else { udp.dport };
        Ok(Self {
            side: Side::Dst,
            addr,
            port,
        })
    }

    /// A node's reply, made to come from the VIP.
    #[inline(always)]
    pub fn to_client(rev: &Reverse) -> Self {
        Self {
            side: Side::Src,
            addr: rev.vip,
            port: rev.vip_port,
        }
    }

    #[inline(always)]
    pub fn addressing(&self, pkt: &Packet, udp: &Udp) -> Addressing {
        match self.side {
            Side::Dst => Addressing {
                src: pkt.src,
                dst: self.addr,
                sport: udp.sport,
                dport: self.port,
            },
            Side::Src => Addressing {
                src: self.addr,
                dst: pkt.dst,
                sport: self.port,
                dport: udp.dport,
            },
        }
    }

    /// Writes the rewrite into the packet and fixes the checksums. A later IP fragment (`udp`
    /// its first's ports, at offset 0: it has no UDP header) gets the address only.
    #[inline(always)]
    pub fn apply(&self, ctx: &XdpContext, pkt: &Packet, udp: &Udp) -> Result<(), Counter> {
        if udp.off == 0 {
            return crate::frag::rewrite(ctx, pkt, self.side, &self.addr);
        }
        let (side, addr, port) = (self.side, self.addr, self.port);
        let old_addr = if side == Side::Dst { pkt.dst } else { pkt.src };
        let old_port = if side == Side::Dst {
            udp.dport
        } else {
            udp.sport
        };

        let uh: *mut UdpHdr = ptr_at(ctx, udp.off).ok_or(Counter::PassTruncated)?;
        // SAFETY: ptr_at checked the whole UDP header lies inside the frame.
        unsafe {
            let check = u16::from_ne_bytes((*uh).check);
            if pkt.family == FAMILY_V4 {
                let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
                let ip_check = u16::from_ne_bytes((*ip).check);
                let new = CsumDelta::from_check(ip_check)
                    .replace32(old_addr[0], addr[0])
                    .finish();
                (*ip).check = new.to_ne_bytes();
                let bytes = addr[0].to_ne_bytes();
                match side {
                    Side::Dst => (*ip).dst_addr = bytes,
                    Side::Src => (*ip).src_addr = bytes,
                }
                if check != 0 {
                    let new = CsumDelta::from_check(check)
                        .replace32(old_addr[0], addr[0])
                        .replace16(old_port, port)
                        .finish_udp();
                    (*uh).check = new.to_ne_bytes();
                }
            } else {
                let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
                let bytes = bytes16(&addr);
                match side {
                    Side::Dst => (*ip).dst_addr = bytes,
                    Side::Src => (*ip).src_addr = bytes,
                }
                let new = CsumDelta::from_check(check)
                    .replace128(&old_addr, &addr)
                    .replace16(old_port, port)
                    .finish_udp();
                (*uh).check = new.to_ne_bytes();
            }
            match side {
                Side::Dst => (*uh).dst = port.to_ne_bytes(),
                Side::Src => (*uh).src = port.to_ne_bytes(),
            }
        }
        Ok(())
    }
}

#[inline(always)]
pub fn bytes16(w: &[u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}
