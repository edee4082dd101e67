//! Runs [`Gossip`] on a UDP socket: opens and seals each packet, fires timers, republishes this
//! node's card, rejoins through the seeds while it knows nobody, and keeps a view for readers.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dataplane::crypto::{DatagramKey, Psk};

use super::{Card, Gossip, Id, MAX_PACKET_AGE, Out, View, config};

/// The purpose the gossip key is derived for.
const KEY_PURPOSE: &str = "dwcp 2026 fleet gossip datagrams v1";

/// How a gossip node runs.
pub struct Options {
    /// Its node id.
    pub node: u64,
    /// Where it listens (UDP).
    pub listen: String,
    /// Addresses of members to join through.
    pub seeds: Vec<String>,
    /// Probe period (foca's WAN profile scaled to it).
    pub period: Duration,
    /// About how many nodes the group has.
    pub size_hint: u32,
    /// This node's card, as it is now (called at each republication).
    pub card: Box<dyn Fn() -> Card + Send>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options").field("node", &self.node).field("listen", &self.listen).field("seeds", &self.seeds).finish_non_exhaustive()
    }
}

/// A running gossip node; stops when dropped.
#[derive(Debug)]
pub struct Handle {
    /// Where it listens.
    pub addr: SocketAddr,
    view: Arc<Mutex<View>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    /// Stops it (the thread ends within 100 ms).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    /// Its latest view (at most 100 ms old).
    pub fn view(&self) -> View {
        self.view.lock().expect("gossip view lock").clone()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Starts a gossip node.
pub fn run(o: Options, psk: &Psk) -> Result<Handle, String> {
    let sock = UdpSocket::bind(&o.listen).map_err(|e| format!("gossip.listen {}: {e}", o.listen))?;
    let addr = sock.local_addr().map_err(|e| e.to_string())?;
    let key = DatagramKey::derive(psk, KEY_PURPOSE);
    let me = Id { addr, node: o.node, bump: 0 };
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| e.to_string())?;
    let mut g = Gossip::new(me, config(o.size_hint, o.period), u64::from_le_bytes(seed));
    let view = Arc::new(Mutex::new(g.view(Instant::now())));
    let stop = Arc::new(AtomicBool::new(false));
    let (v, s) = (view.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("dwcp-gossip".into())
        .spawn(move || {
            let send = |out: Out| {
                for (to, data) in out.send {
                    let _ = sock.send_to(&key.seal(unix_ms(), &data), to);
                }
                for e in out.events {
                    tracing::info!("gossip: {e}");
                }
            };
            g.set_seeds(o.seeds.iter().filter_map(|a| a.to_socket_addrs().ok()?.next()).collect());
            let mut published = None::<Instant>;
            let mut buf = vec![0u8; 2048];
            while !s.load(Relaxed) {
                let now = Instant::now();
                if published.is_none_or(|t| now - t >= o.period * 2) {
                    if let Err(e) = g.publish(&(o.card)(), now) {
                        tracing::warn!("gossip: this node's card: {e}");
                    }
                    published = Some(now);
                }
                send(g.tick(now));
                let wait = g.next_timer().map_or(Duration::from_millis(100), |t| t.saturating_duration_since(now)).clamp(Duration::from_millis(1), Duration::from_millis(100));
                let _ = sock.set_read_timeout(Some(wait));
                if let Ok((n, _from)) = sock.recv_from(&mut buf) {
                    match key.open(&buf[..n]) {
                        Ok((t, data)) if unix_ms().abs_diff(t) <= MAX_PACKET_AGE.as_millis() as u64 => send(g.handle(&data, Instant::now())),
                        _ => g.count_dropped(),
                    }
                }
                *v.lock().expect("gossip view lock") = g.view(Instant::now());
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Handle { addr, view, stop, thread: Some(thread) })
}
