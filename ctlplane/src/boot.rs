//! The boot graph: components in four phases, started level by level in parallel.
//!
//! A component declares its name, phase, dependencies, whether it is required, and a timeout.
//! The graph is checked before anything starts (a missing dependency, a dependency in a later
//! phase, or a cycle is an error naming it). Phases run in order; inside a phase, components run
//! in dependency levels, every component of a level on its own thread. A required component that
//! fails, times out, or cannot start because a dependency failed ends boot at once with the chain
//! of causes, and what had started is stopped in reverse; an optional one is marked degraded and
//! boot goes on (its dependents are skipped and degraded in turn). Each start is a tracing span.

use std::any::{Any, TypeId};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{info, info_span, warn};

/// Boot phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Host detection, configuration, logging.
    PreInit,
    /// Keys, transport listeners, RDMA, BPF probes.
    Core,
    /// Session manager, HTTP API.
    Service,
    /// Mode detection, peer registration, readiness.
    PostInit,
}

/// What a component declares about itself.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Unique name.
    pub name: String,
    /// Phase it starts in.
    pub phase: Phase,
    /// Names of components that must have started first.
    pub deps: Vec<String>,
    /// Whether boot fails without it.
    pub required: bool,
    /// How long its start may take.
    pub timeout: Duration,
}

impl Spec {
    /// A required component with a 5 s timeout and no dependencies.
    pub fn new(name: &str, phase: Phase) -> Self {
        Self { name: name.into(), phase, deps: Vec::new(), required: true, timeout: Duration::from_secs(5) }
    }
    /// Adds dependencies.
    pub fn after(mut self, deps: &[&str]) -> Self {
        self.deps.extend(deps.iter().map(|d| d.to_string()));
        self
    }
    /// Marks it optional.
    pub fn optional(mut self) -> Self {
        self.required = false;
        self
    }
    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
}

/// Values components hand to each other (HostCaps, config, listeners), by type.
#[derive(Default)]
pub struct Ctx {
    map: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ctx({} values)", self.map.lock().map(|m| m.len()).unwrap_or(0))
    }
}

impl Ctx {
    /// Stores a value (replacing one of the same type).
    pub fn put<T: Any + Send + Sync>(&self, v: T) {
        self.map.lock().expect("ctx lock").insert(TypeId::of::<T>(), Arc::new(v));
    }
    /// Gets a value stored by an earlier component.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let v = self.map.lock().expect("ctx lock").get(&TypeId::of::<T>()).cloned()?;
        v.downcast::<T>().ok()
    }
}

/// A unit of boot.
pub trait Component: Send + Sync {
    /// Its declaration.
    fn spec(&self) -> Spec;
    /// Starts it; an error says what went wrong in the operator's terms.
    fn start(&self, ctx: &Ctx) -> Result<(), String>;
    /// Stops it (shutdown runs in reverse start order).
    fn stop(&self, _ctx: &Ctx) {}
}

/// Problems found before anything starts.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GraphError {
    /// Two components share a name.
    #[error("two components are named {0:?}")]
    Duplicate(String),
    /// A dependency that no component provides.
    #[error("component {component:?} depends on {dep:?}, which does not exist")]
    MissingDependency {
        /// The dependent.
        component: String,
        /// The missing name.
        dep: String,
    },
    /// A dependency in a later phase.
    #[error("component {component:?} ({phase:?}) depends on {dep:?}, which starts later ({dep_phase:?})")]
    LaterPhase {
        /// The dependent.
        component: String,
        /// Its phase.
        phase: Phase,
        /// The dependency.
        dep: String,
        /// The dependency's phase.
        dep_phase: Phase,
    },
    /// A dependency cycle, named in order.
    #[error("dependency cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
}

/// How one component's start ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Started.
    Started,
    /// Optional and failed (or a dependency did): running without it.
    Degraded(String),
    /// Required and failed.
    Failed(String),
    /// Not started because boot had already failed.
    NotRun,
}

/// One component's record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Name.
    pub name: String,
    /// Phase.
    pub phase: Phase,
    /// Level inside the phase.
    pub level: usize,
    /// How it ended.
    pub outcome: Outcome,
    /// How long its start took.
    pub took: Duration,
}

