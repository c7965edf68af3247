//! Variants merged and dropped while the server runs: from the admin API (`/v1/adapters`) and
//! from a declared set (`--variants-file`) that every replica re-reads, so a fleet converges on
//! it. A runtime variant is merged off the engine thread from the base kept in memory, sharing
//! every tensor its adapters leave alone, and starts serving only once built; removing one stops
//! new requests at once, waits for the ones that hold it, then frees its model.
//!
//! Adapters come from directories under `--adapter-root` (a path leaving it, by `..` or by a
//! symlink, is refused) or, unless `HF_HUB_OFFLINE` is set, from the Hub.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use tokenizers::Tokenizer;

use crate::calibration::Calibration;
use crate::engine::backend::T5Backend;
use crate::engine::{Engine, Served};
use crate::error::{Error, Field, Result};
use crate::hub::HubConfig;
use crate::model::digest::FileDigest;
use crate::model::lora::{AdapterSpec, MergeReport};
use crate::model::t5::T5Model;
use crate::model::{Base, VariantSpec, count_bytes, valid_variant_name};
use crate::served::ModelJob;

/// Where a served variant came from, which decides who may remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--variant` (or the default model): served until the server stops.
    Startup,
    /// `--variants-file`: removed when the file no longer declares it.
    File,
    /// `POST /v1/adapters`: removed by `DELETE` (or evicted, with `--variant-eviction lru`).
    Api,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::File => "file",
            Self::Api => "api",
        }
    }
}

/// What to do when a merge would go over `--max-variants`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Eviction {
    /// Refuse the new variant (409).
    #[default]
    Refuse,
    /// Remove the API-loaded variant used least recently.
    Lru,
}

/// How variants may change at runtime.
#[derive(Debug, Clone)]
pub struct RuntimeVariants {
    /// Where adapters may be read from; without it only Hub ids are accepted.
    pub adapter_root: Option<PathBuf>,
    /// Most variants served at once, not counting the default model.
    pub max_variants: Option<usize>,
    pub eviction: Eviction,
    /// Longest a removal waits for the requests that use the variant.
    pub drain_timeout: Duration,
}

/// One adapter of a variant as asked for: a path under the adapter root (or a Hub id) and its
/// weight.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRequest {
    pub path: String,
    pub weight: f64,
}

/// A served variant, as `GET /v1/adapters` and `/info` show it.
#[derive(Debug, Clone)]
pub struct Listing {
    pub name: String,
    pub origin: Origin,
    pub reports: Vec<MergeReport>,
    pub digest: String,
    pub calibration: Option<(PathBuf, Calibration)>,
    /// Weight bytes no other served model shares.
    pub unshared_bytes: usize,
}

struct Entry {
    name: String,
    origin: Origin,
    /// The adapters as asked for (to tell a changed declaration from an unchanged one).
    asked: Vec<AdapterRequest>,
    model: Arc<T5Model>,
    reports: Vec<MergeReport>,
    digest: String,
    calibration: Option<(PathBuf, Calibration)>,
}

/// The served variants and what is needed to merge more.
pub struct Variants {
    engine: Engine,
    job: ModelJob,
    config: RuntimeVariants,
    hub: HubConfig,
    base_files: Vec<FileDigest>,
    tokenizer: Arc<Tokenizer>,
    /// Merges run one at a time: each builds on the base's shared layers.
    base: Mutex<Base>,
    /// The default model first; every served variant, in the order they came.
    entries: Mutex<Vec<Entry>>,
    /// Names being merged (true) or removed (false), so a second request for one is a
    /// conflict, not a race.
    busy: Mutex<BTreeMap<String, bool>>,
    /// Serialises reloads of the variants file.
    reconciling: tokio::sync::Mutex<()>,
}

/// What start-up served, to seed the list with.
pub struct StartupModel {
    pub name: String,
    pub asked: Vec<AdapterRequest>,
    pub model: Arc<T5Model>,
    pub reports: Vec<MergeReport>,
    pub digest: String,
    pub calibration: Option<(PathBuf, Calibration)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Variants {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Engine,
        job: ModelJob,
        config: RuntimeVariants,
        base: Base,
        base_files: Vec<FileDigest>,
        tokenizer: Arc<Tokenizer>,
        startup: Vec<StartupModel>,
    ) -> Self {
        let entries = startup
            .into_iter()
            .map(|m| Entry {
                name: m.name,
                origin: Origin::Startup,
                asked: m.asked,
                model: m.model,
                reports: m.reports,
                digest: m.digest,
                calibration: m.calibration,
            })
            .collect();
        Self {
            engine,
            job,
            config,
            hub: HubConfig::from_env(),
            base_files,
            tokenizer,
            base: Mutex::new(base),
            entries: Mutex::new(entries),
            busy: Mutex::new(BTreeMap::new()),
            reconciling: tokio::sync::Mutex::new(()),
        }
    }

