//! TCP segmentation offload done by the mesh itself, so that the kernel
//! hands the TUN device 64 KiB TCP super-packets and takes them back,
//! instead of one syscall per 1.4 KB packet. Pure: bytes in, bytes out.
//!
//! - Outbound, a packet read from a TUN opened with `IFF_VNET_HDR` starts
//!   with a virtio-net header ([`VnetHdr`]). [`split`] cuts a TCP
//!   super-packet into packets of the segment size the kernel asks for
//!   (the TCP stack's MSS, so each fits the interface MTU), rewriting the
//!   IP and TCP headers and computing the checksums, or finishes the
//!   checksum the kernel left partial on a plain packet.
//! - Inbound, [`Gro`] joins decrypted in-order TCP segments of one flow
//!   into a super-packet written with a GSO virtio-net header, as the
//!   kernel's GRO does for a NIC: same addresses, ports, ACK, window,
//!   options and IP fields; a segment with PSH ends one; a short segment
//!   ends one; every joined segment's checksum is checked first (the
//!   kernel will trust the joined packet's).

use std::ops::Range;

use super::checksum::{addresses, checksum, fold, pseudo_header, transport_valid};

/// Size of `struct virtio_net_hdr` (the TUN's default `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start +
/// csum_offset` holds only the pseudo-header sum; whoever gets the packet
/// finishes it.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN`, a flag on the GSO type.
pub const GSO_ECN: u8 = 0x80;

const TCP: u8 = 6;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const CWR: u8 = 0x80;

/// Most bytes of IP and TCP headers a super-packet may carry (IPv6
/// extension headers included).
const MAX_HEADERS: usize = 256;

/// Most segments joined into one super-packet (the kernel's default
/// `gso_max_segs` for TCP is 64 per skb).
pub const MAX_SEGMENTS: usize = 64;

/// How many of the batch's latest flows a packet is matched against.
const FLOWS_SEARCHED: usize = 8;

/// Largest IP packet: the length fields are 16 bits.
const MAX_PACKET: usize = 65_535;

/// `struct virtio_net_hdr`, in the host's byte order (the TUN's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The header at the start of `b`.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            (2, self.hdr_len),
            (4, self.gso_size),
            (6, self.csum_start),
            (8, self.csum_offset),
        ] {
            b[i..i + 2].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// Why a packet read from the TUN could not be turned into packets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("checksum at {start}+{offset} lies outside a packet of {len} bytes")]
    ChecksumOutside { start: u16, offset: u16, len: usize },
    #[error("GSO type {0:#x} was not offered to the TUN")]
    UnsupportedGso(u8),
    #[error("TCP super-packet: {0}")]
    BadTcp(&'static str),
}

/// Turns one packet read from the TUN (after its virtio-net header `hdr`)
/// into the packets to encrypt, handing each to `each` in order; returns
/// how many. Works in place: segment `i`'s headers are written over the
/// end of segment `i - 1`'s payload once `each` has had it.
pub fn split(
    hdr: &VnetHdr,
    packet: &mut [u8],
    mut each: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                finish_checksum(hdr, packet)?;
            }
            each(packet);
            Ok(1)
        }
        GSO_TCPV4 => split_tcp(hdr, packet, false, each),
        GSO_TCPV6 => split_tcp(hdr, packet, true, each),
        other => Err(OffloadError::UnsupportedGso(other)),
    }
}

