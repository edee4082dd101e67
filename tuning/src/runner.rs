//! The real runner: one run of a point is one send through the transfer engine (the same plan
//! and data plane as `dwcp send`), to a receiver on loopback started in this process, or to a
//! peer's receiver given by address.

use std::time::Instant;

use ctlplane::engine::{self, Request};
use ctlplane::mode::Thresholds;
use dataplane::crypto::Psk;
use dataplane::recv::{self, ReceiverHandle, RecvOptions, Sink};

use crate::sweep::{Point, Runner, Sample};

/// Where the runs send.
#[derive(Debug)]
pub enum Target {
    /// A receiver this process starts on 127.0.0.1 (discarding, plaintext allowed so the plan's
    /// own choice of encryption stands): both ends on this host, their CPU both counted.
    Loopback,
    /// A receiver already running at HOST:PORT (`dwcp recv --discard` there): the CPU counted is
    /// the sender's.
    Peer(String),
}

/// Runs points through the engine.
#[derive(Debug)]
pub struct EngineRunner {
    base: Request,
    psk: Psk,
    thresholds: Thresholds,
    _receiver: Option<ReceiverHandle>,
}

impl EngineRunner {
    /// A runner sending `base` (its `to` filled from `target`) with `psk`.
    pub fn new(target: Target, mut base: Request, psk: Psk, thresholds: Thresholds) -> Result<EngineRunner, String> {
        let receiver = match target {
            Target::Loopback => {
                // HDE decodes into a file: a run with HDE needs a receiver that writes one.
                let sink = if base.hde == ctlplane::engine::plan::Choice::On {
                    let dir = std::env::temp_dir().join(format!("dwcp-tune-{}", std::process::id()));
                    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                    Sink::Dir(dir)
                } else {
                    Sink::Discard
                };
                let mut o = RecvOptions::new("127.0.0.1:0", sink, psk.clone());
                o.allow_plaintext = true;
                // Any chunk size the knobs may ask for (a peer's receiver keeps its own limit).
                o.max_chunk = 64 << 20;
                let rx = recv::start(o).map_err(|e| format!("starting the loopback receiver: {e}"))?;
                base.to = rx.local_addr.to_string();
                Some(rx)
            }
            Target::Peer(addr) => {
                base.to = addr;
                None
            }
        };
        Ok(EngineRunner { base, psk, thresholds, _receiver: receiver })
    }
}

impl Drop for EngineRunner {
    fn drop(&mut self) {
        if let Some(rx) = &self._receiver {
            rx.stop();
        }
    }
}

impl Runner for EngineRunner {
    fn run(&mut self, point: &Point) -> Result<Sample, String> {
        let mut req = self.base.clone();
        point.apply(&mut req)?;
        let host = engine::host(req.cores.as_deref()).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let t = engine::start(req, self.psk.clone(), host, self.thresholds, dataplane::send::Faults::default()).map_err(|e| e.to_string())?;
        let out = t.wait().map_err(|e| e.to_string())?;
        let wall = t0.elapsed().as_secs_f64();
        let r = &out.report;
        if !r.verified {
            return Err("the receiver did not verify the object".into());
        }
        let bytes = r.size;
        let gb = bytes as f64 / 1e9;
        Ok(Sample {
            // Over the whole run, probe and handshake included: what a caller waits for.
            goodput_gbps: bytes as f64 * 8.0 / wall / 1e9,
            cpu_s_per_gb: r.cpu.as_secs_f64() / gb.max(1e-9),
            rtt_ms: r.rtt.as_secs_f64() * 1e3,
            wall_s: wall,
            bytes,
        })
    }
}
