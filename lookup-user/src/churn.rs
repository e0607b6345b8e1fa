//! The churn engine: one writer thread applies every change to bindings.
//!
//! Requests that change bindings (`bind`, `unbind`, `apply`) wait in a
//! bounded queue. Whatever has queued by the time the writer comes round is
//! taken together as a group: each request is checked in arrival order
//! against the bindings as the requests before it leave them (every request
//! all or nothing, and answered on its own), the accepted ones are merged
//! per binding so the last write wins, and the net change is applied as one
//! batch. Sixty clients binding at once cost one set of batched map updates,
//! not sixty.
//!
//! A request too large to take with others is checked and applied in chunks,
//! and between chunks the writer serves the small requests that queued
//! meanwhile, so a `bind` waits for one chunk, not for a million changes.
//! Should the merged group fail to apply (a full table, a failing map
//! update), nothing of it stays applied and its requests are applied one by
//! one instead, each answered with its own outcome.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Instant,
};

use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::{
    batch::{Batch, Change},
    binding::{Binding, Label, Selector},
    dispatcher::{self, Dispatcher},
    error_chain,
    proto::Response,
};

/// Changes one request asks for.
#[derive(Debug)]
pub enum Changes {
    /// Add a binding or move it to another label.
    Bind(Binding),
    /// Remove a binding, which must have this label.
    Unbind(Binding),
    /// A batch: unsorted (input order) if small, sorted if large (see
    /// [`is_large`]).
    Apply(Batch),
}

impl Changes {
    fn len(&self) -> usize {
        match self {
            Self::Bind(_) | Self::Unbind(_) => 1,
            Self::Apply(batch) => batch.changes.len(),
        }
    }
}

/// Whether a batch of `changes` changes is applied on its own in chunks
/// rather than merged with other requests. Such a batch should be sorted
/// ([`Batch::sort`]) before it is queued, outside any lock.
pub fn is_large(changes: usize) -> bool {
    changes > MERGE_MAX
}

/// Requests of at most this many changes are merged with others.
const MERGE_MAX: usize = 4096;

/// A group of merged requests holds at most this many changes.
const GROUP_MAX: usize = 32_768;

/// Changes a large batch checks before small requests get in (checking is
/// cheap: this takes a few milliseconds).
const CHECK_STEP: usize = 16_384;

/// How long a step of a large batch should hold the state: what a small
/// request waits at most, give or take one change. Host changes cost the
/// same whatever the step; a wide change recomputes the tables below its
/// prefix, and changes in one step share that work, so wide steps are
/// allowed longer.
const HOST_STEP_TIME: std::time::Duration = std::time::Duration::from_millis(10);
const WIDE_STEP_TIME: std::time::Duration = std::time::Duration::from_millis(50);

/// Bounds for the number of changes in a step; each next step of a kind is
/// sized from how long the last one of that kind took.
const STEP_MAX: usize = 65_536;
const STEP_FIRST: usize = 1024;

/// The size of the next step, from the last: scaled to `target` at once
/// when the last step took too long, but grown by at most a quarter at a
/// time, since the cost of a change tends to rise along a run (wide
/// prefixes come longest first, and a shorter one has more tables below).
fn next_step(size: usize, took: std::time::Duration, target: std::time::Duration) -> usize {
    let took = took.as_secs_f64().max(1e-6);
    let ideal = size as f64 * target.as_secs_f64() / took;
    let next = if ideal < size as f64 {
        ideal
    } else {
        ideal.min(size as f64 * 1.25 + 1.0)
    };
    (next as usize).clamp(1, STEP_MAX)
}

struct Job {
    changes: Changes,
    reply: oneshot::Sender<Response>,
}

enum Msg {
    Job(Job),
    /// Finish what was queued before, then stop.
    Stop,
}

/// The writer's queue.
#[derive(Clone)]
pub struct Queue(mpsc::Sender<Msg>);

impl Queue {
    /// Queues `changes` (waiting while the queue is full) and waits for the
    /// outcome.
    pub async fn submit(&self, changes: Changes) -> Response {
        let (reply, outcome) = oneshot::channel();
        if self.0.send(Msg::Job(Job { changes, reply })).await.is_err() {
            return stopped();
        }
        let response = outcome.await.unwrap_or_else(|_| stopped());
        log(&response);
        response
    }
}

/// The writer thread, to stop when the agent does.
pub struct WriterThread {
    queue: mpsc::Sender<Msg>,
    thread: std::thread::JoinHandle<()>,
}

