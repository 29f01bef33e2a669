//! Names for native and kernel return addresses, with blazesym (ELF symbol
//! tables of the mapped files, `/proc/kallsyms` for the kernel). Python
//! frames are named by `cpython`.

use std::{collections::HashMap, path::Path, sync::Arc};

use blazesym::{
    symbolize::{cache, evict, source, Input, Symbolized, Symbolizer},
    Pid,
};

use crate::{
    export::frame_kind::KERNEL_FILE,
    stack::{Frame, FrameKind, NativeNames},
};

/// Cached names are dropped past this many addresses, so that memory stays
/// bounded on hosts that run many different programs.
const MAX_CACHED_ADDRESSES: usize = 200_000;

pub struct NativeSymbolizer {
    symbolizer: Symbolizer,
    kernel_source: source::Source<'static>,
    kernel: HashMap<u64, Frame>,
    user: HashMap<(u32, u64), Frame>,
}

impl Default for NativeSymbolizer {
    fn default() -> Self {
        NativeSymbolizer::new()
    }
}

impl NativeSymbolizer {
    pub fn new() -> Self {
        let kernel = source::Kernel { vmlinux: blazesym::MaybeDefault::None, debug_syms: false, ..Default::default() };
        NativeSymbolizer {
            // Function names are what a profile needs; source lines of
            // native code would make symbolization read all of DWARF.
            symbolizer: Symbolizer::builder().enable_code_info(false).enable_inlined_fns(false).build(),
            kernel_source: source::Source::Kernel(kernel),
            kernel: HashMap::new(),
            user: HashMap::new(),
        }
    }

    /// Loads the kernel's symbols now rather than at the first kernel frame,
    /// so that the cost falls in the agent's start-up.
    pub fn load_kernel_symbols(&self) {
        let _ = self.symbolizer.symbolize(&self.kernel_source, Input::AbsAddr(&[0]));
    }

    /// Remembers the memory map of `pid`, so that its last samples are
    /// named even when they are read after it exited.
    pub fn remember_process(&self, pid: u32) {
        let mut process = cache::Process::new(Pid::from(pid));
        process.cache_vmas = true;
        let _ = self.symbolizer.cache(&cache::Cache::Process(process));
    }

    pub fn forget_process(&mut self, pid: u32) {
        let _ = self.symbolizer.evict(&evict::Evict::Process(evict::Process::new(Pid::from(pid))));
        self.user.retain(|(owner, _), _| *owner != pid);
    }

    fn symbolize_user(&self, pid: u32, addrs: &[u64]) -> Vec<Option<Frame>> {
        let mut process = source::Process::new(Pid::from(pid));
        process.perf_map = false;
        process.debug_syms = false;
        let names = self.symbolizer.symbolize(&source::Source::Process(process), Input::AbsAddr(addrs));
        (0..addrs.len())
            .map(|i| match names.as_ref().ok().and_then(|names| names.get(i)) {
                Some(Symbolized::Sym(sym)) => {
                    let module = sym.module.as_deref().map(|m| m.to_string_lossy()).unwrap_or_default();
                    Some(named(FrameKind::Native, &sym.name, &module))
                }
                _ => None,
            })
            .collect()
    }
}

impl NativeNames for NativeSymbolizer {
    /// Appends the frames of kernel return addresses `addrs`, innermost
    /// first, to `out`.
    fn kernel(&mut self, addrs: &[u64], out: &mut Vec<Frame>) {
        let missing: Vec<u64> = addrs.iter().copied().filter(|addr| !self.kernel.contains_key(addr)).collect();
        if !missing.is_empty() {
            bound(&mut self.kernel);
            let names = self.symbolizer.symbolize(&self.kernel_source, Input::AbsAddr(&missing));
            for (i, &addr) in missing.iter().enumerate() {
                // Kernel code has no object file: name the kernel, as
                // readers of the pprof know it.
                let frame = match names.as_ref().ok().and_then(|names| names.get(i)) {
                    Some(Symbolized::Sym(sym)) => named(FrameKind::Kernel, &sym.name, KERNEL_FILE),
                    _ => named(FrameKind::Kernel, "[unknown]", KERNEL_FILE),
                };
                self.kernel.insert(addr, frame);
            }
        }
        out.extend(addrs.iter().map(|addr| self.kernel[addr].clone()));
    }

    /// Appends the frames of user return addresses `addrs` of process `pid`,
    /// innermost first, to `out`.
    fn user(&mut self, pid: u32, addrs: &[u64], out: &mut Vec<Frame>) {
        let missing: Vec<u64> = addrs.iter().copied().filter(|addr| !self.user.contains_key(&(pid, *addr))).collect();
        if !missing.is_empty() {
            bound(&mut self.user);
            let mut frames = self.symbolize_user(pid, &missing);
            if frames.iter().any(Option::is_none) {
                // The memory map cached when the process was first seen may
                // predate a library it loaded since (a Python C extension).
                self.remember_process(pid);
                frames = self.symbolize_user(pid, &missing);
            }
            for (addr, frame) in missing.into_iter().zip(frames) {
                let frame = frame.unwrap_or_else(|| named(FrameKind::Native, "[unknown]", ""));
                self.user.insert((pid, addr), frame);
            }
        }
        out.extend(addrs.iter().map(|addr| self.user[&(pid, *addr)].clone()));
    }
}

fn bound<K, V>(cache: &mut HashMap<K, V>) {
    if cache.len() > MAX_CACHED_ADDRESSES {
        cache.clear();
    }
}

fn named(kind: FrameKind, function: &str, file: &str) -> Frame {
    // Keep the object's path readable but short: its file name is enough.
    let file = Path::new(file).file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    Frame { kind, function: Arc::from(function), file: Arc::from(file), start_line: 0, line: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_kernel_and_own_addresses() {
        // Native frames are named through /proc/PID/map_files, which needs it.
        if !crate::kernel::capabilities::has(40) {
            let missing = "it runs without root or CAP_CHECKPOINT_RESTORE, which reading /proc/PID/map_files needs";
            crate::cpython::skip_or_fail(missing, "run it as root");
            return;
        }
        let mut symbolizer = NativeSymbolizer::new();
        // Our own function, as a return address inside it would be.
        let own = names_kernel_and_own_addresses as fn() as usize as u64;
        let mut frames = Vec::new();
        symbolizer.user(std::process::id(), &[own + 1], &mut frames);
        assert!(frames[0].function.contains("names_kernel_and_own_addresses"), "{frames:?}");
        assert_eq!(frames[0].kind, FrameKind::Native);

        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
        let schedule = kallsyms
            .lines()
            .find_map(|line| line.strip_suffix(" T schedule").map(|addr| u64::from_str_radix(addr, 16).unwrap()))
            .expect("schedule in /proc/kallsyms");
        if schedule == 0 {
            return; // kptr_restrict hides addresses: nothing to check.
        }
        frames.clear();
        symbolizer.kernel(&[schedule + 4], &mut frames);
        assert_eq!(&*frames[0].function, "schedule");
        assert_eq!(&*frames[0].file, KERNEL_FILE);
        assert_eq!(frames[0].kind, FrameKind::Kernel);
    }
}
