//! Per-socket path state for the sender's controllers: the eBPF probes when they load, otherwise
//! `getsockopt(TCP_INFO)` polling, with the reason it degraded.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use crate::{Event, SocketStats};

/// Which source to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Want {
    /// The probes if they load, else polling.
    #[default]
    Auto,
    /// Polling only.
    Poll,
}

/// One watched socket.
#[derive(Debug, Clone, Copy)]
struct Watched {
    fd: RawFd,
    cookie: Option<u64>,
}

/// The sampler. Not `Send` when the probes are loaded: create it on the thread that samples.
#[derive(Debug)]
pub struct Monitor {
    #[cfg(not(dwcp_no_bpf))]
    probes: Option<crate::Probes>,
    degraded: Option<String>,
    socks: Vec<Watched>,
}

impl Monitor {
    /// Opens the probes (unless `want` is `Poll`), or falls back to polling.
    pub fn open(want: Want) -> Self {
        let degraded;
        #[cfg(not(dwcp_no_bpf))]
        let probes = match want {
            Want::Poll => {
                degraded = Some("polling TCP_INFO (asked for)".to_string());
                None
            }
            Want::Auto => match crate::Probes::load() {
                Ok(p) => {
                    degraded = None;
                    Some(p)
                }
                Err(e) => {
                    degraded = Some(format!("{e}; polling TCP_INFO instead"));
                    None
                }
            },
        };
        #[cfg(dwcp_no_bpf)]
        {
            degraded = Some(match want {
                Want::Poll => "polling TCP_INFO (asked for)".to_string(),
                Want::Auto => format!("{}; polling TCP_INFO instead", crate::ProbeError::NotBuilt(env!("DWCP_NO_BPF_WHY"))),
            });
        }
        Self {
            #[cfg(not(dwcp_no_bpf))]
            probes,
            degraded,
            socks: Vec::new(),
        }
    }

    /// `ebpf` or `tcp_info`.
    pub fn backend(&self) -> &'static str {
        if self.degraded.is_none() { "ebpf" } else { "tcp_info" }
    }

    /// Why the probes are not in use (None when they are).
    pub fn degraded(&self) -> Option<&str> {
        self.degraded.as_deref()
    }

    /// Starts watching a socket; returns its index for [`Monitor::sample`]. The caller keeps the
    /// socket open for as long as it samples it.
    pub fn watch(&mut self, sock: BorrowedFd<'_>) -> usize {
        #[cfg(not(dwcp_no_bpf))]
        let cookie = self.probes.as_ref().and_then(|p| p.watch(sock).ok());
        #[cfg(dwcp_no_bpf)]
        let cookie = None;
        self.socks.push(Watched { fd: sock.as_raw_fd(), cookie });
        self.socks.len() - 1
    }

    /// The socket's state now (None if it cannot be read, or before the probes' first event).
    pub fn sample(&self, idx: usize) -> Option<SocketStats> {
        let w = *self.socks.get(idx)?;
        #[cfg(not(dwcp_no_bpf))]
        if let (Some(p), Some(c)) = (&self.probes, w.cookie) {
            return p.stats(c).ok().flatten();
        }
        crate::sys::tcp_info(w.fd).ok()
    }

    /// [`Monitor::sample`], and the socket's [`crate::sys::SendTime`] (always from `TCP_INFO`:
    /// without the probes, from the same read).
    pub fn sample_with_time(&self, idx: usize) -> (Option<SocketStats>, Option<crate::sys::SendTime>) {
        let Some(w) = self.socks.get(idx).copied() else { return (None, None) };
        #[cfg(not(dwcp_no_bpf))]
        if let (Some(p), Some(c)) = (&self.probes, w.cookie) {
            return (p.stats(c).ok().flatten(), crate::sys::send_time(w.fd).ok());
        }
        crate::sys::tcp_info_and_time(w.fd).map_or((None, None), |(s, t)| (Some(s), Some(t)))
    }

    /// Moves pending retransmit and congestion-state events into `out` (probes only).
    pub fn drain(&mut self, out: &mut Vec<Event>) -> usize {
        #[cfg(not(dwcp_no_bpf))]
        if let Some(p) = &self.probes {
            return p.drain(out).unwrap_or(0);
        }
        let _ = out;
        0
    }

    /// The probes' run-time cost so far (empty when polling).
    pub fn cost(&self) -> Vec<crate::ProgCost> {
        #[cfg(not(dwcp_no_bpf))]
        if let Some(p) = &self.probes {
            return p.cost();
        }
        Vec::new()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        #[cfg(not(dwcp_no_bpf))]
        if let Some(p) = &self.probes {
            for c in self.socks.iter().filter_map(|w| w.cookie) {
                p.unwatch(c);
            }
        }
    }
}
