//! The whole hire, order to ready, by phase: a coordinator and eight
//! agents (two fake GPUs each) on hosts of a test LAN, as `tests/hire.rs`
//! makes them, and real Docker. Hires eight nodes (purpose none: the
//! leases' containers meshed; then with no image: the hosts meshed) and
//! three nodes with `--purpose ray` (the Ray image the tests build,
//! cached under target/), each several times, ending each before the
//! next. Prints the coordinator's own phase timings (match, leases, mesh,
//! Ray, total); asserts only that each hire was ready. Part of
//! `cargo bench --bench cluster` (run as root; `WARDEN_BENCH_ROUNDS=N`,
//! default 5; `WARDEN_BENCH_HIRES=0` skips it).

#[path = "../../tests/common/mod.rs"]
mod rigs;

use rigs::{hire::*, image::busybox_image, ray::ray_image, ContainersOf};
use serde_json::Value;

/// One kind of hire, `rounds` times: each phase's timings in ms.
fn rounds(rig: &Rig, what: &str, rounds: usize, args: &[&str]) -> Vec<Value> {
    (0..rounds)
        .map(|i| {
            let name = format!("{what}-{i}");
            let mut all = vec!["hire", name.as_str()];
            all.extend_from_slice(args);
            let hired = cluster(&rig.coord, &all).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(hired["cluster"]["phase"], "ready", "{hired:#}");
            cluster(&rig.coord, &["end", &name]).unwrap();
            hired["cluster"]["timings"].clone()
        })
        .collect()
}

fn report(what: &str, timings: &[Value]) {
    println!("{what} ({} hires)", timings.len());
    for phase in ["match_ms", "leases_ms", "mesh_ms", "ray_ms", "total_ms"] {
        let mut v: Vec<u64> = timings
            .iter()
            .map(|t| t[phase].as_u64().unwrap_or(0))
            .collect();
        v.sort_unstable();
        if v.iter().all(|x| *x == 0) {
            continue;
        }
        println!(
            "  {:<6} median {:>7} ms   min {:>7}   max {:>7}",
            phase.trim_end_matches("_ms"),
            v[v.len() / 2],
            v[0],
            v[v.len() - 1]
        );
    }
}

/// Hires, ends and reports each kind of cluster.
pub fn run() {
    let n: usize = std::env::var("WARDEN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let busybox = busybox_image();
    let ray = ray_image();
    let rig = rig("bh", 210, &["region = \"eu\""; 8], 0);
    let _clean: Vec<ContainersOf> = rig.names.iter().map(|n| ContainersOf(n.clone())).collect();
    let eight = rounds(
        &rig,
        "eight",
        n,
        &[
            "--nodes",
            "8",
            "--duration",
            "10m",
            "--image",
            &busybox,
            "--",
            "sleep",
            "600",
        ],
    );
    report("8 nodes, purpose none, containers meshed", &eight);
    let hosts = rounds(&rig, "hosts", n, &["--nodes", "8", "--duration", "10m"]);
    report("8 nodes, no image, hosts meshed", &hosts);
    let with_ray = rounds(
        &rig,
        "ray",
        n.div_ceil(2),
        &[
            "--nodes",
            "3",
            "--purpose",
            "ray",
            "--image",
            &ray,
            "--cpus",
            "1",
            "--memory",
            "2g",
            "--duration",
            "10m",
            "--timeout",
            "300",
        ],
    );
    report("3 nodes, purpose ray", &with_ray);
}
