//! Checkpoint tensors by name, and their loading from safetensors (single or sharded) or a
//! PyTorch `pytorch_model.bin`.
//!
//! The model takes each tensor it needs out of a [`Weights`] (checking its shape), so whatever is
//! left afterwards was not used; the LoRA merge rewrites entries in place before that.
//!
//! [`Weights::open`] reads a safetensors tensor only when it is taken: a server that rounds its
//! layers to int8 builds them one at a time and never holds the whole f32 checkpoint, and a base
//! kept to merge variants from at runtime holds no memory for tensors no variant changes.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use candle_core::{DType, Device, Tensor, WithDType};

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

/// Where each tensor of one safetensors file lies, from its header.
fn stored_tensors(path: &Path) -> Result<Vec<(String, Stored)>> {
    let err = |e: &dyn std::fmt::Display| Error::weights(path.display(), e);
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let stamp = (meta.len(), meta.modified().ok());
    // SAFETY: read-only map, used only to parse the header (the library checks every tensor's
    // extent against the file's length) and dropped before this returns.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| err(&e))?;
    let data_start = 8 + header as u64;
    metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let dtype =
                DType::try_from(info.dtype).map_err(|e| err(&format!("tensor `{name}`: {e}")))?;
            Ok((
                name,
                Stored {
                    path: path.to_path_buf(),
                    offset: data_start + info.data_offsets.0 as u64,
                    dtype,
                    shape: info.shape.clone(),
                    stamp,
                },
            ))
        })
        .collect()
}

/// Where one safetensors tensor lies in its file, to read it when it is taken.
#[derive(Debug)]
struct Stored {
    path: PathBuf,
    offset: u64,
    dtype: DType,
    shape: Vec<usize>,
    /// The file's length and modification time when its header was read: a file replaced since
    /// then is refused rather than mixed with what was read before.
    stamp: (u64, Option<SystemTime>),
}

impl Stored {
    fn read(&self) -> Result<Tensor> {
        let file = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(&self.path, e))?;
        if (meta.len(), meta.modified().ok()) != self.stamp {
            return Err(Error::weights(
                self.path.display(),
                "the file changed since it was first read; restart to serve the new checkpoint",
            ));
        }
        let mut file = file;
        file.seek(std::io::SeekFrom::Start(self.offset))
            .map_err(|e| Error::io(&self.path, e))?;
        let read = match self.dtype {
            DType::F32 => read_values::<f32>(&mut file, &self.shape),
            DType::BF16 => read_values::<half::bf16>(&mut file, &self.shape),
            DType::F16 => read_values::<half::f16>(&mut file, &self.shape),
            DType::F64 => read_values::<f64>(&mut file, &self.shape),
            other => read_values::<u8>(
                &mut file,
                &[self.shape.iter().product::<usize>() * other.size_in_bytes()],
            )
            .and_then(|bytes| {
                let bytes = bytes.to_vec1::<u8>()?;
                Tensor::from_raw_buffer(&bytes, other, &self.shape, &Device::Cpu)
            }),
        };
        read.map_err(|e| {
            Error::weights(
                self.path.display(),
                format!("reading a tensor at byte {}: {e}", self.offset),
            )
        })
    }
}

/// Little-endian values of `T` for `shape`, read straight into the tensor's own buffer (no
/// second copy of a tensor as large as `lm_head`).
fn read_values<T: WithDType>(file: &mut impl Read, shape: &[usize]) -> candle_core::Result<Tensor> {
    const {
        assert!(
            cfg!(target_endian = "little"),
            "safetensors stores little-endian values"
        )
    };
    let mut values = vec![T::zero(); shape.iter().product()];
    // SAFETY: the bytes of a slice of plain numbers, for which every bit pattern is valid.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            values.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(values.as_slice()),
        )
    };
    file.read_exact(bytes)?;
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// A tensor in memory, or still in its file.
#[derive(Debug, Clone)]
enum Entry {
    Loaded(Tensor),
    Stored(Arc<Stored>),
}

/// Named tensors, all on one device in one dtype, handed out once each. A clone shares every
/// tensor with the original (candle tensors are reference-counted), so each merged variant of
/// a base starts from a clone and replaces only what its adapters change.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Entry>,
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
            tensors.insert(name, Entry::Loaded(t.to_dtype(dtype)?.to_device(device)?));
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

    /// Opens a checkpoint whose safetensors tensors are read (and converted to `dtype` on
    /// `device`) only when taken; a `pytorch_model.bin` is read whole, as [`Weights::load`] does.
    pub fn open(files: &WeightFiles, dtype: DType, device: &Device) -> Result<Self> {
        let WeightFiles::Safetensors(paths) = files else {
            return Self::load(files, dtype, device);
        };
        let mut tensors = HashMap::new();
        for path in paths {
            for (name, stored) in stored_tensors(path)? {
                tensors.insert(name, Entry::Stored(Arc::new(stored)));
            }
        }
        Ok(Self {
            tensors,
            modified: HashSet::new(),
            source: paths
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
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
            tensors: tensors
                .into_iter()
                .map(|(name, t)| (name, Entry::Loaded(t)))
                .collect(),
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

    /// `name`'s tensor, read from its file if it is still there.
    pub fn get(&self, name: &str) -> Result<Option<Tensor>> {
        self.tensors
            .get(name)
            .map(|entry| self.tensor(entry))
            .transpose()
    }

    /// `name`'s shape, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|entry| match entry {
            Entry::Loaded(t) => t.dims(),
            Entry::Stored(s) => s.shape.as_slice(),
        })
    }

    fn tensor(&self, entry: &Entry) -> Result<Tensor> {
        match entry {
            Entry::Loaded(t) => Ok(t.clone()),
            Entry::Stored(s) => Ok(s.read()?.to_dtype(self.dtype)?.to_device(&self.device)?),
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn replace(&mut self, name: &str, tensor: Tensor) {
        self.tensors.insert(name.to_string(), Entry::Loaded(tensor));
        self.modified.insert(name.to_string());
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
        match self.shape(name) {
            None => return Ok(None),
            Some(dims) if dims != shape => {
                return Err(Error::weights(
                    &self.source,
                    format!("tensor `{name}` has shape {dims:?}, the config implies {shape:?}"),
                ));
            }
            Some(_) => {}
        }
        let entry = self.tensors.remove(name);
        entry.map(|entry| self.tensor(&entry)).transpose()
    }

    pub fn discard(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    /// Every tensor, read from its file where it is still there.
    pub fn into_tensors(self) -> Result<HashMap<String, Tensor>> {
        self.tensors
            .iter()
            .map(|(name, entry)| Ok((name.clone(), self.tensor(entry)?)))
            .collect()
    }

    /// Names not taken by the model, sorted.
    pub fn leftover(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}
