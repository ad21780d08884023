//! `warden doctor`: is this machine fit to be a supplier node?
//!
//! `gather` measures (memory, disk, the link to the coordinator, Docker,
//! NVML, TUN, the key file, the clock); `evaluate` is the pure part that
//! holds the facts against the configured minimums and says how to fix
//! each failure.

use std::path::Path;

use serde::Serialize;
use warden_proto::{identity, pb};

use crate::{
    config::{AgentConfig, DoctorConfig},
    host::gpu::{nvml::NvmlSource, GpuSource},
};

/// A check's outcome. Only `Fail` makes the doctor exit non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    /// Not ideal, not disqualifying.
    Warn,
    Fail,
    /// Could not be measured (e.g. no coordinator configured).
    Skip,
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    /// What was measured, with units.
    pub value: String,
    /// What it is held against.
    pub threshold: String,
    /// What to do about a failure (empty when it passed).
    pub fix: String,
}

/// The open guard: a warning, not a failure, when off or unavailable (the
/// time-lock still scans; it costs more and prevents nothing).
fn guard_check(guard: &(bool, Result<(), String>)) -> Check {
    let threshold = "fanotify permission events (timelock.prevent)".to_owned();
    let (verdict, value, fix) = match guard {
        (true, Ok(())) => (
            Verdict::Pass,
            "foreign opens of leased GPUs are denied at the open".to_owned(),
            "",
        ),
        (true, Err(e)) => (
            Verdict::Warn,
            e.clone(),
            "run the agent as root on a kernel built with CONFIG_FANOTIFY_ACCESS_PERMISSIONS that delivers permission events for character devices (Linux 6.18 delivers none: docs/security.md#the-open-guard-prevent-not-only-kill); until then foreign holders are found by scanning /proc every cycle and ended after the fact, and attestations say \"scan\"",
        ),
        (false, _) => (
            Verdict::Warn,
            "off (timelock.prevent = false)".to_owned(),
            "set timelock.prevent = true to deny foreign opens of leased GPUs instead of ending the holders after a scan",
        ),
    };
    Check {
        name: "guard",
        verdict,
        value,
        threshold,
        fix: fix.to_owned(),
    }
}

/// What the key file looks like.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyState {
    /// Not created yet: the agent creates it 0600 at first start.
    Missing,
    Ok,
    /// Unreadable, wrong mode, or not a key: the loader's own message.
    Bad(String),
}

/// The kernel's view of the clock (adjtimex).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelClock {
    /// NTP (or PTP) discipline is in effect.
    pub synced: bool,
    /// Estimated error, µs.
    pub est_error_us: i64,
}

/// Everything measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub memory_bytes: u64,
    pub disk_path: String,
    pub disk_free: Result<u64, String>,
    /// None when no coordinator is configured.
    pub link: Option<pb::LinkSample>,
    pub docker: Result<String, String>,
    /// (GPU count, driver version) or why NVML did not load.
    pub nvml: Result<(usize, String), String>,
    pub tun: Result<(), String>,
    /// The open guard: `timelock.prevent`, and whether fanotify permission
    /// events work here.
    pub guard: (bool, Result<(), String>),
    pub key_path: String,
    pub key: KeyState,
    pub clock: Option<KernelClock>,
    /// The coordinator section's files (its CA); None when none is configured.
    pub coordinator: Option<Result<(), String>>,
    /// What the running agent says of its delivery (its status socket):
    /// None when no agent answers there.
    pub delivery: Option<Option<crate::delivery::problem::Problem>>,
    /// How Docker would serve a GPU device request, or why it cannot be asked.
    pub gpu_runtime: Result<GpuRuntime, String>,
    /// The NVIDIA kernel module's version (/proc/driver/nvidia/version), if loaded.
    pub kernel_driver: Option<String>,
    /// `workload.scratch`, and what a real scratch volume made here did
    /// (`scratch::gocryptfs::probe`); not tried when it is off.
    pub scratch_mode: crate::workloads::scratch::ScratchMode,
    pub scratch: Result<String, String>,
}