/// Completes a partial checksum: the field holds the pseudo-header sum,
/// the rest is summed from `csum_start` to the end.
fn finish_checksum(hdr: &VnetHdr, packet: &mut [u8]) -> Result<(), OffloadError> {
    let (start, at) = (
        usize::from(hdr.csum_start),
        usize::from(hdr.csum_start) + usize::from(hdr.csum_offset),
    );
    if at + 2 > packet.len() {
        return Err(OffloadError::ChecksumOutside {
            start: hdr.csum_start,
            offset: hdr.csum_offset,
            len: packet.len(),
        });
    }
    let mut c = checksum(&packet[start..], 0);
    // UDP (its checksum is at offset 6) sends a computed zero as all ones.
    if c == 0 && hdr.csum_offset == 6 {
        c = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

fn split_tcp(
    hdr: &VnetHdr,
    packet: &mut [u8],
    v6: bool,
    mut each: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    use OffloadError::BadTcp;
    let len = packet.len();
    let version = if v6 { 6 } else { 4 };
    if packet.first().map(|b| b >> 4) != Some(version) {
        return Err(BadTcp("the IP version is not the GSO type's"));
    }
    // The kernel's hdr_len may span the whole linear part, payload too:
    // the headers' length comes from the headers themselves. The TCP
    // header starts where the partial checksum does; a super-packet whose
    // checksum was already checked (DATA_VALID) may not say, and then it
    // follows a plain IP header.
    let iph = if hdr.flags & F_NEEDS_CSUM != 0 {
        if hdr.csum_offset != 16 {
            return Err(BadTcp("the checksum offset is not TCP's"));
        }
        usize::from(hdr.csum_start)
    } else if v6 {
        match packet.get(6) {
            Some(&TCP) => 40,
            _ => return Err(BadTcp("IPv6 extension headers and no checksum start")),
        }
    } else {
        match packet.get(9) {
            Some(&TCP) => usize::from(packet[0] & 0x0f) * 4,
            _ => return Err(BadTcp("not TCP")),
        }
    };
    if iph < if v6 { 40 } else { 20 } || iph + 20 > len {
        return Err(BadTcp("the TCP header lies outside the packet"));
    }
    let headers = iph + usize::from(packet[iph + 12] >> 4) * 4;
    if headers < iph + 20 || headers > len || headers > MAX_HEADERS {
        return Err(BadTcp("bad TCP header length"));
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(BadTcp("zero segment size"));
    }
    let mut h = [0u8; MAX_HEADERS];
    h[..headers].copy_from_slice(&packet[..headers]);
    let addr_sum = {
        let (src, dst) = addresses(&h[..headers]).ok_or(BadTcp("no addresses"))?;
        pseudo_header(src, dst, TCP, 0)
    };
    let seq0 = u32::from_be_bytes([h[iph + 4], h[iph + 5], h[iph + 6], h[iph + 7]]);
    let id0 = u16::from_be_bytes([h[4], h[5]]);
    let flags0 = h[iph + 13];
    let payload = len - headers;
    let n = payload.div_ceil(mss).max(1);
    for i in 0..n {
        let start = headers + i * mss;
        let end = (start + mss).min(len);
        let seg = &mut packet[start - headers..end];
        let total = seg.len();
        seg[..headers].copy_from_slice(&h[..headers]);
        if v6 {
            seg[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(&seg[..iph], 0);
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[iph + 4..iph + 8].copy_from_slice(&seq.to_be_bytes());
        // As the kernel segments: FIN and PSH stay on the last segment, CWR on the first.
        let mut flags = flags0;
        if i + 1 < n {
            flags &= !(FIN | PSH);
        }
        if i > 0 {
            flags &= !CWR;
        }
        seg[iph + 13] = flags;
        seg[iph + 16..iph + 18].copy_from_slice(&[0, 0]);
        let c = checksum(&seg[iph..], addr_sum + (total - iph) as u64);
        seg[iph + 16..iph + 18].copy_from_slice(&c.to_be_bytes());
        each(seg);
    }
    Ok(n)
}

/// A TCP packet that may be joined with others.
struct Segment {
    iph: usize,
    headers: usize,
    seq: u32,
    flags: u8,
    payload: usize,
    v6: bool,
}

/// The key of a TCP flow: addresses and ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    v6: bool,
    addrs: [u8; 32],
    ports: [u8; 4],
}

/// A TCP packet's flow, if it is a TCP packet with no IPv4 options, no
/// fragmentation and no IPv6 extension headers; and whether its shape lets
/// it be joined (only ACK, or ACK with PSH; some payload; lengths agree).
fn parse_tcp(p: &[u8]) -> Option<(Flow, Option<Segment>)> {
    let (v6, iph) = match p.first()? >> 4 {
        4 if p.len() >= 40 && p[0] & 0x0f == 5 && p[9] == TCP => (false, 20),
        6 if p.len() >= 60 && p[6] == TCP => (true, 40),
        _ => return None,
    };
    let mut flow = Flow {
        v6,
        addrs: [0; 32],
        ports: [p[iph], p[iph + 1], p[iph + 2], p[iph + 3]],
    };
    if v6 {
        flow.addrs.copy_from_slice(&p[8..40]);
    } else {
        // Fragments (MF or an offset) are not joined, nor keyed: leave them be.
        if p[6] & 0x3f != 0 || p[7] != 0 {
            return None;
        }
        flow.addrs[..8].copy_from_slice(&p[12..20]);
    }
    let ip_len = if v6 {
        usize::from(u16::from_be_bytes([p[4], p[5]])) + 40
    } else {
        usize::from(u16::from_be_bytes([p[2], p[3]]))
    };
    let headers = iph + usize::from(p[iph + 12] >> 4) * 4;
    let flags = p[iph + 13];
    let joinable = ip_len == p.len()
        && headers >= iph + 20
        && headers < p.len()
        && (flags == ACK || flags == ACK | PSH);
    let seg = joinable.then(|| Segment {
        iph,
        headers,
        seq: u32::from_be_bytes([p[iph + 4], p[iph + 5], p[iph + 6], p[iph + 7]]),
        flags,
        payload: p.len() - headers,
        v6,
    });
    Some((flow, seg))
}

const NONE: u32 = u32::MAX;

/// One packet or super-packet to write.
#[derive(Debug, Clone)]
struct Item {
    /// The packet whose headers lead, then the chain through `Gro::next`.
    head: u32,
    tail: u32,
    segments: usize,
    /// Joinable: the segment shape of the head (zero `headers`: not).
    iph: usize,
    headers: usize,
    v6: bool,
    gso_size: usize,
    /// The whole super-packet's length so far.
    len: usize,
    next_seq: u32,
    psh: bool,
    /// A segment shorter than `gso_size` was appended: nothing may follow.
    short: bool,
    head_checked: bool,
}

/// Userspace GRO for one batch of decrypted packets (see the module
/// docs). Keeps its storage from batch to batch.
#[derive(Debug, Default)]
pub struct Gro {
    items: Vec<Item>,
    /// Per packet of the batch, the next packet of its item's chain.
    next: Vec<u32>,
    /// Each flow's latest item: only it may grow, so a flow's packets keep
    /// their order.
    flows: Vec<(Flow, u32)>,
}

impl Gro {
    /// An empty coalescer.
    pub fn new() -> Gro {
        Gro::default()
    }

    /// Joins what can be joined among `packets` (spans of `arena`, in the
    /// order they arrived), rewriting the leading packets' headers in
    /// place. Then [`Gro::len`] items are to be written, each as
    /// [`Gro::header`] followed by the bytes of [`Gro::parts`].
    pub fn coalesce(&mut self, arena: &mut [u8], packets: &[Range<usize>]) {
        self.items.clear();
        self.flows.clear();
        self.next.clear();
        self.next.resize(packets.len(), NONE);
        for (i, span) in packets.iter().enumerate() {
            let p = &arena[span.clone()];
            let Some((flow, seg)) = parse_tcp(p) else {
                self.items.push(Item::single(i, p.len()));
                continue;
            };
            // Only the most recent flows are searched, so a batch of many
            // interleaved flows costs no more per packet; a flow seen again
            // after that starts a new item (joined less, never reordered).
            let recent = self.flows.len().saturating_sub(FLOWS_SEARCHED);
            let latest = self.flows[recent..]
                .iter()
                .rposition(|(f, _)| *f == flow)
                .map(|at| (recent + at, self.flows[recent + at].1 as usize));
            if let (Some((_, it)), Some(seg)) = (latest, &seg) {
                if self.append(arena, packets, it, i, seg) {
                    continue;
                }
            }
            let item = match &seg {
                Some(seg) => Item::joinable(i, p.len(), seg),
                None => Item::single(i, p.len()),
            };
            self.items.push(item);
            let index = (self.items.len() - 1) as u32;
            match latest {
                Some((at, _)) => self.flows[at].1 = index,
                None => self.flows.push((flow, index)),
            }
        }
        for it in &self.items {
            if it.segments > 1 {
                let head = packets[it.head as usize].clone();
                it.rewrite_head(&mut arena[head]);
            }
        }
    }

    /// Appends packet `i` to item `it` if it continues it.
    fn append(
        &mut self,
        arena: &[u8],
        packets: &[Range<usize>],
        it: usize,
        i: usize,
        seg: &Segment,
    ) -> bool {
        let item = &self.items[it];
        if item.headers == 0
            || item.short
            || item.psh
            || item.segments >= MAX_SEGMENTS
            || seg.v6 != item.v6
            || seg.iph != item.iph
            || seg.headers != item.headers
            || seg.seq != item.next_seq
            || seg.payload > item.gso_size
            || item.len + seg.payload > MAX_PACKET
        {
            return false;
        }
        let head = &arena[packets[item.head as usize].clone()];
        let p = &arena[packets[i].clone()];
        if !same_headers(head, p, seg) {
            return false;
        }
        if !item.head_checked {
            let ok = transport_valid(head, item.iph, TCP);
            let item = &mut self.items[it];
            item.head_checked = true;
            if !ok {
                item.headers = 0; // it goes out alone, as it came
                return false;
            }
        }
        if !transport_valid(p, seg.iph, TCP) {
            return false;
        }
        let item = &mut self.items[it];
        self.next[item.tail as usize] = i as u32;
        item.tail = i as u32;
        item.segments += 1;
        item.len += seg.payload;
        item.next_seq = item.next_seq.wrapping_add(seg.payload as u32);
        item.short = seg.payload < item.gso_size;
        item.psh = seg.flags & PSH != 0;
        true
    }

    /// How many packets to write.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The virtio-net header of item `n`: GSO for a joined one (its TCP
    /// checksum left partial, as the kernel's GRO leaves it), none for a
    /// packet written as it came.
    pub fn header(&self, n: usize) -> VnetHdr {
        let it = &self.items[n];
        if it.segments < 2 {
            return VnetHdr::default();
        }
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if it.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: it.headers as u16,
            gso_size: it.gso_size as u16,
            csum_start: it.iph as u16,
            csum_offset: 16,
        }
    }

    /// The spans of `arena` making item `n`: the leading packet whole,
    /// then the payload of each joined one.
    pub fn parts<'a>(
        &'a self,
        n: usize,
        packets: &'a [Range<usize>],
    ) -> impl Iterator<Item = Range<usize>> + 'a {
        let it = &self.items[n];
        let mut at = it.head;
        let mut first = true;
        std::iter::from_fn(move || {
            if at == NONE {
                return None;
            }
            let span = packets[at as usize].clone();
            at = self.next[at as usize];
            if std::mem::take(&mut first) {
                Some(span)
            } else {
                Some(span.start + it.headers..span.end)
            }
        })
    }

    /// How many packets item `n` joins.
    pub fn segments(&self, n: usize) -> usize {
        self.items[n].segments
    }
}

