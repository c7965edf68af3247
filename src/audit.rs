//! The audit log: one JSON line per answered inference request (`--audit-log`), for model-risk
//! review: when, which request, which variant and digest, the parameters, the input token count,
//! the outputs exactly as answered and the latency; the input text only with
//! `--audit-log-inputs`.
//!
//! Requests hand their record to a bounded channel and never wait on the disk: a writer thread
//! appends, flushes whenever the channel runs dry and rotates the file by size. A record that
//! cannot be queued (the writer is behind) or written (a full disk) is counted in
//! `finserve_audit_records_dropped_total` and logged; with `--audit-log-required` the server
//! answers 503 instead of serving while records are being lost.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use serde_json::Value;

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
    /// Answer 503 rather than serve a request whose record would be lost.
    pub required: bool,
    /// A file is rotated before it would grow past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` the newest).
    pub keep: usize,
    /// Records that may wait for the writer.
    pub capacity: usize,
}

/// The handle requests record through.
pub struct Audit {
    tx: SyncSender<String>,
    /// False from a failed write until the next good one.
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
            return Err(Error::AuditUnavailable(
                "the audit log cannot be written and --audit-log-required is set".into(),
            ));
        }
        Ok(())
    }

    /// Queues `record`. A record that cannot be queued is counted; with
    /// `--audit-log-required` that is an error, so the answer is withheld.
    pub fn record(&self, record: &Value) -> Result<()> {
        self.check()?;
        let line = record.to_string();
        match self.tx.try_send(line) {
            Ok(()) => Ok(()),
            Err(e) => {
                let reason = match e {
                    TrySendError::Full(_) => "full",
                    TrySendError::Disconnected(_) => "writer_down",
                };
                METRICS.audit_dropped.with_label_values(&[reason]).inc();
                tracing::warn!(reason, "audit record dropped");
                if self.required {
                    return Err(Error::AuditUnavailable(format!(
                        "the audit log cannot keep up ({reason}) and --audit-log-required is set"
                    )));
                }
                Ok(())
            }
        }
    }
}

/// The open sink and its rotation.
struct Output {
    writer: BufWriter<Box<dyn Write + Send>>,
    sink: Sink,
    /// The file to rotate, if the sink is a regular file.
    path: Option<PathBuf>,
    size: u64,
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
                // Only a regular file is rotated (not /dev/stdout, a pipe or a device).
                let rotated = meta.is_file().then(|| path.clone());
                (Box::new(file), rotated, meta.len())
            }
        };
        Ok(Self {
            writer: BufWriter::new(writer),
            sink: config.sink.clone(),
            path,
            size,
            max_bytes: config.max_bytes,
            keep: config.keep,
        })
    }

    /// Drops what a failed write left buffered (those records are counted as lost, so they must
    /// not appear later) and reopens the sink.
    fn discard(&mut self) {
        let reopened: std::io::Result<Box<dyn Write + Send>> = match &self.sink {
            Sink::Stdout => Ok(Box::new(std::io::stdout())),
            Sink::File(path) => append(path)
                .map(|f| Box::new(f) as Box<dyn Write + Send>)
                .map_err(|e| std::io::Error::other(e.to_string())),
        };
        match reopened {
            Ok(w) => {
                let old = std::mem::replace(&mut self.writer, BufWriter::new(w));
                drop(old.into_parts());
            }
            Err(e) => tracing::error!(error = %e, "cannot reopen the audit log"),
        }
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

    /// `PATH` becomes `PATH.1` (and each `PATH.k` becomes `PATH.k+1`, the oldest dropped).
    fn rotate(&mut self) -> std::io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        self.writer.flush()?;
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
        Ok(())
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
/// are waiting, so a record is on disk soon after its answer.
fn write_all(rx: Receiver<String>, mut out: Output, writing: &AtomicBool) {
    let mut pending = 0u64;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(line) = next {
            match out.write(&line) {
                Ok(()) => pending += 1,
                Err(e) => {
                    failed(&e, writing, pending + 1);
                    out.discard();
                    pending = 0;
                }
            }
            next = rx.try_recv().ok();
        }
        match out.writer.flush() {
            Ok(()) => {
                METRICS.audit_records.inc_by(pending);
                if !writing.swap(true, Ordering::SeqCst) {
                    tracing::info!("audit log writable again");
                }
            }
            // What was buffered is lost with the failed flush.
            Err(e) => {
                failed(&e, writing, pending);
                out.discard();
            }
        }
        pending = 0;
    }
}

fn failed(e: &std::io::Error, writing: &AtomicBool, records: u64) {
    METRICS
        .audit_dropped
        .with_label_values(&["write_error"])
        .inc_by(records);
    if writing.swap(false, Ordering::SeqCst) {
        tracing::error!(error = %e, "cannot write the audit log; records are being lost");
    }
}