/// What Docker offers for GPU containers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuRuntime {
    /// `workload.gpu_driver`: the driver the leases' device requests name.
    pub driver: String,
    /// The runtimes Docker lists (`docker info`).
    pub runtimes: Vec<String>,
    /// The NVIDIA Container Toolkit's hook on dockerd's PATH (what serves
    /// `--gpus` on Docker's "nvidia" driver); None if dockerd's PATH could
    /// not be read.
    pub hook: Option<bool>,
    /// CDI specs for nvidia.com devices in Docker's CDI directories.
    pub cdi: bool,
}

/// The version in /proc/driver/nvidia/version's first line ("NVRM version:
/// NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 …", or "… Open
/// Kernel Module for x86_64  560.35.03  Release Build …"): its first word
/// of digits and dots.
pub fn kernel_module_version(text: &str) -> Option<String> {
    text.lines()
        .next()?
        .split_whitespace()
        .find(|w| w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .map(str::to_owned)
}

/// The hook that lets Docker serve NVIDIA device requests.
const HOOK: &str = "nvidia-container-runtime-hook";
/// What to install when it is missing (the same words a lease refused for
/// it carries).
const RUNTIME_FIX: &str = crate::workloads::docker::GPU_RUNTIME_FIX;

const GB: f64 = 1e9;

fn row(name: &'static str, ok: bool, value: String, threshold: String, fix: &str) -> Check {
    Check {
        name,
        verdict: if ok { Verdict::Pass } else { Verdict::Fail },
        value,
        threshold,
        fix: if ok { String::new() } else { fix.to_owned() },
    }
}

/// Holds the facts against the thresholds: one row per check, in a fixed order.
pub fn evaluate(f: &Facts, t: &DoctorConfig) -> Vec<Check> {
    let mut out = Vec::new();
    let mem = f.memory_bytes as f64 / GB;
    out.push(row(
        "memory",
        mem >= t.min_memory_gb,
        format!("{mem:.1} GB"),
        format!(">= {} GB", t.min_memory_gb),
        "add RAM: suppliers need the minimum installed",
    ));
    out.push(match &f.disk_free {
        Ok(b) => {
            let gb = *b as f64 / GB;
            row(
                "disk",
                gb >= t.min_disk_free_gb,
                format!("{gb:.1} GB free on {}", f.disk_path),
                format!(">= {} GB", t.min_disk_free_gb),
                "free space on that filesystem, or set state_dir to one with room",
            )
        }
        Err(e) => row(
            "disk",
            false,
            e.clone(),
            format!(">= {} GB", t.min_disk_free_gb),
            "make state_dir's filesystem readable",
        ),
    });
    match &f.link {
        None => {
            for (name, threshold) in [
                ("download", format!(">= {} Mbit/s", t.min_download_mbps)),
                ("upload", format!(">= {} Mbit/s", t.min_upload_mbps)),
                ("rtt", format!("< {} ms", t.max_rtt_ms)),
            ] {
                out.push(Check {
                    name,
                    verdict: Verdict::Skip,
                    value: "no coordinator configured".into(),
                    threshold,
                    fix: "set [coordinator] in the config to measure the link against it".into(),
                });
            }
        }
        Some(l) if !l.error.is_empty() => {
            for (name, threshold) in [
                ("download", format!(">= {} Mbit/s", t.min_download_mbps)),
                ("upload", format!(">= {} Mbit/s", t.min_upload_mbps)),
                ("rtt", format!("< {} ms", t.max_rtt_ms)),
            ] {
                out.push(row(
                    name,
                    false,
                    format!("probe failed: {}", l.error),
                    threshold,
                    "check that the coordinator is reachable (address, CA, firewall)",
                ));
            }
        }
        Some(l) => {
            out.push(row(
                "download",
                l.download_mbps >= t.min_download_mbps,
                format!("{:.0} Mbit/s", l.download_mbps),
                format!(">= {} Mbit/s", t.min_download_mbps),
                "a faster downlink is needed (check the NIC's negotiated speed and the ISP plan)",
            ));
            out.push(row(
                "upload",
                l.upload_mbps >= t.min_upload_mbps,
                format!("{:.0} Mbit/s", l.upload_mbps),
                format!(">= {} Mbit/s", t.min_upload_mbps),
                "a faster uplink is needed (check the NIC's negotiated speed and the ISP plan)",
            ));
            out.push(row(
                "rtt",
                l.rtt_ms < t.max_rtt_ms,
                format!("{:.2} ms", l.rtt_ms),
                format!("< {} ms", t.max_rtt_ms),
                "the coordinator is too far away on the network: use a closer region or a wired link",
            ));
        }
    }
    out.push(match &f.docker {
        Ok(v) => row("docker", true, format!("engine {v}"), "socket reachable".into(), ""),
        Err(e) => row(
            "docker",
            false,
            e.clone(),
            "socket reachable".into(),
            "install Docker and run the agent as root (or in the docker group); `systemctl status docker`",
        ),
    });
    out.push(match &f.nvml {
        Ok((n, driver)) => row(
            "nvml",
            true,
            format!("{n} GPU(s), driver {driver}"),
            "NVML loads".into(),
            "",
        ),
        Err(e) => row(
            "nvml",
            false,
            e.clone(),
            "NVML loads".into(),
            if e.to_lowercase().contains("mismatch") {
                "the kernel module and the library are of different driver versions (an upgrade is half applied): reboot, or reload the nvidia kernel modules"
            } else {
                "install the NVIDIA driver (nvidia-smi must work), or set gpu.nvml_library"
            },
        ),
    });
    out.push(gpu_runtime_check(f));
    if let (Some(kernel), Ok((_, library))) = (&f.kernel_driver, &f.nvml) {
        out.push(row(
            "driver",
            kernel == library,
            format!("kernel module {kernel}, NVML library {library}"),
            "the same version".into(),
            "a driver upgrade is half applied: reboot (or unload and reload the nvidia kernel modules)",
        ));
    }
    out.push(match &f.tun {
        Ok(()) => row(
            "tun",
            true,
            "TUN interface created".into(),
            "/dev/net/tun usable".into(),
            "",
        ),
        Err(e) => row(
            "tun",
            false,
            e.clone(),
            "/dev/net/tun usable".into(),
            "`modprobe tun`; the agent needs CAP_NET_ADMIN for its mesh interface",
        ),
    });
    out.push(guard_check(&f.guard));
    out.push(scratch_check(f));
    if let Some(c) = &f.coordinator {
        out.push(match c {
            Ok(()) => row(
                "coordinator",
                true,
                "CA certificate readable".into(),
                "coordinator.ca_cert holds a certificate".into(),
                "",
            ),
            Err(e) => row(
                "coordinator",
                false,
                e.clone(),
                "coordinator.ca_cert holds a certificate".into(),
                "see the message; the agent refuses to start without it",
            ),
        });
    }
    out.push(match &f.delivery {
        None => Check {
            name: "delivery",
            verdict: Verdict::Skip,
            value: "no agent answers on the status socket".into(),
            threshold: "records receipted".into(),
            fix: String::new(),
        },
        Some(None) => row(
            "delivery",
            true,
            "the running agent's records are receipted".into(),
            "records receipted".into(),
            "",
        ),
        Some(Some(p)) => Check {
            name: "delivery",
            verdict: Verdict::Fail,
            value: p.text.clone(),
            threshold: "records receipted".into(),
            fix: "as the message says (cause, then Fix:)".into(),
        },
    });
    out.push(match &f.key {
        KeyState::Ok => row(
            "key",
            true,
            format!("{} is 0600", f.key_path),
            "owner-only".into(),
            "",
        ),
        KeyState::Missing => row(
            "key",
            true,
            format!("{} not created yet (made 0600 at first start)", f.key_path),
            "owner-only".into(),
            "",
        ),
        KeyState::Bad(e) => row(
            "key",
            false,
            e.clone(),
            "owner-only".into(),
            "see the message: fix the mode, or move the bad file away to get a new identity",
        ),
    });
    let offset = f
        .link
        .as_ref()
        .filter(|l| l.error.is_empty())
        .map(|l| l.clock_offset_ms);
    let threshold = format!("synchronized, |offset| <= {} ms", t.max_clock_offset_ms);
    let fix = "enable time synchronization (systemd-timesyncd or chrony)";
    out.push(match (offset, f.clock) {
        (Some(o), _) if (o.unsigned_abs() as f64) > t.max_clock_offset_ms => row(
            "clock",
            false,
            format!("{o} ms from the coordinator's clock"),
            threshold,
            fix,
        ),
        (Some(o), Some(k)) if !k.synced => Check {
            name: "clock",
            verdict: Verdict::Warn,
            value: format!("{o} ms from the coordinator, but the kernel says unsynchronized"),
            threshold,
            fix: fix.into(),
        },
        (Some(o), _) => row(
            "clock",
            true,
            format!("{o} ms from the coordinator's clock"),
            threshold,
            fix,
        ),
        (None, Some(k)) => row(
            "clock",
            k.synced,
            if k.synced {
                format!("synchronized (estimated error {} µs)", k.est_error_us)
            } else {
                "the kernel says unsynchronized".into()
            },
            threshold,
            fix,
        ),
        (None, None) => Check {
            name: "clock",
            verdict: Verdict::Skip,
            value: "cannot read the kernel clock state".into(),
            threshold,
            fix: String::new(),
        },
    });
    out
}

/// Measures everything `evaluate` needs. Runs a link probe when a
/// coordinator is configured (a few seconds).
pub async fn gather(cfg: &AgentConfig) -> Facts {
    let state_dir = cfg.state_dir.clone();
    let lib = cfg.gpu.nvml_library.clone();
    let key_path = cfg.key_file();
    let driver = cfg.workload.gpu_driver.clone();
    let prevent = cfg.timelock.prevent;
    let scratch_mode = cfg.workload.scratch;
    let socket = cfg.workload.docker_socket.clone();
    // Where the agent makes its volumes (the state directory's filesystem),
    // or the temporary directory before the first start.
    let scratch_base = if cfg.state_dir.is_dir() {
        cfg.state_dir.clone()
    } else {
        std::env::temp_dir()
    };
    let scratch = tokio::task::spawn_blocking(move || {
        if scratch_mode == crate::workloads::scratch::ScratchMode::Off {
            return Err("not tried".to_owned());
        }
        use crate::workloads::scratch::gocryptfs;
        let place = gocryptfs::Place::docker(&socket).map_err(|e| e.to_string())?;
        gocryptfs::probe(&place, &scratch_base)
    })
    .await
    .unwrap_or_else(|e| Err(format!("check panicked: {e}")));
    let gpu = tokio::task::spawn_blocking(move || {
        (
            gpu_runtime(&driver),
            std::fs::read_to_string("/proc/driver/nvidia/version")
                .ok()
                .and_then(|t| kernel_module_version(&t)),
        )
    })
    .await
    .unwrap_or_else(|e| (Err(format!("check panicked: {e}")), None));
    let local = tokio::task::spawn_blocking(move || {
        let nvml = NvmlSource::load(lib.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|s| s.inventory().map_err(|e| e.to_string()))
            .map(|i| (i.gpus.len(), i.driver_version));
        (
            crate::host::facts::summary().memory_bytes,
            crate::host::inventory::free_bytes(&state_dir).map_err(|e| e.to_string()),
            crate::host::inventory::docker_version(Path::new(
                crate::host::inventory::DOCKER_SOCKET,
            )),
            nvml,
            tun_check(),
            crate::timelock::guard::fanotify::probe(),
            key_state(&key_path),
            kernel_clock(),
        )
    })
    .await;
    let (memory_bytes, disk_free, docker, nvml, tun, guard, key, clock) = match local {
        Ok(v) => v,
        Err(e) => {
            let e = format!("check panicked: {e}");
            (
                0,
                Err(e.clone()),
                Err(e.clone()),
                Err(e.clone()),
                Err(e.clone()),
                Err(e.clone()),
                KeyState::Bad(e),
                None,
            )
        }
    };
    let link = match &cfg.coordinator {
        Some(link) => Some(
            crate::host::linkprobe::probe(link, None, &cfg.probe, cfg.uplink.connect_timeout).await,
        ),
        None => None,
    };
    let delivery = match crate::status::query(&cfg.status_socket()).await {
        Ok(v) => serde_json::from_value::<crate::status::StatusReport>(v)
            .ok()
            .map(|r| r.problem),
        Err(_) => None,
    };
    Facts {
        scratch_mode,
        scratch,
        gpu_runtime: gpu.0,
        kernel_driver: gpu.1,
        coordinator: cfg
            .coordinator
            .as_ref()
            .map(|c| c.check_ca().map_err(|e| e.to_string())),
        delivery,
        memory_bytes,
        disk_path: cfg.state_dir.display().to_string(),
        disk_free,
        link,
        docker,
        nvml,
        tun,
        guard: (prevent, guard),
        key_path: cfg.key_file().display().to_string(),
        key,
        clock,
    }
}

fn key_state(path: &Path) -> KeyState {
    match identity::load(path) {
        Ok(_) => KeyState::Ok,
        Err(identity::IdentityError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            KeyState::Missing
        }
        Err(e) => KeyState::Bad(e.to_string()),
    }
}

/// Whether leases get their encrypted scratch volume: without one, what a
/// renter writes to `/scratch` lands on the disk as plaintext. Under `auto`
/// that is a warning (leases run, and their answer says so); under
/// `required` every lease would be refused.
fn scratch_check(f: &Facts) -> Check {
    use crate::workloads::scratch::ScratchMode;
    let threshold = "a gocryptfs volume mounts, Docker sees it, disk holds ciphertext".to_owned();
    let fix = "install gocryptfs and fuse3 (Debian: apt-get install gocryptfs fuse3), load the fuse module, run the agent as root (docs/workloads.md#encrypted-scratch), or set workload.scratch = \"off\"";
    match (&f.scratch, f.scratch_mode) {
        (_, ScratchMode::Off) => Check {
            name: "scratch",
            verdict: Verdict::Skip,
            value: "workload.scratch is off: leases get no encrypted volume".into(),
            threshold,
            fix: String::new(),
        },
        (Ok(v), _) => row("scratch", true, v.clone(), threshold, ""),
        (Err(e), ScratchMode::Required) => row(
            "scratch",
            false,
            format!("{e}; every lease is refused (workload.scratch is required)"),
            threshold,
            fix,
        ),
        (Err(e), ScratchMode::Auto) => Check {
            name: "scratch",
            verdict: Verdict::Warn,
            value: format!("{e}; leases run without an encrypted volume and say so"),
            threshold,
            fix: fix.into(),
        },
    }
}

/// Whether Docker can give a lease its GPUs: a node with NVIDIA GPUs needs
/// the driver its device requests name served (the NVIDIA hook on dockerd's
/// PATH, an "nvidia" runtime, or CDI specs).
fn gpu_runtime_check(f: &Facts) -> Check {
    let has_gpus = matches!(&f.nvml, Ok((n, _)) if *n > 0) || f.kernel_driver.is_some();
    let threshold = "Docker serves GPU device requests".to_owned();
    if !has_gpus {
        return Check {
            name: "runtime",
            verdict: Verdict::Skip,
            value: "no NVIDIA GPU here".into(),
            threshold,
            fix: String::new(),
        };
    }
    match &f.gpu_runtime {
        Err(e) => row(
            "runtime",
            false,
            e.clone(),
            threshold,
            "start Docker, then run the doctor again",
        ),
        Ok(r) => {
            let served = r.hook == Some(true) || r.runtimes.iter().any(|n| n == "nvidia") || r.cdi;
            let how = [
                (r.hook == Some(true), format!("{HOOK} on dockerd's PATH")),
                (
                    r.runtimes.iter().any(|n| n == "nvidia"),
                    "runtime nvidia".into(),
                ),
                (r.cdi, "CDI specs for nvidia.com".into()),
            ]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, s)| s)
            .collect::<Vec<_>>();
            row(
                "runtime",
                served,
                if served {
                    format!("driver {}: {}", r.driver, how.join(", "))
                } else {
                    format!(
                        "driver {}: no {HOOK} on dockerd's PATH, no nvidia runtime (Docker has {}), no CDI spec; every GPU lease would fail with `could not select device driver`",
                        r.driver,
                        if r.runtimes.is_empty() { "none".to_owned() } else { r.runtimes.join(", ") }
                    )
                },
                threshold,
                RUNTIME_FIX,
            )
        }
    }
}