/// Whether `p` may follow `head` in one super-packet: the IP fields that
/// must not change (IPv4 TOS, DF, TTL; IPv6 class, label, hop limit) and
/// the TCP ACK, flags but PSH, window and options are the same.
fn same_headers(head: &[u8], p: &[u8], seg: &Segment) -> bool {
    let ip_same = if seg.v6 {
        head[..4] == p[..4] && head[7] == p[7]
    } else {
        head[1] == p[1] && head[6] == p[6] && head[8] == p[8]
    };
    let t = seg.iph;
    ip_same
        && head[t + 8..t + 13] == p[t + 8..t + 13]
        && head[t + 13] & !PSH == p[t + 13] & !PSH
        && head[t + 14..t + 16] == p[t + 14..t + 16]
        && head[t + 20..seg.headers] == p[t + 20..seg.headers]
}

impl Item {
    fn single(i: usize, len: usize) -> Item {
        Item {
            head: i as u32,
            tail: i as u32,
            segments: 1,
            iph: 0,
            headers: 0,
            v6: false,
            gso_size: 0,
            len,
            next_seq: 0,
            psh: false,
            short: false,
            head_checked: false,
        }
    }

    fn joinable(i: usize, len: usize, seg: &Segment) -> Item {
        Item {
            iph: seg.iph,
            headers: seg.headers,
            v6: seg.v6,
            gso_size: seg.payload,
            next_seq: seg.seq.wrapping_add(seg.payload as u32),
            psh: seg.flags & PSH != 0,
            ..Item::single(i, len)
        }
    }

