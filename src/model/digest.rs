//! SHA-256 digests of the files a served model is made of, and one digest over all that decides
//! its outputs, so that a score can be tied to the exact model that produced it.
//!
//! A served model's digest is the SHA-256 of this text, one line each, in this order:
//! `finserve-model-digest/1`; `file NAME SHA256` for the base's `config.json`, `tokenizer.json`,
//! shard index (if sharded) and weight files (in load order); `dtype D` and `quantize Q`; then per merged adapter, in
//! merge order, `adapter WEIGHT` and `file NAME SHA256` for its `adapter_config.json` and weight
//! file; then `labels JSON`, `template JSON` and `calibration SHA256` (or `calibration none`).
//! Paths never enter it: the same files give the same digest wherever they lie.

use std::io::Read;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One file and the SHA-256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FileDigest {
    /// The file's name (not its path).
    pub name: String,
    /// Lower-case hex.
    pub sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of the file at `path`, read in 1 MiB pieces.
pub fn file(path: &Path) -> Result<FileDigest> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok(FileDigest {
        name,
        sha256: hex(&hasher.finalize()),
    })
}

/// The digests of `paths`, in their order, hashed in parallel.
pub fn files(paths: &[std::path::PathBuf]) -> Result<Vec<FileDigest>> {
    paths.par_iter().map(|p| file(p)).collect()
}

/// The `file NAME SHA256` lines of `files`.
pub fn file_lines(files: &[FileDigest]) -> impl Iterator<Item = String> + '_ {
    files
        .iter()
        .map(|f| format!("file {} {}", f.name, f.sha256))
}

/// `sha256:HEX` of the digest text made of `lines` (see the module documentation).
pub fn combine(lines: impl IntoIterator<Item = String>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"finserve-model-digest/1\n");
    for line in lines {
        hasher.update(line.as_bytes());
        hasher.update(b"\n");
    }
    format!("sha256:{}", hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_digest_is_its_sha256_and_one_byte_changes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc.bin");
        std::fs::write(&path, b"abc").unwrap();
        let d = file(&path).unwrap();
        // FIPS 180-2's example.
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.name, "abc.bin");
        let whole = combine(file_lines(&[d]));
        std::fs::write(&path, b"abd").unwrap();
        assert_ne!(whole, combine(file_lines(&[file(&path).unwrap()])));
        assert!(whole.starts_with("sha256:") && whole.len() == 7 + 64);
    }
}
