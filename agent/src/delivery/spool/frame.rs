//! The spool's frame format, and the scanner that reads a segment back.
//! Pure: bytes in, frames and damage out.
//!
//! ```text
//! word: u32 LE = len | TELEMETRY bit | crc: u32 LE | seq: u64 LE | payload (len bytes, ≤ 4 MiB)
//! crc = crc32c(seq LE ++ payload)            for evidence (the original format)
//! crc = crc32c(seq LE ++ [1] ++ payload)     for telemetry, so a flipped class bit fails the CRC
//! ```
//!
//! A damaged frame is skipped, not followed by a cut: the scanner looks for
//! the next offset where a frame with a later seq verifies, so one flipped
//! bit costs one frame, not the rest of the segment.

/// Largest record payload.
pub const MAX_RECORD: usize = 4 << 20;
/// Bytes before the payload.
pub const HEADER: usize = 16;
/// Bit of the first word that marks a telemetry sample (sheddable).
const TELEMETRY_BIT: u32 = 1 << 31;
/// How far past the last good seq a frame found by resynchronising may
/// claim to be: a random header almost never passes this and the CRC.
const MAX_SEQ_JUMP: u64 = 1 << 40;

/// What a record is to the spool when room runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Attestations, proofs, command results, inventory, events: never
    /// dropped while telemetry occupies space.
    Evidence,
    /// Plain telemetry samples: shed first.
    Telemetry,
}

/// The frame's CRC: over the seq, the class (for telemetry) and the payload.
pub fn crc(seq: u64, class: Class, payload: &[u8]) -> u32 {
    let mut c = crc32c::crc32c(&seq.to_le_bytes());
    if class == Class::Telemetry {
        c = crc32c::crc32c_append(c, &[1]);
    }
    crc32c::crc32c_append(c, payload)
}

/// Appends one frame to `out`.
pub fn encode(seq: u64, class: Class, payload: &[u8], out: &mut Vec<u8>) {
    let mut word = payload.len() as u32;
    if class == Class::Telemetry {
        word |= TELEMETRY_BIT;
    }
    out.extend_from_slice(&word.to_le_bytes());
    out.extend_from_slice(&crc(seq, class, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

/// A frame that verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub seq: u64,
    pub class: Class,
    /// Payload length; the payload starts at the frame's offset + HEADER.
    pub len: usize,
}

impl Frame {
    pub fn size(&self) -> u64 {
        (HEADER + self.len) as u64
    }
}

fn header(buf: &[u8]) -> Option<(u32, u32, u64)> {
    Some((
        u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?),
        u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?),
        u64::from_le_bytes(buf.get(8..16)?.try_into().ok()?),
    ))
}

/// The frame at the start of `buf`, or why those bytes are not one.
pub fn parse(buf: &[u8]) -> Result<Frame, String> {
    let Some((word, crc_claimed, seq)) = header(buf) else {
        return Err(format!("torn header ({} of {HEADER} bytes)", buf.len()));
    };
    let class = if word & TELEMETRY_BIT != 0 {
        Class::Telemetry
    } else {
        Class::Evidence
    };
    let len = (word & !TELEMETRY_BIT) as usize;
    if len > MAX_RECORD {
        return Err(format!("length {len} exceeds {MAX_RECORD}"));
    }
    let Some(payload) = buf.get(HEADER..HEADER + len) else {
        return Err(format!(
            "torn record (seq {seq}: {} of {len} payload bytes)",
            buf.len() - HEADER
        ));
    };
    if crc(seq, class, payload) != crc_claimed {
        return Err(format!("CRC mismatch (claimed seq {seq})"));
    }
    Ok(Frame { seq, class, len })
}

/// A frame worth resynchronising on: checked cheaply (length, seq range)
/// before the CRC, so scanning past damage costs little.
fn candidate(buf: &[u8], after: u64) -> Option<Frame> {
    let (word, _, seq) = header(buf)?;
    let len = (word & !TELEMETRY_BIT) as usize;
    if len > MAX_RECORD || buf.len() < HEADER + len || seq <= after || seq - after > MAX_SEQ_JUMP {
        return None;
    }
    parse(buf).ok()
}

/// Bytes skipped because they hold no frame that verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub offset: usize,
    pub len: usize,
    /// Why the first frame there did not verify.
    pub reason: String,
    /// The last good seq before it (or the scan's start).
    pub after_seq: u64,
    /// The first good seq after it; None when it runs to the end.
    pub before_seq: Option<u64>,
}

/// A segment read back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scan {
    /// Good frames in order, each with its offset.
    pub frames: Vec<(usize, Frame)>,
    pub damage: Vec<Damage>,
    /// The lowest seq the next record may take without reusing one that
    /// may have been written here.
    pub floor: u64,
}

