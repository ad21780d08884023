//! The NVML identity rule: a GPU's uuid, serial, PCI ids and memory must
//! stay what they were when it last passed; any change takes the node out
//! of matching until a challenge passes again on what it is now.

use crate::pb::{GpuIdentity, GpuInfo};

/// The identity an inventory entry claims for its GPU (what a node reports
/// and what a work answer must carry).
pub fn of(g: &GpuInfo) -> GpuIdentity {
    GpuIdentity {
        uuid: g.uuid.clone(),
        serial: g.serial.clone(),
        pci_bus_id: g.pci_bus_id.clone(),
        pci_device_id: g.pci_device_id,
        pci_subsystem_id: g.pci_subsystem_id,
        memory_total_bytes: g.memory_total_bytes,
        name: g.name.clone(),
    }
}

/// The fields of `now` that differ from `passed` (empty: the same GPU).
pub fn changes(passed: &GpuIdentity, now: &GpuIdentity) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut diff = |name, differs: bool| {
        if differs {
            out.push(name)
        }
    };
    diff("uuid", passed.uuid != now.uuid);
    diff("serial", passed.serial != now.serial);
    diff("pci_bus_id", passed.pci_bus_id != now.pci_bus_id);
    diff("pci_device_id", passed.pci_device_id != now.pci_device_id);
    diff(
        "pci_subsystem_id",
        passed.pci_subsystem_id != now.pci_subsystem_id,
    );
    diff(
        "memory_total_bytes",
        passed.memory_total_bytes != now.memory_total_bytes,
    );
    diff("name", passed.name != now.name);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_field_that_changes_is_named() {
        let a = GpuIdentity {
            uuid: "GPU-1".into(),
            serial: "1320".into(),
            pci_bus_id: "00000000:01:00.0".into(),
            pci_device_id: 0x2330_10de,
            pci_subsystem_id: 1,
            memory_total_bytes: 80 << 30,
            name: "NVIDIA H100 80GB HBM3".into(),
        };
        assert!(changes(&a, &a.clone()).is_empty());
        let b = GpuIdentity {
            serial: "9999".into(),
            memory_total_bytes: 40 << 30,
            ..a.clone()
        };
        assert_eq!(changes(&a, &b), vec!["serial", "memory_total_bytes"]);
    }
}
