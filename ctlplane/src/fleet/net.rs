//! Raft's messages between daemons: one request, one reply, as JSON in `Fleet` frames over a
//! TCP connection authenticated and encrypted by the data plane's own Noise handshake (the
//! fleet's key is the daemons' key, so only a host holding it can speak to the group).
//!
//! Every request names the node it is for: a connection that reaches the wrong node (an
//! address reused, a node replaced) is refused rather than fed another node's log.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane::crypto::Psk;
use dataplane::handshake::{self, Conn, HandshakeError};
use dataplane::wire::FrameType;
use openraft::Raft;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use serde::{Deserialize, Serialize};

use super::state::{Cmd, NodeId, Outcome};
use super::{Node, TypeConfig};

/// Most fleet connections served at once (each is a thread): more are closed at once.
pub const MAX_CONNS: usize = 64;
/// How long a connection may wait for its handshake.
const HANDSHAKE: Duration = Duration::from_secs(5);
/// How long a served connection may stay silent before it is closed.
const IDLE: Duration = Duration::from_secs(120);

/// What one daemon asks another.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Raft: replicate entries (or a heartbeat).
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft: ask for a vote.
    Vote(VoteRequest<NodeId>),
    /// Raft: a chunk of a snapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A proposal forwarded to the leader.
    Write(Cmd),
    /// A read the leader answers only after confirming it still leads (linearizable).
    Owner(String),
    /// A membership change forwarded to the leader: add this node (as a voter, once caught up).
    AddMember(NodeId, String),
    /// A membership change forwarded to the leader: remove this node.
    RemoveMember(NodeId),
}

