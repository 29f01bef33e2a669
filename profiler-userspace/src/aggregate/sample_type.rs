//! The sample types of a profile, as one table: what each value of a stack
//! counts, its pprof name and unit, the dimension that measures it, and how
//! each consumer (pprof, flame graphs, Pyroscope) treats it.
//!
//! Adding a dimension is adding to this file: a [`Dimension`], its rows in
//! [`SampleType`] and [`SampleType::ALL`] (the order is the order of the
//! values in pprof), a [`Measurement`] and the values it adds. The agent then
//! produces that measurement; pprof, flame graphs, uploads and Pyroscope read
//! the table, and the terminal summary's exhaustive `match` on [`Dimension`]
//! asks for the new dimension's line.

use std::ops::{Index, IndexMut};

use crate::stack::Wait;

/// What the agent can be asked to measure. CPU time always is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    Cpu,
    /// Off-CPU time, and so wall time.
    Wall,
    /// Allocations, and what stays in use.
    Memory,
}

impl Dimension {
    pub const ALL: [Dimension; 3] = [Dimension::Cpu, Dimension::Wall, Dimension::Memory];

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The dimensions a profile measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dimensions(u8);

impl Dimensions {
    /// CPU time only.
    pub const CPU: Dimensions = Dimensions(1 << Dimension::Cpu as u8);

    pub fn contains(self, dimension: Dimension) -> bool {
        self.0 & dimension.bit() != 0
    }

    pub fn insert(&mut self, dimension: Dimension) {
        self.0 |= dimension.bit();
    }

    /// These and `dimension` if `on`.
    pub fn with(mut self, dimension: Dimension, on: bool) -> Self {
        if on {
            self.insert(dimension);
        }
        self
    }

    /// The sample types of these dimensions, in pprof's order.
    pub fn sample_types(self) -> impl Iterator<Item = SampleType> {
        SampleType::ALL.into_iter().filter(move |sample_type| self.contains(sample_type.row().dimension))
    }
}

impl Default for Dimensions {
    fn default() -> Self {
        Dimensions::CPU
    }
}

/// How a value adds up over time, for backends that merge profiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregation {
    /// A flow (time, allocations): summed.
    Sum,
    /// A level (what is in use): averaged.
    Average,
}

/// How a flame graph draws a sample type: its boxes' width is the value
/// divided by `divisor`, in `count_name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlameWidth {
    pub divisor: u64,
    pub count_name: &'static str,
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    /// pprof's type and unit: Go's, which pprof viewers and Pyroscope know.
    pub name: &'static str,
    pub unit: &'static str,
    pub dimension: Dimension,
    pub aggregation: Aggregation,
    /// Flame graphs draw the first type of the table with a width whose
    /// total is not zero; types without one are not drawn.
    pub flame: Option<FlameWidth>,
}

/// What one value of a stack counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SampleType {
    /// CPU samples taken.
    Samples,
    /// CPU time they stand for, in nanoseconds.
    Cpu,
    /// CPU plus off-CPU time, in nanoseconds: per thread, its wall-clock time.
    Wall,
    /// Time off the CPU, in nanoseconds.
    OffCpu,
    /// Estimated from allocation samples: allocations and bytes over the
    /// period, and what is still in use at its end.
    AllocObjects,
    AllocSpace,
    InuseObjects,
    InuseSpace,
}

impl SampleType {
    /// Every sample type, in pprof's order.
    pub const ALL: [SampleType; 8] = [
        SampleType::Samples,
        SampleType::Cpu,
        SampleType::Wall,
        SampleType::OffCpu,
        SampleType::AllocObjects,
        SampleType::AllocSpace,
        SampleType::InuseObjects,
        SampleType::InuseSpace,
    ];
    pub const COUNT: usize = SampleType::ALL.len();

    /// The table.
    pub fn row(self) -> Row {
        use Aggregation::{Average, Sum};
        use Dimension::{Cpu, Memory, Wall};
        let row = |name, unit, dimension, aggregation, flame| Row { name, unit, dimension, aggregation, flame };
        let width = |divisor, count_name| Some(FlameWidth { divisor, count_name });
        match self {
            SampleType::Samples => row("samples", "count", Cpu, Sum, width(1, "samples")),
            SampleType::Cpu => row("cpu", "nanoseconds", Cpu, Sum, None),
            SampleType::Wall => row("wall", "nanoseconds", Wall, Sum, width(1_000_000, "ms of wall time")),
            SampleType::OffCpu => row("off_cpu", "nanoseconds", Wall, Sum, None),
            SampleType::AllocObjects => row("alloc_objects", "count", Memory, Sum, None),
            SampleType::AllocSpace => row("alloc_space", "bytes", Memory, Sum, width(1024, "KiB allocated")),
            SampleType::InuseObjects => row("inuse_objects", "count", Memory, Average, None),
            SampleType::InuseSpace => row("inuse_space", "bytes", Memory, Average, None),
        }
    }

