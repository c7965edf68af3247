//! The decoder state of a whole batch of sequences, kept in preallocated device tensors so that a
//! decode step is one attention call per layer for every sequence, whatever its position.
//!
//! Sequences live in *slots* (rows of every cache tensor). All active slots write their new
//! self-attention K/V at the same cache *column*; a slot that joined at column `first` owns the
//! columns from `first` on and masks everything before. Because every slot writes at the same
//! column, a key at column `c` seen from a query at column `t` is always `c - t` positions back,
//! whatever the slot: the relative-position bias is one tensor per step, shared by all slots.
//! Cross-attention K/V are computed once when a slot is filled and padded to the longest source
//! in the batch, with a source-length mask.
//!
//! A sequence leaves by freeing its slot (nothing else moves); a new one reuses the lowest free
//! slot. When the columns run out, the columns that no active slot can see are dropped and the
//! capacity doubles, so a long-lived batch neither grows without bound nor re-copies per step.

use candle_core::{DType, Device, Tensor};

/// One occupied slot.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// First cache column of this sequence.
    first: usize,
    /// Real (unpadded) source length.
    src_len: usize,
}

/// Shapes of the cache: one `(keys, values)` pair per decoder layer.
#[derive(Debug, Clone, Copy)]
pub struct CacheShape {
    pub layers: usize,
    pub heads: usize,
    pub d_kv: usize,
}

#[derive(Debug)]
struct Tensors {
    /// Per layer, `(rows, heads, capacity, d_kv)`: `rows` the most slots the batch has had
    /// since it started, rounded up to a [`ROW_BLOCK`] once it grew (freed trailing rows keep
    /// their storage until the batch empties).
    self_kv: Vec<(Tensor, Tensor)>,
    /// Per layer, `(rows, heads, src_capacity, d_kv)`.
    cross_kv: Vec<(Tensor, Tensor)>,
    /// `(slots, 1, 1, src_capacity)` (at least): 0 on real source tokens, `f32::MIN` on padding.
    cross_mask: Tensor,
}

/// Decoder state for many sequences at once; see the module docs.
#[derive(Debug)]
pub struct DecodeBatch {
    shape: CacheShape,
    dtype: DType,
    device: Device,
    slots: Vec<Option<Slot>>,
    tensors: Option<Tensors>,
    /// Cache columns written so far (the next step writes at this column).
    columns: usize,
    capacity: usize,
    src_capacity: usize,
}

const MIN_COLUMNS: usize = 16;
/// Cache rows are added this many at a time (at most this many minus one stay unused).
const ROW_BLOCK: usize = 8;

impl DecodeBatch {
    pub fn new(shape: CacheShape, dtype: DType, device: &Device) -> Self {
        Self {
            shape,
            dtype,
            device: device.clone(),
            slots: Vec::new(),
            tensors: None,
            columns: 0,
            capacity: 0,
            src_capacity: 0,
        }
    }

    /// Slots up to the last active one (free ones between included); every decode step runs
    /// over all of them.
    pub fn num_slots(&self) -> usize {
        self.slots.len()
    }

    pub fn is_active(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(Option::is_some)
    }

