//! Fault injection for tests: what a test makes a sender do wrong, to show that the receiver and
//! the sender's own recovery cope. It is passed beside the options ([`super::send_with`]),
//! never inside them: production option types carry only production choices. The CLI reaches
//! it through hidden flags (`--fault-kill-stream`, `--fault-rdma`) that only the tests use.

/// Faults to inject into one send (none by default).
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Shut a stream's socket down mid-transfer.
    pub kill: Option<KillStream>,
    /// Misbehave on the RDMA data path.
    pub rdma: Option<RdmaFault>,
}

/// Shut stream `stream`'s socket down after it has sent `after` bytes.
#[derive(Debug, Clone, Copy)]
pub struct KillStream {
    /// Stream index.
    pub stream: u16,
    /// Bytes after which the socket is shut down.
    pub after: u64,
}

/// An RDMA write that the receiver must refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RdmaFault {
    /// Write with a wrong remote key.
    WrongRkey,
    /// Write past the end of the receiver's region.
    PastRegion,
    /// Chunks whose tag does not match (a forgery on the fabric, as the receiver sees it).
    BadTag,
}