/// What Docker offers for GPU containers, asked of the engine and of
/// dockerd's process.
fn gpu_runtime(driver: &str) -> Result<GpuRuntime, String> {
    let info =
        crate::host::inventory::docker_info(Path::new(crate::host::inventory::DOCKER_SOCKET))?;
    let runtimes = info["Runtimes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let cdi_dirs: Vec<String> = info["CDISpecDirs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_else(|| vec!["/etc/cdi".into(), "/var/run/cdi".into()]);
    let cdi = cdi_dirs.iter().any(|d| {
        std::fs::read_dir(d).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("nvidia.com/")))
        })
    });
    Ok(GpuRuntime {
        driver: driver.to_owned(),
        runtimes,
        hook: dockerd_path().map(|path| path.split(':').any(|d| Path::new(d).join(HOOK).is_file())),
        cdi,
    })
}

/// The PATH dockerd runs with (from /proc), if a dockerd runs.
fn dockerd_path() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        if comm.trim() != "dockerd" {
            return None;
        }
        let env = std::fs::read(e.path().join("environ")).ok()?;
        env.split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(b"PATH="))
            .map(|p| String::from_utf8_lossy(p).into_owned())
    })
}

/// Creates (and at once drops) a TUN interface: what the mesh will do.
fn tun_check() -> Result<(), String> {
    // Not persistent: it goes away with the descriptor.
    crate::mesh::tun::open("wdoctor%d")
        .map(drop)
        .map_err(|e| e.to_string())
}

