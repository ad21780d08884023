//! The peer table: who the mesh's peers are, and which peer each address
//! belongs to (WireGuard's cryptokey routing). Pure: the tunnel task asks it
//! where a packet goes and whether an inbound packet's source is allowed;
//! the UAPI task and the coordinator feed it operations.
//!
//! Two ways in, with two policies for an allowed IP claimed twice:
//! - [`Table::apply`] applies a UAPI set as the kernel and wireguard-go do:
//!   an allowed IP belongs to at most one peer, and adding it to a peer
//!   silently *moves* it from whichever peer had it (the loser shows up as
//!   [`Change::Updated`]).
//! - A peer list pushed by the coordinator goes through [`check_config`] /
//!   [`split_config`] first, which *report* an overlap (the same prefix, or
//!   one inside another) as an error against the later peer and leave it
//!   out, so one bad entry cannot steal another node's traffic; the peers
//!   that passed go to [`diff`], whose operations [`Table::apply`] applies.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use super::uapi::{new_net, overlaps, IpNet, Key, Op, PeerOp};

/// One peer as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its public key: its identity.
    pub public_key: Key,
    /// The preshared key mixed into handshakes, if any.
    pub preshared_key: Option<Key>,
    /// Where to send to it: configured, or learnt from its last valid
    /// packet (roaming).
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive, in seconds; 0 is off.
    pub keepalive: u16,
    /// The prefixes routed to it and accepted from it.
    pub allowed_ips: Vec<IpNet>,
}

impl Peer {
    /// A peer with nothing configured but its key.
    pub fn new(public_key: Key) -> Peer {
        Peer {
            public_key,
            preshared_key: None,
            endpoint: None,
            keepalive: 0,
            allowed_ips: Vec::new(),
        }
    }

    /// The form the table keeps: allowed IPs masked to their networks,
    /// sorted and without duplicates; an all-zero preshared key is none.
    pub fn normalized(&self) -> Peer {
        let mut ips: Vec<IpNet> = self.allowed_ips.iter().map(IpNet::trunc).collect();
        ips.sort();
        ips.dedup();
        Peer {
            public_key: self.public_key,
            preshared_key: self.preshared_key.filter(|k| *k != [0; 32]),
            endpoint: self.endpoint,
            keepalive: self.keepalive,
            allowed_ips: ips,
        }
    }
}

/// What a set did to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new peer: the tunnel task starts a session for it.
    Added(Key),
    /// An existing peer changed (keys, endpoint, keepalive or allowed IPs,
    /// including an allowed IP moved away from it); its session goes on.
    Updated(Key),
    /// A peer is gone: its session ends.
    Removed(Key),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    peer: Peer,
    /// The endpoint last set by a set request, as opposed to one learnt by
    /// roaming; [`diff`] compares against this one so that a pushed config
    /// does not undo roaming.
    configured_endpoint: Option<SocketAddr>,
}

/// The peers by public key, with an index of allowed IPs for longest-prefix
/// match.
#[derive(Debug, Clone, Default)]
pub struct Table {
    peers: BTreeMap<Key, Entry>,
    /// Masked prefix → the peer it belongs to.
    owners: HashMap<IpNet, Key>,
    /// Prefix lengths in use (with how many prefixes), per family, so a
    /// lookup tries only those, longest first.
    v4_lens: BTreeMap<u8, usize>,
    v6_lens: BTreeMap<u8, usize>,
}

impl Table {
    /// An empty table.
    pub fn new() -> Table {
        Table::default()
    }

    /// How many peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// One peer.
    pub fn get(&self, key: &Key) -> Option<&Peer> {
        self.peers.get(key).map(|e| &e.peer)
    }

