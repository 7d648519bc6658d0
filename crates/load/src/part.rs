//! A part: a set of subscribers held by one process, driven by commands from the coordinator
//! (in the same process, or over stdin/stdout of a worker process).
//!
//! Each subscriber is a task that reads into a per-thread buffer when its socket is readable,
//! decodes the HTTP body and scans it for markers: no per-event parsing, no per-subscriber
//! read buffer, so tens of thousands of subscribers cost little besides their sockets.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::http::{self, BodyDecoder, HttpError};
use super::marker::MarkerScanner;
use super::sys;
use super::ws;

/// One server subscribers connect to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Target {
    /// The server's address.
    pub addr: SocketAddr,
    /// The `Host` header.
    pub authority: String,
    /// The path subscribers GET.
    pub path: String,
}

/// What one part holds and where it connects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartSpec {
    /// The servers, round-robin: subscriber `i` of the whole run connects to
    /// `targets[i % len]` (at least one).
    pub targets: Vec<Target>,
    /// The run-wide index of this part's first subscriber.
    #[serde(default)]
    pub first_index: usize,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// WebSocket mode: the text messages sent after the upgrade (empty: SSE).
    #[serde(default)]
    pub ws_messages: Vec<String>,
    /// Subscribers that read.
    pub readers: usize,
    /// Subscribers that connect, read the response head and then never read again.
    pub stalled: usize,
    /// Source addresses, round-robin (empty: the kernel's choice).
    pub source_addrs: Vec<IpAddr>,
    /// Marker prefix.
    pub marker: String,
    /// Subscribers connected at once.
    pub connect_batch: usize,
    /// Time allowed per batch, in milliseconds.
    pub connect_timeout_ms: u64,
}

/// What the coordinator tells a part.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Command {
    /// Record marks from now on; report `Complete` once every reader has seen `last`.
    Start {
        /// The last mark of the run, if known.
        last: Option<u64>,
    },
    /// Stop, report, exit.
    Report,
}

/// How connecting went.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    /// Readers with a 200 response.
    pub readers: usize,
    /// Stalled subscribers with a 200 response.
    pub stalled: usize,
    /// Non-200 responses.
    pub rejected: usize,
    /// Connections that failed or timed out.
    pub failed: usize,
    /// The first failure, for the report.
    pub first_error: Option<String>,
}

/// One reader's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Receipts {
    /// Which of the targets it read from.
    #[serde(default)]
    pub target: usize,
    /// (mark, monotonic µs) in the order received, from `Start` on.
    pub marks: Vec<(u64, u64)>,
    /// Body bytes on the wire (after the response head) from `Start` on.
    pub bytes: u64,
    /// Why the connection ended before the report, if it did.
    pub ended: Option<String>,
}

/// What a part reports at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartReport {
    /// Every connected reader's receipts.
    pub readers: Vec<Receipts>,
    /// Stalled subscribers still connected at the end.
    pub stalled_alive: usize,
}

/// What a part tells the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum PartEvent {
    /// Everyone connected (or failed to).
    Ready(Ready),
    /// Recording.
    Started,
    /// Every live reader has the last mark (monotonic µs when the last one got it).
    Complete {
        /// When.
        at_us: u64,
    },
    /// The final report.
    Report(PartReport),
    /// The part failed.
    Failed(String),
}

/// Why a subscriber did not get going.
#[derive(Debug)]
enum Refused {
    Status(u16),
    Failed(String),
}

struct Shared {
    spec: PartSpec,
    recording: AtomicBool,
    /// The last mark of the run (0: unknown).
    last: AtomicU64,
    /// Readers that have the last mark.
    reached: AtomicUsize,
    /// Readers still connected.
    alive: AtomicUsize,
    progress: Notify,
    stop: CancellationToken,
}

thread_local! {
    static READ_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; 256 * 1024]);
}

