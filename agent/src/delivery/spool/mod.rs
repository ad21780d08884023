//! The durable spool: every record is appended here (fsync'd in groups)
//! before it is sent, and leaves only on the coordinator's receipt, when
//! the coordinator refuses it for good (it is then set aside, see
//! [`aside`]), or, for a telemetry sample, when room is needed for evidence.
//!
//! On disk, `dir` holds:
//! - segment files `seg-{first_seq:020}.log`, runs of frames ([`frame`]);
//! - `acked`, the decimal seq through which every record is done
//!   (acknowledged, set aside or shed), written to `acked.tmp`, fsync'd,
//!   renamed. It is persisted before a segment is deleted and at flush, not
//!   on every ack: replaying a few acknowledged records after a crash is
//!   harmless, the coordinator is idempotent on seq. At open it must not
//!   exceed the last seq on disk, or it is ignored (everything is replayed).
//! - `unanchored` while the spool was started empty and the coordinator has
//!   not yet said its last stored seq for this node (see [`Spool::anchor`]);
//! - `owner`, the node id whose key signed the records;
//! - `refused.log` / `refused.txt`, the set-aside records;
//! - `lock`, held (flock) by the one agent using the spool.
//!
//! Seqs are never given out twice: the newest segment holds the highest seq
//! (it is never deleted, and never compacted), and damage in it is assumed
//! to hide as many seqs as it could hold. A damaged frame anywhere is
//! skipped, counted and reported; the frames after it are kept.
//! The in-memory index holds positions only, never payloads.

mod aside;
pub mod frame;

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::{
        fs::{FileExt, OpenOptionsExt, PermissionsExt},
        io::AsRawFd,
    },
    path::{Path, PathBuf},
};

use frame::HEADER;
pub use frame::{Class, MAX_RECORD};

const ACKED: &str = "acked";
const UNANCHORED: &str = "unanchored";
const OWNER: &str = "owner";
const LOCK: &str = "lock";
const RENUMBER: &str = "renumber.tmp";
/// Seqs above this are never given out, so `seq + 1` cannot overflow
/// whatever a coordinator says.
pub const MAX_SEQ: u64 = 1 << 62;
/// Files the outbox keeps in the spool directory.
pub const RELINKS: &str = "relinks";

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
    /// Damaged frames skipped (the frames around them are kept).
    pub damaged: Vec<Damaged>,
    pub pending: u64,
    /// Why the `acked` file was ignored, if it was.
    pub watermark_reset: Option<String>,
}

/// Bytes of a segment that held no frame that verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    pub file: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    pub reason: String,
    /// The good seqs around it: what was lost lies strictly between.
    pub after_seq: u64,
    pub before_seq: Option<u64>,
}

/// Figures for status, heartbeats and telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SpoolStats {
    pub pending: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Evidence is refused: the spool is full of evidence (no telemetry left to shed).
    pub full: bool,
    /// Evidence records refused since start because the spool was full.
    pub refused: u64,
    /// New telemetry samples are being shed for lack of room.
    pub shedding: bool,
    /// Telemetry samples not kept since start: not spooled, or evicted for evidence.
    pub shed: u64,
    /// Records in the set-aside log (refused for good, or signed by another node key).
    pub set_aside: u64,
    pub set_aside_bytes: u64,
    /// Damaged frames found since start (at open, or when read back).
    pub corrupt: u64,
    /// False while a spool started empty waits for the coordinator's last seq.
    pub anchored: bool,
    pub next_seq: u64,
    pub acked_through: u64,
}

impl SpoolStats {
    /// The figures as they go on the wire (heartbeats, telemetry).
    pub fn to_pb(&self) -> warden_proto::pb::SpoolState {
        warden_proto::pb::SpoolState {
            pending: self.pending,
            bytes: self.bytes,
            max_bytes: self.max_bytes,
            full: self.full,
            refused: self.refused,
            shed: self.shed,
            shedding: self.shedding,
            set_aside: self.set_aside,
            corrupt: self.corrupt,
        }
    }
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool {} is in use by another warden agent (its lock file is held); two agents on one spool would give the same seqs to different records — stop the other agent or give this one its own state_dir", dir.display())]
    Locked { dir: PathBuf },
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
    #[error("the coordinator says it holds seqs up to {last_stored}, beyond any seq a spool gives out ({MAX_SEQ}); ignored")]
    Anchor { last_stored: u64 },
    #[error("spooled record {seq} could not be renumbered: {reason}")]
    Renumber { seq: u64, reason: String },
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

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn remove_if_present(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// The room a new record meets, as the admission policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Bytes on disk plus bytes admitted for the batch being written.
    pub used: u64,
    pub max: u64,
    /// Bytes compaction could free: telemetry samples and done records.
    pub reclaimable: u64,
    /// Where shedding began, while it lasts.
    pub shed_at: Option<u64>,
}

/// What the spool does with a new record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Take,
    /// Take it after compaction frees this many bytes.
    Reclaim(u64),
    /// A telemetry sample not kept.
    Shed,
    /// Evidence refused: nothing left to free.
    Full,
}

/// The admission policy. Telemetry takes free room only, and once shed it
/// stays shed until room comes back below where shedding began (no
/// flapping). Evidence takes free room, else room freed by dropping
/// telemetry and done records; it is refused only when the spool holds
/// nothing but pending evidence.
pub fn decide(class: Class, size: u64, room: Room) -> Decision {
    let over = (room.used + size).saturating_sub(room.max);
    match class {
        Class::Telemetry if over > 0 || room.shed_at.is_some_and(|at| room.used >= at) => {
            Decision::Shed
        }
        Class::Telemetry => Decision::Take,
        Class::Evidence if over == 0 => Decision::Take,
        Class::Evidence if over <= room.reclaimable => Decision::Reclaim(over),
        Class::Evidence => Decision::Full,
    }
}

/// What [`Spool::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Take,
    Shed,
    Full,
}

/// Re-signs a record's payload under a new seq (the outbox holds the key).
pub type Resign<'a> = dyn FnMut(u64, &[u8]) -> Result<Vec<u8>, String> + 'a;

/// A frame read back: its class and payload, or why it is damaged.
type FrameRead = Result<(Class, Vec<u8>), String>;

/// What [`Spool::anchor`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchoring {
    Unchanged,
    /// The next seq jumped past the coordinator's last one.
    Skipped {
        from: u64,
        to: u64,
    },
    /// Unsent records were renumbered (and re-signed) to follow it.
    Renumbered {
        count: u64,
        first: u64,
    },
}

/// What compaction dropped to make room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Eviction {
    pub freed: u64,
    pub shed: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    len: u64,
    /// Pending records in this segment.
    live: u64,
    /// Bytes of its pending evidence frames: what compaction must keep.
    evidence_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    segment: u64,
    offset: u64,
    len: u32,
    class: Class,
}

impl Slot {
    fn size(&self) -> u64 {
        (HEADER + self.len as usize) as u64
    }
}

