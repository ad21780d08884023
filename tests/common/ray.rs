//! A local image with Python 3 and Ray, for the Ray cluster tests: a Debian
//! bookworm root (debootstrap, minbase, python3) with Ray's wheels from PyPI
//! installed into it by the host's pip, then `docker import`ed, since no
//! container registry is reachable. debootstrap and pip use the machine's
//! own apt and pip configuration (no mirror or index named here).
//!
//! The root is kept as a tarball under the target directory
//! (`target/ray-image/`), named by a hash of the recipe below, so a later
//! run only re-imports it; an image whose tag is already in Docker is used
//! as is.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::Instant,
};

use super::image::image_exists;

/// The Ray release in the image: token authentication (`RAY_AUTH_MODE=token`)
/// exists since 2.52.
pub const RAY_VERSION: &str = "2.60.0";
/// Ray core plus the client extra (grpcio), which the Ray client server
/// (`ray://…:10001`) needs. No dashboard (`ray[default]` is much larger).
const RAY_REQUIREMENT: &str = "ray[client]==2.60.0";
const SUITE: &str = "bookworm";
/// Bookworm's python3 is 3.11: the wheels are chosen for it, not for
/// whatever Python the host has.
const PYTHON: &str = "3.11";
const PLATFORM: &str = "manylinux2014_x86_64";
/// Besides minbase: the interpreter; procps for looking around (`ps`).
const INCLUDE: &str = "python3,procps";
/// What is left out of the image: Java workers, the dashboard's web build
/// (no dashboard here), source maps.
const PRUNE: &[&str] = &["ray/jars", "ray/dashboard/client/build"];
/// Bump when the recipe changes in a way the constants above do not show.
const RECIPE_REVISION: u32 = 1;

/// The Ray image's tag, e.g. `warden-test/ray:2.60.0-1a2b3c4d`.
pub fn ray_image_tag() -> String {
    let recipe = format!(
        "{RAY_REQUIREMENT}|{SUITE}|{PYTHON}|{PLATFORM}|{INCLUDE}|{}|{RECIPE_REVISION}",
        PRUNE.join(",")
    );
    format!(
        "warden-test/ray:{RAY_VERSION}-{:08x}",
        fnv1a(recipe.as_bytes()) as u32
    )
}

/// The Ray image's tag, building it (or re-importing the cached root) if
/// Docker does not have it yet.
pub fn ray_image() -> String {
    static BUILDING: Mutex<()> = Mutex::new(());
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let tag = ray_image_tag();
    if image_exists(&tag) {
        return tag;
    }
    let tar = rootfs_tar(&tag);
    let started = Instant::now();
    let out = Command::new("docker")
        .args(["import", "--change", "CMD [\"sleep\", \"infinity\"]"])
        .arg(&tar)
        .arg(&tag)
        .output()
        .expect("run docker import");
    assert!(
        out.status.success(),
        "docker import of {}: {}",
        tar.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("imported {tag} in {:.0?}", started.elapsed());
    tag
}

/// `target/ray-image/`, next to the build's `debug/` or `release/`.
fn cache_dir() -> PathBuf {
    let dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(super::WARDEN)
            .parent()
            .and_then(Path::parent)
            .expect("warden binary is in <target>/<profile>/")
            .to_path_buf(),
    }
    .join("ray-image");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The image's root as a tarball, made once and kept for later runs.
fn rootfs_tar(tag: &str) -> PathBuf {
    let dir = cache_dir();
    let name = tag.rsplit(':').next().unwrap();
    let tar = dir.join(format!("ray-{name}.tar"));
    if tar.exists() {
        return tar;
    }
    let started = Instant::now();
    let work = tempfile::tempdir_in(&dir).unwrap();
    let root = work.path().join("root");
    run(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
            .arg(&root),
        "debootstrap (apt-get install debootstrap; it needs root)",
    );
    let debootstrapped = started.elapsed();
    // Debian's python3 looks in /usr/local/lib/python3.11/dist-packages.
    let site = root.join(format!("usr/local/lib/python{PYTHON}/dist-packages"));
    run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-cache-dir",
                "--no-compile",
            ])
            .args(["--disable-pip-version-check", "--only-binary=:all:"])
            .args(["--implementation", "cp", "--python-version", PYTHON])
            .args(["--platform", PLATFORM, "--target"])
            .arg(&site)
            .arg(RAY_REQUIREMENT),
        "pip install of Ray (apt-get install python3-pip)",
    );
    for p in PRUNE {
        let _ = std::fs::remove_dir_all(site.join(p));
    }
    run(
        Command::new("find")
            .arg(&site)
            .args(["-name", "*.map", "-delete"]),
        "find",
    );
    // The console scripts name the host's interpreter: point them at the
    // image's, in /usr/local/bin.
    let bin = root.join("usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    for entry in std::fs::read_dir(site.join("bin")).unwrap() {
        let entry = entry.unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let body = text.split_once('\n').map(|(_, b)| b).unwrap_or("");
        let script = bin.join(entry.file_name());
        std::fs::write(&script, format!("#!/usr/bin/python3\n{body}")).unwrap();
        run(Command::new("chmod").arg("755").arg(&script), "chmod");
    }
    std::fs::remove_dir_all(site.join("bin")).unwrap();
    // Package lists, downloaded .debs, docs and man pages are of no use here.
    for d in [
        "var/lib/apt/lists",
        "var/cache/apt",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
    ] {
        let p = root.join(d);
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::create_dir_all(&p);
    }
    let partial = dir.join(format!("{}.partial-{}", name, std::process::id()));
    run(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&partial)
            .arg("."),
        "tar of the Ray root",
    );
    // Whole or absent, for a run that is interrupted or a second test process.
    std::fs::rename(&partial, &tar).unwrap();
    eprintln!(
        "made {} in {:.0?} (debootstrap {:.0?}; kept for later runs)",
        tar.display(),
        started.elapsed(),
        debootstrapped
    );
    tar
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// FNV-1a, 64 bits: a hash that stays the same across Rust releases.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