/// A failed boot: the chain of causes, outermost first.
#[derive(Debug, Error)]
#[error("boot failed: {}", .chain.join(": "))]
pub struct BootError {
    /// `component X failed`, `because Y ...`, the root cause last.
    pub chain: Vec<String>,
    /// Everything that was attempted.
    pub records: Vec<Record>,
}

/// A booted system: records, and the components to stop in reverse.
pub struct Booted {
    /// What happened to each component.
    pub records: Vec<Record>,
    /// Boot wall time.
    pub took: Duration,
    started: Vec<Arc<dyn Component>>,
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for Booted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Booted {{ records: {:?}, took: {:?} }}", self.records, self.took)
    }
}

impl Booted {
    /// Components running degraded, with why.
    pub fn degraded(&self) -> Vec<(String, String)> {
        self.records
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Degraded(w) => Some((r.name.clone(), w.clone())),
                _ => None,
            })
            .collect()
    }
    /// The shared context.
    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }
    /// Stops every started component in reverse order.
    pub fn shutdown(self) {
        for c in self.started.iter().rev() {
            let _s = info_span!("stop", component = %c.spec().name).entered();
            c.stop(&self.ctx);
        }
    }
}

/// A checked graph, ready to boot.
pub struct Graph {
    comps: Vec<(Spec, Arc<dyn Component>)>,
    /// (phase, level) -> indices, in start order.
    plan: Vec<(Phase, usize, Vec<usize>)>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<Vec<&str>> = self.plan.iter().map(|(_, _, ix)| ix.iter().map(|&i| self.comps[i].0.name.as_str()).collect()).collect();
        write!(f, "Graph {{ levels: {names:?} }}")
    }
}

impl Graph {
    /// Checks the components and plans their levels.
    pub fn new(components: Vec<Arc<dyn Component>>) -> Result<Self, GraphError> {
        let comps: Vec<(Spec, Arc<dyn Component>)> = components.into_iter().map(|c| (c.spec(), c)).collect();
        let mut index = HashMap::new();
        for (i, (s, _)) in comps.iter().enumerate() {
            if index.insert(s.name.clone(), i).is_some() {
                return Err(GraphError::Duplicate(s.name.clone()));
            }
        }
        for (s, _) in &comps {
            for d in &s.deps {
                let Some(&j) = index.get(d) else {
                    return Err(GraphError::MissingDependency { component: s.name.clone(), dep: d.clone() });
                };
                if comps[j].0.phase > s.phase {
                    return Err(GraphError::LaterPhase { component: s.name.clone(), phase: s.phase, dep: d.clone(), dep_phase: comps[j].0.phase });
                }
            }
        }
        // Cycle check (DFS with the current path) and level = longest same-phase dependency chain.
        let mut level = vec![usize::MAX; comps.len()];
        fn visit(
            i: usize,
            comps: &[(Spec, Arc<dyn Component>)],
            index: &HashMap<String, usize>,
            level: &mut [usize],
            path: &mut Vec<usize>,
            on_path: &mut HashSet<usize>,
        ) -> Result<usize, GraphError> {
            if level[i] != usize::MAX {
                return Ok(level[i]);
            }
            if !on_path.insert(i) {
                let start = path.iter().position(|&p| p == i).unwrap_or(0);
                let mut cyc: Vec<String> = path[start..].iter().map(|&p| comps[p].0.name.clone()).collect();
                cyc.push(comps[i].0.name.clone());
                return Err(GraphError::Cycle(cyc));
            }
            path.push(i);
            let mut l = 0;
            for d in &comps[i].0.deps {
                let j = index[d];
                let lj = visit(j, comps, index, level, path, on_path)?;
                if comps[j].0.phase == comps[i].0.phase {
                    l = l.max(lj + 1);
                }
            }
            path.pop();
            on_path.remove(&i);
            level[i] = l;
            Ok(l)
        }
        for i in 0..comps.len() {
            visit(i, &comps, &index, &mut level, &mut Vec::new(), &mut HashSet::new())?;
        }
        let mut keys: Vec<(Phase, usize)> = comps.iter().enumerate().map(|(i, (s, _))| (s.phase, level[i])).collect();
        keys.sort();
        keys.dedup();
        let plan = keys.into_iter().map(|(ph, l)| (ph, l, (0..comps.len()).filter(|&i| comps[i].0.phase == ph && level[i] == l).collect())).collect();
        Ok(Self { comps, plan })
    }

