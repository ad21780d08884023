//! Compiles the .proto files with protox (pure Rust, no system `protoc`) and
//! writes the descriptor sets that the coordinator serves for reflection.
use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/warden/v1/envelope.proto",
        "proto/warden/v1/attest.proto",
        "proto/warden/v1/lease.proto",
        "proto/warden/v1/uplink.proto",
        "proto/warden/v1/admin.proto",
        "proto/warden/v1/probe.proto",
        "proto/warden/v1/workproof.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("warden_descriptor.bin"), fds.encode_to_vec())?;
    // The TLS port's reflection describes only what is callable there: not
    // Admin (a unix socket's service), whose file nothing else imports.
    let mut public = fds.clone();
    public.file.retain(|f| f.name() != "warden/v1/admin.proto");
    fs::write(
        out.join("warden_public_descriptor.bin"),
        public.encode_to_vec(),
    )?;
    let mut builder = tonic_prost_build::configure();
    // The state messages that `warden status/inventory/nodes --json` print.
    for m in [
        "InventorySummary",
        "GpuInfo",
        "GpuSample",
        "GpuProcess",
        "GpuEvent",
        "LinkSample",
        "SpoolState",
        "HostSample",
        "ContainerState",
        "WorkloadEvent",
        // And what `warden nodes/lease list/cluster --json` print.
        "NodeInfo",
        "LeaseInfo",
        "ClusterInfo",
        "ClusterMember",
        "NodeLabels",
        "GpuWorkStanding",
        "ClusterOrder",
        "ClusterTimings",
        "ClusterPlan",
        "PlannedMember",
        "ContainerSpec",
        "PortSpec",
        "MountSpec",
        "RenterPeer",
        "ClusterEvent",
        // And what `warden verify DIR --json` prints of a cluster record.
        "ClusterRecord",
        "ClusterOrderSummary",
        "ClusterLease",
        "ClusterRecordEvent",
    ] {
        builder = builder.type_attribute(format!(".warden.v1.{m}"), "#[derive(serde::Serialize)]");
    }
    // What `warden status` reads back from the agent's report.
    for m in ["GpuSample", "GpuProcess", "LinkSample"] {
        builder = builder.type_attribute(
            format!(".warden.v1.{m}"),
            "#[derive(serde::Deserialize)] #[serde(default)]",
        );
    }
    for (field, with) in [
        ("NodeInfo.public_key", "hex"),
        ("NodeInfo.mesh_public_key", "base64_std"),
        ("NodeInfo.missing", "seq_ranges"),
        ("RenterPeer.public_key", "base64_std"),
        ("ClusterRecord.coordinator_public_key", "base64_std"),
        ("ClusterLease.node_public_key", "base64_std"),
        ("LeaseInfo.sealed_scratch_key", "base64_std"),
    ] {
        builder = builder.field_attribute(
            format!(".warden.v1.{field}"),
            format!("#[serde(serialize_with = \"crate::json::{with}\")]"),
        );
    }
    builder
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        // Probe filler is sliced from one shared buffer, not copied per chunk.
        .bytes(".warden.v1.ProbeChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
