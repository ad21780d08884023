//! A fake `libnvidia-ml.so.1` for tests. It exports the NVML functions the
//! agent calls, with the real names, signatures and struct layouts, so the
//! agent loads it through nvml-wrapper's own `lib_path` and its real FFI
//! code runs. State comes from the JSON file named by `FAKE_NVML_STATE`,
//! looked at on every call (re-parsed when the file changes), so a test can
//! change the GPUs while the agent runs. See README.md.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::{
    ffi::{c_char, c_int, c_uint, c_ulonglong, c_void},
    os::unix::fs::MetadataExt,
    sync::{Arc, Mutex},
};

use serde::Deserialize;

type Ret = c_int;
const SUCCESS: Ret = 0;
const ERROR_UNINITIALIZED: Ret = 1;
const ERROR_INVALID_ARGUMENT: Ret = 2;
const ERROR_NOT_SUPPORTED: Ret = 3;
const ERROR_INSUFFICIENT_SIZE: Ret = 7;
const ERROR_DRIVER_NOT_LOADED: Ret = 9;
const ERROR_TIMEOUT: Ret = 10;
const ERROR_GPU_IS_LOST: Ret = 15;
const ERROR_UNKNOWN: Ret = 999;

#[derive(Deserialize, Clone, Default)]
#[serde(default)]
struct State {
    driver_version: String,
    cuda_version: i32,
    /// Make nvmlInit fail with this NVML error code (e.g. 9: driver not loaded).
    init_error: Option<i32>,
    devices: Vec<Device>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(default)]
struct Device {
    uuid: String,
    name: String,
    pci_bus_id: String,
    memory_total_mib: u64,
    memory_used_mib: u64,
    utilization_gpu: u32,
    utilization_memory: u32,
    power_mw: u32,
    temperature_c: u32,
    sm_clock_mhz: u32,
    processes: Vec<Process>,
    graphics_processes: Vec<Process>,
    lost: bool,
    /// Minor number of its device node (/dev/nvidiaN); default: its index.
    minor_number: Option<u32>,
    /// Xid errors to raise, in order; each is delivered once through the
    /// event API (`nvmlEventSetWait_v2`), so a test appends to raise more.
    xid_errors: Vec<u64>,
    /// The board serial (nvmlDeviceGetSerial); empty: NOT_SUPPORTED.
    serial: String,
    /// A confidential-computing report (hex) for
    /// nvmlDeviceGetConfComputeGpuAttestationReport, which returns it
    /// followed by the caller's nonce; absent: NOT_SUPPORTED (no CC mode).
    cc_report_hex: Option<String>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(default)]
struct Process {
    pid: u32,
    used_memory_mib: u64,
}

/// Identifies a version of the state file: inode, size, mtime (s, ns).
type FileKey = (u64, u64, i64, i64);
/// The last read: its file key and what it parsed to (None: unparsable).
static CACHE: Mutex<Option<(FileKey, Option<Arc<State>>)>> = Mutex::new(None);
static INITIALIZED: Mutex<u32> = Mutex::new(0);

fn state() -> Result<Arc<State>, Ret> {
    let path = std::env::var_os("FAKE_NVML_STATE").ok_or(ERROR_DRIVER_NOT_LOADED)?;
    let meta = std::fs::metadata(&path).map_err(|_| ERROR_DRIVER_NOT_LOADED)?;
    let key = (meta.ino(), meta.len(), meta.mtime(), meta.mtime_nsec());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.as_ref().map(|(k, _)| *k) != Some(key) {
        let parsed = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<State>(&b).ok())
            .map(Arc::new);
        *cache = Some((key, parsed));
    }
    cache
        .as_ref()
        .and_then(|(_, s)| s.clone())
        .ok_or(ERROR_UNKNOWN)
}

fn initialized() -> Result<Arc<State>, Ret> {
    if *INITIALIZED.lock().unwrap_or_else(|e| e.into_inner()) == 0 {
        return Err(ERROR_UNINITIALIZED);
    }
    state()
}

