//! dwcp data plane: wire protocol, authentication, sessions and the io_uring multi-stream
//! transport that moves VM images and byte streams between hosts.
//!
//! Layout: I/O-free cores ([`wire`], [`crypto`], [`framing`], [`session`]) and the runtime that
//! performs what they decide ([`handshake`], [`probe`], [`send`], [`recv`], [`transport`]). `unsafe` lives in
//! [`sys`] and [`transport::uring::sys`] only.

pub mod control;
pub mod crypto;
pub mod framing;
pub mod handshake;
pub mod hde;
pub mod placement;
pub mod probe;
pub mod qemu;
pub mod recv;
pub mod send;
pub mod session;
pub mod source;
pub mod sys;
pub mod transport;
pub mod wire;