impl WriterThread {
    /// Lets the writer finish every request queued so far (a large batch
    /// included: a batch is all or nothing, and a stop must not cut one in
    /// half), then waits for it to end. Requests queued after this are
    /// refused.
    pub async fn stop(self) {
        let _ = self.queue.send(Msg::Stop).await;
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

fn stopped() -> Response {
    Response::Error {
        message: "lookupd is stopping: the change was not applied".into(),
    }
}

/// Starts the writer for `shared`, with room for `capacity` waiting
/// requests (senders wait when it is full). With `merge` false every
/// request is applied on its own: for comparison in benchmarks.
pub fn start(
    shared: Arc<Mutex<Dispatcher>>,
    capacity: usize,
    merge: bool,
) -> (Queue, WriterThread) {
    let (tx, rx) = mpsc::channel(capacity);
    let thread = std::thread::Builder::new()
        .name("lookupd-writer".into())
        .spawn(move || {
            let writer = Writer {
                shared,
                rx,
                deferred: VecDeque::new(),
                merge,
                stopping: false,
            };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run())).is_err() {
                // Without its writer the agent cannot change anything: stop,
                // and let the service manager start a fresh one (the data
                // plane keeps steering meanwhile).
                error!("the writer panicked; lookupd exits");
                std::process::exit(70);
            }
        })
        .expect("cannot start the writer thread");
    (Queue(tx.clone()), WriterThread { queue: tx, thread })
}

struct Writer {
    shared: Arc<Mutex<Dispatcher>>,
    rx: mpsc::Receiver<Msg>,
    /// Large requests taken from the queue while another was applied.
    deferred: VecDeque<Job>,
    merge: bool,
    /// A stop was asked for: finish what is deferred, take nothing more.
    stopping: bool,
}

impl Writer {
    fn run(mut self) {
        loop {
            let job = match self.deferred.pop_front() {
                Some(job) => job,
                None if self.stopping => return,
                None => match self.rx.blocking_recv() {
                    Some(Msg::Job(job)) => job,
                    Some(Msg::Stop) | None => {
                        self.stopping = true;
                        continue;
                    }
                },
            };
            if is_large(job.changes.len()) {
                self.apply_large(job);
            } else {
                let mut group = vec![job];
                self.gather(&mut group);
                self.apply_group(group);
            }
        }
    }

    /// Adds queued small requests to `group` (up to [`GROUP_MAX`]
    /// changes), without waiting; large ones are set aside for later.
    fn gather(&mut self, group: &mut Vec<Job>) {
        if self.stopping || (!self.merge && !group.is_empty()) {
            return;
        }
        let mut size: usize = group.iter().map(|j| j.changes.len()).sum();
        while size < GROUP_MAX {
            let job = match self.rx.try_recv() {
                Ok(Msg::Job(job)) => job,
                Ok(Msg::Stop) => {
                    self.stopping = true;
                    break;
                }
                Err(_) => break,
            };
            let n = job.changes.len();
            if is_large(n) {
                self.deferred.push_back(job);
                continue;
            }
            size += n;
            group.push(job);
            if !self.merge {
                break;
            }
        }
    }

    /// Applies the small requests waiting now, if any.
    fn serve_waiting(&mut self) {
        let mut group = Vec::new();
        self.gather(&mut group);
        if !group.is_empty() {
            self.apply_group(group);
        }
    }

    /// Applies a group and answers each request.
    fn apply_group(&self, group: Vec<Job>) {
        let started = Instant::now();
        let (changes, replies): (Vec<_>, Vec<_>) =
            group.into_iter().map(|j| (j.changes, j.reply)).unzip();
        let outcomes = apply_merged(&mut self.shared.blocking_lock(), &changes);
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(answer(outcome));
        }
        debug!(
            requests = changes.len(),
            micros = started.elapsed().as_micros() as u64,
            "group applied"
        );
    }

    /// Checks and applies a large batch in chunks, serving small requests
    /// between chunks.
    fn apply_large(&mut self, job: Job) {
        let Job { changes, reply } = job;
        let Changes::Apply(batch) = changes else {
            unreachable!("only batches are large")
        };
        let started = Instant::now();
        let outcome = self.large(batch, started).map_err(|r| r.0);
        let _ = reply.send(answer(outcome));
    }

    fn large(&mut self, batch: Batch, started: Instant) -> Result<String, Refusal> {
        let shared = Arc::clone(&self.shared);
        let mut d = shared.blocking_lock();
        d.ensure_pinned().map_err(Refusal::from)?;
        // Checked in steps, small requests served in between; nothing
        // changes until the whole batch has passed.
        let mut check = d.begin_check(batch);
        while !d
            .check_some(&mut check, CHECK_STEP)
            .map_err(Refusal::from)?
        {
            drop(d);
            self.serve_waiting();
            d = shared.blocking_lock();
        }
        let mut plan = d.plan_batch(check).map_err(Refusal::from)?;
        let checked = started.elapsed();
        let mut failed = None;
        let mut longest_chunk = std::time::Duration::ZERO;
        // Step sizes for host and for wide changes, learnt as they go.
        let (mut host_step, mut wide_step, mut steps) = (STEP_FIRST, STEP_FIRST, 0);
        while !plan.is_done() {
            let chunk_started = Instant::now();
            let (host, n) = plan.next_run(if plan.next_run(1).0 {
                host_step
            } else {
                wide_step
            });
            if let Err(e) = d.apply_chunk(&mut plan, n) {
                failed = Some(e);
                break;
            }
            let took = chunk_started.elapsed();
            longest_chunk = longest_chunk.max(took);
            if host {
                host_step = next_step(n, took, HOST_STEP_TIME);
            } else {
                wide_step = next_step(n, took, WIDE_STEP_TIME);
            }
            steps += 1;
            drop(d);
            self.serve_waiting();
            d = shared.blocking_lock();
        }
        let summary = d.finish_batch(plan);
        info!(
            check_ms = checked.as_millis() as u64,
            steps,
            longest_step_ms = longest_chunk.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "batch done"
        );
        match (failed, summary) {
            (Some(e), _) | (None, Err(e)) => Err(e.into()),
            (None, Ok(m)) => Ok(m),
        }
    }
}

