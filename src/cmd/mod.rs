//! One file per command: its arguments and how it runs and prints.

pub mod admin;
pub mod agent;
pub mod challenge;
pub mod cluster;
pub mod coordinator;
pub mod host;
pub mod image;
pub mod lease;
pub mod mesh;
pub mod nodes;
pub mod status;
pub mod verify;