    /// The peers, ordered by public key.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values().map(|e| &e.peer)
    }

    /// Apply a set request as WireGuard does, op by op, and say what changed
    /// per peer (a peer appears once per add/remove, and at most once as
    /// updated after it). Interface ops (`private_key`, `listen_port`,
    /// `fwmark`) are not the table's and are skipped. Within a peer block:
    /// `remove` removes the peer (unknown: nothing), `update_only` skips an
    /// unknown peer, an all-zero preshared key clears it, and
    /// `replace_allowed_ips` empties the list before the block's
    /// `allowed_ip`s are added; each added prefix is masked to its network
    /// and moved from any peer that had it. The caller filters out a peer
    /// whose key is the device's own (wireguard-go ignores it).
    pub fn apply(&mut self, ops: &[Op]) -> Vec<Change> {
        let mut changes = Vec::new();
        for op in ops {
            match op {
                Op::PrivateKey(_) | Op::ListenPort(_) | Op::Fwmark(_) => {}
                Op::ReplacePeers => {
                    for k in self.peers.keys() {
                        changes.push(Change::Removed(*k));
                    }
                    self.peers.clear();
                    self.owners.clear();
                    self.v4_lens.clear();
                    self.v6_lens.clear();
                }
                Op::Peer(p) => self.apply_peer(p, &mut changes),
            }
        }
        changes
    }

    fn apply_peer(&mut self, op: &PeerOp, changes: &mut Vec<Change>) {
        let k = op.public_key;
        if op.remove {
            if self.remove_peer(&k) {
                changes.push(Change::Removed(k));
            }
            return;
        }
        let before = match self.peers.get(&k) {
            Some(e) => Some(e.clone()),
            None if op.update_only => return,
            None => {
                self.peers.insert(
                    k,
                    Entry {
                        peer: Peer::new(k),
                        configured_endpoint: None,
                    },
                );
                None
            }
        };
        let Some(entry) = self.peers.get_mut(&k) else {
            return;
        };
        if let Some(psk) = op.preshared_key {
            entry.peer.preshared_key = Some(psk).filter(|k| *k != [0; 32]);
        }
        if let Some(ep) = op.endpoint {
            entry.peer.endpoint = Some(ep);
            entry.configured_endpoint = Some(ep);
        }
        if let Some(ka) = op.keepalive {
            entry.peer.keepalive = ka;
        }
        let dropped = if op.replace_allowed_ips {
            std::mem::take(&mut entry.peer.allowed_ips)
        } else {
            Vec::new()
        };
        for net in dropped {
            self.unindex(&net);
        }
        for net in &op.allowed_ips {
            self.claim(k, net.trunc(), changes);
        }
        match before {
            None => changes.push(Change::Added(k)),
            Some(b) if self.peers.get(&k) != Some(&b) => note_updated(changes, k),
            Some(_) => {}
        }
    }

    /// Give `net` (masked) to `k`, taking it from its owner if another.
    fn claim(&mut self, k: Key, net: IpNet, changes: &mut Vec<Change>) {
        match self.owners.get(&net).copied() {
            Some(owner) if owner == k => return,
            Some(owner) => {
                if let Some(e) = self.peers.get_mut(&owner) {
                    e.peer.allowed_ips.retain(|n| *n != net);
                }
                note_updated(changes, owner);
            }
            None => {
                *self
                    .lens_mut(net.addr())
                    .entry(net.prefix_len())
                    .or_insert(0) += 1
            }
        }
        self.owners.insert(net, k);
        if let Some(e) = self.peers.get_mut(&k) {
            if let Err(at) = e.peer.allowed_ips.binary_search(&net) {
                e.peer.allowed_ips.insert(at, net);
            }
        }
    }

    /// Drop `net` from the index.
    fn unindex(&mut self, net: &IpNet) {
        if self.owners.remove(net).is_none() {
            return;
        }
        let lens = self.lens_mut(net.addr());
        if let Some(n) = lens.get_mut(&net.prefix_len()) {
            *n -= 1;
            if *n == 0 {
                lens.remove(&net.prefix_len());
            }
        }
    }

    fn lens_mut(&mut self, addr: IpAddr) -> &mut BTreeMap<u8, usize> {
        match addr {
            IpAddr::V4(_) => &mut self.v4_lens,
            IpAddr::V6(_) => &mut self.v6_lens,
        }
    }

    fn remove_peer(&mut self, k: &Key) -> bool {
        let Some(e) = self.peers.remove(k) else {
            return false;
        };
        for net in &e.peer.allowed_ips {
            self.unindex(net);
        }
        true
    }

    /// Cryptokey routing: the peer whose allowed IPs hold `dst` with the
    /// longest prefix.
    pub fn lookup(&self, dst: IpAddr) -> Option<&Key> {
        let lens = match dst {
            IpAddr::V4(_) => &self.v4_lens,
            IpAddr::V6(_) => &self.v6_lens,
        };
        // The lengths in `lens` are of `dst`'s family, so `new_net` never
        // refuses one.
        lens.keys().rev().find_map(|&prefix| {
            let net = new_net(dst, prefix).ok()?.trunc();
            self.owners.get(&net)
        })
    }

    /// The inbound check: a packet decrypted from `peer` is accepted only if
    /// routing its source address would pick that same peer. This is
    /// WireGuard's rule, stricter than "inside one of its prefixes": with
    /// 10.0.0.0/24 on A and 10.0.0.5/32 on B, A may not send from 10.0.0.5.
    pub fn allowed_src(&self, peer: &Key, src: IpAddr) -> bool {
        self.lookup(src) == Some(peer)
    }

    /// Roaming: a valid packet from `peer` came from `ep`. Returns whether
    /// the endpoint changed (false for an unknown peer). The configured
    /// endpoint is kept for [`diff`].
    pub fn set_endpoint(&mut self, peer: &Key, ep: SocketAddr) -> bool {
        match self.peers.get_mut(peer) {
            Some(e) if e.peer.endpoint != Some(ep) => {
                e.peer.endpoint = Some(ep);
                true
            }
            _ => false,
        }
    }
}

