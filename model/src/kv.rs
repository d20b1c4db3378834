//! The paged KV cache: a fixed pool of blocks, each holding the keys and values of
//! `block_size` consecutive tokens of one sequence, for every layer.
//!
//! [`BlockAllocator`] is the bookkeeping (free list, reference counts) and is pure: the
//! scheduler uses it to decide what fits. [`KvCache`] is the storage, owned by the
//! inference thread. Layout per layer: keys `[block][kv_head][head_dim][slot]` (one pass
//! over a block scores all its slots), values `[block][kv_head][slot][head_dim]`, both
//! f16.

use std::collections::{BTreeMap, HashMap};

use half::f16;
use half::slice::HalfFloatSliceExt;
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// Tokens per KV block.
pub const BLOCK_SIZE: usize = 16;

/// Identity of a full block's contents: a SHA-256 over every token from the start of the
/// sequence to the block's end (so equal keys mean equal keys and values in the block).
/// A cryptographic hash, because a collision would hand one client's cached prompt to
/// another.
pub type BlockHash = [u8; 32];

/// Free list, reference counts and prefix cache of the block pool.
///
/// A block is in use (referenced by sequences), cached (no references, but its contents
/// are registered under a [`BlockHash`] and can be picked up by a later sequence with the
/// same prefix), or free. Allocation takes free blocks first, then evicts the least
/// recently released cached block.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    refs: Vec<u32>,
    /// Registered contents of each block, if any.
    hash: Vec<Option<BlockHash>>,
    by_hash: HashMap<BlockHash, u32>,
    /// Cached blocks with no references, by release time (oldest first).
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            // Reversed so that blocks are handed out in ascending order.
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            by_hash: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            clock: 0,
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that can be allocated now (free or evictable).
    pub fn free_count(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by sequences.
    pub fn used(&self) -> usize {
        self.total() - self.free_count()
    }

    /// Blocks holding reusable contents that no sequence references.
    pub fn cached(&self) -> usize {
        self.evictable.len()
    }

    /// Sequences referencing block `id`.
    pub fn refs(&self, id: u32) -> u32 {
        self.refs.get(id as usize).copied().unwrap_or(0)
    }

    /// Each block's state in pool order, one character each: `u` in use by one
    /// sequence, `s` shared by several, `c` cached (reusable, no references), `f` free.
    pub fn map(&self) -> String {
        (0..self.total())
            .map(|i| match (self.refs[i], self.hash[i].is_some()) {
                (0, true) => 'c',
                (0, false) => 'f',
                (1, _) => 'u',
                _ => 's',
            })
            .collect()
    }

    pub fn allocate(&mut self) -> Option<u32> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.evictable.pop_first()?;
                if let Some(h) = self.hash[id as usize].take() {
                    self.by_hash.remove(&h);
                }
                id
            }
        };
        self.refs[id as usize] = 1;
        Some(id)
    }

    /// Drops one reference; at zero the block becomes evictable if its contents are
    /// registered, free otherwise.
    pub fn release(&mut self, id: u32) {
        let i = id as usize;
        let r = &mut self.refs[i];
        debug_assert!(*r > 0, "block {id} released more often than held");
        *r = r.saturating_sub(1);
        if *r == 0 {
            if self.hash[i].is_some() {
                self.clock += 1;
                self.released_at[i] = self.clock;
                self.evictable.insert(self.clock, id);
            } else {
                self.free.push(id);
            }
        }
    }

    /// Takes one more reference to a block in use (a forked sequence sharing it).
    pub fn share(&mut self, id: u32) {
        debug_assert!(self.refs[id as usize] > 0, "block {id} shared while free");
        self.refs[id as usize] += 1;
    }

    pub fn release_all(&mut self, ids: &[u32]) {
        for &id in ids {
            self.release(id);
        }
    }

    /// Records that block `id` (held, full, computed) holds the contents `hash`. If
    /// another block already holds them, nothing changes.
    pub fn register(&mut self, id: u32, hash: BlockHash) {
        let i = id as usize;
        if self.hash[i].is_none() && !self.by_hash.contains_key(&hash) {
            self.hash[i] = Some(hash);
            self.by_hash.insert(hash, id);
        }
    }

    /// Whether a block holds `hash` (without taking it).
    pub fn holds(&self, hash: &BlockHash) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// Takes a reference to the block holding `hash`, if one does.
    pub fn lookup(&mut self, hash: &BlockHash) -> Option<u32> {
        let id = *self.by_hash.get(hash)?;
        let i = id as usize;
        if self.refs[i] == 0 {
            self.evictable.remove(&self.released_at[i]);
        }
        self.refs[i] += 1;
        Some(id)
    }
}

/// The hash of a full block of `tokens`, chained on the hash of the blocks before it.
pub fn block_hash(prev: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    if let Some(p) = prev {
        h.update(p);
    }
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

/// Number of blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_SIZE)
}

/// Shape of the per-layer KV storage.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Values of K (or V) in one block of one layer.
    pub fn block_len(&self) -> usize {
        self.kv_heads * BLOCK_SIZE * self.head_dim
    }

    /// Bytes one block costs across all layers, keys and values.
    pub fn block_bytes(&self) -> usize {
        2 * self.layers * self.block_len() * std::mem::size_of::<f16>()
    }

    /// How many blocks a budget of `bytes` holds.
    pub fn blocks_in(&self, bytes: usize) -> usize {
        bytes / self.block_bytes()
    }
}

