//! How a node writes a stream's changes in a cluster: each change is computed here (the diff
//! against the local copy, which is at the log's top), then appended to the log by one atomic
//! script that checks the writer's fence and base; only then is it applied locally. A writer
//! whose base is stale catches up from the log and computes the change again, so a change is
//! never applied to a stale base and never lost.
//!
//! Polled streams are written by the node holding their lease (its fence goes with every
//! append, so a node that lost the lease while paused cannot write after its successor); push
//! streams by whichever node received the push, checked by base alone.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{Mutex, watch};

use super::follow::{Catchup, Reloaded};
use super::lease::Holding;
use super::message::LoggedChange;
use super::replica;
use super::store::{Append, Appended, Retention, StoreError};
use crate::hub::{Preparation, Prepared, Publication, Stream};
use crate::metrics::StreamLabels;
use crate::upstream::fetch::{FetchError, Validators};
use crate::upstream::poller::{Publish, PublishResult};
use crate::wire::ChangeKind;

/// Appends that find the log moved by another writer are retried this many times (each
/// after catching up); past that the write fails and the caller may try again.
const ATTEMPTS: usize = 5;

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError<E> {
    /// The caller's function refused the current document (a patch that does not apply).
    #[error("refused")]
    Refused(E),
    /// This node no longer holds the stream's lease.
    #[error("this node no longer polls the stream")]
    Fenced,
    /// The stream's log belongs to another configuration of the stream, loaded by another
    /// node: this node writes it again once reloaded with the same.
    #[error(
        "another node runs another configuration of this stream; this node writes it again once reloaded with the same"
    )]
    Stale,
    /// Redis could not be reached.
    #[error("the cluster's log is unreachable: {0}")]
    Unavailable(#[from] StoreError),
    /// Other writers kept moving the log.
    #[error("the log kept moving; try again")]
    Contended,
}

/// How the next document is made from the current one (`None` before the first).
pub type Make<E> = Arc<dyn Fn(Option<&Value>) -> Result<Value, E> + Send + Sync>;

/// What a write starts from.
enum Input<E> {
    /// A whole document (a poll, a `POST`).
    Document(Value),
    /// A function of the current document (a `PATCH`), applied again after catching up.
    Make(Make<E>),
}

#[derive(Debug, Default)]
struct Progress {
    /// Patch bytes logged since the log's stored document (`None`: not known here yet).
    pending: Option<u64>,
    /// Changes since the stored document, as far as this writer knows.
    since_checkpoint: u64,
    /// The log cannot be rebuilt: the next append starts a new epoch.
    broken: bool,
}

/// One stream's writer on this node.
pub struct Writer {
    stream: Arc<Stream>,
    catchup: Catchup,
    node: Arc<str>,
    retention: Retention,
    /// The lease, for a polled stream (`None`: a push stream, any node writes).
    lease: Option<watch::Receiver<Option<Holding>>>,
    /// The fingerprint of this node's configuration of the stream (`None`: a dynamic stream).
    config: Option<Arc<str>>,
    /// One write of this stream at a time on this node.
    progress: Mutex<Progress>,
}

impl Writer {
    /// A writer of `stream`; `lease` is the keeper's watch for a polled stream.
    pub fn new(
        stream: Arc<Stream>,
        catchup: Catchup,
        node: Arc<str>,
        retention: Retention,
        lease: Option<watch::Receiver<Option<Holding>>>,
        config: Option<Arc<str>>,
    ) -> Self {
        Writer {
            stream,
            catchup,
            node,
            retention,
            lease,
            config,
            progress: Mutex::default(),
        }
    }

    /// The stream written.
    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    /// The fence to write with: `Ok(None)` for a push stream, `Err` when the lease is not
    /// held.
    fn fence<E>(&self) -> Result<Option<u64>, WriteError<E>> {
        match &self.lease {
            None => Ok(None),
            Some(lease) => lease
                .borrow()
                .as_ref()
                .map(|h| Some(h.id))
                .ok_or(WriteError::Fenced),
        }
    }

    /// Publishes `document` (a poll or a `POST`).
    pub async fn publish(&self, document: Value) -> Result<Publication, WriteError<()>> {
        self.write(Input::Document(document)).await
    }