    /// Every served model, the default first, with the bytes each holds alone.
    pub fn list(&self) -> Vec<Listing> {
        let entries = lock(&self.entries);
        let models: Vec<&T5Model> = entries.iter().map(|e| &*e.model).collect();
        let (_, unshared) = count_bytes(&models);
        entries
            .iter()
            .zip(unshared)
            .map(|(e, unshared_bytes)| Listing {
                name: e.name.clone(),
                origin: e.origin,
                reports: e.reports.clone(),
                digest: e.digest.clone(),
                calibration: e.calibration.clone(),
                unshared_bytes,
            })
            .collect()
    }

    /// Weight bytes of every served model together, shared tensors counted once.
    pub fn weight_bytes(&self) -> usize {
        let entries = lock(&self.entries);
        let models: Vec<&T5Model> = entries.iter().map(|e| &*e.model).collect();
        count_bytes(&models).0
    }

    /// Merges `adapters` as the variant `name` and serves it; returns once it serves.
    pub async fn load(
        self: &Arc<Self>,
        name: &str,
        adapters: Vec<AdapterRequest>,
        origin: Origin,
    ) -> Result<Listing> {
        if !valid_variant_name(name) {
            return Err(Error::invalid(
                Field::VariantName,
                format!(
                    "`{name}` must be 1-64 characters of letters, digits, `.`, `_`, `-` or `/`"
                ),
            ));
        }
        let specs = self.adapter_specs(&adapters)?;
        let _claim = self.claim(name, true)?;
        if lock(&self.entries).iter().any(|e| e.name == name) {
            return Err(Error::Conflict(format!(
                "a variant named `{name}` is already served"
            )));
        }
        self.make_room(origin).await?;
        let this = self.clone();
        let owned = name.to_string();
        let entry = tokio::task::spawn_blocking(move || this.merge(owned, adapters, specs, origin))
            .await
            .map_err(|e| Error::Inference(format!("the merge task failed: {e}")))??;
        let listing_name = entry.name.clone();
        lock(&self.entries).push(entry);
        tracing::info!(variant = %listing_name, origin = origin.as_str(), "runtime variant serving");
        self.list()
            .into_iter()
            .find(|l| l.name == listing_name)
            .ok_or_else(|| Error::NotFound(format!("variant `{listing_name}` vanished")))
    }

    /// Stops serving the runtime variant `name` and frees it once no request holds it. Only
    /// variants of `origin` may be removed this way (`None`: any runtime variant).
    pub async fn unload(&self, name: &str, origin: Option<Origin>) -> Result<()> {
        let _claim = self.claim(name, false)?;
        {
            let mut entries = lock(&self.entries);
            let at = entries
                .iter()
                .position(|e| e.name == name)
                .ok_or_else(|| Error::NotFound(format!("no variant `{name}` is served")))?;
            let e = &entries[at];
            if e.origin == Origin::Startup {
                return Err(Error::Conflict(format!(
                    "`{name}` was served at start-up (--variant); it stays until the server stops"
                )));
            }
            if origin.is_some_and(|o| o != e.origin) {
                return Err(Error::Conflict(match e.origin {
                    Origin::File => {
                        format!("`{name}` is declared in --variants-file; remove it there")
                    }
                    _ => format!("`{name}` was loaded through the API; remove it there"),
                }));
            }
            // Dropped here so the model is freed as soon as the engine lets go of it.
            entries.remove(at);
        }
        self.engine
            .remove_variant(name, self.config.drain_timeout)
            .await?;
        tracing::info!(variant = %name, "runtime variant removed");
        Ok(())
    }

