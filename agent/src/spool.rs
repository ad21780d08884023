//! The durable spool: every record is appended here (fsync'd in groups)
//! before it is sent, and deleted only after the coordinator's receipt.
//!
//! On disk, `dir` holds segment files `seg-{first_seq:020}.log`, each a run
//! of frames:
//!
//! ```text
//! len: u32 LE | crc: u32 LE = crc32c(seq LE ++ payload) | seq: u64 LE | payload (len bytes, ≤ 4 MiB)
//! ```
//!
//! and `acked`, the decimal seq through which every record is acknowledged
//! (written to `acked.tmp`, fsync'd, renamed). It is persisted before a
//! segment is deleted and at flush, not on every ack: replaying a few
//! acknowledged records after a crash is harmless, the coordinator is
//! idempotent on seq. At open, a torn or corrupt frame truncates its
//! segment at that frame, with a warning; nothing before it is lost.
//! The in-memory index holds positions only, never payloads.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Largest record payload.
pub const MAX_RECORD: usize = 4 << 20;
const HEADER: usize = 16;

/// Where and how large.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Cap on the segment files' total size (default 1 GiB).
    pub max_bytes: u64,
    /// Size at which a new segment file is started (default 8 MiB).
    pub segment_bytes: u64,
}

/// What opening found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub truncated: Vec<Truncation>,
    pub pending: u64,
    /// Why the `acked` file was ignored, if it was.
    pub watermark_reset: Option<String>,
}

/// One segment cut at a bad frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub file: PathBuf,
    pub offset: u64,
    pub dropped_bytes: u64,
    pub reason: String,
}

/// Figures for status, heartbeats and telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct SpoolStats {
    pub pending: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Appends are refused for lack of room, until acknowledgements free some.
    pub full: bool,
    /// Records refused since start because the spool was full.
    pub refused: u64,
    pub next_seq: u64,
    pub acked_through: u64,
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool is full ({bytes} of {max_bytes} bytes): {refused} new records refused; the coordinator has not acknowledged older records — check connectivity or raise spool.max_bytes")]
    Full {
        bytes: u64,
        max_bytes: u64,
        refused: usize,
    },
    #[error("record seq {got} appended out of order (expected {expected})")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("record of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("spool file {} is corrupt at offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    len: u64,
    /// Pending records in this segment.
    live: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    segment: u64,
    offset: u64,
    len: u32,
}

/// The spool; owned by one task, no internal locking.
#[derive(Debug)]
pub struct Spool {
    cfg: SpoolConfig,
    /// By first seq.
    segments: BTreeMap<u64, Segment>,
    /// Pending records by seq.
    index: BTreeMap<u64, Slot>,
    active: Option<(u64, File)>,
    next_seq: u64,
    persisted_watermark: u64,
    bytes: u64,
    /// Size when an append was last refused: the spool stays full until
    /// acknowledgements bring it below that, so it does not flap.
    full_at: Option<u64>,
    refused: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn frame_crc(seq: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&seq.to_le_bytes()), payload)
}

/// One parsed frame, or why the bytes at `offset` are not one.
fn parse_frame(buf: &[u8], offset: usize) -> Result<(u64, usize), String> {
    let rest = &buf[offset..];
    if rest.len() < HEADER {
        return Err(format!("torn header ({} of {HEADER} bytes)", rest.len()));
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap_or_default());
    let seq = u64::from_le_bytes(rest[8..16].try_into().unwrap_or_default());
    if len > MAX_RECORD {
        return Err(format!("length {len} exceeds {MAX_RECORD}"));
    }
    if rest.len() < HEADER + len {
        return Err(format!(
            "torn record (seq {seq}: {} of {len} payload bytes)",
            rest.len() - HEADER
        ));
    }
    if frame_crc(seq, &rest[HEADER..HEADER + len]) != crc {
        return Err(format!("CRC mismatch (claimed seq {seq})"));
    }
    Ok((seq, len))
}