    /// The critical path: the sum over levels of the slowest timeout-free estimate `cost(name)`.
    pub fn critical_path(&self, cost: impl Fn(&str) -> Duration) -> Duration {
        self.plan.iter().map(|(_, _, ix)| ix.iter().map(|&i| cost(&self.comps[i].0.name)).max().unwrap_or_default()).sum()
    }

    /// Boots: level by level, in parallel (or one component at a time when `parallel` is false).
    pub fn boot(&self, parallel: bool) -> Result<Booted, BootError> {
        let t0 = Instant::now();
        let ctx = Arc::new(Ctx::default());
        let mut records: HashMap<usize, Record> = HashMap::new();
        let mut started: Vec<Arc<dyn Component>> = Vec::new();
        let index: HashMap<&str, usize> = self.comps.iter().enumerate().map(|(i, (s, _))| (s.name.as_str(), i)).collect();
        for (phase, level, ixs) in &self.plan {
            let _ps = info_span!("boot_level", ?phase, level).entered();
            // Components whose dependencies did not start are decided without running.
            let mut runnable = Vec::new();
            for &i in ixs {
                let s = &self.comps[i].0;
                let bad = s.deps.iter().find(|d| !matches!(records.get(&index[d.as_str()]).map(|r| &r.outcome), Some(Outcome::Started)));
                match bad {
                    None => runnable.push(i),
                    Some(d) => {
                        let why = match &records[&index[d.as_str()]].outcome {
                            Outcome::Degraded(w) | Outcome::Failed(w) => format!("needs {d}, which is unavailable: {w}"),
                            _ => format!("needs {d}, which did not start"),
                        };
                        let outcome = if s.required { Outcome::Failed(why) } else { Outcome::Degraded(why) };
                        records.insert(i, Record { name: s.name.clone(), phase: *phase, level: *level, outcome, took: Duration::ZERO });
                    }
                }
            }
            let results: Vec<(usize, Result<(), String>, Duration)> = if parallel {
                let handles: Vec<_> = runnable.iter().map(|&i| (i, spawn_start(self.comps[i].1.clone(), ctx.clone()))).collect();
                handles
                    .into_iter()
                    .map(|(i, rx)| {
                        let (r, d) = wait_start(&self.comps[i].0, rx);
                        (i, r, d)
                    })
                    .collect()
            } else {
                runnable
                    .iter()
                    .map(|&i| {
                        let (r, d) = wait_start(&self.comps[i].0, spawn_start(self.comps[i].1.clone(), ctx.clone()));
                        (i, r, d)
                    })
                    .collect()
            };
            for (i, r, took) in results {
                let s = &self.comps[i].0;
                let outcome = match r {
                    Ok(()) => {
                        started.push(self.comps[i].1.clone());
                        info!(component = %s.name, ms = took.as_secs_f64() * 1e3, "started");
                        Outcome::Started
                    }
                    Err(e) if s.required => Outcome::Failed(e),
                    Err(e) => {
                        warn!(component = %s.name, "degraded: {e}");
                        Outcome::Degraded(e)
                    }
                };
                records.insert(i, Record { name: s.name.clone(), phase: *phase, level: *level, outcome, took });
            }
            // The first required failure of this level ends boot.
            if let Some(&i) = ixs.iter().find(|&&i| matches!(records[&i].outcome, Outcome::Failed(_))) {
                let chain = cause_chain(i, &self.comps, &index, &records);
                for c in started.iter().rev() {
                    c.stop(&ctx);
                }
                let mut all: Vec<Record> = self.all_records(records);
                all.sort_by_key(|r| (r.phase, r.level));
                return Err(BootError { chain, records: all });
            }
        }
        let mut all = self.all_records(records);
        all.sort_by_key(|r| (r.phase, r.level));
        Ok(Booted { records: all, took: t0.elapsed(), started, ctx })
    }

