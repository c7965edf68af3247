//! Turns a `--model` / `--adapter` argument into a local directory: either the directory itself,
//! or a Hugging Face Hub repository resolved through the `hf-hub` crate and its cache layout
//! (`models--org--name/snapshots/<commit>/`).
//!
//! The environment follows `huggingface_hub`: `HF_HUB_CACHE` (else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), `HF_ENDPOINT`, `HF_TOKEN` (else the token file in the cache), and
//! `HF_HUB_OFFLINE=1`, which resolves from the cache alone and never touches the network.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// Which files a repository must provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Adapter,
}

/// Files fetched when present; the weights are chosen separately.
const MODEL_METADATA: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "spiece.model",
];
const ADAPTER_METADATA: &[&str] = &["adapter_config.json"];

/// How to reach the Hub, normally read from the environment.
#[derive(Clone)]
pub struct HubConfig {
    pub cache_dir: PathBuf,
    pub endpoint: Option<String>,
    pub token: Option<String>,
    pub offline: bool,
}

impl std::fmt::Debug for HubConfig {
    /// Everything but the token, so a debug print never leaks it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .finish()
    }
}

impl HubConfig {
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// `from_env` with the environment passed in, so it can be tested without touching the process.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let cache_dir = get("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| get("HF_HOME").map(|h| Path::new(&h).join("hub")))
            .unwrap_or_else(|| Cache::default().path().clone());
        let token = get("HF_TOKEN").or_else(|| Cache::new(cache_dir.clone()).token());
        let offline = get("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        Self {
            cache_dir,
            endpoint: get("HF_ENDPOINT"),
            token,
            offline,
        }
    }

    /// A local directory is used as is; anything else is a Hub repository id.
    pub fn resolve(&self, id: &str, revision: Option<&str>, kind: RepoKind) -> Result<PathBuf> {
        let local = Path::new(id);
        if local.is_dir() {
            return Ok(local.to_path_buf());
        }
        let hub_error = |message: String| Error::Hub {
            model: id.to_string(),
            message,
        };
        if id.is_empty() || id.starts_with('/') || id.starts_with('.') || id.split('/').count() > 2
        {
            return Err(hub_error("no such local directory".into()));
        }
        let revision = revision.unwrap_or("main");
        if self.offline {
            self.resolve_cached(id, revision, kind)
                .map_err(|m| hub_error(format!("HF_HUB_OFFLINE is set and {m}")))
        } else {
            self.download(id, revision, kind).map_err(hub_error)
        }
    }

    /// The snapshot directory of `id` at `revision` (a branch/tag name in `refs/`, or a commit).
    fn resolve_cached(
        &self,
        id: &str,
        revision: &str,
        kind: RepoKind,
    ) -> std::result::Result<PathBuf, String> {
        let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
        let root = self.cache_dir.join(repo.folder_name());
        let commit = std::fs::read_to_string(root.join("refs").join(revision))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| revision.to_string());
        let snapshot = root.join("snapshots").join(&commit);
        let required = match kind {
            RepoKind::Model => "config.json",
            RepoKind::Adapter => "adapter_config.json",
        };
        if snapshot.join(required).is_file() {
            Ok(snapshot)
        } else {
            Err(format!(
                "revision `{revision}` is not in the cache (looked for {})",
                snapshot.join(required).display()
            ))
        }
    }

    fn download(
        &self,
        id: &str,
        revision: &str,
        kind: RepoKind,
    ) -> std::result::Result<PathBuf, String> {
        let mut builder = ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_token(self.token.clone())
            .with_progress(false);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder.build().map_err(|e| e.to_string())?;
        let repo = api.repo(Repo::with_revision(
            id.to_string(),
            RepoType::Model,
            revision.to_string(),
        ));
        let listed: Vec<String> = repo
            .info()
            .map_err(|e| format!("listing the repository failed: {e}"))?
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .collect();
        let has = |f: &str| listed.iter().any(|l| l == f);
        let (metadata, weights): (&[&str], &[&str]) = match kind {
            RepoKind::Model => (
                MODEL_METADATA,
                &[
                    "model.safetensors",
                    "model.safetensors.index.json",
                    "pytorch_model.bin",
                ],
            ),
            RepoKind::Adapter => (
                ADAPTER_METADATA,
                &["adapter_model.safetensors", "adapter_model.bin"],
            ),
        };
        let fetch = |f: &str| {
            repo.get(f)
                .map_err(|e| format!("downloading {f} failed: {e}"))
        };
        let mut dir = None;
        for f in metadata.iter().filter(|f| has(f)) {
            dir = fetch(f)?.parent().map(Path::to_path_buf);
        }
        let weight = weights
            .iter()
            .find(|f| has(f))
            .ok_or_else(|| format!("the repository has none of {weights:?}"))?;
        let path = fetch(weight)?;
        if weight.ends_with(".index.json") {
            for shard in shard_names(&path)? {
                fetch(&shard)?;
            }
        }
        dir.ok_or_else(|| format!("the repository has none of {metadata:?}"))
    }
}

fn shard_names(index: &Path) -> std::result::Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = v["weight_map"]
        .as_object()
        .ok_or("index has no weight_map")?
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> HubConfig {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn environment_is_read_like_huggingface_hub() {
        let c = config(&[
            ("HF_HOME", "/h"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_TOKEN", "t"),
        ]);
        assert_eq!(c.cache_dir, PathBuf::from("/h/hub"));
        assert!(c.offline);
        assert_eq!(c.token.as_deref(), Some("t"));
        let c = config(&[
            ("HF_HOME", "/h"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_ENDPOINT", "http://e"),
        ]);
        assert_eq!(c.cache_dir, PathBuf::from("/c"));
        assert!(!c.offline);
        assert_eq!(c.endpoint.as_deref(), Some("http://e"));
    }

    #[test]
    fn offline_resolves_refs_and_commits_from_the_cache_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--bigscience--mt0-tiny");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let hub = HubConfig {
            cache_dir: tmp.path().to_path_buf(),
            endpoint: None,
            token: None,
            offline: true,
        };
        let model = RepoKind::Model;
        assert_eq!(
            hub.resolve("bigscience/mt0-tiny", None, model).unwrap(),
            snap
        );
        assert_eq!(
            hub.resolve("bigscience/mt0-tiny", Some("abc123"), model)
                .unwrap(),
            snap
        );
        let err = hub
            .resolve("bigscience/mt0-tiny", Some("v2"), model)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("v2"),
            "{err}"
        );
        let err = hub
            .resolve("bigscience/mt0-tiny", None, RepoKind::Adapter)
            .unwrap_err();
        assert!(err.to_string().contains("adapter_config.json"), "{err}");
    }
}