/// Record `Updated(k)` unless the latest change for `k` already says it
/// is added or updated.
fn note_updated(changes: &mut Vec<Change>, k: Key) {
    let last = changes.iter().rev().find(|c| match c {
        Change::Added(x) | Change::Updated(x) | Change::Removed(x) => *x == k,
    });
    if !matches!(last, Some(Change::Added(_) | Change::Updated(_))) {
        changes.push(Change::Updated(k));
    }
}

/// The operations that turn `current` into `desired` (the coordinator's
/// full peer list, checked by [`split_config`]) and touch nothing else, so
/// unchanged peers keep their sessions:
/// - a peer no longer desired: one `remove` block;
/// - a new peer: one block with what is set;
/// - a changed peer: one `update_only` block with only the changed fields;
///   allowed IPs are only added when the list grows, and replaced
///   (`replace_allowed_ips`) when any is dropped;
/// - an unchanged peer: nothing.
///
/// Endpoints: a desired endpoint is compared with the last *configured*
/// one, so a peer that roamed keeps its learnt address until the
/// coordinator announces a different one; a desired `None` leaves the
/// endpoint as it is (UAPI cannot unset an endpoint). Removes come first,
/// then the rest by public key. A key listed twice: the last entry counts.
pub fn diff(current: &Table, desired: &[Peer]) -> Vec<Op> {
    let desired: BTreeMap<Key, Peer> = desired
        .iter()
        .map(|p| (p.public_key, p.normalized()))
        .collect();
    let mut ops = Vec::new();
    for k in current.peers.keys() {
        if !desired.contains_key(k) {
            let mut op = PeerOp::new(*k);
            op.remove = true;
            ops.push(Op::Peer(op));
        }
    }
    for (k, want) in &desired {
        let mut op = PeerOp::new(*k);
        match current.peers.get(k) {
            None => {
                op.preshared_key = want.preshared_key;
                op.endpoint = want.endpoint;
                op.keepalive = Some(want.keepalive).filter(|k| *k != 0);
                op.allowed_ips = want.allowed_ips.clone();
                ops.push(Op::Peer(op));
            }
            Some(e) => {
                op.update_only = true;
                if want.preshared_key != e.peer.preshared_key {
                    op.preshared_key = Some(want.preshared_key.unwrap_or([0; 32]));
                }
                if want.endpoint.is_some() && want.endpoint != e.configured_endpoint {
                    op.endpoint = want.endpoint;
                }
                if want.keepalive != e.peer.keepalive {
                    op.keepalive = Some(want.keepalive);
                }
                if want.allowed_ips != e.peer.allowed_ips {
                    let have = &e.peer.allowed_ips;
                    if have
                        .iter()
                        .all(|n| want.allowed_ips.binary_search(n).is_ok())
                    {
                        op.allowed_ips = want
                            .allowed_ips
                            .iter()
                            .filter(|n| have.binary_search(n).is_err())
                            .copied()
                            .collect();
                    } else {
                        op.replace_allowed_ips = true;
                        op.allowed_ips = want.allowed_ips.clone();
                    }
                }
                if op != with_key_only(*k) {
                    ops.push(Op::Peer(op));
                }
            }
        }
    }
    ops
}

fn with_key_only(k: Key) -> PeerOp {
    let mut op = PeerOp::new(k);
    op.update_only = true;
    op
}

/// Why a peer pushed by the coordinator was refused from the peer table
/// (left out of the config applied; the other peers go on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    /// The same public key appears again; the first entry is kept.
    #[error("peer {} is listed more than once; the first entry is used", hex::encode(.0))]
    DuplicatePeer(Key),
    /// One of its allowed IPs is, contains, or lies inside an allowed IP of
    /// a peer listed before it.
    #[error("allowed IP {net} overlaps {other}, already routed to peer {}", hex::encode(.owner))]
    Overlap {
        /// Its prefix.
        net: IpNet,
        /// The earlier peer's prefix.
        other: IpNet,
        /// The earlier peer.
        owner: Key,
    },
}