    pub fn active(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    fn zeros(&self, slots: usize, len: usize) -> candle_core::Result<Tensor> {
        let s = self.shape;
        Tensor::zeros((slots, s.heads, len, s.d_kv), self.dtype, &self.device)
    }

    /// Adds sequences whose cross-attention K/V (per layer, `(n, heads, src, d_kv)`, padded to
    /// a common `src`) and true source lengths are given. Returns their slots.
    pub fn fill(
        &mut self,
        cross_kv: Vec<(Tensor, Tensor)>,
        src_lens: &[usize],
    ) -> candle_core::Result<Vec<usize>> {
        let n = src_lens.len();
        if cross_kv.len() != self.shape.layers {
            candle_core::bail!(
                "cross K/V for {} layers, expected {}",
                cross_kv.len(),
                self.shape.layers
            );
        }
        let src = match cross_kv.first() {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        };
        let slots = if self.tensors.is_none() {
            self.adopt(cross_kv, n)?
        } else {
            self.place(cross_kv, n, src)?
        };
        for (&slot, &src_len) in slots.iter().zip(src_lens) {
            self.slots[slot] = Some(Slot {
                first: self.columns,
                src_len,
            });
        }
        self.rebuild_cross_mask()?;
        Ok(slots)
    }

    /// Starts an empty batch from the first sequences: their cross K/V become the cache as they
    /// are (no copy), in slots `0..n`.
    fn adopt(
        &mut self,
        cross_kv: Vec<(Tensor, Tensor)>,
        n: usize,
    ) -> candle_core::Result<Vec<usize>> {
        let cross_kv = cross_kv
            .into_iter()
            .map(|(k, v)| Ok((k.contiguous()?, v.contiguous()?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.src_capacity = cross_kv.first().map_or(Ok(0), |(k, _)| k.dim(2))?;
        let self_kv = (0..self.shape.layers)
            .map(|_| Ok((self.zeros(n, MIN_COLUMNS)?, self.zeros(n, MIN_COLUMNS)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.tensors = Some(Tensors {
            self_kv,
            cross_kv,
            cross_mask: Tensor::zeros((n, 1, 1, self.src_capacity), DType::F32, &self.device)?,
        });
        self.capacity = MIN_COLUMNS;
        self.slots = vec![None; n];
        Ok((0..n).collect())
    }

    /// Copies new sequences' cross K/V into free slots (then new ones), growing the cache as
    /// needed; a run of consecutive slots is one copy.
    fn place(
        &mut self,
        cross_kv: Vec<(Tensor, Tensor)>,
        n: usize,
        src: usize,
    ) -> candle_core::Result<Vec<usize>> {
        let free: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].is_none())
            .collect();
        let mut next = self.slots.len();
        let slots: Vec<usize> = (0..n)
            .map(|j| {
                free.get(j).copied().unwrap_or_else(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        self.reserve(next, src.max(self.src_capacity), self.capacity)?;
        let (cap, s) = (self.src_capacity, self.shape);
        let consecutive = slots.windows(2).all(|w| w[1] == w[0] + 1);
        let tensors = self
            .tensors
            .as_mut()
            .ok_or_else(|| candle_core::Error::Msg("decode batch has no cache".into()))?;
        for (layer, (k, v)) in cross_kv.into_iter().enumerate() {
            let (k, v) = if src < cap {
                let pad = Tensor::zeros((n, s.heads, cap - src, s.d_kv), self.dtype, &self.device)?;
                (Tensor::cat(&[&k, &pad], 2)?, Tensor::cat(&[&v, &pad], 2)?)
            } else {
                (k.contiguous()?, v.contiguous()?)
            };
            let (ck, cv) = &tensors.cross_kv[layer];
            if consecutive {
                ck.slice_set(&k, 0, slots[0])?;
                cv.slice_set(&v, 0, slots[0])?;
            } else {
                for (j, &slot) in slots.iter().enumerate() {
                    ck.slice_set(&k.narrow(0, j, 1)?, 0, slot)?;
                    cv.slice_set(&v.narrow(0, j, 1)?, 0, slot)?;
                }
            }
        }
        Ok(slots)
    }

    /// Frees a slot. Trailing free rows leave the step (the views [`Self::layer`] hands out end
    /// before them) but keep their storage, so the next sequences move in without a copy. When no
    /// slot is left active the cache is released entirely.
    pub fn free(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = None;
        }
        while self.slots.last().is_some_and(Option::is_none) {
            self.slots.pop();
        }
        if self.slots.is_empty() {
            *self = Self::new(self.shape, self.dtype, &self.device);
        }
    }

    /// Grows the cache to at least `slots` rows, `src` source columns and `columns` self columns.
    fn reserve(&mut self, slots: usize, src: usize, columns: usize) -> candle_core::Result<()> {
        let s = self.shape;
        let t = self
            .tensors
            .as_mut()
            .ok_or_else(|| candle_core::Error::Msg("decode batch has no cache".into()))?;
        // Rows past the active ones hold what earlier sequences left: a new sequence's cross K/V
        // overwrite its row, and its self-attention masks every column before its first.
        let stored = t.cross_kv.first().map_or(Ok(0), |(k, _)| k.dim(0))?;
        // Rows grow a block at a time: sequences that join one by one would otherwise copy the
        // whole cache at every join.
        let rows = if slots > stored {
            slots.next_multiple_of(ROW_BLOCK)
        } else {
            stored
        };
        if rows > stored {
            let grow = |x: &Tensor| -> candle_core::Result<Tensor> {
                let mut dims = x.dims().to_vec();
                dims[0] = rows - stored;
                Tensor::cat(&[x, &Tensor::zeros(dims, x.dtype(), x.device())?], 0)
            };
            for (k, v) in t.self_kv.iter_mut().chain(t.cross_kv.iter_mut()) {
                *k = grow(k)?;
                *v = grow(v)?;
            }
        }
        if slots > self.slots.len() {
            self.slots.resize(slots, None);
        }
        if src > self.src_capacity {
            let extra = src - self.src_capacity;
            for (k, v) in t.cross_kv.iter_mut() {
                let pad = Tensor::zeros((rows, s.heads, extra, s.d_kv), k.dtype(), k.device())?;
                *k = Tensor::cat(&[&*k, &pad], 2)?;
                *v = Tensor::cat(&[&*v, &pad], 2)?;
            }
            self.src_capacity = src;
        }
        if columns > self.capacity {
            // Columns before the earliest active slot's first are seen by no one: drop them.
            let start = self
                .slots
                .iter()
                .flatten()
                .map(|s| s.first)
                .min()
                .unwrap_or(self.columns);
            let used = self.columns - start;
            let capacity = columns.max(2 * used).max(MIN_COLUMNS);
            for (k, v) in t.self_kv.iter_mut() {
                let pad = Tensor::zeros(
                    (rows, s.heads, capacity - used, s.d_kv),
                    k.dtype(),
                    k.device(),
                )?;
                *k = Tensor::cat(&[&k.narrow(2, start, used)?, &pad], 2)?;
                *v = Tensor::cat(&[&v.narrow(2, start, used)?, &pad], 2)?;
            }
            for slot in self.slots.iter_mut().flatten() {
                slot.first -= start;
            }
            self.columns = used;
            self.capacity = capacity;
        }
        Ok(())
    }

    fn rebuild_cross_mask(&mut self) -> candle_core::Result<()> {
        let cap = self.src_capacity;
        let mask: Vec<f32> = self
            .slots
            .iter()
            .flat_map(|s| {
                // A free slot sees every column, so its (ignored) output stays finite.
                let len = s.map_or(cap, |s| s.src_len);
                (0..cap).map(move |c| if c < len { 0.0 } else { f32::MIN })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (self.slots.len(), 1, 1, cap), &self.device)?;
        if let Some(t) = self.tensors.as_mut() {
            t.cross_mask = mask;
        }
        Ok(())
    }

    /// Makes room for `n` more columns and returns the column the step writes at.
    pub fn begin_step(&mut self, n: usize) -> candle_core::Result<usize> {
        if self.columns + n > self.capacity {
            self.reserve(self.slots.len(), self.src_capacity, self.columns + n)?;
        }
        Ok(self.columns)
    }

    /// Ends a step that wrote `n` columns.
    pub fn end_step(&mut self, n: usize) {
        self.columns += n;
    }

    /// The self-attention mask of a step writing `n` columns at `start`, `(slots, 1, n, start + n)`:
    /// `f32::MIN` where a query must not look (the future, or before its slot's first column).
    pub fn self_mask(&self, start: usize, n: usize) -> candle_core::Result<Tensor> {
        let width = start + n;
        let mask: Vec<f32> = self
            .slots
            .iter()
            .flat_map(|s| {
                let first = s.map_or(0, |s| s.first);
                (0..n).flat_map(move |q| {
                    (0..width).map(move |c| {
                        if c > start + q || c < first {
                            f32::MIN
                        } else {
                            0.0
                        }
                    })
                })
            })
            .collect();
        Tensor::from_vec(mask, (self.slots.len(), 1, n, width), &self.device)
    }

    /// Layer `layer`'s caches: self K/V (whole capacity), cross K/V and the cross mask.
    pub fn layer(&self, layer: usize) -> candle_core::Result<LayerCache> {
        let t = self
            .tensors
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("decode batch is empty".into()))?;
        let rows = self.slots.len();
        let view = |(k, v): &(Tensor, Tensor)| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((k.narrow(0, 0, rows)?, v.narrow(0, 0, rows)?))
        };
        Ok(LayerCache {
            self_kv: view(&t.self_kv[layer])?,
            cross_kv: view(&t.cross_kv[layer])?,
            cross_mask: t.cross_mask.narrow(0, 0, rows)?,
        })
    }

    /// Each slot's first cache column; `None` for a free slot.
    pub fn first_columns(&self) -> Vec<Option<usize>> {
        self.slots.iter().map(|s| s.map(|s| s.first)).collect()
    }

    /// Each slot's real source length; 0 for a free slot.
    pub fn source_lengths(&self) -> Vec<usize> {
        self.slots
            .iter()
            .map(|s| s.map_or(0, |s| s.src_len))
            .collect()
    }
}

/// One layer's view of the batch caches.
pub struct LayerCache {
    /// Views of the step's rows (slots up to the last active one): a prefix along dim 0,
    /// contiguous, so written in place.
    pub self_kv: (Tensor, Tensor),
    pub cross_kv: (Tensor, Tensor),
    pub cross_mask: Tensor,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_joining_one_at_a_time_grow_the_cache_a_block_of_rows_at_a_time() {
        let shape = CacheShape {
            layers: 1,
            heads: 2,
            d_kv: 4,
        };
        let mut batch = DecodeBatch::new(shape, DType::F32, &Device::Cpu);
        let cross_kv = || {
            let t = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
            vec![(t.clone(), t)]
        };
        let stored = |b: &DecodeBatch| b.tensors.as_ref().unwrap().self_kv[0].0.dim(0).unwrap();
        assert_eq!(batch.fill(cross_kv(), &[3]).unwrap(), [0]);
        assert_eq!(stored(&batch), 1);
        for slot in 1..ROW_BLOCK {
            assert_eq!(batch.fill(cross_kv(), &[3]).unwrap(), [slot]);
            assert_eq!(stored(&batch), ROW_BLOCK);
        }
        assert_eq!(batch.fill(cross_kv(), &[3]).unwrap(), [ROW_BLOCK]);
        assert_eq!(stored(&batch), 2 * ROW_BLOCK);
        assert_eq!(batch.num_slots(), ROW_BLOCK + 1);
        let cache = batch.layer(0).unwrap();
        assert_eq!(cache.cross_kv.0.dim(0).unwrap(), ROW_BLOCK + 1);
        assert_eq!(cache.cross_mask.dim(0).unwrap(), ROW_BLOCK + 1);
    }
}
