//! IP fragments (docs/datapath.md "What the datapath does", step 1): the first fragment is balanced or
//! un-NATed like any datagram and recorded under (source, destination, identification,
//! family) with its ports, direction and (to a VIP) node; a later fragment takes its first's
//! ports for the UDP header it lacks. No eviction is modelled (the caller keeps `FRAGS` far
//! from full).

use lb_common::frag::{FragKey, FragRoute, FRAG_FROM_NODE, FRAG_TO_VIP};

use crate::{
    parse::{Packet, Udp, FRAG_LATER},
    State,
};

pub fn key(pkt: &Packet) -> FragKey {
    FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id: pkt.frag_id,
        family: pkt.family,
        _pad: [0; 3],
    }
}

/// A later fragment's stand-in UDP header (offset 0) and its `frag` with the first's
/// direction, or zeros and `FRAG_LATER` with no first recorded.
pub fn first(state: &State, pkt: &Packet) -> (Udp, u8, Option<FragRoute>) {
    let none = Udp {
        off: 0,
        sport: 0,
        dport: 0,
        len: 0,
    };
    match state.frags.get(&key(pkt)) {
        Some(r) if r.dir == FRAG_TO_VIP || r.dir == FRAG_FROM_NODE => (
            Udp {
                off: 0,
                sport: r.sport,
                dport: r.dport,
                len: 0,
            },
            FRAG_LATER + r.dir,
            Some(*r),
        ),
        _ => (none, FRAG_LATER, None),
    }
}

/// Records a first fragment.
pub fn record(state: &mut State, pkt: &Packet, udp: &Udp, dir: u8, node_id: u32) {
    state.frags.insert(
        key(pkt),
        FragRoute {
            node_id,
            sport: udp.sport,
            dport: udp.dport,
            dir,
            _pad: [0; 3],
        },
    );
}
