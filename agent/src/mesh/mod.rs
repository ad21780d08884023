//! The mesh: a userspace WireGuard interface that links this node to the
//! other Warden nodes. Peers come from two places: the coordinator pushes
//! the full peer list (its `MeshConfig`), and an operator may drive the
//! interface with stock `wg show` / `wg set` through the cross-platform
//! userspace API (UAPI) on `/var/run/wireguard/IFNAME.sock`.
//!
//! The pure core, fed with text and peer lists and answering with text,
//! operations and decisions:
//! - [`uapi`] parses UAPI requests and renders their answers;
//! - [`peers`] is the peer table: set semantics as WireGuard applies them,
//!   cryptokey routing (longest-prefix match), roaming, and the diff that
//!   turns a pushed peer list into the fewest operations;
//! - [`offload`] splits the TCP super-packets the TUN hands over into
//!   packets, and joins decrypted segments back into super-packets
//!   ([`checksum`] computes what that rewrites).
//!
//! The I/O, thin around it:
//! - [`tun`] is the TUN device (with segmentation offload where allowed);
//! - [`udp`] is the UDP socket, many datagrams per syscall;
//! - [`device`] runs boringtun's noise protocol per peer between the TUN
//!   device and the UDP socket;
//! - [`ifaddr`] sets the interface's address, MTU and up flag;
//! - [`rtt`] pings peers over the mesh;
//! - [`node`] is the agent's own interface, driven by the coordinator;
//! - [`place`] puts it in a lease container's network namespace instead
//!   of the host's;
//! - [`standalone`] is an interface on its own, driven by stock `wg`.

pub mod checksum;
pub mod control;
pub mod device;
pub mod ifaddr;
pub mod key;
#[cfg(test)]
pub(crate) mod netns;
pub mod node;
pub mod offload;
pub mod peers;
pub mod place;
pub mod rtt;
pub mod standalone;
pub mod tun;
pub mod uapi;
pub mod udp;
