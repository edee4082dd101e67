//! The fleet's part of the daemon's endpoints. Reads (`GET /fleet`) are on the HTTP endpoint
//! and the jobs socket; changes (ownership, membership) only on the jobs socket, whose file
//! permissions say who may make them.
//!
//! On the jobs socket:
//! - `GET /fleet`: this node's view (leader, term, lags, members) and the replicated state.
//! - `GET /fleet/vms/NAME`: the VM's owner, confirmed by the leader (linearizable).
//! - `POST /fleet/vms/NAME/claim` `{"node": N}` (default this node): take a VM nobody owns.
//! - `POST /fleet/vms/NAME/handoff` `{"from": N, "to": M, "epoch": E}`: move it, compare-and-set.
//! - `POST /fleet/vms/NAME/resume` `{"node": N, "epoch": E}`: the owner is about to run it
//!   (committed compare-and-set; the epoch moves on).
//! - `POST /fleet/vms/NAME/release` `{"node": N, "epoch": E}`: give it up.
//! - `POST /fleet/members` `{"id": N, "addr": "HOST:PORT"}`, `DELETE /fleet/members/N`: change
//!   the group (on the leader).

use serde::Deserialize;
use serde_json::{Value, json};

use super::state::NodeId;
use super::{Fleet, FleetError};

/// A reply: HTTP status and JSON body.
pub type Reply = (u16, Value);

fn error(code: u16, msg: impl Into<String>) -> Reply {
    (code, json!({ "error": msg.into() }))
}

fn fleet_error(e: FleetError) -> Reply {
    match e {
        // 409: the state says no (stale epoch, another owner). 503: no quorum; the outcome of a
        // change may still be unknown, and the reply says so.
        FleetError::Refused(w) => error(409, w),
        e @ FleetError::NotCommitted { .. } => (503, json!({ "error": e.to_string(), "unknown_outcome": true })),
        e => error(500, e.to_string()),
    }
}

/// `GET /fleet`: the Raft group's view and state (with `[fleet]`) and the gossip view (with
/// `[gossip]`); `None` with neither.
pub fn view(f: Option<&Fleet>, g: Option<&crate::gossip::Handle>) -> Option<Value> {
    if f.is_none() && g.is_none() {
        return None;
    }
    let mut v = json!({ "gossip": g.map(|g| g.view()) });
    if let Some(f) = f {
        let s = f.local_state();
        v["status"] = json!(f.status());
        v["vms"] = json!(s.vms);
        v["nodes"] = json!(s.nodes);
        v["jobs"] = json!(s.jobs.len());
        v["job_nodes"] = json!(s.jobs.iter().map(|(k, j)| (k.clone(), j.node)).collect::<std::collections::BTreeMap<_, _>>());
        v["ended"] = json!(s.ended.iter().rev().take(32).collect::<Vec<_>>());
    }
    Some(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    #[serde(default)]
    node: Option<NodeId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandoffBody {
    from: NodeId,
    to: NodeId,
    epoch: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    #[serde(default)]
    node: Option<NodeId>,
    epoch: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberBody {
    id: NodeId,
    addr: String,
}

fn body<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, Reply> {
    let b = if b.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { b };
    serde_json::from_slice(b).map_err(|e| error(400, format!("request body: {e}")))
}

/// Answers a request under `/fleet` on the jobs socket; `None` for a path that is not the
/// fleet's.
pub fn handle(f: Option<&Fleet>, g: Option<&crate::gossip::Handle>, method: &str, path: &str, b: &[u8]) -> Option<Reply> {
    let rest = path.strip_prefix("/fleet")?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    if let ("GET", []) = (method, parts.as_slice()) {
        return Some(view(f, g).map_or_else(|| error(404, "this daemon is in no fleet: configure [fleet] or [gossip]"), |v| (200, v)));
    }
    let Some(f) = f else { return Some(error(404, "this daemon is in no Raft group: configure [fleet] (gossip alone decides no ownership)")) };
    let r = match (method, parts.as_slice()) {
        ("GET", ["vms", vm]) => match f.owner(vm) {
            Ok(o) => (200, json!({ "vm": vm, "owner": o })),
            Err(e) => fleet_error(e),
        },
        ("POST", ["vms", vm, "claim"]) => match body::<ClaimBody>(b) {
            Err(r) => r,
            Ok(c) => match f.claim(vm, c.node.unwrap_or(f.id())) {
                Ok(epoch) => (200, json!({ "vm": vm, "owner": c.node.unwrap_or(f.id()), "epoch": epoch })),
                Err(e) => fleet_error(e),
            },
        },
        ("POST", ["vms", vm, "handoff"]) => match body::<HandoffBody>(b) {
            Err(r) => r,
            Ok(h) => match f.handoff(vm, h.from, h.to, h.epoch) {
                Ok(epoch) => (200, json!({ "vm": vm, "owner": h.to, "epoch": epoch })),
                Err(e) => fleet_error(e),
            },
        },
        ("POST", ["vms", vm, "resume"]) => match body::<ReleaseBody>(b) {
            Err(r) => r,
            Ok(r) => match f.resume(vm, r.node.unwrap_or(f.id()), r.epoch) {
                Ok(epoch) => (200, json!({ "vm": vm, "owner": r.node.unwrap_or(f.id()), "epoch": epoch })),
                Err(e) => fleet_error(e),
            },
        },
        ("POST", ["vms", vm, "release"]) => match body::<ReleaseBody>(b) {
            Err(r) => r,
            Ok(r) => match f.propose(super::state::Cmd::Release { vm: (*vm).into(), node: r.node.unwrap_or(f.id()), epoch: r.epoch }) {
                Ok(super::state::Outcome::Done { .. }) => (200, json!({ "vm": vm, "owner": null })),
                Ok(super::state::Outcome::Refused(w)) => error(409, w),
                Err(e) => fleet_error(e),
            },
        },
        ("POST", ["members"]) => match body::<MemberBody>(b) {
            Err(r) => r,
            Ok(m) => match f.add(m.id, &m.addr) {
                Ok(()) => (200, view(Some(f), g).unwrap_or_default()),
                Err(e) => fleet_error(e),
            },
        },
        ("DELETE", ["members", id]) => match id.parse::<NodeId>() {
            Err(_) => error(400, "a member's id is a number: /fleet/members/ID"),
            Ok(id) => match f.remove(id) {
                Ok(()) => (200, view(Some(f), g).unwrap_or_default()),
                Err(e) => fleet_error(e),
            },
        },
        _ => error(404, "try GET /fleet, GET /fleet/vms/NAME, POST /fleet/vms/NAME/{claim,handoff,resume,release}, POST /fleet/members, DELETE /fleet/members/ID"),
    };
    Some(r)
}
