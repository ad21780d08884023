//! Lease latency against the real Docker engine, through the operator's
//! CLI: `warden lease start` until the container is reported running (the
//! command returns only then), and `warden lease end` until the container is
//! stopped and removed. Median of `WARDEN_BENCH_LEASES` (20) each; local
//! image. Run with `cargo bench --bench lease`; prints numbers, asserts
//! nothing. Target: under 1 s each.

mod common;
#[path = "../tests/common/image.rs"]
#[allow(dead_code)]
mod image;

use std::{process::Command, time::Duration};

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:.0} ms, p90 {:.0} ms, min {:.0} ms, max {:.0} ms",
        ms(v[v.len() / 2]),
        ms(v[v.len() * 9 / 10]),
        ms(v[0]),
        ms(v[v.len() - 1])
    )
}

fn main() {
    let n: usize = std::env::var("WARDEN_BENCH_LEASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let image = image::busybox_image();
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, link) = common::coordinator(&tmp.path().join("coord"));
    let socket = tmp.path().join("coord/admin.sock");
    let agent = common::spawn_agent(
        tmp.path(),
        &format!("{link}\n[metrics]\nlisten = \"127.0.0.1:0\"\n[probe]\ninterval = \"0s\"\n"),
        &[],
    );
    let status = tmp.path().join("agent/agent.sock");
    let node_id = loop {
        let out = Command::new(common::WARDEN)
            .args(["status", "--json", "--socket", status.to_str().unwrap()])
            .output()
            .unwrap();
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if s["coordinator"]["connected"] == true {
            break s["node_id"].as_str().unwrap().to_owned();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut starts, mut ends) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (t, lease) = common::warden_lease(
            &socket,
            &["start", &node_id, "--image", &image, "--", "sleep", "300"],
        );
        starts.push(t);
        let (t, _) = common::warden_lease(&socket, &["end", &lease]);
        ends.push(t);
    }
    println!("lease/start_to_running n={n}: {}", summary(starts));
    println!("lease/end_to_removed n={n}: {}", summary(ends));
    drop(agent);
}
