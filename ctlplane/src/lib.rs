//! dwcp control plane: the four-phase boot graph ([`boot`]), host detection ([`host`]),
//! configuration ([`config`]), I/O-free mode detection ([`mode`]), the transfer engine every
//! caller drives ([`engine`]), where jobs run ([`itp`]), and the daemon ([`daemon`])
//! with its HTTP endpoint ([`api`]), its jobs ([`jobs`]) and its warm peers ([`warm`]).
#![forbid(unsafe_code)]

pub mod api;
pub mod boot;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod fleet;
pub mod gossip;
pub mod host;
pub mod itp;
pub mod jobs;
pub mod mode;
pub mod state;
pub mod warm;