/// Applies a group of requests as if one after the other, in order, with
/// the fewest map updates: each request is checked against the bindings as
/// the ones before it leave them and refused whole or accepted whole, and
/// the net change of the accepted ones is applied as one batch. Returns
/// each request's outcome: what it did, or why it was refused.
pub fn apply_merged(d: &mut Dispatcher, requests: &[Changes]) -> Vec<Result<String, String>> {
    let outcomes = match d.ensure_pinned() {
        Err(e) => {
            let message = error_chain(&e);
            requests
                .iter()
                .map(|_| Err(Refusal(message.clone())))
                .collect()
        }
        Ok(()) => {
            let mut sim = Simulation::new(d);
            let outcomes: Vec<_> = requests.iter().map(|r| sim.request(r)).collect();
            let net = sim.net();
            drop(sim);
            if net.changes.is_empty() {
                outcomes
            } else {
                match d.apply_batch(net) {
                    Ok(_) => outcomes,
                    Err(e) => {
                        warn!(
                            error = %error_chain(&e),
                            requests = requests.len(),
                            "a merged group failed and was undone; applying its requests one by one"
                        );
                        one_by_one(d, requests)
                    }
                }
            }
        }
    };
    outcomes.into_iter().map(|o| o.map_err(|r| r.0)).collect()
}

/// Applies every request of a group on its own, in order: the fallback
/// when the merged group failed (and was undone). Each is checked again:
/// a request refused against what the group would have made may be fine
/// against what the requests before it really made.
fn one_by_one(d: &mut Dispatcher, requests: &[Changes]) -> Vec<Result<String, Refusal>> {
    requests
        .iter()
        .map(|changes| {
            let applied = match changes {
                Changes::Bind(b) => d.bind(b),
                Changes::Unbind(b) => d.unbind(b),
                Changes::Apply(batch) => d.apply_batch(batch.clone()),
            };
            applied.map_err(Refusal::from)
        })
        .collect()
}

/// Why a request was refused: its message.
#[derive(Debug)]
struct Refusal(String);

impl From<dispatcher::Error> for Refusal {
    fn from(e: dispatcher::Error) -> Self {
        Self(error_chain(&e))
    }
}

/// The answer to a request. It is logged by whoever waits for it, not by
/// the writer, which has the next request to write.
fn answer(outcome: Result<String, impl Into<String>>) -> Response {
    match outcome.map_err(Into::into) {
        Ok(message) => Response::Done {
            messages: vec![message],
        },
        Err(message) => Response::Error { message },
    }
}

fn log(response: &Response) {
    match response {
        Response::Done { messages } => messages.iter().for_each(|m| info!("{m}")),
        Response::Error { message } => warn!(error = %message, "request refused"),
        _ => {}
    }
}

/// The bindings as the requests checked so far leave them, over the
/// dispatcher's; labels borrowed from the requests and the dispatcher.
struct Simulation<'a> {
    d: &'a Dispatcher,
    /// Bindings changed by accepted requests, with their label now (`None`:
    /// removed), and the order in which they were first changed.
    overlay: HashMap<Selector, Option<&'a str>>,
    order: Vec<Selector>,
}

impl<'a> Simulation<'a> {
    fn new(d: &'a Dispatcher) -> Self {
        Self {
            d,
            overlay: HashMap::new(),
            order: Vec::new(),
        }
    }