    fn all_records(&self, mut records: HashMap<usize, Record>) -> Vec<Record> {
        (0..self.comps.len())
            .map(|i| {
                records.remove(&i).unwrap_or_else(|| {
                    let s = &self.comps[i].0;
                    Record { name: s.name.clone(), phase: s.phase, level: 0, outcome: Outcome::NotRun, took: Duration::ZERO }
                })
            })
            .collect()
    }
}

type StartRx = crossbeam_channel::Receiver<(Result<(), String>, Duration)>;

fn spawn_start(c: Arc<dyn Component>, ctx: Arc<Ctx>) -> StartRx {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let name = c.spec().name;
    std::thread::Builder::new()
        .name(format!("boot-{name}"))
        .spawn(move || {
            let _s = info_span!("start", component = %name).entered();
            let t = Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.start(&ctx))).unwrap_or_else(|_| Err("panicked while starting".into()));
            let _ = tx.send((r, t.elapsed()));
        })
        .expect("spawn boot thread");
    rx
}

fn wait_start(s: &Spec, rx: StartRx) -> (Result<(), String>, Duration) {
    match rx.recv_timeout(s.timeout) {
        Ok(r) => r,
        Err(_) => (Err(format!("did not start within {:?}", s.timeout)), s.timeout),
    }
}

