//! io_uring multi-stream TCP (AMST): one ring per pinned shard thread, registered buffer pool,
//! `IORING_OP_SEND_ZC` where the kernel has it. All `unsafe` is in [`sys`].

pub mod sys;

pub use sys::probe_ops;
