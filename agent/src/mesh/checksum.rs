//! The Internet checksum (RFC 1071) of IP headers and TCP segments, which
//! the mesh computes itself when it splits or joins TCP packets (see
//! `offload`). Pure.

use std::net::IpAddr;

/// The one's-complement sum of `data` as big-endian 16-bit words (an odd
/// last byte is the high half of a word), added to `initial`; not folded.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    // The sum is independent of byte order (RFC 1071 §2(B)): add 64-bit
    // native words as 32-bit halves in four independent lanes, fold, and
    // swap to big-endian once at the end. A lane overflows only after
    // gigabytes.
    let mut lanes = [0u64; 4];
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        for (lane, w) in lanes.iter_mut().zip(b.chunks_exact(8)) {
            let w = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            *lane += (w & 0xffff_ffff) + (w >> 32);
        }
    }
    // The rest padded with zeros: an odd last byte lands in the high half
    // of its big-endian word, as it should.
    let rest = blocks.remainder();
    let mut tail = [0u8; 32];
    tail[..rest.len()].copy_from_slice(rest);
    for (lane, w) in lanes.iter_mut().zip(tail.chunks_exact(8)) {
        let w = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        *lane += (w & 0xffff_ffff) + (w >> 32);
    }
    let native = fold(lanes.iter().sum());
    initial + u64::from(u16::from_be(native))
}

/// `acc` folded to 16 bits (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum field's value for `data` whose own checksum field is zero:
/// the complement of the folded sum.
pub fn checksum(data: &[u8], initial: u64) -> u16 {
    !fold(sum(data, initial))
}

/// The sum of the TCP/UDP pseudo-header: both addresses, the protocol and
/// the transport length. The addresses are the packet's own bytes (4 or 16).
pub fn pseudo_header(src: &[u8], dst: &[u8], protocol: u8, length: u32) -> u64 {
    let acc = sum(src, 0) + sum(dst, 0) + u64::from(protocol);
    acc + u64::from(length >> 16) + u64::from(length & 0xffff)
}

/// Whether the TCP or UDP segment in `packet` (its transport header at
/// `l4`) carries a correct checksum; `packet` starts with its IP header.
pub fn transport_valid(packet: &[u8], l4: usize, protocol: u8) -> bool {
    let Some((src, dst)) = addresses(packet) else {
        return false;
    };
    let Some(segment) = packet.get(l4..) else {
        return false;
    };
    let ph = pseudo_header(src, dst, protocol, segment.len() as u32);
    fold(sum(segment, ph)) == 0xffff
}

/// The source and destination address bytes of an IPv4 or IPv6 header.
pub fn addresses(packet: &[u8]) -> Option<(&[u8], &[u8])> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some((&packet[12..16], &packet[16..20])),
        6 if packet.len() >= 40 => Some((&packet[8..24], &packet[24..40])),
        _ => None,
    }
}

/// The source address of an IPv4 or IPv6 packet.
pub fn source(packet: &[u8]) -> Option<IpAddr> {
    let (src, _) = addresses(packet)?;
    Some(match src.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(src).ok()?),
        _ => IpAddr::from(<[u8; 16]>::try_from(src).ok()?),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// RFC 1071 written the slow way: 16-bit words, folded as we go.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for pair in data.chunks(2) {
            let w = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            acc += u32::from(w);
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    #[test]
    fn a_known_ipv4_header() {
        // The example header from Wikipedia's IPv4 article; its checksum is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h, 0), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(
            fold(sum(&h, 0)),
            0xffff,
            "a correct header sums to all ones"
        );
    }

    proptest! {
        #[test]
        fn matches_the_reference(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            prop_assert_eq!(checksum(&data, 0), reference(&data));
        }

        #[test]
        fn splitting_at_an_even_offset_changes_nothing(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            cut in 0usize..1500,
        ) {
            let cut = (cut * 2).min(data.len() & !1);
            let whole = fold(sum(&data, 0));
            let parts = fold(sum(&data[cut..], sum(&data[..cut], 0)));
            prop_assert_eq!(whole, parts);
        }
    }
}
