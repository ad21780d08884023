//! What a lease's encrypted scratch volume costs (real gocryptfs, real
//! Docker), printed, asserting nothing. Run with `cargo bench --bench
//! scratch` as root on a host with gocryptfs and Docker.
//!
//! 1. The volume alone, `WARDEN_BENCH_VOLUMES` (30) times: making it
//!    (password, `gocryptfs -init`, mount, Docker's view checked) and
//!    destroying it (unmount, gocryptfs gone, ciphertext removed).
//! 2. Lease start and end through the operator's CLI on two agents of one
//!    coordinator, one with `workload.scratch = "off"`, one with
//!    `"required"`, alternating, `WARDEN_BENCH_LEASES` (20) each: the
//!    volume's share of a lease's start.
//! 3. Writing and reading back 64 MiB through the volume and in a plain
//!    directory of the same filesystem (from the host, with fsync). The
//!    plain read comes from the page cache; the volume's is decrypted by
//!    gocryptfs (mounted without kernel_cache, a file's cache goes at
//!    each open).

mod common;
#[path = "../tests/common/image.rs"]
#[allow(dead_code)]
mod image;

use std::{
    io::{Read, Write},
    path::Path,
    time::{Duration, Instant},
};

use warden_agent::workloads::scratch::{gocryptfs, Layout};

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |p: usize| v[((v.len() * p) / 100).min(v.len() - 1)];
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms",
        ms(at(50)),
        ms(at(90)),
        ms(at(99)),
        ms(v[0]),
        ms(v[v.len() - 1])
    )
}

/// Writes `bytes` to `path` (fsync), then reads it back: the two times.
fn write_read(path: &Path, bytes: &[u8]) -> (Duration, Duration) {
    let t = Instant::now();
    let mut f = std::fs::File::create(path).unwrap();
    for chunk in bytes.chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    let w = t.elapsed();
    drop(f);
    let t = Instant::now();
    let mut back = Vec::with_capacity(bytes.len());
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    let r = t.elapsed();
    assert_eq!(back.len(), bytes.len());
    (w, r)
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    println!(
        "scratch/{}",
        gocryptfs::version().expect("gocryptfs is installed")
    );

    // 1. The volume alone.
    let volumes = env_n("WARDEN_BENCH_VOLUMES", 30);
    let layout = Layout::new(&tmp.path().join("state"));
    let here = gocryptfs::Place::here();
    let (mut made, mut destroyed) = (Vec::new(), Vec::new());
    for i in 0..volumes {
        let lease = format!("bench-{i}");
        let t = Instant::now();
        gocryptfs::create(&here, &layout, &lease, None).expect("a volume");
        made.push(t.elapsed());
        let t = Instant::now();
        gocryptfs::destroy(&here, &layout, &lease).expect("destroyed");
        destroyed.push(t.elapsed());
    }
    println!("scratch/volume_create n={volumes}: {}", summary(made));
    println!("scratch/volume_destroy n={volumes}: {}", summary(destroyed));

    // 3. Throughput, host side.
    let size = 64usize << 20;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
    gocryptfs::create(&here, &layout, "io", None).expect("a volume");
    let (ew, er) = write_read(&layout.source("io").join("f"), &data);
    gocryptfs::destroy(&here, &layout, "io").unwrap();
    let plain_dir = tmp.path().join("plain-dir");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let (pw, pr) = write_read(&plain_dir.join("f"), &data);
    let mbs = |d: Duration| size as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "scratch/io 64 MiB: encrypted write {:.0} MiB/s, read {:.0} MiB/s; plain directory write {:.0} MiB/s, read {:.0} MiB/s",
        mbs(ew),
        mbs(er),
        mbs(pw),
        mbs(pr)
    );

    // 2. Lease start with and without the volume.
    let n = env_n("WARDEN_BENCH_LEASES", 20);
    let image = image::busybox_image();
    let (_coord, link) = common::coordinator(&tmp.path().join("coord"));
    let socket = tmp.path().join("coord/admin.sock");
    let agent = |name: &str, mode: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let a = common::spawn_agent(
            &dir,
            &format!("{link}\n[metrics]\nlisten = \"127.0.0.1:0\"\n[probe]\ninterval = \"0s\"\n[workload]\nscratch = \"{mode}\"\n"),
            &[],
        );
        (
            a,
            common::connected_node_id(&dir.join("agent/agent.sock"), 0),
        )
    };
    let (_off, off_node) = agent("off", "off");
    let (_on, on_node) = agent("on", "required");
    let mut times = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    for _ in 0..n {
        for (i, node) in [&off_node, &on_node].into_iter().enumerate() {
            let (t, lease) = common::warden_lease(
                &socket,
                &["start", node, "--image", &image, "--", "sleep", "300"],
            );
            times[i].0.push(t);
            let (t, _) = common::warden_lease(&socket, &["end", &lease]);
            times[i].1.push(t);
        }
    }
    let [(off_start, off_end), (on_start, on_end)] = times;
    println!("scratch/lease_start_without n={n}: {}", summary(off_start));
    println!("scratch/lease_start_with n={n}: {}", summary(on_start));
    println!("scratch/lease_end_without n={n}: {}", summary(off_end));
    println!("scratch/lease_end_with n={n}: {}", summary(on_end));
}