/// Split a pushed peer list into the peers to configure and the ones left
/// out, each with why. Peers are taken in order; a peer is left out whole
/// if its key was seen already or one of its allowed IPs overlaps (equal,
/// containing or inside) an allowed IP of a peer already accepted. Peers
/// after it are checked only against accepted peers, so one bad entry
/// costs only itself. Overlaps are found by comparing every pair of
/// prefixes: fine for the few thousand a mesh holds.
pub fn split_config(desired: &[Peer]) -> (Vec<Peer>, Vec<(Key, PeerRefusal)>) {
    let mut ok: Vec<Peer> = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashSet<Key> = HashSet::new();
    let mut taken: Vec<(IpNet, Key)> = Vec::new();
    'peers: for p in desired {
        let k = p.public_key;
        if !seen.insert(k) {
            errors.push((k, PeerRefusal::DuplicatePeer(k)));
            continue;
        }
        let p = p.normalized();
        for net in &p.allowed_ips {
            if let Some((other, owner)) = taken.iter().find(|(t, _)| overlaps(t, net)) {
                errors.push((
                    k,
                    PeerRefusal::Overlap {
                        net: *net,
                        other: *other,
                        owner: *owner,
                    },
                ));
                continue 'peers;
            }
        }
        taken.extend(p.allowed_ips.iter().map(|n| (*n, k)));
        ok.push(p);
    }
    (ok, errors)
}

