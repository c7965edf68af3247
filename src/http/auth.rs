//! API keys: several may be valid at once, and the set is re-read from `--api-key-file` (one key
//! per line) when the file changes and on SIGHUP, so keys rotate without a restart: add the new
//! key, move clients over, remove the old one. A Kubernetes Secret mounted as a directory is
//! updated by swapping its `..data` symlink, which a re-read follows; a `subPath` mount never
//! changes, so rotation needs the directory mount.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;

/// An API key, kept only as its SHA-256 digest: comparing digests takes the same time
/// whatever the key's length or where a guess differs, and the key itself never sits in
/// memory that a `Debug` print or a log line could show.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey([u8; 32]);

impl ApiKey {
    pub fn new(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    fn matches(&self, given: &[u8; 32]) -> bool {
        given
            .iter()
            .zip(&self.0)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The keys a client may send: given on the command line, or read from a file and re-read.
#[derive(Debug)]
pub struct ApiKeys {
    keys: RwLock<Vec<ApiKey>>,
    file: Option<PathBuf>,
}

/// The keys of a key file's text: one per line, blank lines and `#` comments skipped.
fn parse(text: &str) -> Vec<ApiKey> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(ApiKey::new)
        .collect()
}

impl ApiKeys {
    /// Fixed keys (`--api-key`, repeated).
    pub fn fixed(keys: &[String]) -> Self {
        Self {
            keys: RwLock::new(keys.iter().map(|k| ApiKey::new(k)).collect()),
            file: None,
        }
    }

    /// The keys of `file`; an unreadable file or one without a key is refused.
    pub fn from_file(file: PathBuf) -> Result<Self, String> {
        let keys = Self::read(&file)?;
        Ok(Self {
            keys: RwLock::new(keys),
            file: Some(file),
        })
    }

    fn read(file: &std::path::Path) -> Result<Vec<ApiKey>, String> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read the API key file {}: {e}", file.display()))?;
        let keys = parse(&text);
        if keys.is_empty() {
            return Err(format!("the API key file {} holds no key", file.display()));
        }
        Ok(keys)
    }

    /// Whether `given` is one of the keys.
    pub fn allows(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        // Every key is compared, so the time taken does not say which one matched.
        keys.iter().fold(false, |hit, k| k.matches(&given) | hit)
    }

    /// Re-reads the key file, if there is one. A file that cannot be read or holds no key
    /// leaves the keys as they were (logged): a botched edit must not open or close the server.
    pub fn reload(&self) {
        let Some(file) = &self.file else { return };
        match Self::read(file) {
            Ok(keys) => {
                let mut current = self.keys.write().unwrap_or_else(|e| e.into_inner());
                if *current != keys {
                    tracing::info!(keys = keys.len(), file = %file.display(), "API keys reloaded");
                    *current = keys;
                }
            }
            Err(e) => tracing::error!(error = %e, "API keys kept as they were"),
        }
    }

    /// Re-reads the key file on SIGHUP and every `poll`, until the runtime ends.
    pub fn watch(self: Arc<Self>, poll: Duration) {
        if self.file.is_none() {
            return;
        }
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(poll);
            loop {
                #[cfg(unix)]
                let hup = async {
                    match hangup.as_mut() {
                        Some(s) => {
                            s.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let hup = std::future::pending::<()>();
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = hup => tracing::info!("SIGHUP: re-reading the API key file"),
                }
                self.reload();
            }
        });
    }
}

/// Refuses requests without one of the keys (`Authorization: Bearer` or `x-api-key`) with 401.
pub(super) async fn authorize(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(keys) = &state.config.api_keys
        && !presented_key(&req).is_some_and(|g| keys.allows(g))
    {
        return super::refuse(req, ApiError::unauthorized(), &state).await;
    }
    next.run(req).await
}

/// The key a request presents: `Authorization: Bearer KEY`, else `x-api-key`.
pub(super) fn presented_key(req: &Request) -> Option<&str> {
    let h = req.headers();
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_key_is_allowed_and_a_reload_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# rotation\nold\n\n  new  \n").unwrap();
        let keys = ApiKeys::from_file(file.clone()).unwrap();
        assert!(keys.allows("old") && keys.allows("new") && !keys.allows("other"));
        std::fs::write(&file, "new\n").unwrap();
        keys.reload();
        assert!(!keys.allows("old") && keys.allows("new"));
        // A file emptied by mistake keeps the keys that were there.
        std::fs::write(&file, "\n").unwrap();
        keys.reload();
        assert!(keys.allows("new"));
        assert!(ApiKeys::from_file(file).is_err());
    }
}
