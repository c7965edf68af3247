//! Checkpoint tensors by name, and their loading from safetensors (memory-mapped, single or
//! sharded) or a PyTorch `pytorch_model.bin`.
//!
//! The model takes each tensor it needs out of a [`Weights`] (checking its shape), so whatever is
//! left afterwards was not used; the LoRA merge rewrites entries in place before that.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where a checkpoint's tensors are stored.
#[derive(Debug, Clone)]
pub enum WeightFiles {
    /// One or more safetensors files (several when sharded through an index).
    Safetensors(Vec<PathBuf>),
    /// A PyTorch pickle, the fallback for checkpoints without safetensors.
    Pytorch(PathBuf),
}

impl WeightFiles {
    /// Finds the weights of a checkpoint directory, preferring safetensors like transformers does.
    pub fn discover(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(Self::Safetensors(vec![single]));
        }
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Ok(Self::Safetensors(shards_of(&index)?));
        }
        let bin = dir.join("pytorch_model.bin");
        if bin.is_file() {
            return Ok(Self::Pytorch(bin));
        }
        Err(Error::weights(
            dir.display(),
            "no model.safetensors, model.safetensors.index.json or pytorch_model.bin found",
        ))
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            Self::Safetensors(p) => p.clone(),
            Self::Pytorch(p) => vec![p.clone()],
        }
    }
}

/// The distinct shard files named by a `*.safetensors.index.json`, in first-seen order.
pub fn shards_of(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index =
        serde_json::from_str(&text).map_err(|e| Error::weights(index.display(), e))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<&String> = parsed.weight_map.values().collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            let p = dir.join(f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::weights(
                    index.display(),
                    format!("shard `{f}` listed in the index is missing"),
                ))
            }
        })
        .collect()
}

/// Calls `f` with every tensor of `files`, read onto the CPU in its stored dtype, one at a time.
pub fn for_each_tensor(
    files: &WeightFiles,
    mut f: impl FnMut(String, Tensor) -> Result<()>,
) -> Result<()> {
    match files {
        WeightFiles::Safetensors(paths) => {
            for path in paths {
                read_safetensors(path, &mut f)?;
            }
        }
        WeightFiles::Pytorch(path) => {
            for (name, t) in candle_core::pickle::read_all(path)
                .map_err(|e| Error::weights(path.display(), e))?
            {
                f(name, t)?;
            }
        }
    }
    Ok(())
}

/// Reads one memory-mapped safetensors file tensor by tensor. Each tensor's pages are released
/// from the mapping once copied, so the process holds about one copy of the weights, not two.
fn read_safetensors(path: &Path, f: &mut impl FnMut(String, Tensor) -> Result<()>) -> Result<()> {
    use candle_core::safetensors::Load;
    let err = |e: &dyn std::fmt::Display| Error::weights(path.display(), e);
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives until every tensor has been copied out of it.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| err(&e))?;
    let mut names = st.names();
    names.sort();
    for name in names {
        let view = st.tensor(name).map_err(|e| err(&e))?;
        let tensor = view
            .load(&Device::Cpu)
            .map_err(|e| Error::weights(path.display(), format!("tensor `{name}`: {e}")))?;
        #[cfg(unix)]
        // SAFETY: read-only file mapping; these bytes are not read again, and a later read would
        // fault them back in from the file.
        unsafe {
            let offset = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
            let _ = mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                offset,
                view.data().len(),
            );
        }
        f(name.to_string(), tensor)?;
    }
    Ok(())
}

/// Named tensors, all on one device in one dtype, handed out once each. A clone shares every
/// tensor with the original (candle tensors are reference-counted), so each merged variant of
/// a base starts from a clone and replaces only what its adapters change.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Names whose tensor [`Weights::replace`] changed since loading.
    modified: HashSet<String>,
    source: String,
    device: Device,
    dtype: DType,
}

impl Weights {
    /// Loads a checkpoint, converting each tensor to `dtype` on `device` as it is read so that
    /// only one copy of the weights is alive at a time.
    pub fn load(files: &WeightFiles, dtype: DType, device: &Device) -> Result<Self> {
        let source = files
            .paths()
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut tensors = HashMap::new();
        for_each_tensor(files, |name, t| {
            tensors.insert(name, t.to_dtype(dtype)?.to_device(device)?);
            Ok(())
        })?;
        Ok(Self {
            tensors,
            modified: HashSet::new(),
            source,
            device: device.clone(),
            dtype,
        })
    }

    /// Wraps tensors already in memory (tests, benchmarks, synthetic models).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        source: &str,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            tensors,
            modified: HashSet::new(),
            source: source.to_string(),
            device: device.clone(),
            dtype,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn replace(&mut self, name: &str, tensor: Tensor) {
        self.tensors.insert(name.to_string(), tensor);
        self.modified.insert(name.to_string());
    }

    /// Holds `name`'s values in `tensor` instead (another allocation of the same values, e.g. a
    /// view into a layer built from it): not a modification.
    pub fn share(&mut self, name: &str, tensor: Tensor) {
        self.tensors.insert(name.to_string(), tensor);
    }

    /// Whether `name` was replaced (by a LoRA merge) since the checkpoint was read.
    pub fn is_modified(&self, name: &str) -> bool {
        self.modified.contains(name)
    }

    /// Removes and returns `name`, which must exist with exactly `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.take_optional(name, shape)?
            .ok_or_else(|| Error::weights(&self.source, format!("missing tensor `{name}`")))
    }

    /// Like [`Weights::take`], for tensors a checkpoint may leave out.
    pub fn take_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(t) = self.tensors.remove(name) else {
            return Ok(None);
        };
        if t.dims() != shape {
            return Err(Error::weights(
                &self.source,
                format!(
                    "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(Some(t))
    }

    pub fn discard(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors
    }

    /// Names not taken by the model, sorted.
    pub fn leftover(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}
