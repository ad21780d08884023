//! The set-aside log: records that can never be delivered (the coordinator
//! refused them for good, or another node key signed them), moved out of
//! the spool so they stop holding delivery up, and kept for the supplier.
//!
//! `refused.log` holds their frames exactly as they were spooled (same
//! format as a segment); `refused.txt` one line per record: seq, then why.
//! The agent never deletes either; `warden status` counts them.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use super::{
    frame::{self, Class},
    io_err, SpoolError,
};

pub const LOG: &str = "refused.log";
pub const REASONS: &str = "refused.txt";

#[derive(Debug)]
pub struct Aside {
    log: PathBuf,
    reasons: PathBuf,
    /// Frames in the log.
    pub count: u64,
    pub bytes: u64,
}

impl Aside {
    /// Counts what an earlier run set aside.
    pub fn open(dir: &Path) -> Result<Aside, SpoolError> {
        let log = dir.join(LOG);
        let (count, bytes) = match std::fs::read(&log) {
            Ok(buf) => (count_frames(&buf), buf.len() as u64),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, 0),
            Err(e) => return Err(io_err(&log)(e)),
        };
        Ok(Aside {
            log,
            reasons: dir.join(REASONS),
            count,
            bytes,
        })
    }

    /// Appends records and one reason for them, durably (one fsync each
    /// for the log and the reasons), before the caller drops them from the spool.
    pub fn put(&mut self, records: &[(u64, Class, Vec<u8>)], why: &str) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        let mut lines = String::new();
        let why = why.replace(['\n', '\t'], " ");
        for (seq, class, payload) in records {
            frame::encode(*seq, *class, payload, &mut buf);
            lines.push_str(&format!("{seq}\t{why}\n"));
        }
        append_synced(&self.log, &buf)?;
        append_synced(&self.reasons, lines.as_bytes())?;
        self.count += records.len() as u64;
        self.bytes += buf.len() as u64;
        Ok(())
    }
}

/// Frames in a set-aside log, in file order. Unlike a segment its seqs
/// need not grow (a new node key starts again at 1), so this walks frames
/// rather than scanning for growing seqs; it stops at damage.
fn count_frames(buf: &[u8]) -> u64 {
    let (mut offset, mut n) = (0, 0);
    while let Ok(f) = frame::parse(&buf[offset..]) {
        offset += frame::HEADER + f.len;
        n += 1;
    }
    n
}

fn append_synced(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let mut f: File = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_data().map_err(io_err(path))
}