    /// The sample type named `name` in pprof.
    pub fn named(name: &str) -> Option<SampleType> {
        SampleType::ALL.into_iter().find(|sample_type| sample_type.row().name == name)
    }
}

// `ALL` lists every type once, in the order of their discriminants, which
// index `StackValue`.
const _: () = {
    let mut i = 0;
    while i < SampleType::COUNT {
        assert!(SampleType::ALL[i] as usize == i);
        i += 1;
    }
};

/// The values of one stack, one per sample type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackValue([u64; SampleType::COUNT]);

impl Index<SampleType> for StackValue {
    type Output = u64;

    fn index(&self, sample_type: SampleType) -> &u64 {
        &self.0[sample_type as usize]
    }
}

impl IndexMut<SampleType> for StackValue {
    fn index_mut(&mut self, sample_type: SampleType) -> &mut u64 {
        &mut self.0[sample_type as usize]
    }
}

impl FromIterator<(SampleType, u64)> for StackValue {
    fn from_iter<I: IntoIterator<Item = (SampleType, u64)>>(values: I) -> Self {
        let mut value = StackValue::default();
        for (sample_type, n) in values {
            value[sample_type] += n;
        }
        value
    }
}

/// What one event of the kernel (or the period's end) measured of a stack.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Measurement {
    /// One CPU sample: a sampling period of CPU, and wall, time.
    Cpu,
    /// `ns` off the CPU, waiting for `wait`.
    OffCpu { wait: Wait, ns: u64 },
    /// The estimated `objects` and `bytes` allocated.
    Alloc { objects: f64, bytes: f64 },
    /// The estimated `objects` and `bytes` allocated and still in use at the
    /// end of the period.
    InUse { objects: f64, bytes: f64 },
}

impl Measurement {
    /// What the stack waited for, which keys it apart.
    pub fn wait(&self) -> Option<Wait> {
        match *self {
            Measurement::OffCpu { wait, .. } => Some(wait),
            _ => None,
        }
    }

    /// Adds it to `value`; a CPU sample stands for `sample_period_ns`.
    pub fn add_to(&self, value: &mut StackValue, sample_period_ns: u64) {
        use SampleType as T;
        let estimate = |n: f64| n.round() as u64;
        match *self {
            Measurement::Cpu => {
                value[T::Samples] += 1;
                value[T::Cpu] += sample_period_ns;
                value[T::Wall] += sample_period_ns;
            }
            Measurement::OffCpu { ns, .. } => {
                value[T::OffCpu] += ns;
                value[T::Wall] += ns;
            }
            Measurement::Alloc { objects, bytes } => {
                value[T::AllocObjects] += estimate(objects);
                value[T::AllocSpace] += estimate(bytes);
            }
            Measurement::InUse { objects, bytes } => {
                value[T::InuseObjects] += estimate(objects);
                value[T::InuseSpace] += estimate(bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_names_units_and_order() {
        let rows: Vec<_> = SampleType::ALL.iter().map(|t| (t.row().name, t.row().unit)).collect();
        assert_eq!(
            rows,
            [
                ("samples", "count"),
                ("cpu", "nanoseconds"),
                ("wall", "nanoseconds"),
                ("off_cpu", "nanoseconds"),
                ("alloc_objects", "count"),
                ("alloc_space", "bytes"),
                ("inuse_objects", "count"),
                ("inuse_space", "bytes"),
            ]
        );
        assert_eq!(SampleType::named("inuse_space"), Some(SampleType::InuseSpace));
        let wall: Vec<_> = Dimensions::CPU.with(Dimension::Wall, true).sample_types().collect();
        assert_eq!(wall, [SampleType::Samples, SampleType::Cpu, SampleType::Wall, SampleType::OffCpu]);
    }

    #[test]
    fn measurements_add_what_they_stand_for() {
        let mut value = StackValue::default();
        Measurement::Cpu.add_to(&mut value, 10);
        Measurement::OffCpu { wait: Wait::Sleep, ns: 5 }.add_to(&mut value, 10);
        Measurement::Alloc { objects: 1.5, bytes: 2.4 }.add_to(&mut value, 10);
        Measurement::InUse { objects: 0.4, bytes: 7.5 }.add_to(&mut value, 10);
        let values: Vec<u64> = SampleType::ALL.iter().map(|&t| value[t]).collect();
        assert_eq!(values, [1, 10, 15, 5, 2, 2, 0, 8]);
    }
}