    /// The leading packet's headers for the whole super-packet: lengths,
    /// the IPv4 header checksum, PSH if the last segment had it, and the
    /// TCP checksum left as the pseudo-header sum for the kernel to finish.
    fn rewrite_head(&self, p: &mut [u8]) {
        let t = self.iph;
        if self.v6 {
            p[4..6].copy_from_slice(&((self.len - 40) as u16).to_be_bytes());
        } else {
            p[2..4].copy_from_slice(&(self.len as u16).to_be_bytes());
            p[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(&p[..20], 0);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        if self.psh {
            p[t + 13] |= PSH;
        }
        let partial = match addresses(p) {
            Some((src, dst)) => fold(pseudo_header(src, dst, TCP, (self.len - t) as u32)),
            None => 0,
        };
        p[t + 16..t + 18].copy_from_slice(&partial.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::mesh::checksum::sum;

    const V4_SRC: [u8; 4] = [10, 1, 0, 1];
    const V4_DST: [u8; 4] = [10, 1, 0, 2];
    const V6_SRC: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const V6_DST: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    /// A TCP packet with correct checksums; `options` bytes of TCP options
    /// (a multiple of 4).
    fn tcp(v6: bool, seq: u32, flags: u8, payload: &[u8], options: usize) -> Vec<u8> {
        let iph = if v6 { 40 } else { 20 };
        let th = 20 + options;
        let total = iph + th + payload.len();
        let mut p = vec![0u8; total];
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&V6_SRC);
            p[24..40].copy_from_slice(&V6_DST);
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            p[6] = 0x40; // DF
            p[8] = 64;
            p[9] = TCP;
            p[12..16].copy_from_slice(&V4_SRC);
            p[16..20].copy_from_slice(&V4_DST);
            let c = checksum(&p[..20], 0);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = iph;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&777u32.to_be_bytes());
        p[t + 12] = ((th / 4) as u8) << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        for (k, b) in p[t + 20..t + th].iter_mut().enumerate() {
            *b = 1 + k as u8; // stand-in option bytes, the same in every packet
        }
        p[t + th..].copy_from_slice(payload);
        fix_tcp_checksum(&mut p, t);
        p
    }

    fn fix_tcp_checksum(p: &mut [u8], t: usize) {
        p[t + 16..t + 18].copy_from_slice(&[0, 0]);
        let (src, dst) = addresses(p).unwrap();
        let ph = pseudo_header(src, dst, TCP, (p.len() - t) as u32);
        let c = checksum(&p[t..], ph);
        p[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
    }

    /// The super-packet the kernel would hand over: one packet carrying all
    /// the payload, its TCP checksum partial; and its header.
    fn super_packet(v6: bool, seq: u32, flags: u8, payload: &[u8], mss: u16) -> (VnetHdr, Vec<u8>) {
        let mut p = tcp(v6, seq, flags, payload, 12);
        let iph = if v6 { 40 } else { 20 };
        let (src, dst) = addresses(&p).unwrap();
        let partial = fold(pseudo_header(src, dst, TCP, (p.len() - iph) as u32));
        p[iph + 16..iph + 18].copy_from_slice(&partial.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            // The kernel may say the whole linear part; split must not trust it.
            hdr_len: p.len().min(2000) as u16,
            gso_size: mss,
            csum_start: iph as u16,
            csum_offset: 16,
        };
        (hdr, p)
    }

    fn split_all(hdr: &VnetHdr, mut p: Vec<u8>) -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut out = Vec::new();
        split(hdr, &mut p, |s| out.push(s.to_vec()))?;
        Ok(out)
    }

    fn ip_header_valid(p: &[u8]) -> bool {
        p[0] >> 4 == 6 || fold(sum(&p[..20], 0)) == 0xffff
    }

    /// Checks every segment and returns the payload they carry, in order.
    fn check_segments(segs: &[Vec<u8>], v6: bool, seq0: u32, flags: u8, mss: usize) -> Vec<u8> {
        let iph = if v6 { 40 } else { 20 };
        let mut data = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(ip_header_valid(s), "IPv4 header checksum of segment {i}");
            assert!(transport_valid(s, iph, TCP), "TCP checksum of segment {i}");
            let ip_len = if v6 {
                u16::from_be_bytes([s[4], s[5]]) as usize + 40
            } else {
                u16::from_be_bytes([s[2], s[3]]) as usize
            };
            assert_eq!(ip_len, s.len(), "IP length of segment {i}");
            if !v6 {
                let id = u16::from_be_bytes([s[4], s[5]]);
                assert_eq!(id, 0x1234u16.wrapping_add(i as u16), "IPv4 id");
            }
            let seq = u32::from_be_bytes(s[iph + 4..iph + 8].try_into().unwrap());
            assert_eq!(
                seq,
                seq0.wrapping_add((i * mss) as u32),
                "seq of segment {i}"
            );
            let f = s[iph + 13];
            let last = i + 1 == segs.len();
            assert_eq!(f & (FIN | PSH), if last { flags & (FIN | PSH) } else { 0 });
            assert_eq!(f & CWR, if i == 0 { flags & CWR } else { 0 });
            let headers = iph + usize::from(s[iph + 12] >> 4) * 4;
            let payload = &s[headers..];
            assert!(payload.len() <= mss);
            if !last {
                assert_eq!(payload.len(), mss, "only the last segment is short");
            }
            data.extend_from_slice(payload);
        }
        data
    }

    fn bytes(n: usize, salt: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
            .collect()
    }

    #[test]
    fn a_v4_super_packet_is_cut_at_the_mss() {
        let payload = bytes(5000, 1);
        let (hdr, p) = super_packet(false, 1000, ACK | PSH, &payload, 1368);
        let segs = split_all(&hdr, p).unwrap();
        assert_eq!(segs.len(), 4);
        assert_eq!(segs[3].len(), 20 + 32 + 5000 - 3 * 1368);
        assert_eq!(check_segments(&segs, false, 1000, ACK | PSH, 1368), payload);
    }

    #[test]
    fn a_v6_super_packet_with_fin_and_cwr_keeps_them_where_the_kernel_would() {
        let payload = bytes(4001, 2);
        let flags = ACK | PSH | FIN | CWR;
        let (hdr, p) = super_packet(true, u32::MAX - 100, flags, &payload, 1000);
        let segs = split_all(&hdr, p).unwrap();
        assert_eq!(segs.len(), 5);
        // The sequence number wraps past 2^32.
        assert_eq!(
            check_segments(&segs, true, u32::MAX - 100, flags, 1000),
            payload
        );
    }

    #[test]
    fn a_super_packet_without_a_checksum_start_is_cut_too() {
        // Forwarded traffic may come checked (DATA_VALID) with no csum_start.
        for v6 in [false, true] {
            let payload = bytes(3000, 4);
            let (hdr, p) = super_packet(v6, 77, ACK, &payload, 1000);
            let hdr = VnetHdr {
                flags: 2, // VIRTIO_NET_HDR_F_DATA_VALID
                csum_start: 0,
                csum_offset: 0,
                ..hdr
            };
            let segs = split_all(&hdr, p).unwrap();
            assert_eq!(check_segments(&segs, v6, 77, ACK, 1000), payload);
        }
    }

    #[test]
    fn a_payload_that_fits_one_segment_is_one_packet() {
        let payload = bytes(10, 3);
        let (hdr, p) = super_packet(false, 5, ACK, &payload, 1368);
        let segs = split_all(&hdr, p).unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!(check_segments(&segs, false, 5, ACK, 1368), payload);
    }

    #[test]
    fn a_partial_checksum_on_a_plain_packet_is_finished() {
        for v6 in [false, true] {
            let whole = tcp(v6, 9, ACK, b"hello, mesh", 0);
            let iph = if v6 { 40 } else { 20 };
            let mut partial = whole.clone();
            let (src, dst) = addresses(&whole).unwrap();
            let ph = fold(pseudo_header(src, dst, TCP, (whole.len() - iph) as u32));
            partial[iph + 16..iph + 18].copy_from_slice(&ph.to_be_bytes());
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: iph as u16,
                csum_offset: 16,
                ..VnetHdr::default()
            };
            assert_eq!(split_all(&hdr, partial).unwrap(), vec![whole]);
        }
        // Without the flag the packet is passed as it is.
        let p = tcp(false, 1, ACK, b"x", 0);
        assert_eq!(split_all(&VnetHdr::default(), p.clone()).unwrap(), vec![p]);
    }