fn kernel_clock() -> Option<KernelClock> {
    // SAFETY: a zeroed timex with modes 0 only reads the kernel's state.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut t) };
    if state < 0 {
        return None;
    }
    Some(KernelClock {
        synced: state != libc::TIME_ERROR && t.status & libc::STA_UNSYNC == 0,
        est_error_us: t.esterror,
    })
}

/// The names of the failed checks.
pub fn failed(checks: &[Check]) -> Vec<&'static str> {
    checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Facts {
        Facts {
            memory_bytes: 64_000_000_000,
            disk_path: "/var/lib/warden".into(),
            disk_free: Ok(2_000_000_000_000),
            link: Some(pb::LinkSample {
                download_mbps: 940.0,
                upload_mbps: 930.0,
                rtt_ms: 4.0,
                clock_offset_ms: 3,
                ..Default::default()
            }),
            docker: Ok("24.0.7".into()),
            nvml: Ok((8, "550.54.15".into())),
            tun: Ok(()),
            guard: (true, Ok(())),
            key_path: "/var/lib/warden/node.key".into(),
            key: KeyState::Ok,
            clock: Some(KernelClock {
                synced: true,
                est_error_us: 10,
            }),
            coordinator: Some(Ok(())),
            delivery: Some(None),
            gpu_runtime: Ok(GpuRuntime {
                driver: "nvidia".into(),
                runtimes: vec!["runc".into()],
                hook: Some(true),
                cdi: false,
            }),
            kernel_driver: Some("550.54.15".into()),
            scratch_mode: crate::workloads::scratch::ScratchMode::Auto,
            scratch: Ok("gocryptfs 2.3: a volume was mounted".into()),
        }
    }

    #[test]
    fn a_gpu_host_without_the_container_toolkit_or_with_a_half_upgraded_driver_fails() {
        let mut f = good();
        f.gpu_runtime = Ok(GpuRuntime {
            driver: "nvidia".into(),
            runtimes: vec!["io.containerd.runc.v2".into(), "runc".into()],
            hook: Some(false),
            cdi: false,
        });
        let checks = evaluate(&f, &DoctorConfig::default());
        assert_eq!(failed(&checks), ["runtime"]);
        let c = checks.iter().find(|c| c.name == "runtime").unwrap();
        assert!(c.value.contains("could not select device driver"), "{c:?}");
        assert!(c.fix.contains("nvidia-container-toolkit"), "{c:?}");
        // An nvidia runtime or CDI specs serve it too.
        for runtime in [
            GpuRuntime {
                runtimes: vec!["nvidia".into()],
                ..Default::default()
            },
            GpuRuntime {
                cdi: true,
                ..Default::default()
            },
        ] {
            f.gpu_runtime = Ok(runtime);
            assert!(failed(&evaluate(&f, &DoctorConfig::default())).is_empty());
        }
        // The kernel module from before an upgrade, the library from after it.
        f.kernel_driver = Some("535.129.03".into());
        let checks = evaluate(&f, &DoctorConfig::default());
        assert_eq!(failed(&checks), ["driver"]);
        // NVML's own word for it.
        f.kernel_driver = None;
        f.nvml = Err("Driver/library version mismatch".into());
        let checks = evaluate(&f, &DoctorConfig::default());
        let n = checks.iter().find(|c| c.name == "nvml").unwrap();
        assert!(n.fix.contains("reboot"), "{n:?}");
        // No NVIDIA GPU at all: not a failure of the runtime.
        f.nvml = Err("libnvidia-ml.so not found".into());
        f.gpu_runtime = Ok(GpuRuntime::default());
        let checks = evaluate(&f, &DoctorConfig::default());
        assert_eq!(
            checks.iter().find(|c| c.name == "runtime").unwrap().verdict,
            Verdict::Skip
        );
    }

    #[test]
    fn the_kernel_modules_version_is_read_from_procfs() {
        let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version:  gcc version 12.2.0\n";
        assert_eq!(kernel_module_version(text).as_deref(), Some("550.54.15"));
        let open =
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  560.35.03  Release Build\n";
        assert_eq!(kernel_module_version(open).as_deref(), Some("560.35.03"));
        assert_eq!(kernel_module_version(""), None);
    }

    #[test]
    fn a_missing_ca_or_an_agent_that_cannot_deliver_fails_the_doctor() {
        let mut f = good();
        assert!(failed(&evaluate(&f, &DoctorConfig::default())).is_empty());
        f.coordinator = Some(Err("coordinator.ca_cert: cannot read /ca.pem".into()));
        f.delivery = Some(Some(crate::delivery::problem::Problem {
            kind: "disconnected".into(),
            text: "wrong key. Fix: set it".into(),
        }));
        let checks = evaluate(&f, &DoctorConfig::default());
        assert_eq!(failed(&checks), ["coordinator", "delivery"]);
        let d = checks.iter().find(|c| c.name == "delivery").unwrap();
        assert!(d.value.contains("wrong key"), "{d:?}");
        // No agent running: not measured, not failed.
        f.delivery = None;
        f.coordinator = None;
        let checks = evaluate(&f, &DoctorConfig::default());
        assert!(failed(&checks).is_empty());
        assert_eq!(
            checks
                .iter()
                .find(|c| c.name == "delivery")
                .unwrap()
                .verdict,
            Verdict::Skip
        );
    }

    fn verdicts(f: &Facts) -> Vec<(&'static str, Verdict)> {
        evaluate(f, &DoctorConfig::default())
            .into_iter()
            .map(|c| (c.name, c.verdict))
            .collect()
    }

    #[test]
    fn a_good_machine_passes_every_check() {
        let checks = evaluate(&good(), &DoctorConfig::default());
        assert_eq!(
            checks.iter().map(|c| c.name).collect::<Vec<_>>(),
            [
                "memory",
                "disk",
                "download",
                "upload",
                "rtt",
                "docker",
                "nvml",
                "runtime",
                "driver",
                "tun",
                "guard",
                "scratch",
                "coordinator",
                "delivery",
                "key",
                "clock"
            ]
        );
        assert!(
            checks
                .iter()
                .all(|c| c.verdict == Verdict::Pass && c.fix.is_empty()),
            "{checks:#?}"
        );
        assert!(failed(&checks).is_empty());
    }

    #[test]
    fn each_minimum_fails_on_its_own_with_a_fix() {
        type Breaker = Box<dyn Fn(&mut Facts)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("memory", Box::new(|f| f.memory_bytes = 11_900_000_000)),
            ("disk", Box::new(|f| f.disk_free = Ok(499_000_000_000))),
            (
                "download",
                Box::new(|f| f.link.as_mut().unwrap().download_mbps = 499.0),
            ),
            (
                "upload",
                Box::new(|f| f.link.as_mut().unwrap().upload_mbps = 249.0),
            ),
            ("rtt", Box::new(|f| f.link.as_mut().unwrap().rtt_ms = 30.0)),
            (
                "docker",
                Box::new(|f| f.docker = Err("permission denied".into())),
            ),
            ("nvml", Box::new(|f| f.nvml = Err("not loaded".into()))),
            ("tun", Box::new(|f| f.tun = Err("no such device".into()))),
            (
                "scratch",
                Box::new(|f| {
                    f.scratch_mode = crate::workloads::scratch::ScratchMode::Required;
                    f.scratch = Err("gocryptfs cannot be run".into());
                }),
            ),
            (
                "key",
                Box::new(|f| f.key = KeyState::Bad("mode 0644".into())),
            ),
            (
                "clock",
                Box::new(|f| f.link.as_mut().unwrap().clock_offset_ms = -1500),
            ),
        ];
        for (name, break_it) in cases {
            let mut f = good();
            break_it(&mut f);
            let checks = evaluate(&f, &DoctorConfig::default());
            assert_eq!(failed(&checks), [name], "{checks:#?}");
            let c = checks.iter().find(|c| c.name == name).unwrap();
            assert!(!c.fix.is_empty() && !c.value.is_empty(), "{c:?}");
        }
    }

    #[test]
    fn a_host_without_the_open_guard_is_warned_not_failed() {
        for guard in [
            (
                true,
                Err("fanotify permission events are unavailable: EPERM".to_owned()),
            ),
            (false, Ok(())),
        ] {
            let mut f = good();
            f.guard = guard.clone();
            let checks = evaluate(&f, &DoctorConfig::default());
            assert!(failed(&checks).is_empty(), "{checks:#?}");
            let c = checks.iter().find(|c| c.name == "guard").unwrap();
            assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
            assert!(c.fix.contains("timelock.prevent") || c.fix.contains("FANOTIFY"));
            if let (true, Err(e)) = &guard {
                assert_eq!(&c.value, e);
            }
        }
    }

    #[test]
    fn a_node_without_encrypted_scratch_says_so() {
        use crate::workloads::scratch::ScratchMode;
        let mut f = good();
        f.scratch =
            Err("the volume is mounted where this agent runs but Docker does not see it".into());
        // auto: leases still run (without the volume): a warning with its fix.
        let checks = evaluate(&f, &DoctorConfig::default());
        assert!(failed(&checks).is_empty());
        let c = checks.iter().find(|c| c.name == "scratch").unwrap();
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(
            c.value.contains("Docker does not see it") && c.value.contains("without"),
            "{c:?}"
        );
        assert!(c.fix.contains("apt-get install gocryptfs"), "{c:?}");
        // required: every lease would be refused.
        f.scratch_mode = ScratchMode::Required;
        assert_eq!(failed(&evaluate(&f, &DoctorConfig::default())), ["scratch"]);
        // off: nothing to check.
        f.scratch_mode = ScratchMode::Off;
        assert!(verdicts(&f).contains(&("scratch", Verdict::Skip)));
    }

    #[test]
    fn thresholds_come_from_the_config() {
        let mut f = good();
        f.disk_free = Ok(100_000_000_000);
        let t = DoctorConfig {
            min_disk_free_gb: 50.0,
            ..Default::default()
        };
        assert!(failed(&evaluate(&f, &t)).is_empty());
        assert_eq!(failed(&evaluate(&f, &DoctorConfig::default())), ["disk"]);
    }

    #[test]
    fn without_a_coordinator_the_link_is_skipped_and_the_kernel_clock_decides() {
        let mut f = good();
        f.link = None;
        let v = verdicts(&f);
        assert!(v.contains(&("download", Verdict::Skip)) && v.contains(&("rtt", Verdict::Skip)));
        assert!(v.contains(&("clock", Verdict::Pass)));
        f.clock = Some(KernelClock {
            synced: false,
            est_error_us: 16_000_000,
        });
        assert_eq!(failed(&evaluate(&f, &DoctorConfig::default())), ["clock"]);
        // With a coordinator close in time, an unsynchronized kernel is only a warning.
        let mut f = good();
        f.clock = Some(KernelClock {
            synced: false,
            est_error_us: 0,
        });
        assert!(verdicts(&f).contains(&("clock", Verdict::Warn)));
        // A failed probe fails the three link rows, naming the error.
        let mut f = good();
        f.link = Some(pb::LinkSample {
            error: "connection refused".into(),
            ..Default::default()
        });
        assert_eq!(
            failed(&evaluate(&f, &DoctorConfig::default())),
            ["download", "upload", "rtt"]
        );
    }
}
