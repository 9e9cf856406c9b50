//! The plan: pure functions from a validated config (and the nodes' health, and the indices
//! the maps hold now) to the exact contents of the datapath's maps. No kernel here, so unit
//! tests reach all of it; `provision.rs` writes a plan into the maps.

pub mod indices;
pub mod limits;
pub mod maglev;
pub mod nodes;
pub mod reverse;
pub mod sources;
pub mod vips;