/// The reply.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// To [`Request::Append`].
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To [`Request::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To [`Request::Snapshot`].
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// To [`Request::Write`]: what applying it did, or why it was not committed here.
    Write(Result<Outcome, String>),
    /// To [`Request::Owner`]: the VM's owner and epoch, if it has one.
    Owner(Result<Option<super::state::Owner>, String>),
    /// To [`Request::AddMember`] and [`Request::RemoveMember`].
    Members(Result<(), String>),
    /// The request was refused before it was looked at.
    Refused(String),
}

/// A request with the ids of its sender and of the node it is for.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender.
    pub from: NodeId,
    /// The node it is for.
    pub to: NodeId,
    /// The request.
    pub req: Request,
}

/// Decodes a request from another daemon (bytes from the network: the frame bounds their size,
/// serde_json their nesting).
pub fn decode_request(bytes: &[u8]) -> Result<Envelope, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("malformed fleet request: {e}"))
}

/// Decodes a reply.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("malformed fleet reply: {e}"))
}

/// A connection to one node, opened when first needed and kept.
#[derive(Debug, Clone)]
pub struct Client {
    me: NodeId,
    target: NodeId,
    addr: String,
    psk: Psk,
    conn: Arc<Mutex<Option<Conn>>>,
}

/// Why a request did not get a reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection (refused, unreachable, the handshake failed).
    #[error("node {node} at {addr}: {source}")]
    Connect {
        /// The node.
        node: NodeId,
        /// Its address.
        addr: String,
        /// Why.
        source: HandshakeError,
    },
    /// The connection broke or the reply did not come in time.
    #[error("node {node} at {addr}: {why}")]
    Lost {
        /// The node.
        node: NodeId,
        /// Its address.
        addr: String,
        /// What happened.
        why: String,
    },
}

impl Client {
    /// A client from `me` to `target` at `addr`; connects on first use.
    pub fn new(me: NodeId, target: NodeId, addr: String, psk: Psk) -> Self {
        Self { me, target, addr, psk, conn: Arc::default() }
    }

    /// Sends `req` and waits up to `ttl` for the reply (blocking). A kept connection that
    /// turns out dead is replaced once.
    pub fn call(&self, req: &Request, ttl: Duration) -> Result<Reply, CallError> {
        let env = EnvelopeRef { from: self.me, to: self.target, req };
        let bytes = serde_json::to_vec(&env).map_err(|e| self.lost(e.to_string()))?;
        let mut slot = self.conn.lock().expect("fleet client lock");
        for attempt in 0..2 {
            let fresh = slot.is_none();
            if fresh {
                let (c, _) = handshake::connect(&self.addr, &self.psk, true, 0, ttl.min(HANDSHAKE)).map_err(|source| CallError::Connect {
                    node: self.target,
                    addr: self.addr.clone(),
                    source,
                })?;
                *slot = Some(c);
            }
            let c = slot.as_mut().expect("connected above");
            c.set_timeout(ttl);
            let r = c.write_frame(FrameType::Fleet, 0, &bytes).and_then(|()| c.expect(FrameType::Fleet, "waiting for a fleet reply"));
            match r {
                Ok((_, p)) => return decode_reply(&p).map_err(|w| self.lost(w)),
                Err(e) => {
                    *slot = None;
                    if fresh || attempt == 1 || matches!(e, HandshakeError::Timeout { .. }) {
                        return Err(self.lost(e.to_string()));
                    }
                }
            }
        }
        Err(self.lost("no reply".into()))
    }

    fn lost(&self, why: String) -> CallError {
        CallError::Lost { node: self.target, addr: self.addr.clone(), why }
    }
}

/// [`Envelope`] as sent: the same fields, the request borrowed.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    from: NodeId,
    to: NodeId,
    req: &'a Request,
}

/// Opens clients for openraft.
#[derive(Debug, Clone)]
pub struct Factory {
    /// This node.
    pub me: NodeId,
    /// The fleet's key.
    pub psk: Psk,
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Client;
    async fn new_client(&mut self, target: NodeId, node: &Node) -> Client {
        Client::new(self.me, target, node.addr.clone(), self.psk.clone())
    }
}

impl Client {
    async fn rpc(&self, req: Request, option: &RPCOption) -> Result<Reply, CallError> {
        let (c, ttl) = (self.clone(), option.hard_ttl());
        match tokio::task::spawn_blocking(move || c.call(&req, ttl)).await {
            Ok(r) => r,
            Err(e) => Err(self.lost(format!("the call's thread failed: {e}"))),
        }
    }
}

fn rpc_err<E: std::error::Error>(e: CallError) -> RPCError<NodeId, Node, E> {
    match e {
        CallError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        CallError::Lost { .. } => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected<E: std::error::Error>(what: &str) -> RPCError<NodeId, Node, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(format!("unexpected reply to {what}"))))
}

impl RaftNetwork<TypeConfig> for Client {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.rpc(Request::Append(rpc), &option).await.map_err(rpc_err)? {
            Reply::Append(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            Reply::Refused(w) => Err(RPCError::Network(NetworkError::new(&std::io::Error::other(w)))),
            _ => Err(unexpected("append")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>> {
        match self.rpc(Request::Snapshot(rpc), &option).await.map_err(rpc_err)? {
            Reply::Snapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            Reply::Refused(w) => Err(RPCError::Network(NetworkError::new(&std::io::Error::other(w)))),
            _ => Err(unexpected("snapshot")),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.rpc(Request::Vote(rpc), &option).await.map_err(rpc_err)? {
            Reply::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            Reply::Refused(w) => Err(RPCError::Network(NetworkError::new(&std::io::Error::other(w)))),
            _ => Err(unexpected("vote")),
        }
    }
}

/// What a served request is answered from.
pub(super) trait Handler: Send + Sync + 'static {
    /// This node's id.
    fn id(&self) -> NodeId;
    /// Answers one request.
    fn handle(&self, from: NodeId, req: Request) -> Reply;
}

/// The fleet's listener; stops when dropped.
#[derive(Debug)]
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Stops accepting, and ends each served connection at its next request.
    pub fn halt(&self) {
        if !self.stop.swap(true, Relaxed) {
            // Wakes the accept loop so it sees the flag.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Serves fleet requests on `listen` with `handler`.
pub(super) fn serve(listen: &str, psk: Psk, handler: Arc<dyn Handler>) -> Result<Server, String> {
    let l = TcpListener::bind(listen).map_err(|e| format!("fleet.listen {listen}: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(AtomicUsize::new(0));
    let s = stop.clone();
    std::thread::Builder::new()
        .name("dwcp-fleet".into())
        .spawn(move || {
            for sock in l.incoming() {
                if s.load(Relaxed) {
                    break;
                }
                let Ok(sock) = sock else { continue };
                if live.fetch_add(1, Relaxed) >= MAX_CONNS {
                    live.fetch_sub(1, Relaxed);
                    tracing::warn!(peer = ?sock.peer_addr().ok(), "fleet: {MAX_CONNS} connections already served; closing this one");
                    continue;
                }
                let (psk, h, live, s) = (psk.clone(), handler.clone(), live.clone(), s.clone());
                let spawned = std::thread::Builder::new().name("dwcp-fleet-conn".into()).spawn(move || {
                    serve_conn(sock, &psk, &*h, &s);
                    live.fetch_sub(1, Relaxed);
                });
                if spawned.is_err() {
                    tracing::warn!("fleet: no thread for a connection");
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Server { addr, stop })
}

fn serve_conn(sock: TcpStream, psk: &Psk, h: &dyn Handler, stop: &AtomicBool) {
    let peer = sock.peer_addr().ok();
    let (mut c, encrypted) = match handshake::accept(sock, psk, HANDSHAKE) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(?peer, "fleet: refused a connection: {e}");
            return;
        }
    };
    if !encrypted {
        c.write_error(dataplane::wire::ErrorCode::Protocol, "fleet connections must be encrypted");
        return;
    }
    c.set_timeout(IDLE);
    while !stop.load(Relaxed) {
        let p = match c.expect(FrameType::Fleet, "reading a fleet request") {
            Ok((_, p)) => p,
            Err(HandshakeError::Closed { .. }) => return,
            Err(e) => {
                tracing::debug!(?peer, "fleet: connection ended: {e}");
                return;
            }
        };
        if stop.load(Relaxed) {
            return;
        }
        let reply = match decode_request(&p) {
            Err(why) => {
                tracing::warn!(?peer, "fleet: {why}");
                c.write_error(dataplane::wire::ErrorCode::Protocol, &why);
                return;
            }
            Ok(env) if env.to != h.id() => Reply::Refused(format!("this is node {}, not node {}: the fleet's address for node {} is wrong", h.id(), env.to, env.to)),
            Ok(env) => h.handle(env.from, env.req),
        };
        let bytes = serde_json::to_vec(&reply).expect("a reply serializes");
        if c.write_frame(FrameType::Fleet, 0, &bytes).is_err() {
            return;
        }
    }
}

/// Serves requests with a Raft node.
pub(super) struct RaftHandler {
    pub(super) id: NodeId,
    pub(super) raft: Raft<TypeConfig>,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) state: Arc<std::sync::RwLock<super::store::Applied>>,
    pub(super) timeout: Duration,
}

impl Handler for RaftHandler {
    fn id(&self) -> NodeId {
        self.id
    }
    fn handle(&self, _from: NodeId, req: Request) -> Reply {
        let r = &self.raft;
        match req {
            Request::Append(a) => Reply::Append(self.rt.block_on(r.append_entries(a))),
            Request::Vote(v) => Reply::Vote(self.rt.block_on(r.vote(v))),
            Request::Snapshot(s) => Reply::Snapshot(self.rt.block_on(r.install_snapshot(s))),
            Request::Write(cmd) => Reply::Write(match self.rt.block_on(r.client_write(cmd)) {
                Ok(w) => Ok(w.data),
                Err(e) => Err(e.to_string()),
            }),
            Request::Owner(vm) => Reply::Owner(match self.rt.block_on(r.ensure_linearizable()) {
                Ok(_) => Ok(self.state.read().expect("fleet state lock").state.vms.get(&vm).cloned()),
                Err(e) => Err(e.to_string()),
            }),
            Request::AddMember(id, addr) => Reply::Members(self.rt.block_on(super::add_member(r, id, &addr, self.timeout))),
            Request::RemoveMember(id) => Reply::Members(self.rt.block_on(super::remove_member(r, id, self.timeout))),
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    use super::*;
    use crate::fleet::state::Job;

    fn samples() -> Vec<Envelope> {
        let lid = |t, i| LogId::new(CommittedLeaderId::new(t, 1), i);
        let entries = vec![
            Entry { log_id: lid(2, 5), payload: EntryPayload::Normal(Cmd::Claim { vm: "web1".into(), node: 1 }) },
            Entry { log_id: lid(2, 6), payload: EntryPayload::Normal(Cmd::PutJob { key: "1/3".into(), job: Job { node: 1, record: "{\"bytes\":1}".into() } }) },
            Entry { log_id: lid(2, 7), payload: EntryPayload::Blank },
        ];
        let append = AppendEntriesRequest { vote: Vote::new_committed(2, 1), prev_log_id: Some(lid(1, 4)), entries, leader_commit: Some(lid(2, 5)) };
        vec![
            Envelope { from: 1, to: 2, req: Request::Append(append) },
            Envelope { from: 3, to: 2, req: Request::Vote(VoteRequest { vote: Vote::new(3, 3), last_log_id: Some(lid(2, 7)) }) },
            Envelope { from: 2, to: 1, req: Request::Write(Cmd::Handoff { vm: "web1".into(), from: 1, to: 2, epoch: 1 }) },
            Envelope { from: 2, to: 1, req: Request::Owner("web1".into()) },
        ]
    }

    /// Every request decodes to what was encoded. With `DWCP_FLEET_SEEDS=DIR` set, writes them
    /// there as the fuzz target's seeds.
    #[test]
    fn requests_round_trip_through_their_decoder() {
        for (i, env) in samples().into_iter().enumerate() {
            let b = serde_json::to_vec(&env).unwrap();
            let back = decode_request(&b).unwrap();
            assert_eq!(serde_json::to_vec(&back).unwrap(), b);
            if let Ok(d) = std::env::var("DWCP_FLEET_SEEDS") {
                std::fs::write(std::path::Path::new(&d).join(format!("req{i}")), &b).unwrap();
            }
        }
        assert!(decode_request(b"{\"from\":1,\"to\":2,\"req\":{\"Write\":{\"Claim\":{\"vm\":7}}}}").is_err());
    }
}
