//! The NVML edge, through nvml-wrapper with a configurable library path.

use std::{ffi::OsStr, path::Path, sync::Mutex, time::Duration};

use nvml_wrapper::{
    bitmasks::event::EventTypes,
    enum_wrappers::device::{Clock, TemperatureSensor},
    enums::{device::UsedGpuMemory, event::XidError},
    error::NvmlError,
    EventSet, Nvml,
};
use warden_proto::pb;

use super::{GpuError, GpuSource, Inventory};

/// The library a stock driver installs.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// NVML, loaded once and shared by the sampler and the inventory.
pub struct NvmlSource {
    /// Loaded once for the life of the process (an event set borrows it).
    nvml: &'static Nvml,
    /// uuid by index, from the inventory at load: names a GPU that is lost.
    uuids: Vec<String>,
    /// Registered for Xid critical errors on every GPU that supports them.
    events: Option<Mutex<EventSet<'static>>>,
}

impl NvmlSource {
    /// Loads NVML from `library` (default: the driver's `libnvidia-ml.so.1`).
    pub fn load(library: Option<&Path>) -> Result<Self, GpuError> {
        let lib = library.map_or(OsStr::new(DEFAULT_LIBRARY), |p| p.as_os_str());
        let nvml = Nvml::builder()
            .lib_path(lib)
            .init()
            .map_err(|e| GpuError::Load {
                library: lib.to_string_lossy().into_owned(),
                reason: describe(&e),
            })?;
        // Leaked on purpose: loaded once per process, and an event set must borrow it.
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let mut src = NvmlSource {
            nvml,
            uuids: Vec::new(),
            events: None,
        };
        let count = src
            .nvml
            .device_count()
            .map_err(|e| GpuError::Nvml(describe(&e)))?;
        src.uuids = (0..count)
            .map(|i| {
                src.nvml
                    .device_by_index(i)
                    .and_then(|d| d.uuid())
                    .unwrap_or_else(|_| format!("index-{i}"))
            })
            .collect();
        src.events = xid_events(nvml, count).map(Mutex::new);
        Ok(src)
    }

    /// GPUs found at load (lost ones included).
    pub fn gpu_count(&self) -> usize {
        self.uuids.len()
    }

    fn read(&self, index: u32, time_unix_ms: i64) -> Result<pb::GpuSample, NvmlError> {
        let d = self.nvml.device_by_index(index)?;
        let mem = d.memory_info()?;
        let util = d.utilization_rates()?;
        let mut processes: Vec<pb::GpuProcess> = Vec::new();
        for (list, graphics) in [
            (d.running_compute_processes()?, false),
            (d.running_graphics_processes()?, true),
        ] {
            processes.extend(list.into_iter().map(|p| pb::GpuProcess {
                pid: p.pid,
                used_memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => b,
                    UsedGpuMemory::Unavailable => 0,
                },
                graphics,
            }));
        }
        Ok(pb::GpuSample {
            index,
            uuid: d.uuid()?,
            utilization_gpu: util.gpu,
            utilization_memory: util.memory,
            memory_used_bytes: mem.used,
            memory_total_bytes: mem.total,
            // Power and clocks are unsupported on some boards: zero, not a failure.
            power_mw: optional(d.power_usage())?,
            temperature_c: optional(d.temperature(TemperatureSensor::Gpu))?,
            sm_clock_mhz: optional(d.clock_info(Clock::SM))?,
            processes,
            error: String::new(),
            lost: false,
            time_unix_ms,
        })
    }
}

/// An event set registered for Xid errors on every GPU that reports them;
/// None when no GPU does (or events are unavailable, as in containers
/// without the driver's event support).
fn xid_events(nvml: &'static Nvml, count: u32) -> Option<EventSet<'static>> {
    let mut set = nvml.create_event_set().ok()?;
    let mut registered = 0;
    for i in 0..count {
        let Ok(d) = nvml.device_by_index(i) else {
            continue;
        };
        if !d
            .supported_event_types()
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR))
        {
            continue;
        }
        match d.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                registered += 1;
            }
            Err(e) => {
                tracing::debug!(gpu = i, error = %e.error, "cannot watch Xid errors");
                // A failed registration frees the set: start a new one.
                set = nvml.create_event_set().ok()?;
            }
        }
    }
    (registered > 0).then_some(set)
}

fn optional(r: Result<u32, NvmlError>) -> Result<u32, NvmlError> {
    match r {
        Err(NvmlError::NotSupported) => Ok(0),
        other => other,
    }
}

