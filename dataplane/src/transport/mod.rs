//! Transports behind the same session logic: io_uring TCP streams ([`uring`]) and RDMA verbs
//! queue pairs ([`rdma`], with the default `rdma` feature).

#[cfg(feature = "rdma")]
pub mod rdma;
pub mod uring;
