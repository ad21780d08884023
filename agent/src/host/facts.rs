//! Facts about the host read from procfs: the Register summary and the
//! periodic host sample. Missing or odd files give zeros, never an error:
//! telemetry must keep flowing on unusual kernels.

use std::path::Path;

use warden_proto::pb;

/// The inventory summary sent at Register.
pub fn summary() -> pb::InventorySummary {
    summary_from(Path::new("/"))
}

/// One host sample for telemetry.
pub fn sample() -> pb::HostSample {
    sample_from(Path::new("/"))
}

fn read(root: &Path, rel: &str) -> String {
    // procfs files are small; cap what we read so a strange file cannot grow memory.
    std::fs::read_to_string(root.join(rel))
        .map(|mut s| {
            s.truncate(64 << 10);
            s
        })
        .unwrap_or_default()
}

fn summary_from(root: &Path) -> pb::InventorySummary {
    let (mem_total, _) = parse_meminfo(&read(root, "proc/meminfo"));
    pb::InventorySummary {
        hostname: read(root, "proc/sys/kernel/hostname").trim().to_owned(),
        os: parse_os_release(&read(root, "etc/os-release")),
        kernel: read(root, "proc/sys/kernel/osrelease").trim().to_owned(),
        cpu_cores: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(0),
        memory_bytes: mem_total,
        ..Default::default()
    }
}

fn sample_from(root: &Path) -> pb::HostSample {
    let (mem_total, mem_available) = parse_meminfo(&read(root, "proc/meminfo"));
    pb::HostSample {
        load1: first_field(&read(root, "proc/loadavg")).unwrap_or(0.0),
        mem_total_bytes: mem_total,
        mem_available_bytes: mem_available,
        uptime_s: first_field(&read(root, "proc/uptime")).unwrap_or(0.0) as u64,
    }
}

fn first_field(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// (MemTotal, MemAvailable) in bytes.
fn parse_meminfo(text: &str) -> (u64, u64) {
    let kib = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |k| k.saturating_mul(1024))
    };
    (kib("MemTotal"), kib("MemAvailable"))
}

fn parse_os_release(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_procfs_text() {
        let mi = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_meminfo(mi), (24_000_000 * 1024, 12_000_000 * 1024));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
        assert_eq!(
            parse_os_release("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"),
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(first_field("0.52 0.58 0.59 1/189 1234\n"), Some(0.52));
        assert_eq!(first_field(""), None);
    }

    #[test]
    fn reads_a_fake_root() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("proc/sys/kernel")).unwrap();
        std::fs::create_dir_all(p.join("etc")).unwrap();
        std::fs::write(p.join("proc/sys/kernel/hostname"), "gpu-box-7\n").unwrap();
        std::fs::write(p.join("proc/sys/kernel/osrelease"), "6.1.0-18-amd64\n").unwrap();
        std::fs::write(
            p.join("proc/meminfo"),
            "MemTotal: 2048 kB\nMemAvailable: 1024 kB\n",
        )
        .unwrap();
        std::fs::write(p.join("proc/loadavg"), "1.50 1 1 1/1 1\n").unwrap();
        std::fs::write(p.join("proc/uptime"), "3600.25 1.0\n").unwrap();
        let s = summary_from(p);
        assert_eq!(s.hostname, "gpu-box-7");
        assert_eq!(s.kernel, "6.1.0-18-amd64");
        assert_eq!(s.memory_bytes, 2048 * 1024);
        let h = sample_from(p);
        assert_eq!(h.load1, 1.5);
        assert_eq!(h.uptime_s, 3600);
        assert_eq!(h.mem_available_bytes, 1024 * 1024);
    }
}