    fn current(&self, selector: &Selector) -> Option<&'a str> {
        match self.overlay.get(selector) {
            Some(label) => *label,
            None => self.d.label_of(selector).map(Label::as_str),
        }
    }

    /// Checks one request against the current view; if it is accepted, its
    /// changes become part of the view. Says what it did, in the words the
    /// dispatcher uses.
    fn request(&mut self, changes: &'a Changes) -> Result<String, Refusal> {
        match changes {
            Changes::Bind(b) => {
                let selector = b.selector();
                let label = b.label.as_str();
                let message = match self.current(&selector) {
                    Some(now) if now == label => format!("already bound {selector} -> {label}"),
                    Some(now) => format!("rebound {selector} -> {label} (was {now})"),
                    None => format!("bound {selector} -> {label}"),
                };
                self.set(selector, Some(label));
                Ok(message)
            }
            Changes::Unbind(b) => {
                let selector = b.selector();
                self.check_unbind(&selector, b.label.as_str())
                    .map_err(Refusal::from)?;
                self.set(selector, None);
                Ok(format!("unbound {selector} -> {}", b.label))
            }
            Changes::Apply(batch) => self.batch(batch),
        }
    }

    fn check_unbind(&self, selector: &Selector, given: &str) -> Result<(), dispatcher::Error> {
        match self.current(selector) {
            None => Err(dispatcher::Error::NoSuchBinding(*selector)),
            Some(actual) if actual != given => Err(dispatcher::Error::LabelMismatch {
                selector: *selector,
                actual: actual.to_owned(),
                given: given.to_owned(),
            }),
            Some(_) => Ok(()),
        }
    }

    fn set(&mut self, selector: Selector, label: Option<&'a str>) {
        if self.overlay.insert(selector, label).is_none() {
            self.order.push(selector);
        }
    }

    /// A batch, line by line in input order, all or nothing.
    fn batch(&mut self, batch: &'a Batch) -> Result<String, Refusal> {
        let mut staged: HashMap<Selector, Option<&'a str>> = HashMap::new();
        let mut order = Vec::new();
        for &Change {
            selector,
            label,
            bind,
            line,
        } in &batch.changes
        {
            let label = batch.labels[label as usize].as_str();
            if !bind {
                let now = match staged.get(&selector) {
                    Some(staged) => *staged,
                    None => self.current(&selector),
                };
                let refused = match now {
                    None => Some(dispatcher::Error::NoSuchBinding(selector)),
                    Some(actual) if actual != label => Some(dispatcher::Error::LabelMismatch {
                        selector,
                        actual: actual.to_owned(),
                        given: label.to_owned(),
                    }),
                    Some(_) => None,
                };
                if let Some(e) = refused {
                    return Err(dispatcher::Error::Batch {
                        line,
                        source: Box::new(e),
                    }
                    .into());
                }
            }
            if staged.insert(selector, bind.then_some(label)).is_none() {
                order.push(selector);
            }
        }
        let (mut bound, mut moved, mut unbound) = (0, 0, 0);
        for selector in order {
            let after = staged[&selector];
            match (self.current(&selector), after) {
                (None, Some(_)) => bound += 1,
                (Some(a), Some(b)) if a != b => moved += 1,
                (Some(_), None) => unbound += 1,
                _ => {}
            }
            self.set(selector, after);
        }
        let total = batch.changes.len();
        Ok(format!(
            "applied {total} change{}: {bound} bound, {moved} moved, {unbound} unbound, {} unchanged",
            if total == 1 { "" } else { "s" },
            total.saturating_sub(bound + moved + unbound)
        ))
    }

    /// The net change of every accepted request, as one batch.
    fn net(&self) -> Batch {
        let mut net = Batch::default();
        let mut labels: HashMap<&str, u32> = HashMap::new();
        for selector in &self.order {
            let after = self.overlay[selector];
            let before = self.d.label_of(selector).map(Label::as_str);
            if after == before {
                continue;
            }
            // An unbind names the label the binding has.
            let Some(label) = after.or(before) else {
                continue;
            };
            let next = labels.len() as u32;
            let index = *labels.entry(label).or_insert_with(|| {
                net.labels
                    .push(label.parse().expect("labels here were valid once"));
                next
            });
            net.changes.push(Change {
                selector: *selector,
                label: index,
                bind: after.is_some(),
                line: net.changes.len() as u32 + 1,
            });
        }
        net
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn steps_shrink_at_once_and_grow_slowly() {
        let ms = Duration::from_millis;
        // Twice too slow: half the size next time.
        assert_eq!(next_step(1000, ms(20), ms(10)), 500);
        // Ten times too fast: a quarter more, not ten times more.
        assert_eq!(next_step(1000, ms(1), ms(10)), 1251);
        // On target: about the same.
        assert_eq!(next_step(1000, ms(10), ms(10)), 1000);
        // Never below one change, never above the cap.
        assert_eq!(next_step(1, Duration::from_secs(1), ms(10)), 1);
        assert_eq!(next_step(STEP_MAX, Duration::ZERO, ms(10)), STEP_MAX);
    }
}