/// Reads every frame of one segment whose seqs must exceed `after`.
///
/// The floor after damage at the end assumes the segment's seqs are
/// consecutive (true of the newest segment, the only one whose tail can
/// hold the highest seq): each frame is at least HEADER bytes, so the
/// damaged bytes hold at most `ceil(len / HEADER)` of them, and none of
/// their seqs is given out again even if they were sent.
pub fn scan(buf: &[u8], after: u64) -> Scan {
    let mut out = Scan::default();
    let mut last = after;
    let mut offset = 0usize;
    while offset < buf.len() {
        let reason = match parse(&buf[offset..]) {
            Ok(f) if f.seq > last => {
                out.frames.push((offset, f));
                last = f.seq;
                offset += HEADER + f.len;
                continue;
            }
            Ok(f) => format!("seq {} does not follow {last}", f.seq),
            Err(reason) => reason,
        };
        let next = (offset + 1..buf.len().saturating_sub(HEADER - 1))
            .find_map(|at| candidate(&buf[at..], last).map(|f| (at, f)));
        match next {
            Some((at, f)) => {
                out.damage.push(Damage {
                    offset,
                    len: at - offset,
                    reason,
                    after_seq: last,
                    before_seq: Some(f.seq),
                });
                offset = at;
            }
            None => {
                let len = buf.len() - offset;
                out.damage.push(Damage {
                    offset,
                    len,
                    reason,
                    after_seq: last,
                    before_seq: None,
                });
                last += len.div_ceil(HEADER) as u64;
                break;
            }
        }
    }
    out.floor = last + 1;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment(first: u64, payloads: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            let class = if i % 3 == 0 {
                Class::Telemetry
            } else {
                Class::Evidence
            };
            encode(first + i as u64, class, p, &mut buf);
            ends.push(buf.len());
        }
        (buf, ends)
    }

    fn seqs(s: &Scan) -> Vec<u64> {
        s.frames.iter().map(|(_, f)| f.seq).collect()
    }

    #[test]
    fn a_flipped_bit_costs_one_frame_and_the_rest_is_read() {
        let payloads: Vec<Vec<u8>> = (0..10).map(|i| vec![i as u8; 40 + i]).collect();
        let (mut buf, ends) = segment(101, &payloads);
        // A bit in the fourth frame's payload (seq 104).
        buf[ends[2] + HEADER + 5] ^= 0x10;
        let s = scan(&buf, 100);
        assert_eq!(seqs(&s), vec![101, 102, 103, 105, 106, 107, 108, 109, 110]);
        assert_eq!(s.damage.len(), 1);
        let d = &s.damage[0];
        assert_eq!((d.offset, d.len), (ends[2], ends[3] - ends[2]));
        assert_eq!((d.after_seq, d.before_seq), (103, Some(105)));
        assert!(d.reason.contains("CRC"), "{}", d.reason);
        assert_eq!(s.floor, 111);
    }

    #[test]
    fn a_flipped_length_or_class_bit_is_caught_too() {
        let payloads: Vec<Vec<u8>> = (0..4).map(|_| vec![7; 30]).collect();
        for byte in [0usize, 3] {
            let (mut buf, ends) = segment(1, &payloads);
            buf[ends[0] + byte] ^= 0x80; // length high bit / class bit of seq 2
            let s = scan(&buf, 0);
            assert_eq!(seqs(&s), vec![1, 3, 4], "byte {byte}");
        }
    }

    #[test]
    fn damage_at_the_end_never_lets_its_seqs_be_given_again() {
        let payloads: Vec<Vec<u8>> = (0..3).map(|_| vec![1; 100]).collect();
        let (mut buf, ends) = segment(1, &payloads);
        buf[ends[1] + 20] ^= 1; // the last frame (seq 3)
        let s = scan(&buf, 0);
        assert_eq!(seqs(&s), vec![1, 2]);
        assert_eq!(s.damage[0].before_seq, None);
        assert!(s.floor > 3, "seq 3 was written: floor {}", s.floor);
        // Garbage after good frames: the seqs it might hold are skipped too.
        let (mut buf, _) = segment(1, &payloads);
        buf.extend_from_slice(&[0x55; 7]);
        let s = scan(&buf, 0);
        assert_eq!((seqs(&s), s.floor), (vec![1, 2, 3], 5));
        // A clean segment: the floor is the next seq.
        let (buf, _) = segment(1, &payloads);
        assert_eq!(scan(&buf, 0).floor, 4);
        assert_eq!(scan(&[], 9).floor, 10);
    }

    #[test]
    fn seqs_must_grow() {
        let mut buf = Vec::new();
        encode(5, Class::Evidence, b"a", &mut buf);
        encode(5, Class::Evidence, b"b", &mut buf);
        encode(6, Class::Evidence, b"c", &mut buf);
        let s = scan(&buf, 0);
        assert_eq!(seqs(&s), vec![5, 6]);
        assert!(s.damage[0].reason.contains("does not follow"));
        assert_eq!(
            scan(&buf, 5).frames.len(),
            1,
            "seqs at or below `after` are not taken"
        );
    }

    #[test]
    fn the_class_round_trips() {
        let mut buf = Vec::new();
        encode(1, Class::Telemetry, b"t", &mut buf);
        encode(2, Class::Evidence, b"e", &mut buf);
        let s = scan(&buf, 0);
        let classes: Vec<_> = s.frames.iter().map(|(_, f)| f.class).collect();
        assert_eq!(classes, vec![Class::Telemetry, Class::Evidence]);
    }

    /// What a mutation did to a segment.
    #[derive(Debug, Clone)]
    enum Harm {
        Flip { at: usize, bit: u8 },
        Truncate { keep: usize },
        Overwrite { at: usize, bytes: Vec<u8> },
        Append(Vec<u8>),
    }

    fn harm() -> impl Strategy<Value = Harm> {
        prop_oneof![
            (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Harm::Flip { at, bit }),
            any::<usize>().prop_map(|keep| Harm::Truncate { keep }),
            (
                any::<usize>(),
                proptest::collection::vec(any::<u8>(), 1..40)
            )
                .prop_map(|(at, bytes)| Harm::Overwrite { at, bytes }),
            proptest::collection::vec(any::<u8>(), 1..60).prop_map(Harm::Append),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary bytes never panic the scanner, and what it returns is
        /// ordered and within bounds.
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600), after in 0u64..1000) {
            let s = scan(&buf, after);
            let mut last = after;
            for (offset, f) in &s.frames {
                prop_assert!(f.seq > last);
                prop_assert!(offset + HEADER + f.len <= buf.len());
                last = f.seq;
            }
            prop_assert!(s.floor > last);
        }

        /// Bit flips, truncation, overwrites and garbage: every frame before
        /// the first harmed byte comes back unchanged, every frame returned is
        /// one that was written, and the floor is above every seq written
        /// (none is ever reused).
        #[test]
        fn harm_never_loses_a_record_before_it_nor_reuses_a_seq(
            sizes in proptest::collection::vec(0usize..120, 1..24),
            first in 1u64..1_000_000,
            harms in proptest::collection::vec(harm(), 1..4),
        ) {
            let payloads: Vec<Vec<u8>> = sizes.iter().enumerate()
                .map(|(i, n)| (0..*n).map(|j| (i * 31 + j) as u8).collect())
                .collect();
            let (mut buf, ends) = segment(first, &payloads);
            let mut first_harm = buf.len();
            for h in &harms {
                if buf.is_empty() { break; }
                match h {
                    Harm::Flip { at, bit } => {
                        let at = at % buf.len();
                        buf[at] ^= 1 << bit;
                        first_harm = first_harm.min(at);
                    }
                    Harm::Truncate { keep } => {
                        let keep = keep % buf.len();
                        buf.truncate(keep);
                        first_harm = first_harm.min(keep);
                    }
                    Harm::Overwrite { at, bytes } => {
                        let at = at % buf.len();
                        let end = (at + bytes.len()).min(buf.len());
                        buf[at..end].copy_from_slice(&bytes[..end - at]);
                        first_harm = first_harm.min(at);
                    }
                    Harm::Append(bytes) => {
                        first_harm = first_harm.min(buf.len());
                        buf.extend_from_slice(bytes);
                    }
                }
            }
            let s = scan(&buf, first - 1);
            let intact = ends.iter().take_while(|e| **e <= first_harm).count();
            let got = seqs(&s);
            prop_assert!(got.len() >= intact, "lost a record before the damage: {got:?}, {intact} intact");
            for (i, (offset, f)) in s.frames.iter().enumerate() {
                let k = (f.seq - first) as usize;
                prop_assert!(k < payloads.len(), "seq {} was never written", f.seq);
                prop_assert_eq!(&buf[offset + HEADER..offset + HEADER + f.len], &payloads[k][..]);
                if i < intact {
                    prop_assert_eq!(f.seq, first + i as u64);
                }
            }
            // Seqs whose bytes (any of them) are still in the segment are never given again.
            let written = ends.iter().zip(std::iter::once(&0).chain(ends.iter()))
                .filter(|(_, start)| **start < buf.len())
                .count() as u64;
            prop_assert!(s.floor >= first + written, "floor {} reuses seqs below {}", s.floor, first + written);
        }
    }
}
