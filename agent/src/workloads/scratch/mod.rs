//! Each lease's encrypted scratch volume: a directory its containers see at
//! [`TARGET`], stored on the node only as gocryptfs ciphertext under a key
//! made for that lease and never written down. At the lease's end the
//! containers go, the mount goes (and with the gocryptfs process, the key),
//! then the ciphertext: what the renter wrote cannot be read back from the
//! disk (crypto-shredding).
//!
//! This file is the pure part: where a lease's volume lives, the mode the
//! config chooses, the mount table read back, which volumes are left over;
//! `gocryptfs` is the edge that makes and destroys them.

pub mod gocryptfs;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use bollard::models::{Mount, MountType};
use serde::{Deserialize, Serialize};

/// Where a lease's containers see their scratch volume.
pub const TARGET: &str = "/scratch";

/// The filesystem type a gocryptfs mount has in the mount table.
pub const FSTYPE: &str = "fuse.gocryptfs";

/// Whether leases get an encrypted scratch volume (`workload.scratch`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScratchMode {
    /// Every lease gets one where gocryptfs works; where it does not, the
    /// lease runs without and its answer says why.
    #[default]
    Auto,
    /// A lease whose volume cannot be made is refused.
    Required,
    /// No lease gets one.
    Off,
}

/// A lease's volume as the book remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Volume {
    /// Mounted at the lease's start; its containers get it.
    Encrypted,
    /// Found dead (its gocryptfs ended, with the key: under systemd, an
    /// agent restart ends it) and destroyed: new containers of the lease
    /// are refused, since `/scratch` would be their unencrypted layer.
    Lost,
}

/// Where the volumes live: `<state_dir>/scratch/<lease>/{cipher,plain}`.
/// Inside the state directory, so no renter's bind mount can name one
/// (`confine::host_path_danger` refuses the state directory and what is
/// below it) and the host's other users cannot reach one (0700).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(state_dir: &Path) -> Layout {
        Layout {
            root: state_dir.join("scratch"),
        }
    }

    /// The lease's own directory, holding both of the others.
    pub fn dir(&self, lease_id: &str) -> PathBuf {
        self.root.join(lease_id)
    }

    /// The ciphertext, on disk.
    pub fn cipher(&self, lease_id: &str) -> PathBuf {
        self.dir(lease_id).join("cipher")
    }

    /// The mount point of the plaintext view.
    pub fn plain(&self, lease_id: &str) -> PathBuf {
        self.dir(lease_id).join("plain")
    }

    /// What containers get at [`TARGET`]: a directory made inside the
    /// mounted volume, so that it exists only where the volume is mounted
    /// (where it is not, Docker refuses the bind: "bind source path does
    /// not exist").
    pub fn source(&self, lease_id: &str) -> PathBuf {
        self.plain(lease_id).join("data")
    }
}

/// The bind mount that puts a lease's volume ([`Layout::source`]) at
/// [`TARGET`] in a container.
pub fn mount(source: &Path) -> Mount {
    Mount {
        target: Some(TARGET.to_owned()),
        source: Some(source.to_string_lossy().into_owned()),
        typ: Some(MountType::BIND),
        read_only: Some(false),
        ..Default::default()
    }
}

/// One line of `/proc/PID/mountinfo`: where something is mounted and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The mount's own options (`rw,nosuid,nodev,…`).
    pub options: String,
}

