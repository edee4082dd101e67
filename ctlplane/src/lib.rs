//! dwcp control plane. Built so far: the four-phase boot graph ([`boot`]) and I/O-free mode
//! detection ([`mode`]). Still to come (control plane issue): host detection into `HostCaps`,
//! configuration, the daemon with health, readiness, metrics and status endpoints.
#![forbid(unsafe_code)]

pub mod boot;
pub mod mode;
pub mod config;
pub mod host;