impl Spool {
    /// Opens the spool, repairing torn or corrupt tails.
    pub fn open(cfg: SpoolConfig) -> Result<(Spool, Recovery), SpoolError> {
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        let mut recovery = Recovery::default();

        let watermark_path = dir.join("acked");
        let watermark = match fs::read_to_string(&watermark_path) {
            Ok(text) => match text.trim().parse::<u64>() {
                Ok(w) => w,
                Err(_) => {
                    let why = format!(
                        "{} holds `{}`, not a seq; replaying every spooled record",
                        watermark_path.display(),
                        text.trim().chars().take(40).collect::<String>()
                    );
                    tracing::warn!("{why}");
                    recovery.watermark_reset = Some(why);
                    0
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&watermark_path)(e)),
        };

        let mut firsts = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match parse_segment_name(&name) {
                Some(first) => firsts.push(first),
                // The agent holds this lock while the spool is open.
                None if name == "acked"
                    || name == "acked.tmp"
                    || name == warden_state::lock::LOCK_FILE => {}
                None => {
                    tracing::warn!(file = %entry.path().display(), "ignoring a file that is not a spool segment")
                }
            }
        }
        firsts.sort_unstable();

        let mut spool = Spool {
            segments: BTreeMap::new(),
            index: BTreeMap::new(),
            active: None,
            next_seq: 1,
            persisted_watermark: watermark,
            bytes: 0,
            full_at: None,
            refused: 0,
            cfg,
        };
        let mut last_seq = 0u64;
        for first in firsts {
            let path = dir.join(segment_name(first));
            let buf = fs::read(&path).map_err(io_err(&path))?;
            // An older agent made segments under its umask: private from now on.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
            let mut offset = 0usize;
            let mut live = 0;
            while offset < buf.len() {
                let bad = match parse_frame(&buf, offset) {
                    Ok((seq, _)) if seq <= last_seq => {
                        Some(format!("seq {seq} does not follow {last_seq}"))
                    }
                    Ok((seq, len)) => {
                        last_seq = seq;
                        if seq > watermark {
                            spool.index.insert(
                                seq,
                                Slot {
                                    segment: first,
                                    offset: offset as u64,
                                    len: len as u32,
                                },
                            );
                            live += 1;
                        }
                        offset += HEADER + len;
                        None
                    }
                    Err(reason) => Some(reason),
                };
                if let Some(reason) = bad {
                    let t = Truncation {
                        file: path.clone(),
                        offset: offset as u64,
                        dropped_bytes: (buf.len() - offset) as u64,
                        reason,
                    };
                    tracing::warn!(
                        file = %t.file.display(), offset = t.offset, dropped_bytes = t.dropped_bytes,
                        reason = %t.reason, "spool segment truncated at a bad record"
                    );
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io_err(&path))?;
                    f.set_len(offset as u64).map_err(io_err(&path))?;
                    f.sync_all().map_err(io_err(&path))?;
                    recovery.truncated.push(t);
                    break;
                }
            }
            spool.bytes += offset as u64;
            spool.segments.insert(
                first,
                Segment {
                    path,
                    len: offset as u64,
                    live,
                },
            );
        }
        spool.next_seq = last_seq.max(watermark) + 1;
        // Fully acknowledged segments, except the newest (it holds the last seq), go now.
        let newest = spool.segments.keys().next_back().copied();
        let dead: Vec<u64> = spool
            .segments
            .iter()
            .filter(|(first, s)| s.live == 0 && Some(**first) != newest)
            .map(|(f, _)| *f)
            .collect();
        for first in dead {
            spool.delete_segment(first)?;
        }
        recovery.pending = spool.index.len() as u64;
        Ok((spool, recovery))
    }

    /// The seq the next appended record must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends records with consecutive seqs from `next_seq`, then fsyncs
    /// once. All or nothing with respect to the size cap.
    pub fn append_batch(&mut self, records: &[(u64, Vec<u8>)]) -> Result<(), SpoolError> {
        let mut expected = self.next_seq;
        let mut size = 0u64;
        for (seq, payload) in records {
            if *seq != expected {
                return Err(SpoolError::OutOfOrder {
                    expected,
                    got: *seq,
                });
            }
            if payload.len() > MAX_RECORD {
                return Err(SpoolError::TooLarge {
                    len: payload.len(),
                    max: MAX_RECORD,
                });
            }
            expected += 1;
            size += (HEADER + payload.len()) as u64;
        }
        if records.is_empty() {
            return Ok(());
        }
        let still_full = self.full_at.is_some_and(|at| self.bytes >= at);
        if still_full || self.bytes + size > self.cfg.max_bytes {
            self.full_at = Some(self.bytes);
            self.refused += records.len() as u64;
            return Err(SpoolError::Full {
                bytes: self.bytes,
                max_bytes: self.cfg.max_bytes,
                refused: records.len(),
            });
        }

        let mut buf = Vec::new();
        for (seq, payload) in records {
            let need_new = match &self.active {
                None => true,
                Some((first, _)) => {
                    let seg = &self.segments[first];
                    seg.len + buf.len() as u64 >= self.cfg.segment_bytes
                }
            };
            if need_new {
                self.write_active(&mut buf)?;
                self.rotate(*seq)?;
            }
            let first = self.active.as_ref().map_or(0, |(f, _)| *f);
            let offset = self.segments[&first].len + buf.len() as u64;
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&frame_crc(*seq, payload).to_le_bytes());
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(payload);
            self.index.insert(
                *seq,
                Slot {
                    segment: first,
                    offset,
                    len: payload.len() as u32,
                },
            );
            if let Some(s) = self.segments.get_mut(&first) {
                s.live += 1;
            }
        }
        self.write_active(&mut buf)?;
        // One fsync for the group (earlier segments of a rotation were synced at rotation).
        if let Some((first, file)) = &self.active {
            file.sync_data()
                .map_err(io_err(&self.segments[first].path))?;
        }
        self.next_seq = expected;
        self.full_at = None;
        Ok(())
    }

    fn write_active(&mut self, buf: &mut Vec<u8>) -> Result<(), SpoolError> {
        if buf.is_empty() {
            return Ok(());
        }
        if let Some((first, file)) = &mut self.active {
            let seg = self
                .segments
                .get_mut(first)
                .expect("active segment is known");
            file.write_all(buf).map_err(io_err(&seg.path))?;
            seg.len += buf.len() as u64;
            self.bytes += buf.len() as u64;
            buf.clear();
        }
        Ok(())
    }

    /// Syncs the active segment and starts a new one at `first_seq`.
    fn rotate(&mut self, first_seq: u64) -> Result<(), SpoolError> {
        let old = self.active.take();
        if let Some((first, file)) = &old {
            file.sync_data()
                .map_err(io_err(&self.segments[first].path))?;
        }
        let path = self.cfg.dir.join(segment_name(first_seq));
        // Records are private whatever the umask.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        // A new file's directory entry must be durable too.
        File::open(&self.cfg.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.cfg.dir))?;
        self.bytes += len;
        self.segments
            .insert(first_seq, Segment { path, len, live: 0 });
        self.active = Some((first_seq, file));
        // Only now that a newer segment exists may the old one go.
        if let Some((first, _)) = old {
            if self.segments.get(&first).is_some_and(|s| s.live == 0) {
                self.delete_segment(first)?;
            }
        }
        Ok(())
    }

    /// Acknowledges one record; returns whether it was pending.
    pub fn ack(&mut self, seq: u64) -> bool {
        let Some(slot) = self.index.remove(&seq) else {
            return false;
        };
        // The newest segment stays: it carries the highest seq, so seqs are never reused.
        let newest = self.segments.keys().next_back().copied();
        let dead = match self.segments.get_mut(&slot.segment) {
            Some(s) => {
                s.live = s.live.saturating_sub(1);
                s.live == 0 && Some(slot.segment) != newest
            }
            None => false,
        };
        if dead {
            if let Err(e) = self.delete_segment(slot.segment) {
                tracing::warn!(error = %e, "could not delete an acknowledged spool segment; it is retried later");
            }
        }
        true
    }

    fn delete_segment(&mut self, first: u64) -> Result<(), SpoolError> {
        self.persist_watermark()?;
        if let Some(seg) = self.segments.remove(&first) {
            match fs::remove_file(&seg.path) {
                Ok(()) => self.bytes = self.bytes.saturating_sub(seg.len),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.bytes = self.bytes.saturating_sub(seg.len)
                }
                Err(e) => {
                    let path = seg.path.clone();
                    self.segments.insert(first, seg);
                    return Err(io_err(&path)(e));
                }
            }
        }
        Ok(())
    }

    /// Every seq up to this one is acknowledged.
    fn acked_through(&self) -> u64 {
        match self.index.keys().next() {
            Some(first) => first - 1,
            None => self.next_seq - 1,
        }
    }

    fn persist_watermark(&mut self) -> Result<(), SpoolError> {
        let w = self.acked_through();
        if w == self.persisted_watermark {
            return Ok(());
        }
        // Whole, 0600, never through a link (its temporary is `acked.tmp`).
        let dst = self.cfg.dir.join("acked");
        warden_state::file::write_private(&dst, format!("{w}\n").as_bytes())
            .map_err(io_err(&dst))?;
        self.persisted_watermark = w;
        Ok(())
    }

    /// Up to `max` pending records with seq ≥ `from`, in order, read back
    /// from disk and checked again.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let mut files: HashMap<u64, File> = HashMap::new();
        let mut out = Vec::new();
        for (&seq, slot) in self.index.range(from..).take(max) {
            let seg = &self.segments[&slot.segment];
            let file = match files.entry(slot.segment) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(File::open(&seg.path).map_err(io_err(&seg.path))?)
                }
            };
            let mut buf = vec![0u8; HEADER + slot.len as usize];
            file.read_exact_at(&mut buf, slot.offset)
                .map_err(io_err(&seg.path))?;
            match parse_frame(&buf, 0) {
                Ok((s, _)) if s == seq => {}
                Ok((s, _)) => {
                    return Err(SpoolError::Corrupt {
                        path: seg.path.clone(),
                        offset: slot.offset,
                        reason: format!("expected seq {seq}, found {s}"),
                    })
                }
                Err(reason) => {
                    return Err(SpoolError::Corrupt {
                        path: seg.path.clone(),
                        offset: slot.offset,
                        reason,
                    })
                }
            }
            buf.drain(..HEADER);
            out.push((seq, buf));
        }
        Ok(out)
    }

    pub fn first_pending(&self) -> Option<u64> {
        self.index.keys().next().copied()
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            pending: self.index.len() as u64,
            bytes: self.bytes,
            max_bytes: self.cfg.max_bytes,
            full: self.full_at.is_some(),
            refused: self.refused,
            next_seq: self.next_seq,
            acked_through: self.acked_through(),
        }
    }

    /// Syncs the active segment and persists the watermark (clean shutdown).
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        if let Some((first, file)) = &self.active {
            file.sync_all()
                .map_err(io_err(&self.segments[first].path))?;
        }
        self.persist_watermark()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(dir: &Path, segment: u64, max: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_owned(),
            max_bytes: max,
            segment_bytes: segment,
        }
    }

    fn rec(seq: u64) -> (u64, Vec<u8>) {
        (seq, format!("record-{seq}").into_bytes())
    }

    fn append(s: &mut Spool, n: u64) {
        let first = s.next_seq();
        let batch: Vec<_> = (first..first + n).map(rec).collect();
        s.append_batch(&batch).unwrap();
    }

    fn pending_seqs(s: &Spool) -> Vec<u64> {
        s.read_from(0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(q, _)| q)
            .collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn append_read_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, r) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert_eq!(r, Recovery::default());
        assert_eq!(s.next_seq(), 1);
        append(&mut s, 5);
        let got = s.read_from(2, 2).unwrap();
        assert_eq!(got, vec![rec(2), rec(3)]);
        assert_eq!(s.stats().pending, 5);
        assert_eq!(s.first_pending(), Some(1));
    }

    #[test]
    fn restart_replays_exactly_the_unacked_in_order() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
            append(&mut s, 10);
            for q in [1, 2, 3, 5, 8] {
                assert!(s.ack(q));
            }
            assert!(!s.ack(3));
            assert!(!s.ack(99));
            s.flush().unwrap();
        }
        let (mut s, r) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert_eq!(
            r.pending, 7,
            "4,6,7,9,10 pending; 5 and 8 were acked above the watermark, so replayed"
        );
        assert_eq!(pending_seqs(&s), vec![4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(s.next_seq(), 11);
        append(&mut s, 1);
        assert_eq!(s.read_from(11, 1).unwrap(), vec![rec(11)]);
    }

    #[test]
    fn segments_and_the_watermark_are_private_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
            for _ in 0..3 {
                append(&mut s, 2);
            }
            s.ack(1);
            s.flush().unwrap();
            let files = segment_files(d.path());
            assert!(files.len() >= 2, "{files:?}");
            for f in &files {
                assert_eq!(mode(f), 0o600, "{}", f.display());
            }
            assert_eq!(mode(&d.path().join("acked")), 0o600);
            assert_eq!(mode(d.path()), 0o700);
            // As an older agent left them, under a 022 umask.
            for f in files.iter().chain([&d.path().join("acked")]) {
                fs::set_permissions(f, fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        for f in segment_files(d.path()) {
            assert_eq!(mode(&f), 0o600, "reopened {}", f.display());
        }
        s.ack(2);
        s.flush().unwrap();
        assert_eq!(mode(&d.path().join("acked")), 0o600);
    }

    #[test]
    fn watermark_advances_only_when_contiguous() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        append(&mut s, 4);
        s.ack(2);
        s.ack(3);
        assert_eq!(s.stats().acked_through, 0);
        s.ack(1);
        assert_eq!(s.stats().acked_through, 3);
        s.ack(4);
        assert_eq!(s.stats().acked_through, 4);
        assert_eq!(s.stats().pending, 0);
    }

    #[test]
    fn fully_acked_segments_are_deleted_and_seq_survives_it() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        for _ in 0..6 {
            append(&mut s, 2);
        }
        let before = segment_files(d.path()).len();
        assert!(before >= 3, "{before} segments");
        let bytes_before = s.stats().bytes;
        for q in 1..=12 {
            s.ack(q);
        }
        assert_eq!(
            segment_files(d.path()).len(),
            1,
            "only the newest segment stays"
        );
        assert!(s.stats().bytes < bytes_before);
        drop(s);
        // A crash before flush: the newest segment's acked records may come back,
        // but seqs are never reused.
        let (mut s, r) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        assert_eq!(s.next_seq(), 13);
        assert!(r.pending <= 3, "{}", r.pending);
        for q in pending_seqs(&s) {
            assert!(q > 9, "{q} was in a deleted segment");
            s.ack(q);
        }
        s.flush().unwrap();
        drop(s);
        let (s, r) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        assert_eq!((s.next_seq(), r.pending), (13, 0));
    }

    #[test]
    fn torn_tail_is_truncated_and_earlier_records_kept() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
            append(&mut s, 5);
        }
        let seg = segment_files(d.path()).pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 3).unwrap();
        let (mut s, r) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert_eq!(r.truncated.len(), 1);
        assert!(r.truncated[0].reason.contains("torn"), "{:?}", r.truncated);
        assert_eq!(pending_seqs(&s), vec![1, 2, 3, 4]);
        assert_eq!(s.next_seq(), 5);
        append(&mut s, 2);
        assert_eq!(pending_seqs(&s), vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn flipped_byte_is_caught_by_the_crc() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
            append(&mut s, 3);
        }
        let seg = segment_files(d.path()).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        let (s, r) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert!(r.truncated[0].reason.contains("CRC"), "{:?}", r.truncated);
        assert_eq!(pending_seqs(&s), vec![1, 2]);
        // Garbage appended after good frames is cut too.
        drop(s);
        let mut bytes = fs::read(&seg).unwrap();
        let good = bytes.len();
        bytes.extend_from_slice(&[0xAA; 40]);
        fs::write(&seg, &bytes).unwrap();
        let (_, r) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert_eq!(r.truncated[0].offset, good as u64);
        assert_eq!(fs::metadata(&seg).unwrap().len(), good as u64);
    }

    #[test]
    fn full_spool_refuses_new_records_and_keeps_old_ones() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(cfg(d.path(), 100, 200)).unwrap();
        append(&mut s, 6); // 6 × (16 + 8) = 144 bytes
        let err = s.append_batch(&[rec(7), rec(8), rec(9)]).unwrap_err();
        assert!(matches!(err, SpoolError::Full { refused: 3, .. }), "{err}");
        assert!(err.to_string().contains("spool.max_bytes"));
        let st = s.stats();
        assert!(st.full);
        assert_eq!(st.refused, 3);
        assert_eq!(st.next_seq, 7, "nothing written");
        assert_eq!(pending_seqs(&s), (1..=6).collect::<Vec<_>>());
        // Still full for a record that would fit: no flapping until space is freed.
        assert!(matches!(
            s.append_batch(&[rec(7)]),
            Err(SpoolError::Full { .. })
        ));
        // Acks that free no segment free no space.
        for q in 1..=4 {
            s.ack(q);
        }
        assert!(s.append_batch(&[rec(7)]).is_err());
        s.ack(5); // the first segment goes
        append(&mut s, 2);
        assert!(!s.stats().full);
        assert_eq!(pending_seqs(&s), vec![6, 7, 8]);
    }

    #[test]
    fn corrupt_watermark_replays_everything() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
            append(&mut s, 3);
            s.ack(1);
            s.flush().unwrap();
        }
        assert_eq!(fs::read_to_string(d.path().join("acked")).unwrap(), "1\n");
        fs::write(d.path().join("acked"), "garbage").unwrap();
        let (s, r) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert!(r.watermark_reset.is_some());
        assert_eq!(pending_seqs(&s), vec![1, 2, 3]);
    }

    #[test]
    fn out_of_order_and_oversized_appends_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert!(matches!(
            s.append_batch(&[rec(2)]),
            Err(SpoolError::OutOfOrder {
                expected: 1,
                got: 2
            })
        ));
        assert!(matches!(
            s.append_batch(&[(1, vec![0; MAX_RECORD + 1])]),
            Err(SpoolError::TooLarge { .. })
        ));
        assert_eq!(s.stats().pending, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Whatever bytes follow a run of good frames, open keeps the good
        /// frames, cuts the rest, and never panics.
        #[test]
        fn open_survives_arbitrary_tails(good in 0u64..6, tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let d = tempfile::tempdir().unwrap();
            let c = cfg(d.path(), 1 << 20, 1 << 30);
            {
                let (mut s, _) = Spool::open(c.clone()).unwrap();
                append(&mut s, good);
            }
            let seg = d.path().join(segment_name(1));
            let mut bytes = fs::read(&seg).unwrap_or_default();
            bytes.extend_from_slice(&tail);
            fs::write(&seg, &bytes).unwrap();
            let (s, r) = Spool::open(c).unwrap();
            let seqs = pending_seqs(&s);
            prop_assert!(seqs.len() as u64 >= good);
            prop_assert_eq!(&seqs[..good as usize], &(1..=good).collect::<Vec<_>>()[..]);
            prop_assert_eq!(s.next_seq(), seqs.last().map_or(1, |q| q + 1));
            prop_assert!(r.truncated.len() <= 1);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Ack(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..6).prop_map(Op::Append),
            any::<u8>().prop_map(Op::Ack),
            Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn pending_matches_a_model(ops in proptest::collection::vec(op(), 1..40)) {
            let d = tempfile::tempdir().unwrap();
            let c = cfg(d.path(), 96, 1 << 30);
            let (mut s, _) = Spool::open(c.clone()).unwrap();
            let mut model = std::collections::BTreeSet::new();
            let mut next = 1u64;
            for o in ops {
                match o {
                    Op::Append(n) => {
                        append(&mut s, n as u64);
                        model.extend(next..next + n as u64);
                        next += n as u64;
                    }
                    Op::Ack(k) => {
                        if !model.is_empty() {
                            let seq = *model.iter().nth(k as usize % model.len()).unwrap();
                            prop_assert!(s.ack(seq));
                            model.remove(&seq);
                        }
                    }
                    Op::Reopen => {
                        s.flush().unwrap();
                        drop(s);
                        s = Spool::open(c.clone()).unwrap().0;
                        // Nothing unacknowledged is lost; acknowledged records above the
                        // watermark may come back (their segment was still on disk).
                        let low = model.iter().next().copied().unwrap_or(next);
                        let got: std::collections::BTreeSet<u64> = pending_seqs(&s).into_iter().collect();
                        prop_assert!(model.is_subset(&got), "lost: {:?}", model.difference(&got).collect::<Vec<_>>());
                        prop_assert!(got.iter().all(|q| (low..next).contains(q)), "{got:?} outside {low}..{next}");
                        model = got;
                    }
                }
                prop_assert_eq!(pending_seqs(&s), model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(s.next_seq(), next);
            }
        }
    }
}