/// An NVML error as a supplier can act on it.
pub fn describe(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(l) => format!(
            "{l} (is the NVIDIA driver installed? set gpu.nvml_library to its libnvidia-ml.so.1)"
        ),
        NvmlError::DriverNotLoaded => {
            "the NVIDIA driver is not loaded (nvidia-smi should say why)".into()
        }
        NvmlError::GpuLost => {
            "GPU is lost (fell off the bus or stopped answering; see dmesg for Xid errors)".into()
        }
        NvmlError::FailedToLoadSymbol(s) => format!("the NVML library lacks {s} (driver too old?)"),
        other => other.to_string(),
    }
}

impl GpuSource for NvmlSource {
    fn inventory(&self) -> Result<Inventory, GpuError> {
        let err = |e: NvmlError| GpuError::Nvml(describe(&e));
        let count = self.nvml.device_count().map_err(err)?;
        let mut gpus = Vec::new();
        for index in 0..count {
            let d = self.nvml.device_by_index(index).map_err(err)?;
            let pci = d.pci_info().map_err(err)?;
            gpus.push(pb::GpuInfo {
                index,
                uuid: d.uuid().map_err(err)?,
                name: d.name().map_err(err)?,
                memory_total_bytes: d.memory_info().map_err(err)?.total,
                pci_bus_id: pci.bus_id,
                minor_number: d.minor_number().map_err(err)?,
                // Consumer boards have no serial: NOT_SUPPORTED is "".
                serial: match d.serial() {
                    Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => {
                        String::new()
                    }
                    other => other.map_err(err)?,
                },
                pci_device_id: pci.pci_device_id,
                pci_subsystem_id: pci.pci_sub_system_id.unwrap_or(0),
            });
        }
        Ok(Inventory {
            driver_version: self.nvml.sys_driver_version().map_err(err)?,
            cuda_version: self.nvml.sys_cuda_driver_version().map_err(err)?,
            gpus,
        })
    }

    fn cc_report(&self, uuid: &str, nonce: [u8; 32]) -> Result<Vec<u8>, GpuError> {
        let err = |e: NvmlError| match e {
            NvmlError::NotSupported => GpuError::Nvml("not supported".into()),
            e => GpuError::Nvml(describe(&e)),
        };
        // By index, as the inventory finds GPUs (the same NVML calls).
        let count = self.nvml.device_count().map_err(err)?;
        let d = (0..count)
            .filter_map(|i| self.nvml.device_by_index(i).ok())
            .find(|d| d.uuid().is_ok_and(|u| u == uuid))
            .ok_or_else(|| GpuError::Nvml(format!("no GPU {uuid} on this node")))?;
        let r = d
            .confidential_compute_gpu_attestation_report(nonce)
            .map_err(err)?;
        // Kept whole: the report, then the CEC report when present.
        let mut out = r.attestation_report;
        out.extend_from_slice(&r.cec_attestation_report);
        Ok(out)
    }

    fn wait_events(&self, timeout: Duration) -> Vec<pb::GpuEvent> {
        let Some(events) = &self.events else {
            std::thread::sleep(timeout);
            return Vec::new();
        };
        let set = events.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let mut wait = timeout.as_millis().min(u32::MAX as u128) as u32;
        // Collect whatever is queued: block for the first, then drain.
        loop {
            match set.wait(wait) {
                Ok(ev) => {
                    let xid = match ev.event_data {
                        Some(XidError::Value(v)) => v.to_string(),
                        _ => "unknown".into(),
                    };
                    let index = ev.device.index().unwrap_or(u32::MAX);
                    out.push(pb::GpuEvent {
                        index,
                        uuid: ev
                            .device
                            .uuid()
                            .or_else(|_| {
                                self.uuids
                                    .get(index as usize)
                                    .cloned()
                                    .ok_or(NvmlError::Unknown)
                            })
                            .unwrap_or_default(),
                        kind: "xid".into(),
                        detail: format!("Xid {xid}"),
                        time_unix_ms: crate::now_ms(),
                    });
                    wait = 0;
                }
                Err(NvmlError::Timeout) => break,
                Err(e) => {
                    tracing::debug!(error = %describe(&e), "waiting for NVML events");
                    if out.is_empty() {
                        // Do not spin on a broken event set.
                        drop(set);
                        std::thread::sleep(timeout);
                    }
                    break;
                }
            }
        }
        out
    }

    fn sample(&self) -> Vec<pb::GpuSample> {
        let now = crate::now_ms();
        (0..self.uuids.len() as u32)
            .map(|i| {
                self.read(i, now).unwrap_or_else(|e| pb::GpuSample {
                    index: i,
                    uuid: self.uuids[i as usize].clone(),
                    lost: matches!(e, NvmlError::GpuLost),
                    error: describe(&e),
                    time_unix_ms: now,
                    ..Default::default()
                })
            })
            .collect()
    }
}