/// The part of the spool read back from disk.
#[derive(Debug)]
struct OnDisk {
    /// By first seq.
    segments: BTreeMap<u64, Segment>,
    /// Pending records by seq.
    index: BTreeMap<u64, Slot>,
    next_seq: u64,
    persisted_watermark: u64,
    bytes: u64,
    anchored: bool,
}

/// The spool; owned by one task, no internal locking.
#[derive(Debug)]
pub struct Spool {
    cfg: SpoolConfig,
    disk: OnDisk,
    active: Option<(u64, File)>,
    /// Bytes admitted for the batch about to be appended.
    reserved: u64,
    shed_at: Option<u64>,
    full: bool,
    refused: u64,
    shed: u64,
    corrupt: u64,
    aside: aside::Aside,
    _lock: File,
}

/// Takes the spool's lock, or says who holds it.
fn lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK);
    // Private like every other state file, and never through a link.
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_err(&path))?;
    // A lock file left by an older version may still be world-readable.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err(&path))?;
    // A child this process forks shares the lock of the descriptor it was
    // opened with until its exec closes it (a moment): a spool reopened
    // right after it was closed may find it held by such a child, so a
    // held lock is tried again for a little while before it means another
    // agent.
    for attempt in 0.. {
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_err(&path)(e));
        }
        if attempt == 10 {
            return Err(SpoolError::Locked {
                dir: dir.to_owned(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(f)
}

fn read_watermark(dir: &Path) -> Result<(u64, Option<String>), SpoolError> {
    let path = dir.join(ACKED);
    match fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(w) => Ok((w, None)),
            Err(_) => Ok((
                0,
                Some(format!(
                    "{} holds `{}`, not a seq; replaying every spooled record",
                    path.display(),
                    text.trim().chars().take(40).collect::<String>()
                )),
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, None)),
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn write_watermark(dir: &Path, w: u64) -> Result<(), SpoolError> {
    // Whole, 0600, never through a link (its temporary is `acked.tmp`).
    let dst = dir.join(ACKED);
    warden_state::file::write_private(&dst, format!("{w}\n").as_bytes()).map_err(io_err(&dst))
}

/// Finishes a renumbering that was committed before a crash, or drops one
/// that was not. Each step can be repeated.
fn finish_renumber(dir: &Path) -> Result<(), SpoolError> {
    let tmp = dir.join(RENUMBER);
    if !tmp.exists() {
        return Ok(());
    }
    let commit = tmp.join("COMMIT");
    let moving = tmp.join("MOVING");
    if commit.exists() {
        // COMMIT: the watermark, then the old segments to delete.
        let text = fs::read_to_string(&commit).map_err(io_err(&commit))?;
        let mut lines = text.lines();
        let watermark = lines.next().and_then(|l| l.parse::<u64>().ok());
        for name in lines.filter(|n| parse_segment_name(n).is_some()) {
            remove_if_present(&dir.join(name))?;
        }
        sync_dir(dir)?;
        fs::write(&moving, watermark.unwrap_or(0).to_string()).map_err(io_err(&moving))?;
        sync_dir(&tmp)?;
        remove_if_present(&commit)?;
    }
    if moving.exists() {
        let watermark = fs::read_to_string(&moving)
            .map_err(io_err(&moving))?
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if parse_segment_name(&name).is_some() {
                fs::rename(entry.path(), dir.join(&name)).map_err(io_err(&entry.path()))?;
            }
        }
        write_watermark(dir, watermark)?;
        remove_if_present(&dir.join(UNANCHORED))?;
        sync_dir(dir)?;
    }
    fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    sync_dir(dir)
}

/// Reads the segments back, checks the watermark against them and builds
/// the index of pending records.
fn load(dir: &Path) -> Result<(OnDisk, Recovery, u64), SpoolError> {
    finish_renumber(dir)?;
    let mut recovery = Recovery::default();
    let (mut watermark, reset) = read_watermark(dir)?;
    recovery.watermark_reset = reset;

    let mut firsts = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(first) = parse_segment_name(&name) {
            firsts.push(first);
        } else if name.ends_with(".compact") {
            // A compaction that did not finish: the segment itself is intact.
            remove_if_present(&entry.path())?;
        } else if ![
            ACKED,
            "acked.tmp",
            // The agent's lock on its spool directory (warden-state).
            warden_state::lock::LOCK_FILE,
            UNANCHORED,
            OWNER,
            LOCK,
            RELINKS,
            aside::LOG,
            aside::REASONS,
        ]
        .contains(&name.as_str())
        {
            tracing::warn!(file = %entry.path().display(), "ignoring a file that is not a spool segment");
        }
    }
    firsts.sort_unstable();
    let fresh = firsts.is_empty();
    if fresh && !dir.join(UNANCHORED).exists() {
        fs::write(dir.join(UNANCHORED), b"").map_err(io_err(&dir.join(UNANCHORED)))?;
        sync_dir(dir)?;
    }

    // Read every segment; the watermark is checked once the last seq is known.
    let mut scans = Vec::with_capacity(firsts.len());
    let mut after = 0u64;
    for (i, first) in firsts.iter().enumerate() {
        let path = dir.join(segment_name(*first));
        let buf = fs::read(&path).map_err(io_err(&path))?;
        // An older agent made segments under its umask: private from now on.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
        let scan = frame::scan(&buf, after.max(first.saturating_sub(1)));
        let last_good = scan.frames.last().map_or(0, |(_, f)| f.seq);
        after = match firsts.get(i + 1) {
            // An older segment's seqs all lie below the next one's name,
            // whatever damage at its end could have held.
            Some(next) => (scan.floor - 1).min(next - 1).max(last_good),
            None => scan.floor - 1,
        };
        scans.push((path, buf.len() as u64, scan));
    }
    let highest = after;
    if watermark > highest {
        let why = format!(
            "{} says every record through seq {watermark} is acknowledged, but the spool's last seq is {highest}; ignored: every spooled record is replayed (the coordinator acknowledges what it already has again)",
            dir.join(ACKED).display()
        );
        recovery.watermark_reset = Some(why);
        watermark = 0;
    }
    if let Some(why) = &recovery.watermark_reset {
        tracing::warn!("{why}");
    }

    let mut disk = OnDisk {
        segments: BTreeMap::new(),
        index: BTreeMap::new(),
        next_seq: highest + 1,
        persisted_watermark: watermark,
        bytes: 0,
        anchored: !dir.join(UNANCHORED).exists(),
    };
    let mut corrupt = 0;
    for (first, (path, len, scan)) in firsts.iter().zip(scans) {
        let mut seg = Segment {
            path: path.clone(),
            len,
            live: 0,
            evidence_bytes: 0,
        };
        for (offset, f) in &scan.frames {
            if f.seq > watermark {
                disk.index.insert(
                    f.seq,
                    Slot {
                        segment: *first,
                        offset: *offset as u64,
                        len: f.len as u32,
                        class: f.class,
                    },
                );
                seg.live += 1;
                if f.class == Class::Evidence {
                    seg.evidence_bytes += f.size();
                }
            }
        }
        for d in scan.damage {
            let d = Damaged {
                file: path.clone(),
                offset: d.offset as u64,
                bytes: d.len as u64,
                reason: d.reason,
                after_seq: d.after_seq,
                before_seq: d.before_seq,
            };
            tracing::warn!(
                file = %d.file.display(), offset = d.offset, bytes = d.bytes, reason = %d.reason,
                after_seq = d.after_seq, before_seq = ?d.before_seq,
                "damaged spool frame skipped; the records after it are kept and its seqs are never reused"
            );
            corrupt += 1;
            recovery.damaged.push(d);
        }
        disk.bytes += len;
        disk.segments.insert(*first, seg);
    }
    recovery.pending = disk.index.len() as u64;
    Ok((disk, recovery, corrupt))
}

impl Spool {
    /// Opens the spool (taking its lock), skipping damaged frames.
    pub fn open(cfg: SpoolConfig) -> Result<(Spool, Recovery), SpoolError> {
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        let lock = lock(&dir)?;
        let (disk, recovery, corrupt) = load(&dir)?;
        let mut spool = Spool {
            aside: aside::Aside::open(&dir)?,
            cfg,
            disk,
            active: None,
            reserved: 0,
            shed_at: None,
            full: false,
            refused: 0,
            shed: 0,
            corrupt,
            _lock: lock,
        };
        spool.delete_dead_segments()?;
        Ok((spool, recovery))
    }

    /// The spool's directory (the outbox keeps its relinks file there).
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Fully done segments, except the newest (it holds the last seq), go.
    fn delete_dead_segments(&mut self) -> Result<(), SpoolError> {
        let newest = self.newest();
        let dead: Vec<u64> = self
            .disk
            .segments
            .iter()
            .filter(|(first, s)| s.live == 0 && Some(**first) != newest)
            .map(|(f, _)| *f)
            .collect();
        for first in dead {
            self.delete_segment(first)?;
        }
        Ok(())
    }

    fn newest(&self) -> Option<u64> {
        self.disk.segments.keys().next_back().copied()
    }

    /// The seq the next appended record must carry.
    pub fn next_seq(&self) -> u64 {
        self.disk.next_seq
    }

    /// Whether a record of `class` with a payload of `len` bytes may be
    /// appended; evidence may first evict telemetry (and done records) by
    /// compaction. A record taken has its room reserved until the next
    /// [`Spool::append_batch`], which must carry exactly the records taken.
    pub fn admit(&mut self, class: Class, len: usize) -> Result<(Admit, Eviction), SpoolError> {
        if len > MAX_RECORD {
            return Err(SpoolError::TooLarge {
                len,
                max: MAX_RECORD,
            });
        }
        let size = (HEADER + len) as u64;
        let room = Room {
            used: self.disk.bytes + self.reserved,
            max: self.cfg.max_bytes,
            reclaimable: self.reclaimable(),
            shed_at: self.shed_at,
        };
        let mut eviction = Eviction::default();
        let taken = match decide(class, size, room) {
            Decision::Take => true,
            Decision::Shed => {
                self.shed_at.get_or_insert(room.used);
                self.shed += 1;
                return Ok((Admit::Shed, eviction));
            }
            Decision::Reclaim(need) => {
                eviction = self.reclaim(need)?;
                self.disk.bytes + self.reserved + size <= self.cfg.max_bytes
            }
            Decision::Full => false,
        };
        if !taken {
            self.full = true;
            self.refused += 1;
            return Ok((Admit::Full, eviction));
        }
        self.reserved += size;
        match class {
            Class::Evidence => self.full = false,
            Class::Telemetry => self.shed_at = None,
        }
        Ok((Admit::Take, eviction))
    }

    fn reclaimable(&self) -> u64 {
        self.disk
            .segments
            .values()
            .map(|s| s.len - s.evidence_bytes)
            .sum()
    }

    /// Compacts the oldest segments holding telemetry or done records
    /// until `need` bytes are free (or nothing more can be freed).
    fn reclaim(&mut self, need: u64) -> Result<Eviction, SpoolError> {
        let mut total = Eviction::default();
        let start = self.disk.bytes;
        while start.saturating_sub(self.disk.bytes) < need {
            let Some(first) = self
                .disk
                .segments
                .iter()
                .find(|(_, s)| s.len > s.evidence_bytes)
                .map(|(f, _)| *f)
            else {
                break;
            };
            // The newest segment is never rewritten: a new one takes its place
            // first (which deletes it outright if nothing in it is pending).
            if Some(first) == self.newest() {
                if first >= self.disk.next_seq {
                    break;
                }
                self.rotate(self.disk.next_seq)?;
            }
            if self.disk.segments.contains_key(&first) {
                let e = self.compact(first)?;
                total.shed += e.shed;
                total.first_seq = total.first_seq.or(e.first_seq);
                total.last_seq = e.last_seq.or(total.last_seq);
            }
        }
        total.freed = start.saturating_sub(self.disk.bytes);
        self.shed += total.shed;
        Ok(total)
    }

    /// Rewrites one (not the newest) segment with only its pending
    /// evidence; its telemetry samples are shed.
    fn compact(&mut self, first: u64) -> Result<Eviction, SpoolError> {
        let seg = &self.disk.segments[&first];
        let path = seg.path.clone();
        let old_len = seg.len;
        let buf = fs::read(&path).map_err(io_err(&path))?;
        let end = self
            .disk
            .segments
            .range(first + 1..)
            .next()
            .map_or(u64::MAX, |(f, _)| *f);
        let slots: Vec<(u64, Slot)> = self
            .disk
            .index
            .range(first..end)
            .filter(|(_, s)| s.segment == first)
            .map(|(q, s)| (*q, *s))
            .collect();
        let mut out = Vec::new();
        let mut eviction = Eviction::default();
        let mut kept = Vec::new();
        for (seq, slot) in slots {
            let bytes = buf.get(slot.offset as usize..(slot.offset + slot.size()) as usize);
            match bytes.map(frame::parse) {
                Some(Ok(f)) if f.seq == seq && slot.class == Class::Telemetry => {
                    self.disk.index.remove(&seq);
                    eviction.shed += 1;
                    eviction.first_seq.get_or_insert(seq);
                    eviction.last_seq = Some(seq);
                }
                Some(Ok(f)) if f.seq == seq => {
                    kept.push((seq, out.len() as u64));
                    out.extend_from_slice(bytes.unwrap_or_default());
                }
                _ => {
                    tracing::warn!(seq, file = %path.display(), "spooled record is damaged on disk; skipped, its seq is not reused");
                    self.disk.index.remove(&seq);
                    self.corrupt += 1;
                }
            }
        }
        let tmp = path.with_extension("log.compact");
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&out).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.cfg.dir)?;
        let mut evidence_bytes = 0;
        for (seq, offset) in &kept {
            if let Some(slot) = self.disk.index.get_mut(seq) {
                slot.offset = *offset;
                evidence_bytes += slot.size();
            }
        }
        let new_len = out.len() as u64;
        if let Some(s) = self.disk.segments.get_mut(&first) {
            s.len = new_len;
            s.live = kept.len() as u64;
            s.evidence_bytes = evidence_bytes;
        }
        self.disk.bytes = self.disk.bytes - old_len + new_len;
        eviction.freed = old_len - new_len;
        if kept.is_empty() {
            self.delete_segment(first)?;
        }
        Ok(eviction)
    }

    /// Appends records with consecutive seqs from `next_seq`, then fsyncs
    /// once. All or nothing with respect to the size cap; the outbox admits
    /// each record first ([`Spool::admit`]).
    pub fn append_batch(&mut self, records: &[(u64, Class, Vec<u8>)]) -> Result<(), SpoolError> {
        let reserved = std::mem::take(&mut self.reserved);
        let mut expected = self.disk.next_seq;
        let mut size = 0u64;
        for (seq, _, payload) in records {
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
        // Room admitted for exactly these records is theirs; otherwise the cap decides.
        if reserved < size && self.disk.bytes + size > self.cfg.max_bytes {
            self.refused += records.len() as u64;
            return Err(SpoolError::Full {
                bytes: self.disk.bytes,
                max_bytes: self.cfg.max_bytes,
                refused: records.len(),
            });
        }

        let mut buf = Vec::new();
        for (seq, class, payload) in records {
            let need_new = match &self.active {
                None => true,
                Some((first, _)) => {
                    self.disk.segments[first].len + buf.len() as u64 >= self.cfg.segment_bytes
                }
            };
            if need_new {
                self.write_active(&mut buf)?;
                self.rotate(*seq)?;
            }
            let first = self.active.as_ref().map_or(0, |(f, _)| *f);
            let offset = self.disk.segments[&first].len + buf.len() as u64;
            frame::encode(*seq, *class, payload, &mut buf);
            let slot = Slot {
                segment: first,
                offset,
                len: payload.len() as u32,
                class: *class,
            };
            self.disk.index.insert(*seq, slot);
            if let Some(s) = self.disk.segments.get_mut(&first) {
                s.live += 1;
                if *class == Class::Evidence {
                    s.evidence_bytes += slot.size();
                }
            }
        }
        self.write_active(&mut buf)?;
        // One fsync for the group (earlier segments of a rotation were synced at rotation).
        if let Some((first, file)) = &self.active {
            file.sync_data()
                .map_err(io_err(&self.disk.segments[first].path))?;
        }
        self.disk.next_seq = expected;
        Ok(())
    }

    fn write_active(&mut self, buf: &mut Vec<u8>) -> Result<(), SpoolError> {
        if buf.is_empty() {
            return Ok(());
        }
        if let Some((first, file)) = &mut self.active {
            let seg = self
                .disk
                .segments
                .get_mut(first)
                .expect("active segment is known");
            file.write_all(buf).map_err(io_err(&seg.path))?;
            seg.len += buf.len() as u64;
            self.disk.bytes += buf.len() as u64;
            buf.clear();
        }
        Ok(())
    }

    /// Syncs the active segment and starts a new one at `first_seq` (its
    /// name then says that seqs below it were given out).
    fn rotate(&mut self, first_seq: u64) -> Result<(), SpoolError> {
        let old = self.active.take();
        if let Some((first, file)) = &old {
            file.sync_data()
                .map_err(io_err(&self.disk.segments[first].path))?;
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
        sync_dir(&self.cfg.dir)?;
        self.disk.bytes += len;
        let previous = self.newest();
        self.disk.segments.insert(
            first_seq,
            Segment {
                path,
                len,
                live: 0,
                evidence_bytes: 0,
            },
        );
        self.active = Some((first_seq, file));
        // Only now that a newer segment exists may the old newest one go.
        if let Some(first) = previous.filter(|p| *p != first_seq) {
            if self.disk.segments.get(&first).is_some_and(|s| s.live == 0) {
                self.delete_segment(first)?;
            }
        }
        Ok(())
    }

    /// Drops one pending record from the index; returns its slot.
    fn settle(&mut self, seq: u64) -> Option<Slot> {
        let slot = self.disk.index.remove(&seq)?;
        // The newest segment stays: it carries the highest seq, so seqs are never reused.
        let newest = self.newest();
        let dead = match self.disk.segments.get_mut(&slot.segment) {
            Some(s) => {
                s.live = s.live.saturating_sub(1);
                if slot.class == Class::Evidence {
                    s.evidence_bytes = s.evidence_bytes.saturating_sub(slot.size());
                }
                s.live == 0 && Some(slot.segment) != newest
            }
            None => false,
        };
        if dead {
            if let Err(e) = self.delete_segment(slot.segment) {
                tracing::warn!(error = %e, "could not delete a spent spool segment; it is retried later");
            }
        }
        Some(slot)
    }

    /// Acknowledges one record; returns whether it was pending.
    pub fn ack(&mut self, seq: u64) -> bool {
        self.settle(seq).is_some()
    }

    /// Moves pending records to the set-aside log (one fsync for all), then
    /// out of the spool; returns how many were pending.
    pub fn set_aside(&mut self, seqs: &[u64], why: &str) -> Result<u64, SpoolError> {
        let mut moved = Vec::new();
        let mut batch = Vec::new();
        for seq in seqs {
            match self.read_slot(*seq)? {
                Some(Ok((class, payload))) => batch.push((*seq, class, payload)),
                Some(Err(reason)) => {
                    tracing::warn!(seq, %reason, "a record to set aside is damaged on disk; dropped, its seq is not reused");
                    self.corrupt += 1;
                    self.settle(*seq);
                    continue;
                }
                None => continue,
            }
            moved.push(*seq);
            if batch.len() >= 1024 {
                self.aside.put(&batch, why)?;
                batch.clear();
            }
        }
        self.aside.put(&batch, why)?;
        for seq in &moved {
            self.settle(*seq);
        }
        Ok(moved.len() as u64)
    }

    /// A pending record's class and payload read back from disk (None: not
    /// pending; `Err`: damaged, with why).
    fn read_slot(&self, seq: u64) -> Result<Option<FrameRead>, SpoolError> {
        let Some(slot) = self.disk.index.get(&seq).copied() else {
            return Ok(None);
        };
        let seg = &self.disk.segments[&slot.segment];
        let file = File::open(&seg.path).map_err(io_err(&seg.path))?;
        Ok(Some(read_frame(&file, seq, &slot)))
    }

    fn delete_segment(&mut self, first: u64) -> Result<(), SpoolError> {
        self.persist_watermark()?;
        if self.active.as_ref().is_some_and(|(f, _)| *f == first) {
            self.active = None;
        }
        if let Some(seg) = self.disk.segments.remove(&first) {
            match fs::remove_file(&seg.path) {
                Ok(()) => self.disk.bytes = self.disk.bytes.saturating_sub(seg.len),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.disk.bytes = self.disk.bytes.saturating_sub(seg.len)
                }
                Err(e) => {
                    let path = seg.path.clone();
                    self.disk.segments.insert(first, seg);
                    return Err(io_err(&path)(e));
                }
            }
        }
        Ok(())
    }

    /// Every seq up to this one is done (acknowledged, set aside or shed).
    fn acked_through(&self) -> u64 {
        match self.disk.index.keys().next() {
            Some(first) => first - 1,
            None => self.disk.next_seq - 1,
        }
    }

    fn persist_watermark(&mut self) -> Result<(), SpoolError> {
        let w = self.acked_through();
        if w == self.disk.persisted_watermark {
            return Ok(());
        }
        write_watermark(&self.cfg.dir, w)?;
        self.disk.persisted_watermark = w;
        Ok(())
    }

    /// Up to `max` pending records with seq ≥ `from`, in order, read back
    /// from disk and checked again. A damaged one is dropped (counted,
    /// logged with its seq, which is never reused) and the rest are read.
    pub fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let mut files: HashMap<u64, File> = HashMap::new();
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for (&seq, slot) in self.disk.index.range(from..).take(max) {
            let seg = &self.disk.segments[&slot.segment];
            let file = match files.entry(slot.segment) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(File::open(&seg.path).map_err(io_err(&seg.path))?)
                }
            };
            match read_frame(file, seq, slot) {
                Ok((_, payload)) => out.push((seq, payload)),
                Err(reason) => {
                    tracing::warn!(seq, file = %seg.path.display(), offset = slot.offset, %reason,
                        "spooled record is damaged on disk; skipped (it cannot be sent), its seq is never reused");
                    damaged.push(seq);
                }
            }
        }
        for seq in damaged {
            self.corrupt += 1;
            self.settle(seq);
        }
        Ok(out)
    }

    pub fn first_pending(&self) -> Option<u64> {
        self.disk.index.keys().next().copied()
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            pending: self.disk.index.len() as u64,
            bytes: self.disk.bytes,
            max_bytes: self.cfg.max_bytes,
            full: self.full,
            refused: self.refused,
            shedding: self.shed_at.is_some(),
            shed: self.shed,
            set_aside: self.aside.count,
            set_aside_bytes: self.aside.bytes,
            corrupt: self.corrupt,
            anchored: self.disk.anchored,
            next_seq: self.disk.next_seq,
            acked_through: self.acked_through(),
        }
    }

    /// Syncs the active segment and persists the watermark (clean shutdown).
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        if let Some((first, file)) = &self.active {
            file.sync_all()
                .map_err(io_err(&self.disk.segments[first].path))?;
        }
        self.persist_watermark()
    }

    /// Binds the spool to the node whose key signs its records. Records
    /// another node key signed (node.key was replaced) can never be
    /// delivered by this one: they are set aside and the spool starts again
    /// empty, so the new identity's seqs start at 1. Returns the previous
    /// owner and how many of its records were set aside, when it changed.
    pub fn claim(&mut self, node_id: &str) -> Result<Option<(String, u64)>, SpoolError> {
        let path = self.cfg.dir.join(OWNER);
        let owner = match fs::read_to_string(&path) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        if owner == node_id {
            return Ok(None);
        }
        let mut changed = None;
        if !owner.is_empty() {
            let seqs: Vec<u64> = self.disk.index.keys().copied().collect();
            let moved = self.set_aside(
                &seqs,
                &format!("signed by node {owner}, but this agent is node {node_id} (node.key was replaced); it can never be delivered"),
            )?;
            self.reset()?;
            changed = Some((owner, moved));
        }
        warden_state::file::write_private(&path, format!("{node_id}\n").as_bytes())
            .map_err(io_err(&path))?;
        Ok(changed)
    }

    /// Deletes every segment and the watermark: an empty, unanchored spool.
    fn reset(&mut self) -> Result<(), SpoolError> {
        self.active = None;
        fs::write(self.cfg.dir.join(UNANCHORED), b"")
            .map_err(io_err(&self.cfg.dir.join(UNANCHORED)))?;
        for seg in std::mem::take(&mut self.disk.segments).into_values() {
            remove_if_present(&seg.path)?;
        }
        remove_if_present(&self.cfg.dir.join(ACKED))?;
        sync_dir(&self.cfg.dir)?;
        self.disk = OnDisk {
            segments: BTreeMap::new(),
            index: BTreeMap::new(),
            next_seq: 1,
            persisted_watermark: 0,
            bytes: 0,
            anchored: false,
        };
        Ok(())
    }

    /// Takes the coordinator's last stored seq for this node (its Welcome).
    ///
    /// A spool started empty ("unanchored": wiped with the key kept, or new)
    /// has sent nothing yet; if its records' seqs are not above `last_stored`
    /// they are renumbered to follow it, each re-signed by `resign(new_seq,
    /// old_payload)`, in one committed step, so nothing collides with what
    /// the coordinator stored before the wipe. An anchored spool whose next
    /// seq is not above `last_stored` (a restored backup) jumps past it; its
    /// pending records are sent as they are (a duplicate is receipted, a
    /// conflict refused and set aside).
    pub fn anchor(
        &mut self,
        last_stored: u64,
        resign: &mut Resign<'_>,
    ) -> Result<Anchoring, SpoolError> {
        if last_stored > MAX_SEQ {
            return Err(SpoolError::Anchor { last_stored });
        }
        let collides = self.first_pending().is_some_and(|f| f <= last_stored);
        let result = if !self.disk.anchored && collides {
            self.renumber(last_stored, resign)?
        } else if self.disk.next_seq <= last_stored {
            let from = self.disk.next_seq;
            self.skip_to(last_stored + 1)?;
            Anchoring::Skipped {
                from,
                to: last_stored + 1,
            }
        } else {
            Anchoring::Unchanged
        };
        if !self.disk.anchored {
            remove_if_present(&self.cfg.dir.join(UNANCHORED))?;
            sync_dir(&self.cfg.dir)?;
            self.disk.anchored = true;
        }
        Ok(result)
    }

    /// Starts a new segment named `to`: seqs below it are never given out.
    fn skip_to(&mut self, to: u64) -> Result<(), SpoolError> {
        self.rotate(to)?;
        self.disk.next_seq = to;
        Ok(())
    }

    fn renumber(
        &mut self,
        last_stored: u64,
        resign: &mut Resign<'_>,
    ) -> Result<Anchoring, SpoolError> {
        let dir = self.cfg.dir.clone();
        let tmp = dir.join(RENUMBER);
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let seqs: Vec<u64> = self.disk.index.keys().copied().collect();
        let mut next = last_stored + 1;
        let mut current: Option<(File, PathBuf, u64)> = None;
        let mut buf = Vec::new();
        for seq in seqs {
            let (class, payload) = match self.read_slot(seq)? {
                Some(Ok(r)) => r,
                Some(Err(reason)) => {
                    tracing::warn!(seq, %reason, "a record to renumber is damaged on disk; dropped");
                    self.corrupt += 1;
                    continue;
                }
                None => continue,
            };
            let bytes =
                resign(next, &payload).map_err(|reason| SpoolError::Renumber { seq, reason })?;
            if current
                .as_ref()
                .is_none_or(|(_, _, len)| *len >= self.cfg.segment_bytes)
            {
                if let Some((f, p, _)) = current.take() {
                    f.sync_all().map_err(io_err(&p))?;
                }
                let p = tmp.join(segment_name(next));
                current = Some((File::create(&p).map_err(io_err(&p))?, p, 0));
            }
            buf.clear();
            frame::encode(next, class, &bytes, &mut buf);
            if let Some((f, p, len)) = current.as_mut() {
                f.write_all(&buf).map_err(io_err(p))?;
                *len += buf.len() as u64;
            }
            next += 1;
        }
        match current.take() {
            Some((f, p, _)) => f.sync_all().map_err(io_err(&p))?,
            None => {
                // Nothing left to carry: an empty segment still says where seqs resume.
                let p = tmp.join(segment_name(next));
                File::create(&p)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err(&p))?;
            }
        }
        sync_dir(&tmp)?;
        let mut commit = format!("{last_stored}\n");
        for seg in self.disk.segments.values() {
            if let Some(name) = seg.path.file_name() {
                commit.push_str(&name.to_string_lossy());
                commit.push('\n');
            }
        }
        // Whole or absent: written beside, then renamed.
        let part = tmp.join("COMMIT.part");
        let mut f = File::create(&part).map_err(io_err(&part))?;
        f.write_all(commit.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io_err(&part))?;
        fs::rename(&part, tmp.join("COMMIT")).map_err(io_err(&part))?;
        sync_dir(&tmp)?;
        // Committed: from here a crash is finished at the next open.
        self.active = None;
        finish_renumber(&dir)?;
        let (disk, _, _) = load(&dir)?;
        let count = next - (last_stored + 1);
        self.disk = disk;
        Ok(Anchoring::Renumbered {
            count,
            first: last_stored + 1,
        })
    }
}