    #[test]
    fn malformed_headers_are_refused() {
        let (hdr, p) = super_packet(false, 0, ACK, &bytes(3000, 0), 1000);
        let bad = |h: VnetHdr, p: &[u8]| split_all(&h, p.to_vec()).unwrap_err();
        assert!(matches!(
            bad(VnetHdr { gso_size: 0, ..hdr }, &p),
            OffloadError::BadTcp(_)
        ));
        assert!(matches!(
            bad(
                VnetHdr {
                    csum_offset: 6,
                    ..hdr
                },
                &p
            ),
            OffloadError::BadTcp(_)
        ));
        assert!(matches!(
            bad(
                VnetHdr {
                    gso_type: GSO_TCPV6,
                    ..hdr
                },
                &p
            ),
            OffloadError::BadTcp(_)
        ));
        assert!(matches!(
            bad(
                VnetHdr {
                    csum_start: 3000,
                    ..hdr
                },
                &p
            ),
            OffloadError::BadTcp(_)
        ));
        assert!(matches!(
            bad(VnetHdr { gso_type: 5, ..hdr }, &p),
            OffloadError::UnsupportedGso(5)
        ));
        let plain = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 30,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        assert!(matches!(
            bad(plain, &p[..40]),
            OffloadError::ChecksumOutside { .. }
        ));
        assert!(matches!(bad(hdr, &p[..30]), OffloadError::BadTcp(_)));
    }

