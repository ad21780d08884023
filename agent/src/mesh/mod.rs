//! The mesh: a userspace WireGuard interface (boringtun's noise protocol
//! over a TUN device and a UDP socket) joining the nodes of a cluster.

pub mod device;
pub mod tun;
