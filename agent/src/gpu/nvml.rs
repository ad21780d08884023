//! The NVML edge, through nvml-wrapper with a configurable library path.

use std::{ffi::OsStr, path::Path};

use nvml_wrapper::{
    enum_wrappers::device::{Clock, TemperatureSensor},
    enums::device::UsedGpuMemory,
    error::NvmlError,
    Nvml,
};
use warden_proto::pb;

use super::{GpuError, GpuSource, Inventory};

/// The library a stock driver installs.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// NVML, loaded once and shared by the sampler and the inventory.
pub struct NvmlSource {
    nvml: Nvml,
    /// uuid by index, from the inventory at load: names a GPU that is lost.
    uuids: Vec<String>,
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
        let mut src = NvmlSource {
            nvml,
            uuids: Vec::new(),
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
        Ok(src)
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
            gpus.push(pb::GpuInfo {
                index,
                uuid: d.uuid().map_err(err)?,
                name: d.name().map_err(err)?,
                memory_total_bytes: d.memory_info().map_err(err)?.total,
                pci_bus_id: d.pci_info().map_err(err)?.bus_id,
            });
        }
        Ok(Inventory {
            driver_version: self.nvml.sys_driver_version().map_err(err)?,
            cuda_version: self.nvml.sys_cuda_driver_version().map_err(err)?,
            gpus,
        })
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