/// `component A failed`, then each dependency whose failure caused it, down to the root cause.
fn cause_chain(i: usize, comps: &[(Spec, Arc<dyn Component>)], index: &HashMap<&str, usize>, records: &HashMap<usize, Record>) -> Vec<String> {
    let mut chain = Vec::new();
    let mut cur = i;
    for _ in 0..comps.len() + 1 {
        let s = &comps[cur].0;
        let why = match &records[&cur].outcome {
            Outcome::Failed(w) | Outcome::Degraded(w) => w.clone(),
            _ => String::new(),
        };
        let next = s.deps.iter().find(|d| records.get(&index[d.as_str()]).is_some_and(|r| !matches!(r.outcome, Outcome::Started)));
        match next {
            Some(d) => {
                chain.push(format!("{} needs {d}", s.name));
                cur = index[d.as_str()];
            }
            None => {
                chain.push(format!("{}: {why}", s.name));
                break;
            }
        }
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    struct T {
        spec: Spec,
        sleep: Duration,
        fail: Option<&'static str>,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Component for T {
        fn spec(&self) -> Spec {
            self.spec.clone()
        }
        fn start(&self, _: &Ctx) -> Result<(), String> {
            std::thread::sleep(self.sleep);
            self.log.lock().unwrap().push(format!("start {}", self.spec.name));
            match self.fail {
                Some(f) => Err(f.into()),
                None => Ok(()),
            }
        }
        fn stop(&self, _: &Ctx) {
            self.log.lock().unwrap().push(format!("stop {}", self.spec.name));
        }
    }

    fn t(spec: Spec, ms: u64, fail: Option<&'static str>, log: &Arc<Mutex<Vec<String>>>) -> Arc<dyn Component> {
        Arc::new(T { spec, sleep: Duration::from_millis(ms), fail, log: log.clone() })
    }

    #[test]
    fn missing_dependency_and_cycle_are_named() {
        let log = Arc::default();
        let e = Graph::new(vec![t(Spec::new("a", Phase::Core).after(&["ghost"]), 0, None, &log)]).unwrap_err();
        assert_eq!(e.to_string(), "component \"a\" depends on \"ghost\", which does not exist");
        let e = Graph::new(vec![
            t(Spec::new("a", Phase::Core).after(&["c"]), 0, None, &log),
            t(Spec::new("b", Phase::Core).after(&["a"]), 0, None, &log),
            t(Spec::new("c", Phase::Core).after(&["b"]), 0, None, &log),
        ])
        .unwrap_err();
        assert!(matches!(&e, GraphError::Cycle(c) if c.len() == 4 && c.first() == c.last()), "{e}");
        assert!(e.to_string().starts_with("dependency cycle: "));
        let e = Graph::new(vec![t(Spec::new("a", Phase::PreInit).after(&["b"]), 0, None, &log), t(Spec::new("b", Phase::Service), 0, None, &log)]).unwrap_err();
        assert!(matches!(e, GraphError::LaterPhase { .. }));
    }

    #[test]
    fn required_failure_stops_boot_with_its_causes_and_stops_the_rest_in_reverse() {
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let g = Graph::new(vec![
            t(Spec::new("host", Phase::PreInit), 0, None, &log),
            t(Spec::new("config", Phase::PreInit).after(&["host"]), 0, None, &log),
            t(Spec::new("keys", Phase::Core).after(&["config"]), 0, Some("key file /etc/dwcp/key is missing"), &log),
            t(Spec::new("listener", Phase::Core).after(&["keys"]), 0, None, &log),
            t(Spec::new("api", Phase::Service).after(&["listener"]), 0, None, &log),
        ])
        .unwrap();
        let e = g.boot(true).unwrap_err();
        assert_eq!(e.to_string(), "boot failed: keys: key file /etc/dwcp/key is missing");
        let l = log.lock().unwrap().clone();
        assert_eq!(l, vec!["start host", "start config", "start keys", "stop config", "stop host"]);
        assert!(e.records.iter().any(|r| r.name == "api" && r.outcome == Outcome::NotRun));
    }

    #[test]
    fn a_required_component_behind_a_failed_optional_one_names_the_chain() {
        let log = Arc::default();
        let g = Graph::new(vec![
            t(Spec::new("rdma", Phase::Core).optional(), 0, Some("no RDMA device"), &log),
            t(Spec::new("fastpath", Phase::Service).after(&["rdma"]), 0, None, &log),
        ])
        .unwrap();
        let e = g.boot(true).unwrap_err();
        assert_eq!(e.chain, vec!["fastpath needs rdma".to_string(), "rdma: no RDMA device".to_string()]);
    }

    #[test]
    fn optional_failure_degrades_and_boot_goes_on() {
        let log = Arc::default();
        let g = Graph::new(vec![
            t(Spec::new("host", Phase::PreInit), 0, None, &log),
            t(Spec::new("rdma", Phase::Core).after(&["host"]).optional(), 0, Some("no RDMA device"), &log),
            t(Spec::new("rdma-stats", Phase::Service).after(&["rdma"]).optional(), 0, None, &log),
            t(Spec::new("api", Phase::Service).after(&["host"]), 0, None, &log),
        ])
        .unwrap();
        let b = g.boot(true).unwrap();
        let d = b.degraded();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0], ("rdma".to_string(), "no RDMA device".to_string()));
        assert!(d[1].1.contains("needs rdma"));
        assert!(b.records.iter().any(|r| r.name == "api" && r.outcome == Outcome::Started));
        b.shutdown();
    }

    #[test]
    fn a_hung_required_component_fails_within_its_timeout() {
        let log = Arc::default();
        let g = Graph::new(vec![t(Spec::new("slow", Phase::Core).timeout(Duration::from_millis(50)), 2000, None, &log)]).unwrap();
        let t0 = Instant::now();
        let e = g.boot(true).unwrap_err();
        assert!(t0.elapsed() < Duration::from_millis(500));
        assert!(e.to_string().contains("did not start within"));
    }

    #[test]
    fn levels_run_in_parallel() {
        let log = Arc::default();
        let mut comps = vec![t(Spec::new("root", Phase::PreInit), 0, None, &log)];
        for i in 0..6 {
            comps.push(t(Spec::new(&format!("w{i}"), Phase::Core).after(&["root"]), 40, None, &log));
        }
        let g = Graph::new(comps).unwrap();
        let par = g.boot(true).unwrap();
        let seq = g.boot(false).unwrap();
        assert!(par.took < Duration::from_millis(150), "parallel {:?}", par.took);
        assert!(seq.took >= Duration::from_millis(240), "sequential {:?}", seq.took);
    }

    #[test]
    fn hundred_boots_in_a_row() {
        let log = Arc::default();
        let g = Graph::new(vec![
            t(Spec::new("a", Phase::PreInit), 0, None, &log),
            t(Spec::new("b", Phase::Core).after(&["a"]), 0, None, &log),
            t(Spec::new("c", Phase::Core).after(&["a"]).optional(), 0, None, &log),
            t(Spec::new("d", Phase::PostInit).after(&["b", "c"]), 0, None, &log),
        ])
        .unwrap();
        for _ in 0..100 {
            let b = g.boot(true).expect("boot");
            assert!(b.degraded().is_empty());
            b.shutdown();
        }
    }
}
