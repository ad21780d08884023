//! The host and its GPUs as the agent reports them. `facts` reads procfs
//! (memory, CPUs, load); `gpu` is the NVML edge and the sampler task;
//! `inventory` the hardware summary and its watch; `telemetry` the periodic
//! host record; `linkprobe` the link to the coordinator; `metrics` the
//! `/metrics` page; `doctor` the pre-flight checks.

pub mod doctor;
pub mod facts;
pub mod gpu;
pub mod inventory;
pub mod linkprobe;
pub mod metrics;
pub mod telemetry;
