//! The audit log: one JSON line per answered inference request (`--audit-log`), for model-risk
//! review: when, which request, which variant and digest, the parameters, the input token count,
//! the outputs exactly as answered and the latency; the input text only with
//! `--audit-log-inputs`.
//!
//! Requests hand their record to a bounded channel; a writer thread appends, flushes whenever the
//! channel runs dry and rotates the file by size. A record that cannot be queued (the writer is
//! behind) or written (a full disk) is counted in `finserve_audit_records_dropped_total` and
//! logged. With `--audit-log-required` a request waits until its record is flushed and is
//! answered 503 instead when it cannot be, so nothing is served unaudited; while writes fail, new
//! work is refused up front, and the writer probes the sink every second to resume.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::metrics::METRICS;

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for Sink {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "-" | "stdout" => Self::Stdout,
            path => Self::File(PathBuf::from(path)),
        })
    }
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub sink: Sink,
    /// Whether records carry the input texts.
    pub inputs: bool,
    /// Answer 503 rather than serve a request whose record is not written.
    pub required: bool,
    /// A file is rotated before it would grow past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` the newest).
    pub keep: usize,
    /// Records that may wait for the writer.
    pub capacity: usize,
}

/// What the writer receives: a record (with, when required, who waits for it to be flushed), or
/// a request to say when everything before it is written.
enum Message {
    Record {
        line: String,
        written: Option<oneshot::Sender<bool>>,
    },
    Sync(oneshot::Sender<()>),
}

/// How long a required record may take to be written before the request gets 503.
const WRITE_WAIT: Duration = Duration::from_secs(10);

/// The handle requests record through.
pub struct Audit {
    tx: SyncSender<Message>,
    /// False from a failed write until the sink works again.
    writing: Arc<AtomicBool>,
    pub inputs: bool,
    required: bool,
}

impl Audit {
    /// Opens the sink (refused at start-up when it cannot be opened) and starts the writer.
    pub fn start(config: AuditConfig) -> Result<Self> {
        let out = Output::open(&config)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(config.capacity.max(1));
        let writing = Arc::new(AtomicBool::new(true));
        let flag = writing.clone();
        std::thread::Builder::new()
            .name("finserve-audit".into())
            .spawn(move || write_all(rx, out, &flag))
            .map_err(|e| Error::Startup(format!("cannot start the audit writer: {e}")))?;
        Ok(Self {
            tx,
            writing,
            inputs: config.inputs,
            required: config.required,
        })
    }

    /// Refuses to start work whose record could not be kept: with `--audit-log-required`,
    /// while writes fail.
    pub fn check(&self) -> Result<()> {
        if self.required && !self.writing.load(Ordering::SeqCst) {
            return Err(unavailable("cannot be written"));
        }
        Ok(())
    }

    /// Records `record`. Without `--audit-log-required` it is queued and a record that cannot be
    /// is counted; with it, this waits until the record is flushed and fails if it is not.
    pub async fn record(&self, record: &Value) -> Result<()> {
        let (written, flushed) = if self.required {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let line = record.to_string();
        if let Err(e) = self.tx.try_send(Message::Record { line, written }) {
            let reason = match e {
                TrySendError::Full(_) => "full",
                TrySendError::Disconnected(_) => "writer_down",
            };
            METRICS.audit_dropped.with_label_values(&[reason]).inc();
            tracing::warn!(reason, "audit record dropped");
            if self.required {
                return Err(unavailable(&format!("cannot keep up ({reason})")));
            }
            return Ok(());
        }
        let Some(flushed) = flushed else {
            return Ok(());
        };
        match tokio::time::timeout(WRITE_WAIT, flushed).await {
            Ok(Ok(true)) => Ok(()),
            _ => Err(unavailable("cannot be written")),
        }
    }

    /// Waits (at most `timeout`) until every record queued so far is written: at shutdown.
    pub async fn sync(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut message = Message::Sync(tx);
        loop {
            match self.tx.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if tokio::time::Instant::now() < deadline => {
                    message = m;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_) => return,
            }
        }
        let _ = tokio::time::timeout_at(deadline, rx).await;
    }
}

fn unavailable(why: &str) -> Error {
    Error::AuditUnavailable(format!(
        "the audit log {why} and --audit-log-required is set"
    ))
}

/// The open sink and its rotation.
struct Output {
    writer: BufWriter<Box<dyn Write + Send>>,
    sink: Sink,
    /// The file to rotate and repair, if the sink is a regular file.
    path: Option<PathBuf>,
    /// Bytes of the current file handed to the writer.
    size: u64,
    /// Bytes of the current file known to be written: whole records only.
    durable: u64,
    max_bytes: u64,
    keep: usize,
}

