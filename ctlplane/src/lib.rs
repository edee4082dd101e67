//! dwcp control plane (not built yet; issue "Control plane"). It will hold the four-phase boot
//! graph (pre-init, core, service, post-init) run level by level in parallel, host detection into
//! one plain `HostCaps` value, configuration (TOML, environment, flags), I/O-free mode detection
//! (datacenter, internet, hybrid) from measured RTT and bandwidth, and the daemon with its
//! health, readiness, metrics and status endpoints. Nothing here yet: the data plane runs on its own.
#![forbid(unsafe_code)]