/// One layer's keys and values, stored as f16: half the memory and half the traffic of
/// f32, which long-context decode is bound by; attention computes in f32.
pub struct LayerKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
}

pub struct KvCache {
    shape: KvShape,
    num_blocks: usize,
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// Pages are touched only when written, so resident memory grows with use.
    pub fn new(shape: KvShape, num_blocks: usize) -> Result<Self> {
        if num_blocks == 0 {
            return Err(ModelError::Kv("the KV budget holds no block".into()));
        }
        let len = num_blocks * shape.block_len();
        let layers = (0..shape.layers)
            .map(|_| LayerKv {
                k: vec![f16::ZERO; len],
                v: vec![f16::ZERO; len],
            })
            .collect();
        Ok(Self {
            shape,
            num_blocks,
            layers,
        })
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }

    /// Copies every layer's keys and values of block `src` into block `dst`.
    pub fn copy_block(&mut self, src: u32, dst: u32) {
        let len = self.shape.block_len();
        let (src, dst) = (src as usize * len, dst as usize * len);
        for l in &mut self.layers {
            l.k.copy_within(src..src + len, dst);
            l.v.copy_within(src..src + len, dst);
        }
    }

    /// Stores one token's keys and values (`[kv_heads * head_dim]` each) at `pos` of a
    /// sequence whose blocks are `blocks`.
    pub fn write(&mut self, layer: usize, blocks: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let s = self.shape;
        let block = blocks[pos / BLOCK_SIZE] as usize;
        let slot = pos % BLOCK_SIZE;
        let l = &mut self.layers[layer];
        for h in 0..s.kv_heads {
            let src = h * s.head_dim..(h + 1) * s.head_dim;
            // Keys `[head_dim][slot]` (attention scores a whole block per pass), values
            // `[slot][head_dim]` (weighted sums run along the head dimension).
            let base = offset(s, block, h, 0);
            for (d, &x) in k[src.clone()].iter().enumerate() {
                l.k[base + d * BLOCK_SIZE + slot] = f16::from_f32(x);
            }
            let at = offset(s, block, h, slot);
            l.v[at..at + s.head_dim].convert_from_f32_slice(&v[src]);
        }
    }
}

/// Index of `[block][head][slot][0]` in one layer's value storage; with `slot = 0`, also
/// where the block's keys for `head` start.
#[inline]
pub fn offset(s: KvShape, block: usize, head: usize, slot: usize) -> usize {
    ((block * s.kv_heads + head) * BLOCK_SIZE + slot) * s.head_dim
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_hands_out_and_takes_back() {
        let mut a = BlockAllocator::new(3);
        let x = a.allocate().unwrap();
        let y = a.allocate().unwrap();
        let z = a.allocate().unwrap();
        assert_eq!((x, y, z), (0, 1, 2));
        assert_eq!(a.allocate(), None);
        a.release_all(&[x, z]);
        assert_eq!(a.free_count(), 2);
        assert_eq!(a.used(), 1);
    }

    #[test]
    fn cached_blocks_are_reused_then_evicted_oldest_first() {
        let mut a = BlockAllocator::new(3);
        let (x, y) = (a.allocate().unwrap(), a.allocate().unwrap());
        let hx = block_hash(None, &[1; BLOCK_SIZE]);
        let hy = block_hash(Some(&hx), &[2; BLOCK_SIZE]);
        a.register(x, hx);
        a.register(y, hy);
        a.release_all(&[x, y]);
        assert_eq!((a.cached(), a.free_count(), a.used()), (2, 3, 0));
        // A new sequence with the same first block picks x up again.
        assert_eq!(a.lookup(&hx), Some(x));
        assert_eq!((a.cached(), a.used()), (1, 1));
        // The free block goes first, then the oldest cached one (y), whose hash is gone.
        assert_eq!(a.allocate(), Some(2));
        assert_eq!(a.allocate(), Some(y));
        assert_eq!(a.lookup(&hy), None);
        assert_eq!(a.allocate(), None);
        // x is still shared: a second reference, two releases.
        assert_eq!(a.lookup(&hx), Some(x));
        a.release(x);
        assert_eq!(a.cached(), 0);
        a.release(x);
        assert_eq!(a.cached(), 1);
    }

    #[test]
    fn block_hash_depends_on_the_whole_prefix() {
        let a = block_hash(None, &[1, 2, 3]);
        assert_ne!(block_hash(Some(&a), &[4]), block_hash(None, &[4]));
        assert_ne!(block_hash(None, &[1, 2, 3]), block_hash(None, &[1, 2, 4]));
        assert_eq!(block_hash(Some(&a), &[4]), block_hash(Some(&a), &[4]));
    }

    #[test]
    fn blocks_for_rounds_up() {
        assert_eq!(blocks_for(0), 0);
        assert_eq!(blocks_for(1), 1);
        assert_eq!(blocks_for(BLOCK_SIZE), 1);
        assert_eq!(blocks_for(BLOCK_SIZE + 1), 2);
    }
}