/// Parses `/proc/PID/mountinfo` (proc(5)): fields 5 (mount point) and 6
/// (options), then after the ` - ` separator the filesystem type. Lines
/// that do not parse are skipped: the kernel writes this file, and a line
/// we cannot read names no volume of ours.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split(' ');
            let mount_point = l.nth(4)?;
            let options = l.next()?;
            let fstype = right.split(' ').next()?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: fstype.to_owned(),
                options: options.to_owned(),
            })
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash in a path as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(d) = octal {
            let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the mount table has a gocryptfs mount at `plain`.
pub fn mounted_at(entries: &[MountEntry], plain: &Path) -> bool {
    entries
        .iter()
        .any(|e| e.mount_point == plain && e.fstype == FSTYPE)
}

/// The volumes to destroy: every lease that has a directory under the
/// root, or a mount below it, and is not active. What lies below the root
/// is named by lease id (its first component).
pub fn leftovers(
    layout: &Layout,
    dirs: &[String],
    mounts: &[MountEntry],
    active: &BTreeSet<String>,
) -> Vec<String> {
    let mounted = mounts.iter().filter_map(|m| {
        let rest = m.mount_point.strip_prefix(&layout.root).ok()?;
        rest.components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
    });
    let all: BTreeSet<String> = dirs.iter().cloned().chain(mounted).collect();
    all.into_iter().filter(|l| !active.contains(l)).collect()
}

/// What a lease's start says of its volume (the answer's note): the renter
/// learns whether `/scratch` is encrypted, and if not, why.
pub fn note<T>(outcome: &Result<T, String>, mode: ScratchMode) -> String {
    match (outcome, mode) {
        (Ok(_), _) => format!(
            "{TARGET} is an encrypted scratch volume (gocryptfs; its key is held in memory only and destroyed when the lease ends)"
        ),
        (Err(_), ScratchMode::Off) => {
            "no encrypted scratch volume: workload.scratch is off on this node".to_owned()
        }
        (Err(why), _) => format!("no encrypted scratch volume: {why}"),
    }
}

/// Why a volume could not be made, checked or destroyed.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("gocryptfs cannot be run ({0}); install it (Debian: apt-get install gocryptfs)")]
    Missing(std::io::Error),
    #[error("gocryptfs {step} failed ({status}): {stderr}")]
    Tool {
        step: &'static str,
        status: String,
        stderr: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the volume is mounted but Docker does not see it ({0}) (docs/workloads.md#encrypted-scratch)")]
    NotShared(String),
    #[error("cannot enter the mount namespace of {whose}, where Docker makes its containers' mounts: {detail} (docs/workloads.md#encrypted-scratch)")]
    Namespace { whose: String, detail: String },
    #[error("the key could not be sealed to the renter's: {0}")]
    Seal(warden_proto::sealed::SealError),
    #[error("the random key could not be made: {0}")]
    Random(String),
    #[error("{path} is still mounted after unmounting it: {detail}")]
    StillMounted { path: PathBuf, detail: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 22 0:40 / /var/lib/warden/scratch/l1/plain rw,nosuid,nodev,relatime shared:20 - fuse.gocryptfs /var/lib/warden/scratch/l1/cipher rw,user_id=0,group_id=0,default_permissions,allow_other
36 22 0:41 / /srv/with\\040space rw,relatime - fuse.gocryptfs /x rw
37 22 0:42 / /var/lib/warden/scratch/gone/plain rw - fuse.gocryptfs /y rw
not a mountinfo line
";

    #[test]
    fn the_mount_table_is_read_with_its_escapes() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].fstype, FSTYPE);
        assert_eq!(m[1].options, "rw,nosuid,nodev,relatime");
        assert_eq!(m[2].mount_point, Path::new("/srv/with space"));
        let layout = Layout::new(Path::new("/var/lib/warden"));
        assert!(mounted_at(&m, &layout.plain("l1")));
        assert!(!mounted_at(&m, &layout.plain("l2")));
        // Another filesystem at the same place is not a volume.
        assert!(!mounted_at(&m, Path::new("/")));
    }

    #[test]
    fn leftovers_are_the_volumes_of_no_active_lease() {
        let layout = Layout::new(Path::new("/var/lib/warden"));
        let m = parse_mountinfo(MOUNTINFO);
        let active = BTreeSet::from(["l1".to_owned()]);
        let dirs = vec!["l1".to_owned(), "old".to_owned()];
        // A directory of an ended lease, and a mount whose directory is gone.
        assert_eq!(leftovers(&layout, &dirs, &m, &active), ["gone", "old"]);
        let all = BTreeSet::from(["l1".into(), "old".into(), "gone".into()]);
        assert!(leftovers(&layout, &dirs, &m, &all).is_empty());
        // Mounts elsewhere are not ours.
        assert!(leftovers(&layout, &[], &m[..1], &BTreeSet::new()).is_empty());
    }

    #[test]
    fn the_layout_keeps_each_lease_apart_inside_the_state_dir() {
        let layout = Layout::new(Path::new("/var/lib/warden"));
        assert_eq!(
            layout.cipher("l1"),
            Path::new("/var/lib/warden/scratch/l1/cipher")
        );
        assert_eq!(
            layout.plain("l1"),
            Path::new("/var/lib/warden/scratch/l1/plain")
        );
        // No renter's mount may name it: it is inside the state directory.
        let danger = crate::workloads::confine::host_path_danger(
            &layout.plain("l2"),
            Path::new("/var/lib/warden"),
            Path::new("/var/run/docker.sock"),
        );
        assert!(danger.unwrap().contains("inside"));
        assert_eq!(
            layout.source("l1"),
            Path::new("/var/lib/warden/scratch/l1/plain/data")
        );
        let m = mount(&layout.source("l1"));
        assert_eq!(m.target.as_deref(), Some(TARGET));
        assert_eq!(m.typ, Some(MountType::BIND));
        assert_eq!(m.read_only, Some(false));
    }

    #[test]
    fn the_note_says_whether_the_volume_is_encrypted_and_why_not() {
        assert!(note(&Ok(()), ScratchMode::Auto).contains("is an encrypted scratch volume"));
        let n = note(
            &Err::<(), _>("gocryptfs cannot be run".into()),
            ScratchMode::Auto,
        );
        assert!(
            n.starts_with("no encrypted scratch volume: gocryptfs"),
            "{n}"
        );
        let n = note(&Err::<(), _>(String::new()), ScratchMode::Off);
        assert!(n.contains("workload.scratch is off"), "{n}");
    }
}
