//! The mesh: a userspace WireGuard interface that links this node to the
//! other Warden nodes. Peers come from two places: the coordinator pushes
//! the full peer list (its `MeshConfig`), and an operator may drive the
//! interface with stock `wg show` / `wg set` through the cross-platform
//! userspace API (UAPI) on `/var/run/wireguard/IFNAME.sock`.
//!
//! This module is the pure core only, fed with text and peer lists and
//! answering with text, operations and decisions:
//! - [`uapi`] parses UAPI requests and renders their answers;
//! - [`peers`] is the peer table: set semantics as WireGuard applies them,
//!   cryptokey routing (longest-prefix match), roaming, and the diff that
//!   turns a pushed peer list into the fewest operations.
//!
//! The I/O comes later and stays thin: the task owning the TUN device and
//! the UDP socket (boringtun's noise protocol per peer), and the task owning
//! the UAPI socket.

pub mod peers;
pub mod uapi;
