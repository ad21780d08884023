//! Warden agent.
