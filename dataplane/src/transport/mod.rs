//! Transports: today io_uring TCP streams; RDMA queue pairs join behind the same session logic.

pub mod uring;