    #[test]
    fn the_header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 66,
            gso_size: 1368,
            csum_start: 40,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::parse(&h.encode()), Some(h));
        assert_eq!(VnetHdr::parse(&[0; 9]), None);
    }

    /// Packets laid end to end in one arena, as the device decrypts them.
    fn arena(packets: &[Vec<u8>]) -> (Vec<u8>, Vec<Range<usize>>) {
        let mut a = Vec::new();
        let mut spans = Vec::new();
        for p in packets {
            spans.push(a.len()..a.len() + p.len());
            a.extend_from_slice(p);
        }
        (a, spans)
    }

    /// Coalesces and returns each item as (header, bytes).
    fn gro(packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
        let (mut a, spans) = arena(packets);
        let mut g = Gro::new();
        g.coalesce(&mut a, &spans);
        (0..g.len())
            .map(|n| {
                let mut b = Vec::new();
                for r in g.parts(n, &spans) {
                    b.extend_from_slice(&a[r]);
                }
                (g.header(n), b)
            })
            .collect()
    }

    /// In-order segments of one flow, as `split` cut them.
    fn segments(v6: bool, seq: u32, flags: u8, len: usize, mss: u16) -> Vec<Vec<u8>> {
        let (hdr, p) = super_packet(v6, seq, flags, &bytes(len, 7), mss);
        split_all(&hdr, p).unwrap()
    }

    #[test]
    fn in_order_segments_become_one_super_packet_that_splits_back() {
        for v6 in [false, true] {
            let segs = segments(v6, 100, ACK | PSH, 10_000, 1368);
            let out = gro(&segs);
            assert_eq!(out.len(), 1, "v6={v6}");
            let (hdr, mut bytes) = out.into_iter().next().unwrap();
            let iph = if v6 { 40 } else { 20 };
            assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            assert_eq!(hdr.gso_size, 1368);
            assert_eq!(usize::from(hdr.hdr_len), iph + 32);
            assert_eq!(bytes[iph + 13] & PSH, PSH, "the last segment's PSH");
            assert!(ip_header_valid(&bytes));
            // The kernel finishes the partial checksum: the sum must come out right.
            let mut whole = bytes.clone();
            finish_checksum(&hdr, &mut whole).unwrap();
            assert!(transport_valid(&whole, iph, TCP));
            // And its segmentation gives back exactly the packets that came in.
            let mut again = Vec::new();
            split(&hdr, &mut bytes, |s| again.push(s.to_vec())).unwrap();
            assert_eq!(again, segs);
        }
    }

    #[test]
    fn psh_ends_a_super_packet() {
        // Two bursts of one flow: the first ends with PSH, so the second starts anew.
        let mut segs = segments(false, 0, ACK | PSH, 3 * 1000, 1000);
        segs.extend(segments(false, 3000, ACK, 2 * 1000, 1000));
        let out = gro(&segs);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.gso_size, 1000);
        assert_eq!(out[0].1.len(), 20 + 32 + 3000);
        assert_eq!(out[1].1.len(), 20 + 32 + 2000);
    }

    #[test]
    fn a_short_segment_ends_a_super_packet() {
        let mut segs = segments(false, 0, ACK, 2500, 1000); // 1000, 1000, 500
        segs.extend(segments(false, 2500, ACK, 2000, 1000));
        let out = gro(&segs);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.len(), 20 + 32 + 2500);
        assert_eq!(out[1].1.len(), 20 + 32 + 2000);
    }

    #[test]
    fn out_of_order_segments_are_not_joined_and_keep_their_order() {
        let segs = segments(false, 0, ACK, 4000, 1000);
        let shuffled = vec![
            segs[0].clone(),
            segs[2].clone(),
            segs[1].clone(),
            segs[3].clone(),
        ];
        let out = gro(&shuffled);
        // Only the flow's latest item may grow: 2 does not follow 0, 1 does
        // not follow 2, 3 does not follow 1 (joining it to 2 would put it
        // before 1).
        let firsts: Vec<u32> = out
            .iter()
            .map(|(_, b)| u32::from_be_bytes(b[24..28].try_into().unwrap()))
            .collect();
        assert_eq!(firsts, vec![0, 2000, 1000, 3000]);
        assert!(out.iter().all(|(h, _)| *h == VnetHdr::default()));
        assert_eq!(
            out.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(),
            shuffled
        );
    }

    #[test]
    fn fin_syn_and_bare_acks_are_written_as_they_came() {
        let data = segments(false, 0, ACK, 2000, 1000);
        let fin = tcp(false, 2000, ACK | FIN, b"", 12);
        let syn = tcp(false, 0, 0x02, b"", 12);
        let bare = tcp(false, 2000, ACK, b"", 12);
        let fin_with_data = tcp(false, 2000, ACK | FIN, &bytes(1000, 0), 12);
        for extra in [fin, syn, bare, fin_with_data] {
            let mut ps = data.clone();
            ps.push(extra.clone());
            let out = gro(&ps);
            assert_eq!(out.len(), 2);
            assert_eq!(out[1], (VnetHdr::default(), extra));
        }
    }

    #[test]
    fn a_bad_checksum_is_never_joined() {
        let mut segs = segments(false, 0, ACK, 3000, 1000);
        segs[1][60] ^= 0xff; // payload corrupted after the checksum was made
        let out = gro(&segs);
        assert_eq!(out.len(), 3, "no joins across a bad segment");
        assert_eq!(out[1], (VnetHdr::default(), segs[1].clone()));
        // A bad first segment is not joined either, and goes out as it came.
        let mut segs = segments(true, 0, ACK, 3000, 1000);
        segs[0][80] ^= 0xff;
        let out = gro(&segs);
        assert_eq!(out[0], (VnetHdr::default(), segs[0].clone()));
        assert_eq!(out.len(), 2, "the other two still join");
    }

    #[test]
    fn differing_acks_windows_options_or_ip_fields_are_not_joined() {
        type Edit = fn(&mut Vec<u8>);
        let edits: [(&str, Edit); 6] = [
            ("ack", |p| p[28] ^= 1),
            ("window", |p| p[34] ^= 1),
            ("option", |p| p[41] ^= 1),
            ("ttl", |p| p[8] ^= 1),
            ("tos", |p| p[1] ^= 4),
            ("ports", |p| p[21] ^= 1),
        ];
        for (what, edit) in edits {
            let mut segs = segments(false, 0, ACK, 2000, 1000);
            edit(&mut segs[1]);
            if what == "ttl" || what == "tos" {
                segs[1][10..12].copy_from_slice(&[0, 0]);
                let c = checksum(&segs[1][..20], 0);
                segs[1][10..12].copy_from_slice(&c.to_be_bytes());
            }
            fix_tcp_checksum(&mut segs[1], 20);
            assert_eq!(gro(&segs).len(), 2, "{what}");
        }
    }

    #[test]
    fn other_traffic_between_segments_goes_through_untouched() {
        let segs = segments(true, 0, ACK, 3000, 1000);
        let other = segments(false, 0, ACK, 2000, 1000);
        let mut udp = tcp(false, 0, ACK, b"datagram", 0);
        udp[9] = 17;
        let mixed = vec![
            segs[0].clone(),
            other[0].clone(),
            udp.clone(),
            segs[1].clone(),
            other[1].clone(),
            segs[2].clone(),
        ];
        let out = gro(&mixed);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].0.gso_type, GSO_TCPV6);
        assert_eq!(out[0].1.len(), 40 + 32 + 3000);
        assert_eq!(out[1].0.gso_type, GSO_TCPV4);
        assert_eq!(out[1].1.len(), 20 + 32 + 2000);
        assert_eq!(out[2], (VnetHdr::default(), udp));
    }

    /// Flows interleaved packet by packet: a few are joined per flow; many
    /// are not, but no flow's packets change order.
    #[test]
    fn interleaved_flows_keep_their_order() {
        for (flows, joined) in [(5u16, true), (20, false)] {
            let per_flow: Vec<Vec<Vec<u8>>> = (0..flows)
                .map(|f| {
                    let mut segs = segments(false, 0, ACK, 3000, 1000);
                    for s in &mut segs {
                        s[20..22].copy_from_slice(&(1000 + f).to_be_bytes());
                        fix_tcp_checksum(s, 20);
                    }
                    segs
                })
                .collect();
            let mixed: Vec<Vec<u8>> = (0..3)
                .flat_map(|k| per_flow.iter().map(move |segs| segs[k].clone()))
                .collect();
            let out = gro(&mixed);
            let expected = if joined {
                flows as usize
            } else {
                3 * flows as usize
            };
            assert_eq!(out.len(), expected, "{flows} flows");
            // Per flow, the bytes come out in sequence order.
            for f in 0..flows {
                let mut next = 0u32;
                for (_, b) in out
                    .iter()
                    .filter(|(_, b)| b[20..22] == (1000 + f).to_be_bytes())
                {
                    let seq = u32::from_be_bytes(b[24..28].try_into().unwrap());
                    assert_eq!(seq, next, "flow {f}");
                    next += (b.len() - 52) as u32;
                }
                assert_eq!(next, 3000);
            }
        }
    }

    #[test]
    fn super_packets_stay_within_64_kib() {
        let segs = segments(false, 0, ACK, 200_000, 1400);
        let out = gro(&segs);
        assert!(out.iter().all(|(_, b)| b.len() <= MAX_PACKET));
        let total: usize = out.iter().map(|(_, b)| b.len() - 52).sum();
        assert_eq!(total, 200_000);
        assert_eq!(
            out.len(),
            200_000usize.div_ceil((65_535 - 52) / 1400 * 1400)
        );
    }

    proptest! {
        /// Any super-packet, split then joined, comes back as one that
        /// splits into the same packets, carrying the same bytes.
        #[test]
        fn split_then_joined_round_trips(
            v6 in any::<bool>(),
            len in 1usize..20_000,
            mss in 1u16..2000,
            seq in any::<u32>(),
            psh in any::<bool>(),
        ) {
            let flags = if psh { ACK | PSH } else { ACK };
            // At most 100 segments: a tiny MSS with a big payload adds nothing but time.
            let len = len.min(usize::from(mss) * 100);
            let payload = bytes(len, seq as u8);
            let (hdr, p) = super_packet(v6, seq, flags, &payload, mss);
            let segs = split_all(&hdr, p).unwrap();
            prop_assert_eq!(check_segments(&segs, v6, seq, flags, mss as usize), payload);
            let mut again = Vec::new();
            for (h, mut b) in gro(&segs) {
                if h.gso_type == GSO_NONE {
                    again.push(b);
                } else {
                    split(&h, &mut b, |s| again.push(s.to_vec())).unwrap();
                }
            }
            prop_assert_eq!(again, segs);
        }

        /// Whatever bytes come out of the tunnel, coalescing neither panics
        /// nor loses or invents a byte of a packet it did not join.
        #[test]
        fn garbage_is_passed_through(
            packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
        ) {
            let out = gro(&packets);
            prop_assert_eq!(out.len(), packets.len());
            for ((h, b), p) in out.iter().zip(&packets) {
                prop_assert_eq!(h, &VnetHdr::default());
                prop_assert_eq!(b, p);
            }
        }
    }
}
