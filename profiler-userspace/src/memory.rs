//! Memory profiling in userspace: what an allocation sample stands for, and
//! which sampled allocations are still in use at the end of a period.
//!
//! The kernel samples allocations by bytes (see `profiler-ebpf/src/memory.rs`):
//! an allocation of `n` bytes is sampled with probability `p = 1 - exp(-n /
//! mean)`, so each sample stands for `1 / p` allocations like it (Go's and
//! tcmalloc's estimator, unbiased). Objects over 512 bytes come one by one,
//! with their address; their frees come as events. Small objects come as the
//! pymalloc pools that size classes take: a pool sample stands for the pool's
//! blocks, and what stays in use is read from the pool's header at the end of
//! each period (blocks in use, size class), so no free of a small object is
//! ever probed.

use std::{collections::HashMap, sync::Arc};

use profiler_common::ALLOC_BUDGETS;

use crate::{
    aggregate::{Frame, Thread},
    procmem::ProcessMemory,
};

/// Byte budgets between two samples: `ALLOC_BUDGETS` quantiles of the
/// exponential distribution of mean `mean`, which the kernel picks at random.
pub fn budgets(mean: u64) -> Vec<u64> {
    let n = f64::from(ALLOC_BUDGETS);
    (0..ALLOC_BUDGETS).map(|i| (-(mean as f64) * (1.0 - (f64::from(i) + 0.5) / n).ln()).round() as u64).collect()
}

/// How many allocations of `bytes` one sample stands for.
pub fn weight(bytes: u64, mean: u64) -> f64 {
    1.0 / -(-(bytes as f64) / mean as f64).exp_m1()
}

/// pymalloc's pool header (`struct pool_header`), the same from 3.9 on: the
/// blocks in use (`ref.count`) and the size class (`szidx`).
const POOL_COUNT: u64 = 0;
const POOL_SIZE_CLASS: u64 = 36;
/// Block sizes are multiples of 16 bytes on 64-bit builds (3.8+).
const POOL_ALIGNMENT: u64 = 16;

/// A pool's size class and block size, read from its header.
pub fn pool_class(mem: &ProcessMemory, pool: u64) -> Option<(u32, u64)> {
    let class = mem.read_u32(pool + POOL_SIZE_CLASS).ok()?;
    // 32 classes of up to 512 bytes: anything else is not a pool header.
    (class < 32).then_some((class, (u64::from(class) + 1) * POOL_ALIGNMENT))
}

/// Where a sampled allocation was made.
#[derive(Clone, Debug)]
pub struct Origin {
    pub application: Arc<str>,
    pub stack: Arc<[Frame]>,
    pub thread: Thread,
}

struct Allocation {
    origin: Origin,
    objects: f64,
    bytes: f64,
}

struct Pool {
    origin: Origin,
    /// Pools this sample stands for.
    weight: f64,
    class: u32,
}

/// Bytes and objects in use, from one origin.
pub struct InUse<'a> {
    pub origin: &'a Origin,
    pub objects: f64,
    pub bytes: f64,
}

/// The sampled allocations and pools still in use.
#[derive(Default)]
pub struct LiveHeap {
    allocations: HashMap<(u32, u64), Allocation>,
    pools: HashMap<(u32, u64), Pool>,
}

/// The most pools followed at once; the kernel bounds allocations itself.
const MAX_POOLS: usize = 65536;

impl LiveHeap {
    /// A sampled allocation at `address` of process `pid`, standing for
    /// `objects` objects and `bytes` bytes.
    pub fn allocated(&mut self, pid: u32, address: u64, origin: Origin, objects: f64, bytes: f64) {
        self.allocations.insert((pid, address), Allocation { origin, objects, bytes });
    }

    pub fn freed(&mut self, pid: u32, address: u64) {
        self.allocations.remove(&(pid, address));
    }

    /// A sampled pool at `pool`, of size class `class`, standing for
    /// `weight` pools; false when too many pools are followed already.
    pub fn pool(&mut self, pid: u32, pool: u64, class: u32, origin: Origin, weight: f64) -> bool {
        if self.pools.len() >= MAX_POOLS && !self.pools.contains_key(&(pid, pool)) {
            return false;
        }
        self.pools.insert((pid, pool), Pool { origin, weight, class });
        true
    }

    /// Forgets the allocations of a process that exited; returns their
    /// addresses, for the kernel's table.
    pub fn forget_process(&mut self, pid: u32) -> Vec<u64> {
        self.pools.retain(|&(owner, _), _| owner != pid);
        let addresses: Vec<u64> = self.allocations.keys().filter(|(owner, _)| *owner == pid).map(|&(_, a)| a).collect();
        for address in &addresses {
            self.allocations.remove(&(pid, *address));
        }
        addresses
    }

    /// What is in use now. Pools are read in their processes: a pool that
    /// emptied, went to another size class or whose arena was freed is
    /// dropped.
    pub fn in_use(&mut self) -> Vec<InUse<'_>> {
        let mut readers: HashMap<u32, ProcessMemory> = HashMap::new();
        let mut blocks: HashMap<(u32, u64), u32> = HashMap::new();
        for (&(pid, pool), sampled) in &self.pools {
            let mem = readers.entry(pid).or_insert_with(|| ProcessMemory::new(pid));
            let count = match pool_class(mem, pool) {
                Some((class, _)) if class == sampled.class => mem.read_u32(pool + POOL_COUNT).unwrap_or(0),
                _ => 0,
            };
            blocks.insert((pid, pool), count);
        }
        self.pools.retain(|key, _| blocks.get(key).is_some_and(|&count| count > 0));
        let allocations = self.allocations.values().map(|allocation| InUse {
            origin: &allocation.origin,
            objects: allocation.objects,
            bytes: allocation.bytes,
        });
        let pools = self.pools.iter().map(|(key, pool)| {
            let count = f64::from(blocks[key]) * pool.weight;
            let block_bytes = (u64::from(pool.class) + 1) * POOL_ALIGNMENT;
            InUse { origin: &pool.origin, objects: count, bytes: count * block_bytes as f64 }
        });
        allocations.chain(pools).collect()
    }

    pub fn len(&self) -> usize {
        self.allocations.len() + self.pools.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_exponential_with_the_mean_asked_for() {
        let budgets = budgets(512 * 1024);
        let mean = budgets.iter().sum::<u64>() as f64 / budgets.len() as f64;
        assert!((mean / (512.0 * 1024.0) - 1.0).abs() < 0.01, "mean {mean}");
        // The median of an exponential is mean × ln 2.
        let mut sorted = budgets.clone();
        sorted.sort();
        let median = sorted[sorted.len() / 2] as f64;
        assert!((median / (512.0 * 1024.0 * std::f64::consts::LN_2) - 1.0).abs() < 0.01, "median {median}");
    }

    #[test]
    fn weights_undo_the_sampling_probability() {
        let mean = 512 * 1024;
        // Much larger than the mean: always sampled, stands for itself.
        assert!((weight(64 << 20, mean) - 1.0).abs() < 1e-9);
        // Much smaller: sampled with probability ≈ n / mean.
        assert!((weight(16 * 1024, mean) - 32.5).abs() < 0.1);
        assert!((weight(1 << 20, mean) - 1.0 / (1.0 - (-2.0f64).exp())).abs() < 1e-9);
    }
}
