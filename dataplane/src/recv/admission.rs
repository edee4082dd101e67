//! Admission of new connections before they authenticate: a global and a per-address cap on
//! handshakes in progress, each slot held by a ticket that gives it back however the handshake
//! ends (a thread that could not be spawned included), and a deadline for the whole handshake
//! (preamble to Welcome) enforced by one watchdog thread that shuts the socket of a handshake
//! still running at its deadline. A peer that trickles one byte at a time therefore holds its
//! slot for the deadline, not for as long as it keeps trickling.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

/// Caps on handshakes in progress.
#[derive(Debug)]
pub struct Admission {
    global: usize,
    per_addr: usize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_addr: HashMap<IpAddr, usize>,
}

/// A slot of the caps, given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    adm: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    /// Caps of `global` handshakes in all and `per_addr` from one address.
    pub fn new(global: usize, per_addr: usize) -> Arc<Admission> {
        Arc::new(Admission { global: global.max(1), per_addr: per_addr.max(1), held: Mutex::default() })
    }

    /// A slot for a handshake from `ip`, or why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, String> {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if h.total >= self.global {
            return Err(format!("{} handshakes in progress, the receiver's limit", self.global));
        }
        let n = h.by_addr.entry(ip).or_default();
        if *n >= self.per_addr {
            return Err(format!("{} handshakes in progress from {ip}, the per-address limit", self.per_addr));
        }
        *n += 1;
        h.total += 1;
        Ok(Ticket { adm: self.clone(), ip })
    }

    /// Handshakes in progress.
    #[cfg(test)]
    pub fn in_progress(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut h = self.adm.held.lock().unwrap_or_else(|e| e.into_inner());
        h.total -= 1;
        if let Some(n) = h.by_addr.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                h.by_addr.remove(&self.ip);
            }
        }
    }
}

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const EXPIRED: u8 = 2;

/// One handshake's race against its deadline.
#[derive(Debug, Clone)]
pub struct Deadline(Arc<AtomicU8>);

impl Deadline {
    /// The handshake is done (the Welcome went out): the watchdog leaves the socket alone.
    /// False if the deadline passed first (the socket is shut already).
    pub fn finish(&self) -> bool {
        self.0.compare_exchange(RUNNING, DONE, SeqCst, SeqCst).is_ok()
    }

    /// Whether the deadline passed before the handshake finished.
    pub fn expired(&self) -> bool {
        self.0.load(SeqCst) == EXPIRED
    }
}

/// The watchdog of handshake deadlines.
#[derive(Debug, Clone)]
pub struct Watchdog {
    tx: Sender<(Instant, TcpStream, Deadline)>,
    limit: Duration,
}

impl Watchdog {
    /// Starts the watchdog thread: every handshake gets `limit`.
    pub fn start(limit: Duration) -> Watchdog {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new().name("dwcp-deadlines".into()).spawn(move || watch(rx)).expect("spawn the deadline watchdog");
        Watchdog { tx, limit }
    }

    /// Watches `sock` (a clone of the handshake's socket) from now.
    pub fn watch(&self, sock: &TcpStream) -> std::io::Result<Deadline> {
        let d = Deadline(Arc::new(AtomicU8::new(RUNNING)));
        let _ = self.tx.send((Instant::now() + self.limit, sock.try_clone()?, d.clone()));
        Ok(d)
    }

    /// The deadline every handshake gets.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

/// Every handshake has the same limit, so deadlines arrive in order: a queue suffices.
fn watch(rx: Receiver<(Instant, TcpStream, Deadline)>) {
    let mut q: VecDeque<(Instant, TcpStream, Deadline)> = VecDeque::new();
    loop {
        let wait = q.front().map(|(at, ..)| at.saturating_duration_since(Instant::now()));
        let got = match wait {
            Some(w) => rx.recv_timeout(w).map_err(|e| e.is_disconnected()),
            None => rx.recv().map_err(|_| true),
        };
        match got {
            Ok(item) => q.push_back(item),
            Err(true) => return,
            Err(false) => {}
        }
        let now = Instant::now();
        while q.front().is_some_and(|(at, ..)| *at <= now) {
            let (_, sock, d) = q.pop_front().expect("front");
            if d.0.compare_exchange(RUNNING, EXPIRED, SeqCst, SeqCst).is_ok() {
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
        // Finished handshakes need not wait for their deadline to drop their socket clone.
        q.retain(|(_, _, d)| d.0.load(SeqCst) == RUNNING);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_hold_and_give_back_both_caps() {
        let a = Admission::new(3, 2);
        let (x, y): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t1 = a.admit(x).unwrap();
        let _t2 = a.admit(x).unwrap();
        assert!(a.admit(x).unwrap_err().contains("per-address"));
        let _t3 = a.admit(y).unwrap();
        assert!(a.admit(y).unwrap_err().contains("receiver's limit"));
        drop(t1);
        assert_eq!(a.in_progress(), 2);
        let _t4 = a.admit(y).unwrap();
        // A ticket moved into a closure that never runs (a thread that could not spawn) is
        // dropped with it, and its slot comes back.
        let t5 = {
            drop(_t4);
            a.admit(y).unwrap()
        };
        let f = move || drop(t5);
        drop(f);
        assert_eq!(a.in_progress(), 2);
    }

    #[test]
    fn a_handshake_past_its_deadline_is_shut_and_a_finished_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let w = Watchdog::start(Duration::from_millis(100));
        let c1 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s1, _) = l.accept().unwrap();
        let c2 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s2, _) = l.accept().unwrap();
        let d1 = w.watch(&s1).unwrap();
        let d2 = w.watch(&s2).unwrap();
        assert!(d2.finish());
        std::thread::sleep(Duration::from_millis(300));
        assert!(!d1.finish(), "expired");
        use std::io::Read;
        let mut b = [0u8; 1];
        c1.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!((&c1).read(&mut b).unwrap(), 0, "the expired handshake's socket was shut");
        c2.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        assert!((&c2).read(&mut b).is_err(), "the finished one is still open (read times out)");
        drop((s1, s2));
    }
}
