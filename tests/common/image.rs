//! A tiny local busybox image for Docker tests, built from the host's
//! static busybox (Debian's busybox-static), since no registry is reachable.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
};

/// The test image's tag.
pub const BUSYBOX_IMAGE: &str = "warden-test/busybox:1";

/// The host's static busybox binary the image is built from.
const HOST_BUSYBOX: &str = "/bin/busybox";

/// The busybox image's tag, building it (`docker import` of a rootfs with
/// busybox and its applet symlinks) if Docker does not have it yet.
pub fn busybox_image() -> String {
    // One builder at a time within this test process.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if !image_exists(BUSYBOX_IMAGE) {
        build(BUSYBOX_IMAGE);
    }
    BUSYBOX_IMAGE.to_owned()
}

/// Whether `docker image inspect` finds the image.
pub fn image_exists(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn build(tag: &str) {
    assert!(
        Path::new(HOST_BUSYBOX).exists(),
        "{HOST_BUSYBOX} is missing: install busybox-static"
    );
    assert!(
        is_static(Path::new(HOST_BUSYBOX)),
        "{HOST_BUSYBOX} is dynamically linked and cannot run in an empty image: install busybox-static"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in ["tmp", "etc", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(HOST_BUSYBOX, bin.join("busybox")).unwrap();
    let list = Command::new(HOST_BUSYBOX).arg("--list").output().unwrap();
    assert!(list.status.success(), "busybox --list failed");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    import_root(&root, &[], tag);
}

/// `tar` of `root` into `docker import [CHANGES…] - TAG` (each of `changes`
/// a Dockerfile instruction), which must succeed.
fn import_root(root: &Path, changes: &[&str], tag: &str) {
    let mut tar = Command::new("tar")
        .args(["-C", root.to_str().unwrap(), "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tar");
    let mut import = Command::new("docker");
    import.arg("import");
    for c in changes {
        import.args(["--change", c]);
    }
    let import = import
        .args(["-", tag])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .expect("run docker import");
    let tar_ok = tar.wait().unwrap().success();
    assert!(
        tar_ok && import.status.success(),
        "could not build {tag}: {}",
        String::from_utf8_lossy(&import.stderr)
    );
}

/// Whether an ELF64 binary has no program interpreter (PT_INTERP), i.e.
/// runs without the host's libc.
fn is_static(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(elf) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    if elf.get(..5) != Some(b"\x7fELF\x02".as_slice()) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| u32_at(phoff + i * phentsize) != Some(PT_INTERP))
}

/// Force-removes Docker objects when a test ends, pass or fail: containers
/// (`docker rm -f`) or images (`docker rmi -f`).
pub struct Remove {
    what: &'static str,
    names: Vec<String>,
}

impl Remove {
    pub fn containers(names: &[&str]) -> Remove {
        Remove {
            what: "rm",
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    pub fn image(tag: &str) -> Remove {
        Remove {
            what: "rmi",
            names: vec![tag.to_owned()],
        }
    }
}

impl Drop for Remove {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("docker").args([self.what, "-f", n]).output();
        }
    }
}

/// An image holding the `warden` binary at `warden` (and the shared libraries
/// `ldd` names, at their paths) whose command is `warden challenge solve`:
/// the CPU reference solver behind the work challenge's container contract.
/// Built fresh under `tag` (the binary changes between builds).
pub fn solver_image(tag: &str, warden: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    for d in ["tmp", "etc", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(warden, root.join("warden")).unwrap();
    let ldd = Command::new("ldd").arg(warden).output().expect("run ldd");
    assert!(ldd.status.success(), "ldd {} failed", warden);
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)".
        let Some(path) = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(Path::new)
        else {
            continue;
        };
        let to = root.join(path.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(path, &to).unwrap();
    }
    import_root(
        &root,
        &[r#"CMD ["/warden", "challenge", "solve", "--threads", "1"]"#],
        tag,
    );
    tag.to_owned()
}