    /// Publishes what `make` builds from the current document (a `PATCH`): if another
    /// node's change lands first, `make` runs again on the new document.
    pub async fn publish_with<E: Send + 'static>(
        &self,
        make: Make<E>,
    ) -> Result<Publication, WriteError<E>> {
        self.write(Input::Make(make)).await
    }

    async fn write<E: Send + 'static>(
        &self,
        mut input: Input<E>,
    ) -> Result<Publication, WriteError<E>> {
        let mut progress = self.progress.lock().await;
        let fence = self.fence()?;
        for _ in 0..ATTEMPTS {
            // A broken log, or none at all, is started over with the whole document.
            let known = if progress.broken {
                None
            } else {
                replica::position(&self.stream)
            };
            let previous = known.and_then(|_| self.stream.snapshot());
            let stream = Arc::clone(&self.stream);
            let again = match &input {
                Input::Make(make) => Some(Arc::clone(make)),
                Input::Document(_) => None,
            };
            let prepared = match input {
                Input::Document(document) => {
                    tokio::task::spawn_blocking(move || {
                        Ok(stream.prepare(previous.as_deref(), document))
                    })
                    .await
                }
                Input::Make(make) => {
                    tokio::task::spawn_blocking(move || {
                        let document = make(previous.as_deref().map(|s| &s.document))
                            .map_err(WriteError::Refused)?;
                        Ok(stream.prepare(previous.as_deref(), document))
                    })
                    .await
                }
            };
            let prepared = match prepared {
                Ok(Ok(Preparation::Change(prepared))) => prepared,
                Ok(Ok(Preparation::Unchanged)) => return Ok(Publication::Unchanged),
                Ok(Ok(Preparation::Ignored)) => return Ok(Publication::Ignored),
                Ok(Err(refused)) => return Err(refused),
                Err(panicked) => {
                    tracing::error!(stream = self.stream.name(), %panicked, "computing a change panicked");
                    return Err(WriteError::Contended);
                }
            };
            let at = SystemTime::now();
            let at_ms = crate::time::unix_ms(at);
            let checkpoint = prepared.kind == ChangeKind::Patch
                && (progress.pending.is_none_or(|p| {
                    p + prepared.payload.len() as u64 >= prepared.json.len() as u64
                }) || progress.since_checkpoint >= (self.retention.history as u64 / 2).max(1));
            let append = Append {
                fence,
                epoch: known.map(|(epoch, _)| epoch),
                base: known.map_or(0, |(_, seq)| seq),
                kind: prepared.kind,
                payload: &prepared.payload,
                at_ms,
                document: checkpoint.then_some(&prepared.json[..]),
                new_epoch: at_ms,
                reset: progress.broken,
                config: self.config.as_deref(),
            };
            match self
                .catchup
                .store
                .append(self.stream.name(), &append, &self.retention)
                .await?
            {
                Appended::Ok {
                    epoch,
                    seq,
                    pending,
                } => {
                    progress.pending = Some(pending);
                    progress.since_checkpoint = if pending == 0 {
                        0
                    } else {
                        progress.since_checkpoint + 1
                    };
                    progress.broken = false;
                    return Ok(self.commit(known, epoch, seq, at, prepared));
                }
                Appended::Fenced => return Err(WriteError::Fenced),
                Appended::Stale => return Err(WriteError::Stale),
                Appended::Conflict { epoch, seq } => {
                    self.catchup
                        .metrics
                        .cluster_conflicts
                        .get_or_create(&StreamLabels {
                            stream: self.stream.name().to_owned(),
                        })
                        .inc();
                    match epoch {
                        Some(epoch) => {
                            let reloaded = self
                                .catchup
                                .follow(&self.stream, Some((epoch, seq)), None)
                                .await?;
                            progress.broken = reloaded == Reloaded::Broken;
                        }
                        // The log is gone (Redis restarted empty): a new epoch starts with
                        // the whole document.
                        None => progress.broken = true,
                    }
                    progress.pending = None;
                }
            }
            input = match again {
                Some(make) => Input::Make(make),
                None => Input::Document(prepared.document),
            };
        }
        Err(WriteError::Contended)
    }

    /// Applies a change the log accepted to the local copy.
    fn commit(
        &self,
        known: Option<(u64, u64)>,
        epoch: u64,
        seq: u64,
        at: SystemTime,
        prepared: Prepared,
    ) -> Publication {
        if known.map(|(e, _)| e) == Some(epoch) {
            // The follower may have applied our own announcement first: then it is here.
            return match self.stream.commit(epoch, seq, at, prepared) {
                Ok(Some(change)) => Publication::Published(change),
                Ok(None) | Err(_) => match self.stream.change_at(epoch, seq) {
                    Some(change) => Publication::Published(change),
                    None => Publication::Unchanged,
                },
            };
        }
        // A new epoch. The follower may have loaded it from the log already (its announcement
        // came first): then subscribers have it, and starting over again would send them the
        // same snapshot twice.
        if replica::position(&self.stream).is_some_and(|(e, s)| e == epoch && s >= seq) {
            return match self.stream.change_at(epoch, seq) {
                Some(change) => Publication::Published(change),
                None => Publication::Unchanged,
            };
        }
        // The local copy starts over from this change.
        let change = LoggedChange {
            epoch,
            seq,
            kind: prepared.kind,
            at_ms: crate::time::unix_ms(at),
            payload: prepared.payload.clone(),
        };
        let history =
            vec![
                self.stream
                    .logged_change(epoch, seq, change.kind, change.payload.clone(), at),
            ];
        self.stream
            .reset(epoch, seq, prepared.document, at, history);
        match self.stream.change_at(epoch, seq) {
            Some(change) => Publication::Published(change),
            None => Publication::Unchanged,
        }
    }

    /// Tells subscribers everywhere the upstream failed (`failure`) or answers again
    /// (`None`): this node's at once, the others through the log's meta and an announcement.
    async fn health(&self, failure: Option<(u16, &'static str, String, Duration)>) {
        let _progress = self.progress.lock().await;
        let json = match &failure {
            Some((status, cause, message, retry_in)) => {
                self.stream.fail(*status, cause, message.clone(), *retry_in);
                Some(replica::failure_json(*status, cause, message, *retry_in))
            }
            None => {
                self.stream.recover();
                None
            }
        };
        let Ok(Some(fence)) = self.fence::<()>() else {
            return;
        };
        if let Err(error) = self
            .catchup
            .store
            .health(
                self.stream.name(),
                fence,
                self.stream.epoch(),
                &self.node,
                json.as_deref(),
            )
            .await
        {
            self.catchup.metrics.cluster_redis_errors.inc();
            tracing::debug!(stream = self.stream.name(), %error, "could not share the upstream's state");
        }
    }
}

