//! Memory profiling in userspace: what an allocation sample stands for, and
//! which sampled allocations are still in use at the end of a period.
//!
//! The kernel samples allocations by bytes (see `profiler-ebpf/src/memory.rs`):
//! an allocation of `n` bytes is sampled with probability `p = 1 - exp(-n /
//! mean)`, so each sample stands for `1 / p` allocations like it (Go's and
//! tcmalloc's estimator, unbiased). Objects over 512 bytes come one by one,
//! with their address; their frees come as events. Small objects come as the
//! pymalloc arenas their pools take: what stays in use in a sampled arena is
//! read from the headers of its pools at the end of each period (blocks in
//! use, size class), so no free of a small object is ever probed.

use std::{collections::HashMap, sync::Arc};

use profiler_common::ALLOC_BUDGETS;

use crate::{
    aggregate::{Aggregator, Measurement, Series},
    cpython::{arena_in_use, Pymalloc},
    process::procmem::ProcessMemory,
    stack::{Frame, Thread},
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

/// Where a sampled allocation was made.
#[derive(Clone, Debug)]
pub struct Origin {
    pub series: Series,
    pub stack: Arc<[Frame]>,
    pub thread: Thread,
}

struct Allocation {
    origin: Origin,
    /// What this sample stands for.
    objects: f64,
    bytes: f64,
    weight: f64,
    /// A pymalloc arena of this many bytes, whose pools hold the objects.
    arena: Option<(u64, Pymalloc)>,
}

/// Bytes and objects in use, from one origin.
pub struct InUse<'a> {
    pub origin: &'a Origin,
    pub objects: f64,
    pub bytes: f64,
}

/// The sampled allocations (arenas among them) still in use.
#[derive(Default)]
pub struct LiveHeap {
    allocations: HashMap<(u32, u64), Allocation>,
}

impl LiveHeap {
    /// A sampled allocation of `bytes` at `address` of process `pid`,
    /// standing for `weight` allocations like it.
    pub fn allocated(&mut self, pid: u32, address: u64, origin: Origin, bytes: u64, weight: f64) {
        let allocation = Allocation { origin, objects: weight, bytes: bytes as f64 * weight, weight, arena: None };
        self.allocations.insert((pid, address), allocation);
    }

    /// A sampled pymalloc arena of `bytes` at `address`.
    pub fn arena(&mut self, pid: u32, address: u64, origin: Origin, bytes: u64, weight: f64, pymalloc: Pymalloc) {
        let allocation = Allocation { origin, objects: 0.0, bytes: 0.0, weight, arena: Some((bytes, pymalloc)) };
        self.allocations.insert((pid, address), allocation);
    }

    pub fn freed(&mut self, pid: u32, address: u64) {
        self.allocations.remove(&(pid, address));
    }

    /// Forgets the allocations of a process that exited; returns their
    /// addresses, for the kernel's table.
    pub fn forget_process(&mut self, pid: u32) -> Vec<u64> {
        let addresses: Vec<u64> = self.allocations.keys().filter(|(owner, _)| *owner == pid).map(|&(_, a)| a).collect();
        for address in &addresses {
            self.allocations.remove(&(pid, *address));
        }
        addresses
    }

    /// What is in use now. The pools of arenas are read in their processes.
    pub fn in_use(&mut self) -> Vec<InUse<'_>> {
        let mut readers: HashMap<u32, ProcessMemory> = HashMap::new();
        for (&(pid, address), allocation) in &mut self.allocations {
            if let Some((arena_bytes, pymalloc)) = allocation.arena {
                let mem = readers.entry(pid).or_insert_with(|| ProcessMemory::new(pid));
                let (blocks, bytes) = arena_in_use(mem, address, arena_bytes, pymalloc).unwrap_or((0, 0));
                allocation.objects = blocks as f64 * allocation.weight;
                allocation.bytes = bytes as f64 * allocation.weight;
            }
        }
        self.allocations
            .values()
            .filter(|allocation| allocation.bytes > 0.0)
            .map(|allocation| InUse {
                origin: &allocation.origin,
                objects: allocation.objects,
                bytes: allocation.bytes,
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.allocations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.allocations.is_empty()
    }
}

/// A sampled allocation of process `pid`: `bytes` at `address` (0 when its
/// free is not followed); for a pymalloc arena, its pools' geometry.
pub struct Sampled {
    pub pid: u32,
    pub address: u64,
    pub bytes: u64,
    pub arena: Option<Pymalloc>,
}

/// Accounts an allocation sample: what it stands for, allocated over the
/// period and, until freed, in use. An arena counts as one allocation of its
/// size; what is in use in it is read from its pools at the period's end.
pub fn account(aggregator: &mut Aggregator, heap: &mut LiveHeap, sampled: Sampled, origin: Origin, mean: u64) {
    let Sampled { pid, address, bytes, arena } = sampled;
    let weight = weight(bytes, mean);
    let Origin { series, stack, thread } = &origin;
    aggregator.add(series, stack, thread, Measurement::Alloc { objects: weight, bytes: bytes as f64 * weight });
    match (address, arena) {
        (0, _) => {}
        (address, Some(pymalloc)) => heap.arena(pid, address, origin, bytes, weight, pymalloc),
        (address, None) => heap.allocated(pid, address, origin, bytes, weight),
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
