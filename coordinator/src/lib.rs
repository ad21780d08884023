//! Warden coordinator.