/// One frame read at its slot and checked: the class and payload, or why not.
fn read_frame(file: &File, seq: u64, slot: &Slot) -> FrameRead {
    let mut buf = vec![0u8; slot.size() as usize];
    file.read_exact_at(&mut buf, slot.offset)
        .map_err(|e| format!("cannot read it back: {e}"))?;
    match frame::parse(&buf) {
        Ok(f) if f.seq == seq => {
            buf.drain(..HEADER);
            Ok((f.class, buf))
        }
        Ok(f) => Err(format!("expected seq {seq}, found {}", f.seq)),
        Err(reason) => Err(reason),
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

    fn rec(seq: u64) -> (u64, Class, Vec<u8>) {
        (seq, Class::Evidence, format!("record-{seq}").into_bytes())
    }

    fn tel(seq: u64) -> (u64, Class, Vec<u8>) {
        (seq, Class::Telemetry, format!("sample-{seq}").into_bytes())
    }

    fn append(s: &mut Spool, n: u64) {
        let first = s.next_seq();
        let batch: Vec<_> = (first..first + n).map(rec).collect();
        s.append_batch(&batch).unwrap();
    }

    /// Admits then appends one record, as the outbox does.
    fn offer(s: &mut Spool, class: Class) -> Admit {
        let seq = s.next_seq();
        let r = match class {
            Class::Evidence => rec(seq),
            Class::Telemetry => tel(seq),
        };
        let (admit, _) = s.admit(class, r.2.len()).unwrap();
        if admit == Admit::Take {
            s.append_batch(&[r]).unwrap();
        }
        admit
    }

    fn pending_seqs(s: &mut Spool) -> Vec<u64> {
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
        assert_eq!(got, vec![(2, rec(2).2), (3, rec(3).2)]);
        assert_eq!(s.stats().pending, 5);
        assert_eq!(s.first_pending(), Some(1));
    }

    #[test]
    fn a_second_agent_cannot_open_a_spool_in_use() {
        let d = tempfile::tempdir().unwrap();
        let (_s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        let err = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap_err();
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another warden agent"), "{err}");
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
        assert_eq!(pending_seqs(&mut s), vec![4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(s.next_seq(), 11);
        append(&mut s, 1);
        assert_eq!(s.read_from(11, 1).unwrap(), vec![(11, rec(11).2)]);
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
        for q in pending_seqs(&mut s) {
            assert!(q > 9, "{q} was in a deleted segment");
            s.ack(q);
        }
        s.flush().unwrap();
        drop(s);
        let (s, r) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        assert_eq!((s.next_seq(), r.pending), (13, 0));
    }

    #[test]
    fn damage_at_the_end_is_skipped_and_its_seqs_are_not_reused() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
            append(&mut s, 5);
        }
        let seg = segment_files(d.path()).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0x40; // inside seq 5, which may have been sent
        fs::write(&seg, &bytes).unwrap();
        for _ in 0..2 {
            // Twice: the floor holds across restarts, before anything new is appended.
            let (mut s, r) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
            assert_eq!(r.damaged.len(), 1);
            assert!(r.damaged[0].reason.contains("CRC"), "{:?}", r.damaged);
            assert_eq!((r.damaged[0].after_seq, r.damaged[0].before_seq), (4, None));
            assert_eq!(pending_seqs(&mut s), vec![1, 2, 3, 4]);
            assert!(s.next_seq() > 5, "seq 5 reused: next {}", s.next_seq());
            assert_eq!(s.stats().corrupt, 1);
        }
        let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        let next = s.next_seq();
        append(&mut s, 2);
        drop(s);
        // New records went to a new segment, after the damage, and read back.
        let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert_eq!(pending_seqs(&mut s), vec![1, 2, 3, 4, next, next + 1]);
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            n as u64,
            "the damaged bytes are kept"
        );
    }

    #[test]
    fn a_flipped_byte_mid_segment_loses_one_record_not_the_rest() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
            append(&mut s, 100);
        }
        let seg = segment_files(d.path()).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        // Frame 10 starts after nine frames of 16 + len("record-N").
        let off: usize = (1..10).map(|q| HEADER + rec(q).2.len()).sum();
        bytes[off + HEADER + 3] ^= 0x01;
        fs::write(&seg, &bytes).unwrap();
        let (mut s, r) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert_eq!(r.damaged.len(), 1);
        assert_eq!(
            (r.damaged[0].after_seq, r.damaged[0].before_seq),
            (9, Some(11))
        );
        let seqs = pending_seqs(&mut s);
        assert_eq!(seqs.len(), 99);
        assert!(!seqs.contains(&10));
        assert_eq!(s.next_seq(), 101);
    }

    #[test]
    fn damage_found_while_running_skips_that_record_only() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        append(&mut s, 6);
        let seg = segment_files(d.path()).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let off: usize = (1..3).map(|q| HEADER + rec(q).2.len()).sum();
        bytes[off + HEADER] ^= 0x20; // seq 3's payload
        fs::write(&seg, &bytes).unwrap();
        let got: Vec<u64> = s
            .read_from(1, 10)
            .unwrap()
            .iter()
            .map(|(q, _)| *q)
            .collect();
        assert_eq!(got, vec![1, 2, 4, 5, 6]);
        let st = s.stats();
        assert_eq!((st.corrupt, st.pending, st.next_seq), (1, 5, 7));
        append(&mut s, 1);
        assert_eq!(pending_seqs(&mut s), vec![1, 2, 4, 5, 6, 7]);
    }

    #[test]
    fn a_watermark_beyond_the_last_seq_is_ignored_and_nothing_pending_is_lost() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
            append(&mut s, 5);
            s.ack(1);
            s.flush().unwrap();
        }
        fs::write(d.path().join("acked"), "999999999\n").unwrap();
        let (mut s, r) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        let why = r.watermark_reset.unwrap();
        assert!(
            why.contains("999999999") && why.contains("last seq is 5"),
            "{why}"
        );
        assert_eq!(
            pending_seqs(&mut s),
            vec![1, 2, 3, 4, 5],
            "replayed, none lost"
        );
        assert_eq!(s.next_seq(), 6, "the next seq did not jump");
        // The next persisted watermark is a real one again.
        s.ack(1);
        s.flush().unwrap();
        assert_eq!(fs::read_to_string(d.path().join("acked")).unwrap(), "1\n");
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
        let (mut s, r) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert!(r.watermark_reset.is_some());
        assert_eq!(pending_seqs(&mut s), vec![1, 2, 3]);
    }

    #[test]
    fn the_policy_sheds_telemetry_first_and_refuses_evidence_last() {
        let room = |used, reclaimable, shed_at| Room {
            used,
            max: 1000,
            reclaimable,
            shed_at,
        };
        use Class::*;
        assert_eq!(decide(Telemetry, 100, room(900, 0, None)), Decision::Take);
        assert_eq!(decide(Telemetry, 101, room(900, 900, None)), Decision::Shed);
        // Once shedding, telemetry waits until room is back below where it began.
        assert_eq!(
            decide(Telemetry, 10, room(950, 0, Some(950))),
            Decision::Shed
        );
        assert_eq!(
            decide(Telemetry, 10, room(940, 0, Some(950))),
            Decision::Take
        );
        assert_eq!(
            decide(Evidence, 100, room(900, 0, Some(900))),
            Decision::Take
        );
        assert_eq!(
            decide(Evidence, 150, room(900, 60, None)),
            Decision::Reclaim(50)
        );
        assert_eq!(decide(Evidence, 150, room(900, 40, None)), Decision::Full);
    }

    #[test]
    fn a_full_spool_sheds_telemetry_and_keeps_taking_evidence() {
        let d = tempfile::tempdir().unwrap();
        // Frames are 16 + 9..12 bytes; 600 bytes hold about 22 of them.
        let (mut s, _) = Spool::open(cfg(d.path(), 200, 600)).unwrap();
        let mut evidence = Vec::new();
        let mut taken = 0;
        while offer(&mut s, Class::Telemetry) == Admit::Take {
            taken += 1;
        }
        assert!(taken > 10, "{taken}");
        let st = s.stats();
        assert!(st.shedding && st.shed == 1 && !st.full, "{st:?}");
        // Evidence keeps coming during the outage: each gets in by evicting samples.
        for _ in 0..taken {
            let seq = s.next_seq();
            assert_eq!(
                offer(&mut s, Class::Evidence),
                Admit::Take,
                "{:?}",
                s.stats()
            );
            evidence.push(seq);
            // Telemetry between the evidence: shed, or taken when eviction left room.
            offer(&mut s, Class::Telemetry);
        }
        let st = s.stats();
        assert!(st.bytes <= 600, "{st:?}");
        assert!(st.shed >= taken, "{st:?}");
        let pending = pending_seqs(&mut s);
        for seq in &evidence {
            assert!(pending.contains(seq), "evidence {seq} lost: {pending:?}");
        }
        // Only evidence left and no room: evidence is refused, counted, and said.
        while offer(&mut s, Class::Evidence) == Admit::Take {}
        let st = s.stats();
        assert!(st.full && st.refused == 1, "{st:?}");
        drop(s);
        // Eviction survives a restart: what is pending is what the index said.
        let (mut s, r) = Spool::open(cfg(d.path(), 200, 600)).unwrap();
        assert!(r.damaged.is_empty(), "{:?}", r.damaged);
        let again = pending_seqs(&mut s);
        for seq in &evidence {
            assert!(again.contains(seq), "evidence {seq} lost after restart");
        }
    }

    #[test]
    fn oversized_evidence_is_refused_without_touching_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(cfg(d.path(), 100, 200)).unwrap();
        append(&mut s, 6); // 6 × (16 + 8) = 144 bytes
        let (admit, _) = s.admit(Class::Evidence, 100).unwrap();
        assert_eq!(admit, Admit::Full);
        let st = s.stats();
        assert!(st.full && st.refused == 1, "{st:?}");
        assert_eq!(st.next_seq, 7, "nothing written");
        assert_eq!(pending_seqs(&mut s), (1..=6).collect::<Vec<_>>());
        // Appending without admission is still held to the cap.
        let err = s.append_batch(&[rec(7), rec(8), rec(9)]).unwrap_err();
        assert!(matches!(err, SpoolError::Full { refused: 3, .. }), "{err}");
        assert!(err.to_string().contains("spool.max_bytes"));
    }

    #[test]
    fn set_aside_records_leave_the_spool_and_are_counted_across_restarts() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
            append(&mut s, 6);
            assert_eq!(s.set_aside(&[1, 2, 3, 42], "refused: conflict").unwrap(), 3);
            let st = s.stats();
            assert_eq!((st.set_aside, st.pending, st.acked_through), (3, 3, 3));
            assert!(st.set_aside_bytes > 0);
            s.flush().unwrap();
        }
        let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        assert_eq!(pending_seqs(&mut s), vec![4, 5, 6]);
        assert_eq!(s.stats().set_aside, 3);
        let log = fs::read(d.path().join(aside::LOG)).unwrap();
        let frames = frame::scan(&log, 0).frames;
        assert_eq!(frames.len(), 3);
        assert_eq!(
            &log[frames[0].0 + HEADER..][..frames[0].1.len],
            rec(1).2.as_slice()
        );
        let why = fs::read_to_string(d.path().join(aside::REASONS)).unwrap();
        assert_eq!(why.lines().next(), Some("1\trefused: conflict"));
    }

    #[test]
    fn a_new_node_key_sets_the_old_records_aside_and_starts_at_seq_1() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
            assert_eq!(s.claim("old").unwrap(), None);
            s.anchor(0, &mut |_, p| Ok(p.to_vec())).unwrap();
            append(&mut s, 8);
            s.ack(1);
            assert_eq!(s.claim("old").unwrap(), None, "same key: nothing moves");
            s.flush().unwrap();
        }
        let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        assert!(s.stats().anchored);
        assert_eq!(s.claim("new").unwrap(), Some(("old".to_owned(), 7)));
        let st = s.stats();
        assert_eq!((st.pending, st.next_seq, st.set_aside), (0, 1, 7));
        assert!(
            !st.anchored,
            "the new identity's seqs wait for its coordinator"
        );
        append(&mut s, 2);
        drop(s);
        let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        assert_eq!(pending_seqs(&mut s), vec![1, 2]);
        assert_eq!(s.stats().set_aside, 7);
        let why = fs::read_to_string(d.path().join(aside::REASONS)).unwrap();
        assert!(why.contains("node.key was replaced"), "{why}");
    }

    #[test]
    fn an_unanchored_spool_renumbers_after_the_coordinators_last_seq() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
            assert!(!s.stats().anchored, "a spool started empty waits");
            append(&mut s, 5);
        }
        // Still unanchored after a restart.
        let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        assert!(!s.stats().anchored);
        let mut seen = Vec::new();
        let got = s
            .anchor(700, &mut |new, old| {
                seen.push((new, String::from_utf8_lossy(old).into_owned()));
                Ok(format!("resigned-{new}").into_bytes())
            })
            .unwrap();
        assert_eq!(
            got,
            Anchoring::Renumbered {
                count: 5,
                first: 701
            }
        );
        assert_eq!(seen[0], (701, "record-1".to_owned()));
        assert_eq!(seen[4], (705, "record-5".to_owned()));
        let st = s.stats();
        assert!(st.anchored);
        assert_eq!((st.next_seq, st.pending), (706, 5));
        assert_eq!(
            s.read_from(0, 1).unwrap(),
            vec![(701, b"resigned-701".to_vec())]
        );
        append(&mut s, 1);
        drop(s);
        let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        assert!(s.stats().anchored);
        assert_eq!(pending_seqs(&mut s), (701..=706).collect::<Vec<_>>());
        assert!(matches!(
            s.anchor(u64::MAX, &mut |_, p| Ok(p.to_vec())),
            Err(SpoolError::Anchor { .. })
        ));
        // Anchored now: a later Welcome below the next seq changes nothing.
        assert_eq!(
            s.anchor(705, &mut |_, _| Err("must not re-sign".into()))
                .unwrap(),
            Anchoring::Unchanged
        );
    }

    #[test]
    fn a_spool_behind_the_coordinator_jumps_past_it_and_stays_there() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
            s.anchor(0, &mut |_, p| Ok(p.to_vec())).unwrap();
            append(&mut s, 3);
            // A restored backup: the coordinator already has up to 50.
            let got = s.anchor(50, &mut |_, _| {
                Err("anchored spools are not re-signed".into())
            });
            assert_eq!(got.unwrap(), Anchoring::Skipped { from: 4, to: 51 });
            assert_eq!(s.next_seq(), 51);
            s.flush().unwrap();
        }
        let (mut s, _) = Spool::open(cfg(d.path(), 64, 1 << 30)).unwrap();
        assert_eq!(s.next_seq(), 51, "the jump is on disk");
        assert_eq!(pending_seqs(&mut s), vec![1, 2, 3]);
    }

    #[test]
    fn a_renumbering_cut_short_is_finished_or_dropped_at_open() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
            append(&mut s, 3);
        }
        // Not committed: dropped, the spool is as it was (and still unanchored).
        let tmp = d.path().join(RENUMBER);
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join(segment_name(101)), b"partial").unwrap();
        let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert_eq!(pending_seqs(&mut s), vec![1, 2, 3]);
        assert!(!s.stats().anchored && !tmp.exists());
        drop(s);
        // Committed, then cut before the old segment was deleted: finished.
        fs::create_dir(&tmp).unwrap();
        let mut buf = Vec::new();
        frame::encode(101, Class::Evidence, b"x", &mut buf);
        fs::write(tmp.join(segment_name(101)), &buf).unwrap();
        fs::write(tmp.join("COMMIT"), format!("100\n{}\n", segment_name(1))).unwrap();
        let (mut s, _) = Spool::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
        assert_eq!(pending_seqs(&mut s), vec![101]);
        assert!(s.stats().anchored);
        assert_eq!(s.next_seq(), 102);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Whatever bytes follow a run of good frames, open keeps the good
        /// frames, never panics, and never gives out a seq at or below one
        /// on disk.
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
            let (mut s, r) = Spool::open(c).unwrap();
            let seqs = pending_seqs(&mut s);
            prop_assert!(seqs.len() as u64 >= good);
            prop_assert_eq!(&seqs[..good as usize], &(1..=good).collect::<Vec<_>>()[..]);
            prop_assert!(s.next_seq() > seqs.last().copied().unwrap_or(0));
            prop_assert!(s.next_seq() > good);
            if !tail.is_empty() {
                prop_assert!(s.next_seq() > good + 1, "a seq the tail may hold was reused");
            }
            prop_assert!(r.damaged.len() <= 1);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8, bool),
        Ack(u8),
        SetAside(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..6, any::<bool>()).prop_map(|(n, t)| Op::Append(n, t)),
            any::<u8>().prop_map(Op::Ack),
            any::<u8>().prop_map(Op::SetAside),
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
                    Op::Append(n, telemetry) => {
                        let batch: Vec<_> = (next..next + n as u64)
                            .map(|q| if telemetry { tel(q) } else { rec(q) })
                            .collect();
                        s.append_batch(&batch).unwrap();
                        model.extend(next..next + n as u64);
                        next += n as u64;
                    }
                    Op::Ack(k) | Op::SetAside(k) if !model.is_empty() => {
                        let seq = *model.iter().nth(k as usize % model.len()).unwrap();
                        if matches!(o, Op::Ack(_)) {
                            prop_assert!(s.ack(seq));
                        } else {
                            prop_assert_eq!(s.set_aside(&[seq], "test").unwrap(), 1);
                        }
                        model.remove(&seq);
                    }
                    Op::Ack(_) | Op::SetAside(_) => {}
                    Op::Reopen => {
                        s.flush().unwrap();
                        drop(s);
                        s = Spool::open(c.clone()).unwrap().0;
                        // Nothing unacknowledged is lost; acknowledged records above the
                        // watermark may come back (their segment was still on disk).
                        let low = model.iter().next().copied().unwrap_or(next);
                        let got: std::collections::BTreeSet<u64> = pending_seqs(&mut s).into_iter().collect();
                        prop_assert!(model.is_subset(&got), "lost: {:?}", model.difference(&got).collect::<Vec<_>>());
                        prop_assert!(got.iter().all(|q| (low..next).contains(q)), "{got:?} outside {low}..{next}");
                        model = got;
                    }
                }
                prop_assert_eq!(pending_seqs(&mut s), model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(s.next_seq(), next);
            }
        }
    }
}