/// Runs a part until `Report`: connect, report `Ready`, then obey commands.
pub async fn run(
    spec: PartSpec,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<PartEvent>,
) {
    if spec.targets.is_empty() {
        let _ = events
            .send(PartEvent::Failed("no server to connect to".into()))
            .await;
        return;
    }
    let total = spec.readers + spec.stalled;
    let batch = spec.connect_batch.max(1);
    let timeout = Duration::from_millis(spec.connect_timeout_ms);
    let shared = Arc::new(Shared {
        spec,
        recording: AtomicBool::new(false),
        last: AtomicU64::new(0),
        reached: AtomicUsize::new(0),
        alive: AtomicUsize::new(0),
        progress: Notify::new(),
        stop: CancellationToken::new(),
    });
    let mut ready = Ready::default();
    let mut readers = Vec::with_capacity(shared.spec.readers);
    let mut stalled = Vec::with_capacity(shared.spec.stalled);
    let (outcome_tx, mut outcomes) = mpsc::unbounded_channel();
    let mut started = 0;
    while started < total {
        let end = (started + batch).min(total);
        for index in started..end {
            // Stalled subscribers are spread evenly among the readers.
            let is_stalled = shared.spec.stalled > 0
                && (index * shared.spec.stalled) / total
                    != ((index + 1) * shared.spec.stalled) / total;
            let task = tokio::spawn(subscriber(
                index,
                is_stalled,
                shared.clone(),
                outcome_tx.clone(),
            ));
            if is_stalled {
                stalled.push(task);
            } else {
                readers.push(task);
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut waiting = end - started;
        while waiting > 0 {
            tokio::select! {
                outcome = outcomes.recv() => {
                    let Some((is_stalled, outcome)) = outcome else { break };
                    waiting -= 1;
                    match outcome {
                        Ok(()) if is_stalled => ready.stalled += 1,
                        Ok(()) => ready.readers += 1,
                        Err(Refused::Status(status)) => {
                            ready.rejected += 1;
                            ready.first_error.get_or_insert(format!("HTTP status {status}"));
                        }
                        Err(Refused::Failed(e)) => {
                            ready.failed += 1;
                            ready.first_error.get_or_insert(e);
                        }
                    }
                }
                () = &mut deadline => {
                    ready.failed += waiting;
                    ready.first_error.get_or_insert(format!(
                        "{waiting} subscribers did not get a response head within {timeout:?}"
                    ));
                    break;
                }
            }
        }
        started = end;
    }
    if events.send(PartEvent::Ready(ready)).await.is_err() {
        shared.stop.cancel();
        return;
    }
    let mut complete_sent = false;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Start { last }) => {
                    shared.last.store(last.unwrap_or(0), Ordering::SeqCst);
                    shared.recording.store(true, Ordering::SeqCst);
                    if events.send(PartEvent::Started).await.is_err() {
                        break;
                    }
                }
                Some(Command::Report) | None => break,
            },
            () = shared.progress.notified(), if !complete_sent => {
                let last = shared.last.load(Ordering::SeqCst);
                if last > 0
                    && shared.reached.load(Ordering::SeqCst) >= shared.alive.load(Ordering::SeqCst)
                {
                    complete_sent = true;
                    let at_us = sys::monotonic_us();
                    if events.send(PartEvent::Complete { at_us }).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    shared.stop.cancel();
    let mut report = PartReport::default();
    for task in readers {
        if let Ok(Some(receipts)) = task.await {
            report.readers.push(receipts);
        }
    }
    for task in stalled {
        if let Ok(Some(_)) = task.await {
            report.stalled_alive += 1;
        }
    }
    let _ = events.send(PartEvent::Report(report)).await;
}

impl PartSpec {
    /// Which target subscriber `index` of this part connects to.
    pub fn target_of(&self, index: usize) -> usize {
        (self.first_index + index) % self.targets.len().max(1)
    }
}

async fn connect(index: usize, shared: &Shared) -> std::io::Result<TcpStream> {
    let target = shared.spec.targets[shared.spec.target_of(index)].addr;
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if !shared.spec.source_addrs.is_empty() {
        let source = shared.spec.source_addrs[index % shared.spec.source_addrs.len()];
        use std::os::fd::AsRawFd;
        sys::bind_address_no_port(socket.as_raw_fd())?;
        socket.bind(SocketAddr::new(source, 0))?;
    }
    socket.connect(target).await
}

/// One subscriber: `Some(receipts)` for a reader, `Some(default)` for a stalled subscriber
/// still connected at the end, `None` when it never got going.
async fn subscriber(
    index: usize,
    is_stalled: bool,
    shared: Arc<Shared>,
    outcomes: mpsc::UnboundedSender<(bool, Result<(), Refused>)>,
) -> Option<Receipts> {
    let started = start(index, &shared).await;
    let (mut stream, head, leftover) = match started {
        Ok(s) => s,
        Err(refused) => {
            let _ = outcomes.send((is_stalled, Err(refused)));
            return None;
        }
    };
    let _ = outcomes.send((is_stalled, Ok(())));
    if is_stalled {
        shared.stop.cancelled().await;
        // Still connected unless the server closed it (its data may still be unread).
        let ready = tokio::time::timeout(
            Duration::from_millis(1),
            stream.ready(tokio::io::Interest::READABLE),
        )
        .await;
        let closed = matches!(ready, Ok(Ok(r)) if r.is_read_closed());
        return (!closed).then(Receipts::default);
    }
    shared.alive.fetch_add(1, Ordering::SeqCst);
    // A WebSocket's frames run until the connection closes.
    let body = if shared.spec.ws_messages.is_empty() {
        head.body
    } else {
        http::BodyKind::UntilClose
    };
    let mut reader = Reader {
        decoder: BodyDecoder::new(body),
        scanner: MarkerScanner::new(shared.spec.marker.as_bytes()),
        receipts: Receipts {
            target: shared.spec.target_of(index),
            ..Receipts::default()
        },
        has_last: false,
    };
    if let Err(e) = reader.consume(&leftover, &shared) {
        reader.receipts.ended = Some(e.to_string());
    }
    // One registration with the stop token for the whole connection, not one per read.
    let stopped = shared.stop.cancelled();
    tokio::pin!(stopped);
    while reader.receipts.ended.is_none() {
        tokio::select! {
            biased;
            () = &mut stopped => break,
            readable = stream.readable() => {
                if let Err(e) = readable {
                    reader.receipts.ended = Some(format!("read failed: {e}"));
                    break;
                }
            }
        }
        let read = READ_BUFFER.with_borrow_mut(|buf| match stream.try_read(buf) {
            Ok(0) => Some(Err("the server closed the connection".to_owned())),
            Ok(n) => Some(
                reader
                    .consume(&buf[..n], &shared)
                    .map_err(|e| format!("bad response body: {e}")),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => Some(Err(format!("read failed: {e}"))),
        });
        match read {
            Some(Err(why)) => reader.receipts.ended = Some(why),
            Some(Ok(())) if reader.decoder.is_done() => {
                reader.receipts.ended = Some("the response body ended".to_owned());
            }
            _ => {}
        }
    }
    if reader.receipts.ended.is_some() {
        shared.alive.fetch_sub(1, Ordering::SeqCst);
        shared.progress.notify_one();
    }
    let _ = stream.shutdown().await;
    Some(reader.receipts)
}

struct Reader {
    decoder: BodyDecoder,
    scanner: MarkerScanner,
    receipts: Receipts,
    has_last: bool,
}

impl Reader {
    fn consume(&mut self, wire: &[u8], shared: &Shared) -> Result<(), HttpError> {
        if wire.is_empty() || !shared.recording.load(Ordering::Relaxed) {
            // Before the start, only keep the decoder and scanner in step.
            let scanner = &mut self.scanner;
            return self
                .decoder
                .feed(wire, &mut |body| scanner.scan(body, &mut |_| {}));
        }
        let at = sys::monotonic_us();
        self.receipts.bytes += wire.len() as u64;
        let last = shared.last.load(Ordering::Relaxed);
        let (scanner, receipts, has_last) =
            (&mut self.scanner, &mut self.receipts, &mut self.has_last);
        self.decoder.feed(wire, &mut |body| {
            scanner.scan(body, &mut |mark| {
                receipts.marks.push((mark, at));
                if mark == last && !*has_last {
                    *has_last = true;
                    shared.reached.fetch_add(1, Ordering::SeqCst);
                    shared.progress.notify_one();
                }
            });
        })
    }
}

type Started = (TcpStream, http::ResponseHead, Vec<u8>);

async fn start(index: usize, shared: &Shared) -> Result<Started, Refused> {
    let failed = |what: &str, e: std::io::Error| Refused::Failed(format!("{what}: {e}"));
    let mut stream = connect(index, shared)
        .await
        .map_err(|e| failed("connect", e))?;
    let websocket = !shared.spec.ws_messages.is_empty();
    let target = &shared.spec.targets[shared.spec.target_of(index)];
    let request = if websocket {
        ws::handshake_request(&target.path, &target.authority, &shared.spec.headers)
    } else {
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n",
            target.path, target.authority
        );
        for (name, value) in &shared.spec.headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request
    };
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| failed("send request", e))?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        stream
            .readable()
            .await
            .map_err(|e| failed("read head", e))?;
        match stream.try_read(&mut chunk) {
            Ok(0) => {
                return Err(Refused::Failed(
                    "the server closed the connection before a response head".into(),
                ));
            }
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(failed("read head", e)),
        }
        if let Some(len) = http::head_len(&head) {
            let parsed =
                http::parse_head(&head[..len]).map_err(|e| Refused::Failed(e.to_string()))?;
            let expected = if websocket { 101 } else { 200 };
            if parsed.status != expected {
                return Err(Refused::Status(parsed.status));
            }
            let leftover = head.split_off(len);
            if websocket {
                let mask = (index as u32).to_be_bytes();
                for message in &shared.spec.ws_messages {
                    stream
                        .write_all(&ws::text_frame(message.as_bytes(), mask))
                        .await
                        .map_err(|e| failed("send message", e))?;
                }
            }
            return Ok((stream, parsed, leftover));
        }
        if head.len() > http::MAX_HEAD {
            return Err(Refused::Failed(
                HttpError::HeadTooLong(http::MAX_HEAD).to_string(),
            ));
        }
    }
}