/// A polled stream's poller publishes through its writer while this node holds the lease.
impl Publish for Writer {
    fn document(self: Arc<Self>, doc: Value) -> BoxFuture<'static, PublishResult> {
        Box::pin(async move {
            match self.publish(doc).await {
                Ok(Publication::Published(_)) => PublishResult::Changed,
                Ok(Publication::Unchanged | Publication::Ignored) => PublishResult::Unchanged,
                Err(error) => {
                    if matches!(error, WriteError::Unavailable(_)) {
                        self.catchup.metrics.cluster_redis_errors.inc();
                    }
                    tracing::warn!(stream = self.stream.name(), %error, "the change was not published");
                    PublishResult::Failed
                }
            }
        })
    }

    fn failure<'a>(&'a self, error: &'a FetchError, retry_in: Duration) -> BoxFuture<'a, ()> {
        Box::pin(self.health(Some((
            error.status(),
            error.cause(),
            error.to_string(),
            retry_in,
        ))))
    }

    fn recovered(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.health(None))
    }

    fn audience(&self) -> usize {
        self.stream.audience()
    }

    fn polled<'a>(&'a self, validators: &'a Validators) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Ok(Some(fence)) = self.fence::<()>() else {
                return;
            };
            let text = |v: &Option<http::HeaderValue>| {
                v.as_ref().and_then(|v| v.to_str().ok()).map(str::to_owned)
            };
            if let Err(error) = self
                .catchup
                .store
                .polled(
                    self.stream.name(),
                    fence,
                    text(&validators.etag).as_deref(),
                    text(&validators.last_modified).as_deref(),
                    &self.retention,
                )
                .await
            {
                self.catchup.metrics.cluster_redis_errors.inc();
                tracing::debug!(stream = self.stream.name(), %error, "could not record the poll");
            }
        })
    }
}
