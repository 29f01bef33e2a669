//! The ring buffer's records, decoded in one place into typed events: a new
//! record kind is a variant here and a type in `profiler-common`.

use profiler_common::{kind, AllocSample, CpuSample, MemoryEvent, OffCpuSample, ProcessEvent, StackRecord};

/// One record of the kernel's ring buffer.
pub enum Event {
    /// A thread sampled on the CPU.
    Cpu(CpuSample),
    /// A thread back from `off_cpu_ns` off the CPU, waiting for `wait`.
    OffCpu(OffCpuSample),
    /// An allocation of `bytes` at `address`, sampled by bytes.
    Alloc(AllocSample),
    /// A pymalloc arena of `bytes` at `address`, sampled by bytes.
    Arena(AllocSample),
    /// A sampled allocation was freed.
    Free {
        pid: u32,
        address: u64,
    },
    /// The first sample of a process not seen before (or since its exec).
    NewProcess {
        pid: u32,
        comm: [u8; 16],
    },
    Exit {
        pid: u32,
    },
}

/// A record that is none of the kinds the agent knows, or too short for its kind.
#[derive(Debug, PartialEq, Eq)]
pub struct Unexpected {
    pub kind: Option<u32>,
    pub len: usize,
}

impl std::fmt::Display for Unexpected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Some(kind) => write!(f, "unexpected record of kind {kind} and {} bytes from the kernel", self.len),
            None => write!(f, "record of {} bytes from the kernel, too short for its kind", self.len),
        }
    }
}

/// The record's value of type `T`, if it is long enough for one.
fn read<T: Copy>(record: &[u8]) -> Option<T> {
    // SAFETY: the kernel wrote a whole `T` (checked by length); the types of
    // `profiler-common` are plain data, valid for any bytes.
    (record.len() >= size_of::<T>()).then(|| unsafe { record.as_ptr().cast::<T>().read_unaligned() })
}

/// Decodes one ring-buffer record.
pub fn decode(record: &[u8]) -> Result<Event, Unexpected> {
    let unexpected = |kind| Unexpected { kind, len: record.len() };
    let kind = record.get(..4).map(|bytes| u32::from_ne_bytes(bytes.try_into().unwrap())).ok_or(unexpected(None))?;
    let stacks = || read::<StackRecord>(record).ok_or(unexpected(Some(kind)));
    let process = || read::<ProcessEvent>(record).ok_or(unexpected(Some(kind)));
    Ok(match kind {
        kind::SAMPLE => Event::Cpu(CpuSample(stacks()?)),
        kind::OFF_CPU => Event::OffCpu(OffCpuSample(stacks()?)),
        kind::ALLOC => Event::Alloc(AllocSample(stacks()?)),
        kind::ARENA => Event::Arena(AllocSample(stacks()?)),
        kind::FREE => {
            let MemoryEvent { pid, address, .. } = read(record).ok_or(unexpected(Some(kind)))?;
            Event::Free { pid, address }
        }
        kind::NEW_PROCESS => {
            let ProcessEvent { pid, comm, .. } = process()?;
            Event::NewProcess { pid, comm }
        }
        kind::EXIT => Event::Exit { pid: process()?.pid },
        _ => return Err(unexpected(Some(kind))),
    })
}

/// The bytes of a record as the kernel writes it, for tests.
#[cfg(test)]
pub fn record_of<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: `T` is one of profiler-common's plain `repr(C)` types.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_to_one_event_each() {
        // SAFETY: all zeroes is a valid `StackRecord` (plain data).
        let mut sample: StackRecord = unsafe { std::mem::zeroed() };
        sample.pid = 42;
        sample.bytes = 4096;
        for (kind, expected) in
            [(kind::SAMPLE, "cpu"), (kind::OFF_CPU, "off"), (kind::ALLOC, "alloc"), (kind::ARENA, "arena")]
        {
            sample.kind = kind;
            let event = decode(&record_of(&sample)).unwrap();
            let (name, decoded): (_, &StackRecord) = match &event {
                Event::Cpu(sample) => ("cpu", sample),
                Event::OffCpu(sample) => ("off", sample),
                Event::Alloc(sample) => ("alloc", sample),
                Event::Arena(sample) => ("arena", sample),
                _ => panic!("kind {kind} is not a sample"),
            };
            assert_eq!((name, decoded.pid, decoded.bytes), (expected, 42, 4096));
        }
        let free = MemoryEvent { kind: kind::FREE, pid: 7, address: 0x1000 };
        assert!(matches!(decode(&record_of(&free)), Ok(Event::Free { pid: 7, address: 0x1000 })));
        let mut new = ProcessEvent { kind: kind::NEW_PROCESS, pid: 9, comm: [0; 16] };
        new.comm[..3].copy_from_slice(b"app");
        assert!(matches!(decode(&record_of(&new)), Ok(Event::NewProcess { pid: 9, comm }) if &comm[..4] == b"app\0"));
        new.kind = kind::EXIT;
        assert!(matches!(decode(&record_of(&new)), Ok(Event::Exit { pid: 9 })));
    }

    #[test]
    fn short_and_unknown_records_are_reported_not_read() {
        let cut = record_of(&MemoryEvent { kind: kind::SAMPLE, pid: 7, address: 0 });
        assert_eq!(decode(&cut).err(), Some(Unexpected { kind: Some(kind::SAMPLE), len: cut.len() }));
        assert_eq!(decode(&[1, 0]).err(), Some(Unexpected { kind: None, len: 2 }));
        assert_eq!(decode(&99u32.to_ne_bytes()).err(), Some(Unexpected { kind: Some(99), len: 4 }));
    }
}