impl Output {
    fn open(config: &AuditConfig) -> Result<Self> {
        let (writer, path, size): (Box<dyn Write + Send>, _, _) = match &config.sink {
            Sink::Stdout => (Box::new(std::io::stdout()), None, 0),
            Sink::File(path) => {
                let file = append(path)?;
                let meta = file.metadata().map_err(|e| Error::io(path, e))?;
                // Only a regular file is rotated and repaired (not /dev/stdout, a pipe or a device).
                let regular = meta.is_file().then(|| path.clone());
                (Box::new(file), regular, meta.len())
            }
        };
        Ok(Self {
            writer: BufWriter::new(writer),
            sink: config.sink.clone(),
            path,
            size,
            durable: size,
            max_bytes: config.max_bytes,
            keep: config.keep,
        })
    }

    fn write(&mut self, line: &str) -> std::io::Result<()> {
        let n = line.len() as u64 + 1;
        if self.size > 0 && self.size + n > self.max_bytes {
            self.rotate()?;
        }
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        self.size += n;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()?;
        self.durable = self.size;
        Ok(())
    }

    /// `PATH` becomes `PATH.1` (and each `PATH.k` becomes `PATH.k+1`, the oldest dropped).
    fn rotate(&mut self) -> std::io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        self.flush()?;
        let numbered = |k: usize| PathBuf::from(format!("{}.{k}", path.display()));
        if self.keep == 0 {
            std::fs::remove_file(&path)?;
        } else {
            for k in (1..self.keep).rev() {
                if numbered(k).exists() {
                    std::fs::rename(numbered(k), numbered(k + 1))?;
                }
            }
            std::fs::rename(&path, numbered(1))?;
        }
        let file = append(&path).map_err(|e| std::io::Error::other(e.to_string()))?;
        self.writer = BufWriter::new(Box::new(file));
        self.size = 0;
        self.durable = 0;
        Ok(())
    }

    /// After a failed write: drops what is buffered (those records are counted as lost, so they
    /// must not appear later), cuts a partly written record off the file, and reopens the sink.
    /// True when the sink could be reopened.
    fn reset(&mut self) -> bool {
        let reopened: std::io::Result<Box<dyn Write + Send>> = match &self.sink {
            Sink::Stdout => Ok(Box::new(std::io::stdout())),
            Sink::File(path) => {
                if self.path.is_some()
                    && let Ok(f) = OpenOptions::new().write(true).open(path)
                {
                    let _ = f.set_len(self.durable);
                }
                append(path)
                    .map(|f| Box::new(f) as Box<dyn Write + Send>)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            }
        };
        self.size = self.durable;
        match reopened {
            Ok(w) => {
                let old = std::mem::replace(&mut self.writer, BufWriter::new(w));
                drop(old.into_parts());
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reopen the audit log");
                false
            }
        }
    }
}

fn append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// The writer thread: appends records until every handle is gone, flushing whenever no more
/// are waiting, so a record is on disk soon after its answer; while writes fail, it probes the
/// sink every second.
fn write_all(rx: Receiver<Message>, mut out: Output, writing: &AtomicBool) {
    loop {
        let first = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                if !writing.load(Ordering::SeqCst) && out.reset() && out.flush().is_ok() {
                    writing.store(true, Ordering::SeqCst);
                    tracing::info!("audit log writable again");
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut waiting = Vec::new();
        let mut syncs = Vec::new();
        let mut records = 0;
        let mut ok = true;
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Record { line, written } => {
                    waiting.extend(written);
                    records += 1;
                    if ok && let Err(e) = out.write(&line) {
                        ok = false;
                        tracing::error!(error = %e, "cannot write the audit log");
                    }
                }
                Message::Sync(done) => syncs.push(done),
            }
            next = rx.try_recv().ok();
        }
        if ok && let Err(e) = out.flush() {
            ok = false;
            tracing::error!(error = %e, "cannot write the audit log");
        }
        if ok {
            METRICS.audit_records.inc_by(records);
            if !writing.swap(true, Ordering::SeqCst) {
                tracing::info!("audit log writable again");
            }
        } else {
            // Nothing of this batch is kept: what reached the file is cut off again.
            METRICS
                .audit_dropped
                .with_label_values(&["write_error"])
                .inc_by(records);
            writing.store(false, Ordering::SeqCst);
            out.reset();
        }
        for w in waiting {
            let _ = w.send(ok);
        }
        for s in syncs {
            let _ = s.send(());
        }
    }
    let _ = out.flush();
}