    /// Brings the variants declared by `text` (one `--variant` value per line) into service and
    /// removes file variants it no longer declares; a changed declaration is merged anew.
    /// Failures are logged and the rest goes on; returns how many changes failed.
    pub async fn reconcile(self: &Arc<Self>, text: &str) -> usize {
        let _one = self.reconciling.lock().await;
        let mut failed = 0;
        let mut wanted = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.parse::<VariantSpec>() {
                Ok(v) => wanted.push((v.name, asked_of(&v.adapters))),
                Err(e) => {
                    tracing::error!(line = i + 1, error = %e, "variants file: line skipped");
                    failed += 1;
                }
            }
        }
        let current: Vec<(String, Vec<AdapterRequest>)> = lock(&self.entries)
            .iter()
            .filter(|e| e.origin == Origin::File)
            .map(|e| (e.name.clone(), e.asked.clone()))
            .collect();
        for (name, asked) in &current {
            if !wanted.iter().any(|(n, a)| n == name && a == asked)
                && let Err(e) = self.unload(name, Some(Origin::File)).await
            {
                tracing::error!(variant = %name, error = %e, "variants file: cannot remove");
                failed += 1;
            }
        }
        for (name, asked) in wanted {
            if current.iter().any(|(n, a)| *n == name && *a == asked) {
                continue;
            }
            if let Err(e) = self.load(&name, asked, Origin::File).await {
                tracing::error!(variant = %name, error = %e, "variants file: cannot serve");
                failed += 1;
            }
        }
        failed
    }

    /// Reconciles with `file` on every change from `last` (checked each `poll`) and on SIGHUP,
    /// until the runtime ends. An unreadable file leaves the variants as they are.
    pub async fn watch(self: Arc<Self>, file: PathBuf, poll: Duration, mut last: Option<String>) {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            if let Some(hup) = hup.as_mut() {
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = hup.recv() => last = None,
                }
            } else {
                tokio::time::sleep(poll).await;
            }
            #[cfg(not(unix))]
            tokio::time::sleep(poll).await;
            match std::fs::read_to_string(&file) {
                Ok(text) if last.as_deref() != Some(text.as_str()) => {
                    let failed = self.reconcile(&text).await;
                    tracing::info!(file = %file.display(), failed, "variants file applied");
                    // A failed change is tried again on the next change or SIGHUP.
                    last = Some(text);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(file = %file.display(), error = %e, "cannot read the variants file; variants kept as they are")
                }
            }
        }
    }

    /// Reserves `name` for one load (`loading`) or unload at a time.
    fn claim(&self, name: &str, loading: bool) -> Result<Claim<'_>> {
        let mut busy = lock(&self.busy);
        if busy.contains_key(name) {
            return Err(Error::Conflict(format!(
                "variant `{name}` is being loaded or removed"
            )));
        }
        busy.insert(name.to_string(), loading);
        Ok(Claim {
            busy: &self.busy,
            name: name.to_string(),
        })
    }

    /// Makes room for one more variant under `--max-variants`: refuses, or evicts the API
    /// variant used least recently.
    async fn make_room(&self, origin: Origin) -> Result<()> {
        let Some(max) = self.config.max_variants else {
            return Ok(());
        };
        loop {
            let (count, victim) = {
                let entries = lock(&self.entries);
                // Other merges under way count too (this one holds a claim of its own).
                let merging = lock(&self.busy).values().filter(|&&l| l).count();
                let count = entries.len() - 1 + merging.saturating_sub(1);
                let served = self.engine.variants();
                let victim = entries
                    .iter()
                    .filter(|e| e.origin == Origin::Api)
                    .filter_map(|e| {
                        let v = served.iter().find(|v| v.name == e.name)?;
                        Some((v.last_used(), e.name.clone()))
                    })
                    .min()
                    .map(|(_, name)| name);
                (count, victim)
            };
            if count < max {
                return Ok(());
            }
            let victim = match (self.config.eviction, victim) {
                (Eviction::Lru, Some(v)) if origin != Origin::Startup => v,
                _ => {
                    return Err(Error::Conflict(format!(
                        "{count} variants are served, the most --max-variants allows ({max}); remove one first"
                    )));
                }
            };
            tracing::info!(variant = %victim, "evicting the variant used least recently (--variant-eviction lru)");
            match self.unload(&victim, Some(Origin::Api)).await {
                Ok(()) => {}
                // Another request is removing it already: look again once it is gone.
                Err(Error::Conflict(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => return Err(e),
            }
        }
    }

    /// Each adapter's source for merging: a directory under the adapter root, or a Hub id.
    fn adapter_specs(&self, adapters: &[AdapterRequest]) -> Result<Vec<AdapterSpec>> {
        if adapters.is_empty() {
            return Err(Error::invalid(
                Field::Adapters,
                "name at least one adapter (the base itself is the default model)",
            ));
        }
        adapters
            .iter()
            .map(|a| {
                if !a.weight.is_finite() {
                    return Err(Error::invalid(
                        Field::Adapters,
                        format!("`{}`: the weight must be a finite number", a.path),
                    ));
                }
                let source = self.adapter_source(&a.path)?;
                Ok(AdapterSpec {
                    source,
                    weight: a.weight,
                })
            })
            .collect()
    }

    fn adapter_source(&self, path: &str) -> Result<String> {
        let refuse = |why: String| Error::invalid(Field::Adapters, format!("`{path}`: {why}"));
        if path.is_empty() {
            return Err(refuse("is empty".into()));
        }
        if let Some(root) = &self.config.adapter_root {
            let root = root
                .canonicalize()
                .map_err(|e| Error::io(root.clone(), e))?;
            let joined = root.join(path);
            if joined.exists() || Path::new(path).is_absolute() || path.starts_with('.') {
                let real = joined
                    .canonicalize()
                    .map_err(|e| refuse(format!("cannot be read ({e})")))?;
                if !real.starts_with(&root) {
                    return Err(refuse("is outside --adapter-root".into()));
                }
                if !real.is_dir() {
                    return Err(refuse("is not a directory".into()));
                }
                return Ok(real.to_string_lossy().into_owned());
            }
        } else if Path::new(path).is_absolute() || path.starts_with('.') {
            return Err(refuse(
                "local adapters are read only from under --adapter-root, which is not set".into(),
            ));
        }
        if self.hub.offline {
            return Err(refuse(
                "is neither under --adapter-root nor allowed as a Hub id (HF_HUB_OFFLINE is set)"
                    .into(),
            ));
        }
        Ok(path.to_string())
    }

    /// Merges and starts serving; runs on a blocking thread.
    fn merge(
        &self,
        name: String,
        asked: Vec<AdapterRequest>,
        specs: Vec<AdapterSpec>,
        origin: Origin,
    ) -> Result<Entry> {
        let started = std::time::Instant::now();
        let (model, mut reports) = lock(&self.base).build(&specs, &self.hub)?;
        // Reports name each adapter as it was asked for, not where it lies on this machine.
        for (r, a) in reports.iter_mut().zip(&asked) {
            r.adapter = a.path.clone();
        }
        let startup = |e: anyhow::Error| Error::invalid(Field::Adapters, format!("{e:#}"));
        let (labels, calibration) = self
            .job
            .labels(&self.tokenizer, None, &specs)
            .map_err(startup)?;
        let target_template =
            crate::served::ModelJob::target_template(None, &specs).map_err(startup)?;
        let digest = self
            .job
            .digest(
                &self.base_files,
                &specs,
                &reports,
                calibration.as_ref().map(|(p, _)| p),
                target_template.as_ref().map(|(p, _)| p),
            )
            .map_err(startup)?;
        self.engine.add_variant(Served {
            name: name.clone(),
            backend: T5Backend::new(model.clone()),
            labels,
            digest: digest.clone(),
            target_template: target_template.map(|(_, t)| t),
        })?;
        tracing::info!(
            variant = %name,
            origin = origin.as_str(),
            seconds = started.elapsed().as_secs_f64(),
            "variant merged"
        );
        Ok(Entry {
            name,
            origin,
            asked,
            model,
            reports,
            digest,
            calibration,
        })
    }
}

/// The adapters of a parsed `--variant` value as a request would name them.
pub fn asked_of(adapters: &[AdapterSpec]) -> Vec<AdapterRequest> {
    adapters
        .iter()
        .map(|a| AdapterRequest {
            path: a.source.clone(),
            weight: a.weight,
        })
        .collect()
}

/// A name reserved in `busy` until dropped.
struct Claim<'a> {
    busy: &'a Mutex<BTreeMap<String, bool>>,
    name: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(self.busy).remove(&self.name);
    }
}

/// Checks that a variants file can be read, at start-up (a missing file is a typo, not an
/// empty set).
pub fn check_file(file: &Path) -> anyhow::Result<()> {
    std::fs::read_to_string(file)
        .map(drop)
        .with_context(|| format!("cannot read --variants-file {}", file.display()))
}