/// Device handles are 1-based indices disguised as pointers.
fn device(handle: *mut c_void) -> Result<Device, Ret> {
    let s = initialized()?;
    let i = (handle as usize)
        .checked_sub(1)
        .ok_or(ERROR_INVALID_ARGUMENT)?;
    let d = s.devices.get(i).cloned().ok_or(ERROR_INVALID_ARGUMENT)?;
    if d.lost {
        return Err(ERROR_GPU_IS_LOST);
    }
    Ok(d)
}

fn run(f: impl FnOnce() -> Result<(), Ret>) -> Ret {
    match f() {
        Ok(()) => SUCCESS,
        Err(e) => e,
    }
}

unsafe fn write_str(s: &str, out: *mut c_char, len: c_uint) -> Result<(), Ret> {
    if out.is_null() {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    if s.len() + 1 > len as usize {
        return Err(ERROR_INSUFFICIENT_SIZE);
    }
    std::ptr::copy_nonoverlapping(s.as_ptr() as *const c_char, out, s.len());
    *out.add(s.len()) = 0;
    Ok(())
}

unsafe fn put<T>(out: *mut T, v: T) -> Result<(), Ret> {
    if out.is_null() {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    *out = v;
    Ok(())
}

#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    run(|| {
        let s = state()?;
        if let Some(e) = s.init_error {
            return Err(e);
        }
        *INITIALIZED.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> Ret {
    nvmlInitWithFlags(0)
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> Ret {
    let mut n = INITIALIZED.lock().unwrap_or_else(|e| e.into_inner());
    if *n == 0 {
        return ERROR_UNINITIALIZED;
    }
    *n -= 1;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    let s: &'static [u8] = match result {
        SUCCESS => b"Success\0",
        ERROR_UNINITIALIZED => b"Uninitialized\0",
        ERROR_INVALID_ARGUMENT => b"Invalid Argument\0",
        ERROR_NOT_SUPPORTED => b"Not Supported\0",
        ERROR_INSUFFICIENT_SIZE => b"Insufficient Size\0",
        ERROR_DRIVER_NOT_LOADED => b"Driver Not Loaded\0",
        ERROR_GPU_IS_LOST => b"GPU is lost\0",
        ERROR_TIMEOUT => b"Timeout\0",
        _ => b"Unknown Error\0",
    };
    s.as_ptr() as *const c_char
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> Ret {
    run(|| write_str(&initialized()?.driver_version, version, length))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(v: *mut c_int) -> Ret {
    run(|| put(v, initialized()?.cuda_version))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(v: *mut c_int) -> Ret {
    nvmlSystemGetCudaDriverVersion_v2(v)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    run(|| put(count, initialized()?.devices.len() as c_uint))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut *mut c_void,
) -> Ret {
    run(|| {
        let s = initialized()?;
        let d = s
            .devices
            .get(index as usize)
            .ok_or(ERROR_INVALID_ARGUMENT)?;
        if d.lost {
            return Err(ERROR_GPU_IS_LOST);
        }
        put(device, (index as usize + 1) as *mut c_void)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: *mut c_void, index: *mut c_uint) -> Ret {
    run(|| {
        self::device(device)?;
        put(index, (device as usize - 1) as c_uint)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: *mut c_void,
    uuid: *mut c_char,
    length: c_uint,
) -> Ret {
    run(|| write_str(&self::device(device)?.uuid, uuid, length))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: *mut c_void,
    name: *mut c_char,
    length: c_uint,
) -> Ret {
    run(|| write_str(&self::device(device)?.name, name, length))
}

/// `nvmlPciInfo_t` as in nvml.h.
#[repr(C)]
pub struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

fn copy_cstr(dst: &mut [c_char], s: &str) {
    let room = dst.len() - 1;
    for (d, b) in dst.iter_mut().zip(s.bytes().take(room)) {
        *d = b as c_char;
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(device: *mut c_void, pci: *mut PciInfo) -> Ret {
    run(|| {
        let d = self::device(device)?;
        if pci.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        // "DDDDDDDD:BB:DD.F"
        let mut parts = d.pci_bus_id.split([':', '.']);
        let mut hex = || {
            parts
                .next()
                .and_then(|p| u32::from_str_radix(p, 16).ok())
                .unwrap_or(0)
        };
        let (domain, bus, dev) = (hex(), hex(), hex());
        let mut info = PciInfo {
            bus_id_legacy: [0; 16],
            domain,
            bus,
            device: dev,
            pci_device_id: 0x2330_10de,
            pci_sub_system_id: 0x16c1_10de,
            bus_id: [0; 32],
        };
        copy_cstr(&mut info.bus_id, &d.pci_bus_id);
        copy_cstr(&mut info.bus_id_legacy, d.pci_bus_id.get(4..).unwrap_or(""));
        *pci = info;
        Ok(())
    })
}

/// `nvmlMemory_v2_t` as in nvml.h.
#[repr(C)]
pub struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlMemory_t` as in nvml.h.
#[repr(C)]
pub struct Memory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

const MIB: u64 = 1 << 20;

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: *mut c_void,
    mem: *mut MemoryV2,
) -> Ret {
    run(|| {
        let d = self::device(device)?;
        if mem.is_null() || (*mem).version >> 24 != 2 {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let total = d.memory_total_mib * MIB;
        let used = d.memory_used_mib.min(d.memory_total_mib) * MIB;
        (*mem).total = total;
        (*mem).reserved = 0;
        (*mem).used = used;
        (*mem).free = total - used;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: *mut c_void, mem: *mut Memory) -> Ret {
    run(|| {
        let d = self::device(device)?;
        let total = d.memory_total_mib * MIB;
        let used = d.memory_used_mib.min(d.memory_total_mib) * MIB;
        put(
            mem,
            Memory {
                total,
                free: total - used,
                used,
            },
        )
    })
}

/// `nvmlUtilization_t` as in nvml.h.
#[repr(C)]
pub struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: *mut c_void,
    u: *mut Utilization,
) -> Ret {
    run(|| {
        let d = self::device(device)?;
        put(
            u,
            Utilization {
                gpu: d.utilization_gpu,
                memory: d.utilization_memory,
            },
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(device: *mut c_void, mw: *mut c_uint) -> Ret {
    run(|| put(mw, self::device(device)?.power_mw))
}

/// Only the GPU die sensor (0) exists, as on real boards.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: *mut c_void,
    sensor: c_int,
    t: *mut c_uint,
) -> Ret {
    run(|| {
        let d = self::device(device)?;
        if sensor != 0 {
            return Err(ERROR_NOT_SUPPORTED);
        }
        put(t, d.temperature_c)
    })
}

/// Graphics (0) and SM (1) clocks are the configured SM clock; others are unsupported.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: *mut c_void,
    kind: c_int,
    mhz: *mut c_uint,
) -> Ret {
    run(|| {
        let d = self::device(device)?;
        match kind {
            0 | 1 => put(mhz, d.sm_clock_mhz),
            _ => Err(ERROR_NOT_SUPPORTED),
        }
    })
}

/// `nvmlProcessInfo_t` (v2 layout) as in nvml.h.
#[repr(C)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// NVML's two-call protocol: a short or null buffer gets the count and
/// INSUFFICIENT_SIZE (SUCCESS when there are none).
unsafe fn processes(
    list: &[Process],
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Result<(), Ret> {
    if count.is_null() {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    let n = list.len() as c_uint;
    if infos.is_null() || *count < n {
        *count = n;
        return if n == 0 {
            Ok(())
        } else {
            Err(ERROR_INSUFFICIENT_SIZE)
        };
    }
    for (i, p) in list.iter().enumerate() {
        *infos.add(i) = ProcessInfo {
            pid: p.pid,
            used_gpu_memory: p.used_memory_mib * MIB,
            gpu_instance_id: u32::MAX,
            compute_instance_id: u32::MAX,
        };
    }
    *count = n;
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: *mut c_void,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    run(|| processes(&self::device(device)?.processes, count, infos))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: *mut c_void,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    run(|| processes(&self::device(device)?.graphics_processes, count, infos))
}

// Events: only Xid critical errors, as the agent registers for.

/// `nvmlEventTypeXidCriticalError`.
const EVENT_XID: c_ulonglong = 0x8;

/// Xid errors delivered so far, by device uuid.
static DELIVERED: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());

/// What an event set handle points at: registered (device index, mask).
struct EventSet {
    registered: Mutex<Vec<(usize, c_ulonglong)>>,
}

/// `nvmlEventData_t` as in nvml.h.
#[repr(C)]
pub struct EventData {
    device: *mut c_void,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut *mut c_void) -> Ret {
    run(|| {
        initialized()?;
        let boxed = Box::new(EventSet {
            registered: Mutex::new(Vec::new()),
        });
        put(set, Box::into_raw(boxed) as *mut c_void)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetFree(set: *mut c_void) -> Ret {
    if set.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    drop(Box::from_raw(set as *mut EventSet));
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: *mut c_void,
    types: *mut c_ulonglong,
) -> Ret {
    run(|| {
        self::device(device)?;
        put(types, EVENT_XID)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: *mut c_void,
    types: c_ulonglong,
    set: *mut c_void,
) -> Ret {
    run(|| {
        self::device(device)?;
        if set.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        if types & !EVENT_XID != 0 {
            return Err(ERROR_NOT_SUPPORTED);
        }
        let set = &*(set as *const EventSet);
        set.registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((device as usize - 1, types));
        Ok(())
    })
}

/// The next undelivered Xid on a registered, answering device, if any.
fn next_xid(set: &EventSet) -> Result<Option<(usize, u64)>, Ret> {
    let s = initialized()?;
    let registered = set
        .registered
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut delivered = DELIVERED.lock().unwrap_or_else(|e| e.into_inner());
    for (index, mask) in registered {
        let Some(d) = s
            .devices
            .get(index)
            .filter(|d| !d.lost && mask & EVENT_XID != 0)
        else {
            continue;
        };
        let n = match delivered.iter_mut().find(|(u, _)| *u == d.uuid) {
            Some((_, n)) => n,
            None => {
                delivered.push((d.uuid.clone(), 0));
                &mut delivered.last_mut().unwrap().1
            }
        };
        if let Some(&xid) = d.xid_errors.get(*n) {
            *n += 1;
            return Ok(Some((index, xid)));
        }
    }
    Ok(None)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: *mut c_void,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> Ret {
    run(|| {
        if set.is_null() || data.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let set = &*(set as *const EventSet);
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms.into());
        loop {
            if let Some((index, xid)) = next_xid(set)? {
                return put(
                    data,
                    EventData {
                        device: (index + 1) as *mut c_void,
                        event_type: EVENT_XID,
                        event_data: xid,
                        gpu_instance_id: 0,
                        compute_instance_id: 0,
                    },
                );
            }
            if std::time::Instant::now() >= deadline {
                return Err(ERROR_TIMEOUT);
            }
            // Poll the state file gently: the real driver blocks in the kernel
            // instead, and benchmarks should not measure this loop.
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(device: *mut c_void, minor: *mut c_uint) -> Ret {
    run(|| {
        let d = self::device(device)?;
        put(minor, d.minor_number.unwrap_or(device as u32 - 1))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSerial(
    device: *mut c_void,
    serial: *mut c_char,
    length: c_uint,
) -> Ret {
    run(|| {
        let d = self::device(device)?;
        if d.serial.is_empty() {
            return Err(ERROR_NOT_SUPPORTED);
        }
        write_str(&d.serial, serial, length)
    })
}

/// `nvmlConfComputeGpuAttestationReport_t` as in nvml.h.
#[repr(C)]
pub struct CcReport {
    is_cec_attestation_report_present: c_uint,
    attestation_report_size: c_uint,
    cec_attestation_report_size: c_uint,
    nonce: [u8; 32],
    attestation_report: [u8; 8192],
    cec_attestation_report: [u8; 4096],
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetConfComputeGpuAttestationReport(
    device: *mut c_void,
    report: *mut CcReport,
) -> Ret {
    run(|| {
        let d = self::device(device)?;
        let body = d.cc_report_hex.ok_or(ERROR_NOT_SUPPORTED)?;
        if report.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let r = &mut *report;
        let mut bytes = hex_bytes(&body).ok_or(ERROR_UNKNOWN)?;
        // The real report signs the nonce; the fake shows it was passed.
        bytes.extend_from_slice(&r.nonce);
        let n = bytes.len().min(r.attestation_report.len());
        r.attestation_report[..n].copy_from_slice(&bytes[..n]);
        r.attestation_report_size = n as c_uint;
        r.is_cec_attestation_report_present = 0;
        r.cec_attestation_report_size = 0;
        Ok(())
    })
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}
