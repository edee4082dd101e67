//! The HTTP endpoint: `/healthz`, `/readyz`, `/metrics` (Prometheus text format), `/status` (JSON),
//! `/fleet` (JSON, read only: see [`crate::fleet::api`]).

use std::sync::atomic::Ordering::Relaxed;

use prometheus::Encoder;
use serde_json::json;

use crate::state::State;

fn respond(req: tiny_http::Request, code: u16, ctype: &str, body: String) {
    let h = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes()).expect("header");
    let _ = req.respond(tiny_http::Response::from_string(body).with_status_code(code).with_header(h));
}

/// The `/status` document.
pub fn status_json(st: &State) -> serde_json::Value {
    let modes = st.peers.lock().expect("peers lock").cluster().map(|m| format!("{m:?}").to_lowercase());
    json!({
        "node": st.config.node.name,
        "ready": st.ready.load(Relaxed),
        "boot_ms": *st.boot_ms.lock().expect("boot lock"),
        "listener": st.listener.get().map(|a| a.to_string()),
        "api": st.api.get().map(|a| a.to_string()),
        "host": st.host.get(),
        "degraded": st.degraded().into_iter().map(|(c, w)| json!({"component": c, "why": w})).collect::<Vec<_>>(),
        "boot": st.boot.lock().expect("boot lock").iter().map(|r| json!({
            "component": r.name, "phase": format!("{:?}", r.phase), "level": r.level,
            "outcome": format!("{:?}", r.outcome), "ms": r.took.as_secs_f64() * 1e3,
        })).collect::<Vec<_>>(),
        "cluster_mode": modes,
        "peers": *st.peer_status.lock().expect("peer status lock"),
        "sessions": *st.sessions.lock().expect("sessions lock"),
        "transfers": st.jobs.get().map(|j| j.list()),
        "warm_peers": st.warm.get().and_then(|w| w.as_ref()).map(|w| w.status()),
        "fleet": st.fleet.get().map(|f| f.status()),
        "gossip": st.gossip.get().map(|g| g.view()),
    })
}

/// Serves requests until the server is unblocked.
pub fn serve(server: &tiny_http::Server, st: &State) {
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("").to_owned();
        match path.as_str() {
            "/healthz" => respond(req, 200, "text/plain", "ok\n".into()),
            "/readyz" => {
                let deg = st.degraded();
                let mut body = String::new();
                for (c, w) in &deg {
                    body.push_str(&format!("degraded: {c}: {w}\n"));
                }
                if st.ready.load(Relaxed) {
                    respond(req, 200, "text/plain", format!("ready\n{body}"));
                } else {
                    respond(req, 503, "text/plain", format!("not ready: booting\n{body}"));
                }
            }
            "/metrics" => {
                if let Some(j) = st.jobs.get() {
                    j.export(&st.metrics);
                }
                if let Some(f) = st.fleet.get() {
                    st.metrics.export_fleet(&f.status());
                }
                if let Some(g) = st.gossip.get() {
                    st.metrics.export_gossip(&g.view());
                }
                let mut buf = Vec::new();
                let enc = prometheus::TextEncoder::new();
                let _ = enc.encode(&st.metrics.registry.gather(), &mut buf);
                respond(req, 200, enc.format_type(), String::from_utf8_lossy(&buf).into_owned());
            }
            "/status" => respond(req, 200, "application/json", status_json(st).to_string()),
            "/fleet" => match crate::fleet::api::view(st.fleet.get().map(|f| &**f), st.gossip.get().map(|g| &**g)) {
                Some(v) => respond(req, 200, "application/json", v.to_string()),
                None => respond(req, 404, "text/plain", "this daemon is in no fleet: configure [fleet] or [gossip]\n".into()),
            },
            _ => respond(req, 404, "text/plain", "not found: try /healthz, /readyz, /metrics, /status or /fleet\n".into()),
        }
    }
}