/// The errors of [`split_config`]: which pushed peers are left out, and why.
pub fn check_config(desired: &[Peer]) -> Vec<(Key, PeerRefusal)> {
    split_config(desired).1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(n: u8) -> Key {
        [n; 32]
    }

    fn net(s: &str) -> IpNet {
        crate::mesh::uapi::parse_net(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn add(key: Key, ips: &[&str]) -> Op {
        let mut p = PeerOp::new(key);
        p.allowed_ips = ips.iter().map(|s| net(s)).collect();
        Op::Peer(p)
    }

    fn peer_op(key: Key, f: impl FnOnce(&mut PeerOp)) -> Op {
        let mut p = PeerOp::new(key);
        f(&mut p);
        Op::Peer(p)
    }

    fn ips(t: &Table, key: Key) -> Vec<String> {
        t.get(&key)
            .unwrap()
            .allowed_ips
            .iter()
            .map(|n| n.to_string())
            .collect()
    }

    #[test]
    fn add_creates_a_peer_with_its_fields() {
        let mut t = Table::new();
        let ch = t.apply(&[peer_op(k(1), |p| {
            p.preshared_key = Some(k(9));
            p.endpoint = Some(ep("192.0.2.1:51820"));
            p.keepalive = Some(25);
            p.allowed_ips = vec![net("10.0.0.1/32"), net("10.1.0.7/16")];
        })]);
        assert_eq!(ch, vec![Change::Added(k(1))]);
        let p = t.get(&k(1)).unwrap();
        assert_eq!(p.preshared_key, Some(k(9)));
        assert_eq!(p.endpoint, Some(ep("192.0.2.1:51820")));
        assert_eq!(p.keepalive, 25);
        // Masked to the network, sorted.
        assert_eq!(ips(&t, k(1)), vec!["10.0.0.1/32", "10.1.0.0/16"]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_bare_public_key_creates_the_peer_and_repeating_it_changes_nothing() {
        let mut t = Table::new();
        assert_eq!(t.apply(&[add(k(1), &[])]), vec![Change::Added(k(1))]);
        assert_eq!(t.apply(&[add(k(1), &[])]), vec![]);
        assert_eq!(t.get(&k(1)), Some(&Peer::new(k(1))));
    }

    #[test]
    fn update_only_skips_unknown_peers_and_updates_known_ones() {
        let mut t = Table::new();
        let ch = t.apply(&[peer_op(k(1), |p| {
            p.update_only = true;
            p.keepalive = Some(5);
        })]);
        assert!(ch.is_empty());
        assert!(t.is_empty());
        t.apply(&[add(k(1), &[])]);
        let ch = t.apply(&[peer_op(k(1), |p| {
            p.update_only = true;
            p.keepalive = Some(5);
        })]);
        assert_eq!(ch, vec![Change::Updated(k(1))]);
        assert_eq!(t.get(&k(1)).unwrap().keepalive, 5);
    }

    #[test]
    fn remove_removes_and_frees_its_allowed_ips() {
        let mut t = Table::new();
        t.apply(&[add(k(1), &["10.0.0.0/24"])]);
        let ch = t.apply(&[peer_op(k(1), |p| {
            p.remove = true;
            p.keepalive = Some(9);
        })]);
        assert_eq!(ch, vec![Change::Removed(k(1))]);
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        // Removing an unknown peer does nothing (and does not create it).
        assert!(t.apply(&[peer_op(k(2), |p| p.remove = true)]).is_empty());
        assert!(t.is_empty());
    }

    #[test]
    fn replace_peers_clears_first() {
        let mut t = Table::new();
        t.apply(&[add(k(1), &["10.0.0.1/32"]), add(k(2), &["10.0.0.2/32"])]);
        let ch = t.apply(&[Op::ReplacePeers, add(k(2), &["10.0.0.3/32"])]);
        assert_eq!(
            ch,
            vec![
                Change::Removed(k(1)),
                Change::Removed(k(2)),
                Change::Added(k(2))
            ]
        );
        assert_eq!(t.len(), 1);
        assert_eq!(ips(&t, k(2)), vec!["10.0.0.3/32"]);
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        assert_eq!(t.lookup(ip("10.0.0.2")), None);
    }

    #[test]
    fn interface_ops_do_not_touch_the_table() {
        let mut t = Table::new();
        t.apply(&[add(k(1), &[])]);
        let ch = t.apply(&[Op::PrivateKey(k(7)), Op::ListenPort(1), Op::Fwmark(2)]);
        assert!(ch.is_empty());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn allowed_ips_accumulate_unless_replaced() {
        let mut t = Table::new();
        t.apply(&[add(k(1), &["10.0.0.1/32"])]);
        t.apply(&[add(k(1), &["10.0.0.2/32", "10.0.0.1/32"])]);
        assert_eq!(ips(&t, k(1)), vec!["10.0.0.1/32", "10.0.0.2/32"]);
        let ch = t.apply(&[peer_op(k(1), |p| {
            p.replace_allowed_ips = true;
            p.allowed_ips = vec![net("10.0.0.3/32")];
        })]);
        assert_eq!(ch, vec![Change::Updated(k(1))]);
        assert_eq!(ips(&t, k(1)), vec!["10.0.0.3/32"]);
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        // Replace with nothing empties the list.
        t.apply(&[peer_op(k(1), |p| p.replace_allowed_ips = true)]);
        assert!(ips(&t, k(1)).is_empty());
        assert_eq!(t.lookup(ip("10.0.0.3")), None);
    }

    #[test]
    fn an_allowed_ip_moves_to_the_peer_that_adds_it() {
        let mut t = Table::new();
        t.apply(&[add(k(1), &["10.0.0.0/24", "10.0.1.0/24"])]);
        let ch = t.apply(&[add(k(2), &["10.0.0.7/24"])]);
        assert_eq!(ch, vec![Change::Updated(k(1)), Change::Added(k(2))]);
        assert_eq!(ips(&t, k(1)), vec!["10.0.1.0/24"]);
        assert_eq!(ips(&t, k(2)), vec!["10.0.0.0/24"]);
        assert_eq!(t.lookup(ip("10.0.0.9")), Some(&k(2)));
        // Removing the old owner does not take the moved prefix with it.
        t.apply(&[peer_op(k(1), |p| p.remove = true)]);
        assert_eq!(t.lookup(ip("10.0.0.9")), Some(&k(2)));
        assert_eq!(t.lookup(ip("10.0.1.9")), None);
    }

    #[test]
    fn preshared_key_zero_clears_it() {
        let mut t = Table::new();
        t.apply(&[peer_op(k(1), |p| p.preshared_key = Some(k(3)))]);
        assert_eq!(t.get(&k(1)).unwrap().preshared_key, Some(k(3)));
        let ch = t.apply(&[peer_op(k(1), |p| p.preshared_key = Some([0; 32]))]);
        assert_eq!(ch, vec![Change::Updated(k(1))]);
        assert_eq!(t.get(&k(1)).unwrap().preshared_key, None);
    }

    #[test]
    fn setting_the_same_values_is_no_change() {
        let mut t = Table::new();
        let full = peer_op(k(1), |p| {
            p.preshared_key = Some(k(3));
            p.endpoint = Some(ep("[fd00::1]:51820"));
            p.keepalive = Some(25);
            p.allowed_ips = vec![net("10.0.0.1/32")];
        });
        t.apply(std::slice::from_ref(&full));
        assert!(t.apply(&[full]).is_empty());
    }

    #[test]
    fn lookup_takes_the_longest_prefix_v4() {
        let mut t = Table::new();
        t.apply(&[
            add(k(1), &["0.0.0.0/0"]),
            add(k(2), &["10.0.0.0/24"]),
            add(k(3), &["10.0.0.5/32"]),
            add(k(4), &["10.0.0.0/8"]),
        ]);
        assert_eq!(t.lookup(ip("10.0.0.5")), Some(&k(3)));
        assert_eq!(t.lookup(ip("10.0.0.6")), Some(&k(2)));
        assert_eq!(t.lookup(ip("10.0.1.6")), Some(&k(4)));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&k(1)));
        // IPv4 prefixes never route IPv6.
        assert_eq!(t.lookup(ip("::1")), None);
        t.apply(&[peer_op(k(1), |p| p.remove = true)]);
        assert_eq!(t.lookup(ip("192.0.2.1")), None);
        t.apply(&[peer_op(k(3), |p| p.remove = true)]);
        assert_eq!(t.lookup(ip("10.0.0.5")), Some(&k(2)));
    }

    #[test]
    fn lookup_takes_the_longest_prefix_v6() {
        let mut t = Table::new();
        t.apply(&[
            add(k(1), &["::/0"]),
            add(k(2), &["fd00::/64"]),
            add(k(3), &["fd00::5/128"]),
        ]);
        assert_eq!(t.lookup(ip("fd00::5")), Some(&k(3)));
        assert_eq!(t.lookup(ip("fd00::6")), Some(&k(2)));
        assert_eq!(t.lookup(ip("fd00:0:0:1::5")), Some(&k(1)));
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        // An empty table routes nothing.
        assert_eq!(Table::new().lookup(ip("fd00::5")), None);
    }

    #[test]
    fn allowed_src_follows_routing() {
        let mut t = Table::new();
        t.apply(&[
            add(k(1), &["10.0.0.0/24", "fd00::/64"]),
            add(k(2), &["10.0.0.5/32"]),
        ]);
        assert!(t.allowed_src(&k(1), ip("10.0.0.4")));
        assert!(t.allowed_src(&k(1), ip("fd00::4")));
        assert!(!t.allowed_src(&k(1), ip("10.0.1.4")));
        // Inside A's /24, but routed to B: refused from A, accepted from B.
        assert!(!t.allowed_src(&k(1), ip("10.0.0.5")));
        assert!(t.allowed_src(&k(2), ip("10.0.0.5")));
        assert!(!t.allowed_src(&k(9), ip("10.0.0.4")));
    }

    #[test]
    fn roaming_updates_the_endpoint_but_not_the_configured_one() {
        let mut t = Table::new();
        t.apply(&[peer_op(k(1), |p| p.endpoint = Some(ep("192.0.2.1:1")))]);
        assert!(t.set_endpoint(&k(1), ep("198.51.100.7:2")));
        assert!(!t.set_endpoint(&k(1), ep("198.51.100.7:2")));
        assert!(!t.set_endpoint(&k(9), ep("198.51.100.7:2")));
        assert_eq!(t.get(&k(1)).unwrap().endpoint, Some(ep("198.51.100.7:2")));
        // The coordinator still says 192.0.2.1:1: no op, roaming stands.
        let mut want = Peer::new(k(1));
        want.endpoint = Some(ep("192.0.2.1:1"));
        assert!(diff(&t, &[want.clone()]).is_empty());
        // It announces a new address: that one is set.
        want.endpoint = Some(ep("192.0.2.2:1"));
        let ops = diff(&t, &[want]);
        t.apply(&ops);
        assert_eq!(t.get(&k(1)).unwrap().endpoint, Some(ep("192.0.2.2:1")));
    }

    fn full_peer(n: u8) -> Peer {
        Peer {
            public_key: k(n),
            preshared_key: Some(k(100 + n)),
            endpoint: Some(ep(&format!("192.0.2.{n}:51820"))),
            keepalive: 25,
            allowed_ips: vec![net(&format!("10.0.{n}.0/24"))],
        }
    }

    fn table_of(peers: &[Peer]) -> Table {
        let mut t = Table::new();
        t.apply(&diff(&t, peers));
        t
    }

    #[test]
    fn diff_from_empty_adds_everything() {
        let want = [full_peer(1), full_peer(2)];
        let t = table_of(&want);
        assert_eq!(t.peers().cloned().collect::<Vec<_>>(), want.to_vec());
    }

    #[test]
    fn diff_of_unchanged_peers_is_empty() {
        let want = [full_peer(1), full_peer(2)];
        let t = table_of(&want);
        assert!(diff(&t, &want).is_empty());
        // Host bits and order in the pushed list do not matter.
        let mut shuffled = [full_peer(2), full_peer(1)];
        shuffled[0].allowed_ips = vec![net("10.0.2.9/24")];
        assert!(diff(&t, &shuffled).is_empty());
    }

    #[test]
    fn diff_of_a_changed_endpoint_is_one_update_only_op() {
        let t = table_of(&[full_peer(1), full_peer(2)]);
        let mut moved = full_peer(2);
        moved.endpoint = Some(ep("203.0.113.9:4000"));
        let ops = diff(&t, &[full_peer(1), moved]);
        let mut expected = PeerOp::new(k(2));
        expected.update_only = true;
        expected.endpoint = Some(ep("203.0.113.9:4000"));
        assert_eq!(ops, vec![Op::Peer(expected)]);
    }

    #[test]
    fn diff_of_a_removed_peer_is_a_remove_op() {
        let t = table_of(&[full_peer(1), full_peer(2)]);
        let ops = diff(&t, &[full_peer(1)]);
        let mut expected = PeerOp::new(k(2));
        expected.remove = true;
        assert_eq!(ops, vec![Op::Peer(expected)]);
    }

    #[test]
    fn diff_changes_only_what_changed() {
        let t = table_of(&[full_peer(1)]);
        let mut want = full_peer(1);
        want.preshared_key = None;
        want.keepalive = 0;
        want.allowed_ips.push(net("10.9.0.0/16"));
        let ops = diff(&t, &[want.clone()]);
        let mut expected = PeerOp::new(k(1));
        expected.update_only = true;
        expected.preshared_key = Some([0; 32]);
        expected.keepalive = Some(0);
        // Growing the list adds only the new prefix, without a replace.
        expected.allowed_ips = vec![net("10.9.0.0/16")];
        assert_eq!(ops, vec![Op::Peer(expected)]);
        // Dropping one replaces the list.
        let t = table_of(&[want]);
        let ops = diff(&t, &[full_peer(1)]);
        let mut expected = PeerOp::new(k(1));
        expected.update_only = true;
        expected.preshared_key = Some(k(101));
        expected.keepalive = Some(25);
        expected.replace_allowed_ips = true;
        expected.allowed_ips = vec![net("10.0.1.0/24")];
        assert_eq!(ops, vec![Op::Peer(expected)]);
    }

    #[test]
    fn diff_without_an_endpoint_keeps_the_known_one() {
        let t = table_of(&[full_peer(1)]);
        let mut want = full_peer(1);
        want.endpoint = None;
        assert!(diff(&t, &[want]).is_empty());
    }

    #[test]
    fn diff_applied_reports_changes_per_peer() {
        let mut t = table_of(&[full_peer(1), full_peer(2)]);
        let mut two = full_peer(2);
        two.keepalive = 5;
        let ops = diff(&t, &[two, full_peer(3)]);
        let ch = t.apply(&ops);
        assert_eq!(
            ch,
            vec![
                Change::Removed(k(1)),
                Change::Updated(k(2)),
                Change::Added(k(3))
            ]
        );
    }

    #[test]
    fn diff_moves_a_prefix_between_peers() {
        let mut t = table_of(&[full_peer(1), full_peer(2)]);
        let one = Peer {
            allowed_ips: vec![],
            ..full_peer(1)
        };
        let two = Peer {
            allowed_ips: vec![net("10.0.1.0/24"), net("10.0.2.0/24")],
            ..full_peer(2)
        };
        let want = [one, two];
        assert!(check_config(&want).is_empty());
        t.apply(&diff(&t, &want));
        assert_eq!(t.peers().cloned().collect::<Vec<_>>(), want.to_vec());
        assert_eq!(t.lookup(ip("10.0.1.1")), Some(&k(2)));
    }

    #[test]
    fn check_config_reports_overlaps_against_the_later_peer() {
        let a = full_peer(1); // 10.0.1.0/24
        let same = Peer {
            allowed_ips: vec![net("10.0.1.0/24")],
            ..full_peer(2)
        };
        let inside = Peer {
            allowed_ips: vec![net("10.0.3.0/24"), net("10.0.1.5/32")],
            ..full_peer(3)
        };
        let around = Peer {
            allowed_ips: vec![net("10.0.0.0/16")],
            ..full_peer(4)
        };
        let fine = full_peer(5);
        let v6 = Peer {
            allowed_ips: vec![net("::/0")],
            ..full_peer(6)
        };
        let (ok, errors) =
            split_config(&[a.clone(), same, inside, around, fine.clone(), v6.clone()]);
        assert_eq!(ok, vec![a, fine, v6]);
        assert_eq!(
            errors,
            vec![
                (
                    k(2),
                    PeerRefusal::Overlap {
                        net: net("10.0.1.0/24"),
                        other: net("10.0.1.0/24"),
                        owner: k(1)
                    }
                ),
                (
                    k(3),
                    PeerRefusal::Overlap {
                        net: net("10.0.1.5/32"),
                        other: net("10.0.1.0/24"),
                        owner: k(1)
                    }
                ),
                (
                    k(4),
                    PeerRefusal::Overlap {
                        net: net("10.0.0.0/16"),
                        other: net("10.0.1.0/24"),
                        owner: k(1)
                    }
                ),
            ]
        );
        // 10.0.3.0/24 of the refused peer 3 is not held against anyone.
        let later = Peer {
            allowed_ips: vec![net("10.0.3.0/24")],
            ..full_peer(7)
        };
        let (ok, _) = split_config(&[full_peer(1), errors_peer(), later.clone()]);
        assert!(ok.contains(&later));
        let msg = errors[0].1.to_string();
        assert!(
            msg.contains("10.0.1.0/24") && msg.contains(&hex::encode(k(1))),
            "{msg}"
        );
    }

    fn errors_peer() -> Peer {
        Peer {
            allowed_ips: vec![net("10.0.3.0/24"), net("10.0.1.5/32")],
            ..full_peer(3)
        }
    }

    #[test]
    fn check_config_reports_duplicate_keys() {
        let again = Peer {
            allowed_ips: vec![net("10.9.0.0/24")],
            ..full_peer(1)
        };
        let (ok, errors) = split_config(&[full_peer(1), again]);
        assert_eq!(ok, vec![full_peer(1)]);
        assert_eq!(errors, vec![(k(1), PeerRefusal::DuplicatePeer(k(1)))]);
        // A peer's own prefixes may nest.
        let nested = Peer {
            allowed_ips: vec![net("10.0.0.0/8"), net("10.0.0.1/32")],
            ..full_peer(2)
        };
        assert!(check_config(&[nested]).is_empty());
    }

    fn arb_peer() -> impl Strategy<Value = Peer> {
        let nets = proptest::collection::vec(
            prop_oneof![
                (0u8..4, prop_oneof![Just(8u8), Just(16), Just(24), Just(32)])
                    .prop_map(|(b, p)| new_net(IpAddr::from([10, b, b, 1]), p).unwrap()),
                (0u16..4, prop_oneof![Just(0u8), Just(64), Just(128)]).prop_map(|(b, p)| {
                    new_net(IpAddr::from([0xfd00, b, 0, 0, 0, 0, 0, 1]), p).unwrap()
                }),
            ],
            0..3,
        );
        (
            0u8..6,
            proptest::option::of(0u8..3),
            proptest::option::of(0u16..3),
            0u16..3,
            nets,
        )
            .prop_map(|(key, psk, port, ka, nets)| Peer {
                public_key: k(key),
                preshared_key: psk.map(k),
                endpoint: port.map(|p| SocketAddr::from(([192, 0, 2, 1], p))),
                keepalive: ka,
                allowed_ips: nets,
            })
    }

    fn arb_peer_op() -> impl Strategy<Value = Op> {
        (arb_peer(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(p, remove, update_only, replace)| {
                Op::Peer(PeerOp {
                    public_key: p.public_key,
                    remove,
                    update_only,
                    preshared_key: p.preshared_key,
                    endpoint: p.endpoint,
                    keepalive: Some(p.keepalive),
                    replace_allowed_ips: replace,
                    allowed_ips: p.allowed_ips,
                })
            },
        )
    }

    /// The index agrees with the peers' lists: every prefix routes to the
    /// one peer that lists it, and no prefix is listed twice.
    fn assert_consistent(t: &Table) {
        let mut listed = 0;
        for p in t.peers() {
            for n in &p.allowed_ips {
                listed += 1;
                assert_eq!(t.owners.get(n), Some(&p.public_key));
            }
        }
        assert_eq!(listed, t.owners.len());
        let lens: usize = t.v4_lens.values().chain(t.v6_lens.values()).sum();
        assert_eq!(lens, t.owners.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// From any table reached by UAPI sets, applying the diff to a
        /// checked pushed list gives exactly that list (endpoints the list
        /// leaves unset excepted: UAPI cannot unset them), and diffing again
        /// gives nothing.
        #[test]
        fn apply_diff_reaches_desired(
            start in proptest::collection::vec(arb_peer_op(), 0..8),
            pushed in proptest::collection::vec(arb_peer(), 0..6),
        ) {
            let mut t = Table::new();
            t.apply(&start);
            assert_consistent(&t);
            let (desired, _) = split_config(&pushed);
            let before = t.clone();
            t.apply(&diff(&t, &desired));
            assert_consistent(&t);
            let mut want: Vec<Peer> = desired.clone();
            want.sort_by_key(|p| p.public_key);
            let got: Vec<Peer> = t.peers().cloned().collect();
            prop_assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                let mut w = w.clone();
                if w.endpoint.is_none() {
                    w.endpoint = before.get(&w.public_key).and_then(|p| p.endpoint);
                }
                prop_assert_eq!(g, &w);
            }
            prop_assert!(diff(&t, &desired).is_empty());
        }

        /// Lookup agrees with a brute-force longest-prefix match.
        #[test]
        fn lookup_is_longest_prefix_match(
            ops in proptest::collection::vec(arb_peer_op(), 0..10),
            probe in prop_oneof![
                (0u8..4, 0u8..3).prop_map(|(b, c)| IpAddr::from([10, b, b, c])),
                (0u16..4, 0u16..3).prop_map(|(b, c)| IpAddr::from([0xfd00, b, 0, 0, 0, 0, 0, c])),
            ],
        ) {
            let mut t = Table::new();
            t.apply(&ops);
            assert_consistent(&t);
            let best = t
                .peers()
                .flat_map(|p| p.allowed_ips.iter().map(move |n| (n, p.public_key)))
                .filter(|(n, _)| n.contains(&probe))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, k)| k);
            prop_assert_eq!(t.lookup(probe).copied(), best);
        }
    }
}
