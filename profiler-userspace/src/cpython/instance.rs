//! One CPython process as the agent profiles it: the kernel told how to walk
//! its frames, its code objects named, and with `--memory` its allocator
//! probed. The agent holds one per CPython process and sees only this.

use std::{ops::Range, path::PathBuf, time::Duration};

use anyhow::Result;
use profiler_common::{PyFrame, PY_BAD_CODE, PY_BAD_POINTER, PY_CYCLE, PY_TRUNCATED};

use super::{allocator, code::FrameSymbolizer, merge, Interpreter, Pymalloc};
use crate::{
    kernel::{MemoryWatch, Sampler},
    process::discovery,
    stack::{marker, Frame, InterpreterFrames, Walk},
};

pub struct Instance {
    symbolizer: FrameSymbolizer,
    /// [`Interpreter::eval_loop`], where its Python frames go.
    eval_loop: Option<Range<u64>>,
    /// With `--memory`: the allocation probes and, when its arenas are
    /// probed, the geometry of its pools.
    memory: Option<(MemoryWatch, Option<Pymalloc>)>,
}

/// How `--memory` went for a process [`Instance::attach`] attached.
pub enum MemoryProbes {
    NotAsked,
    On,
    /// Not profiled, and why.
    Failed(anyhow::Error),
}

impl Instance {
    /// Tells the kernel how to walk `pid`'s interpreter and, with `memory`,
    /// probes its allocator (in the file `interpreter.path`, or at `libc`,
    /// paths as `pid` sees them). Only the walk must succeed.
    pub fn attach(
        pid: u32,
        interpreter: &Interpreter,
        libc: Option<&str>,
        sampler: &mut Sampler,
        memory: bool,
    ) -> Result<(Instance, MemoryProbes)> {
        sampler.add_python(pid, &interpreter.kernel)?;
        let mut instance = Instance {
            symbolizer: FrameSymbolizer::new(pid, interpreter),
            eval_loop: interpreter.eval_loop.clone(),
            memory: None,
        };
        if !memory {
            return Ok((instance, MemoryProbes::NotAsked));
        }
        let root = format!("/proc/{pid}/root");
        let object = PathBuf::from(format!("{root}{}", interpreter.path));
        let libc_path = |libc: &str| PathBuf::from(format!("{root}{libc}"));
        let mut watch = |libc: Option<&str>| {
            let sites = allocator::memory_sites(&object, libc.map(libc_path).as_deref())?;
            sampler.watch_memory(pid, &sites)
        };
        let mut watched = watch(libc);
        if watched.is_err() && libc.is_none() {
            // Looked at as it started, before the loader mapped libc: a
            // stripped build needs it, and it comes within milliseconds.
            if let Some(libc) = discovery::wait_for_libc(pid, Duration::from_millis(100)) {
                watched = watch(Some(&libc));
            }
        }
        match watched {
            Ok(watch) => {
                let pymalloc = interpreter.pymalloc().filter(|_| watch.arenas);
                if pymalloc.is_none() {
                    log::info!(
                        "pid {pid}: memory: objects of 512 bytes or less are not profiled (a build without symbol \
                         table or without pymalloc)"
                    );
                }
                instance.memory = Some((watch, pymalloc));
                Ok((instance, MemoryProbes::On))
            }
            Err(error) => Ok((instance, MemoryProbes::Failed(error))),
        }
    }

    /// Undoes [`Instance::attach`]'s probes (the process exited or ran another program).
    pub fn detach(self, sampler: &mut Sampler) {
        if let Some((watch, _)) = self.memory {
            sampler.unwatch_memory(watch);
        }
    }

    /// The geometry of its pools, when its arenas are probed.
    pub fn pymalloc(&self) -> Option<Pymalloc> {
        self.memory.as_ref().and_then(|(_, pymalloc)| *pymalloc)
    }

    /// Forgets the code objects read so far (each period: addresses are reused).
    pub fn forget_code(&mut self) {
        self.symbolizer.forget_code();
    }
}

impl InterpreterFrames for Instance {
    fn insert(&mut self, frames: &[PyFrame], status: u32, stack: &mut Vec<Frame>, native: usize, user: &[u64]) -> Walk {
        // By address when `stack[native + i]` is the frame of `user[i]`, as
        // `NativeNames::user` promises (`stack::assemble` asserts it).
        let eval_loop = match &self.eval_loop {
            Some(range) if stack.len() - native == user.len() => merge::EvalLoop::Address { range, user },
            _ => merge::EvalLoop::Name,
        };
        let mut walk = Walk::default();
        let inline_calls = self.symbolizer.inline_calls;
        let named = frames.iter().map(|frame| {
            let named = self.symbolizer.symbolize(frame).unwrap_or_else(|| {
                walk.unnamed += 1;
                Frame::marker(marker::UNKNOWN_PYTHON)
            });
            (named, merge::is_entry(frame.code, inline_calls))
        });
        merge::merge(stack, native, eval_loop, named);
        match status {
            PY_TRUNCATED => stack.push(Frame::marker(marker::TRUNCATED)),
            PY_BAD_POINTER | PY_BAD_CODE | PY_CYCLE => {
                walk.broken = true;
                stack.push(Frame::marker(marker::BROKEN));
            }
            _ => {}
        }
        walk
    }
}
