//! Which dimensions of profiling this kernel runs, and in plain words why
//! not: kernels differ in what their verifiers accept, and one refused
//! program must not cost the others.

use std::fmt;

/// Whether one dimension runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    On,
    /// Not asked for (`--no-wall`, memory without `--memory`).
    NotAsked,
    /// Asked for, but the kernel would not run it: why.
    Refused(String),
}

impl State {
    pub fn is_on(&self) -> bool {
        *self == State::On
    }
}

/// The dimensions the agent measures and how each fared at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    pub cpu: State,
    pub wall: State,
    pub memory: State,
}

impl Features {
    /// `(name, state)` of each dimension, in a stable order.
    pub fn each(&self) -> [(&'static str, &State); 3] {
        [("cpu", &self.cpu), ("wall", &self.wall), ("memory", &self.memory)]
    }

    /// The dimensions asked for that the kernel refused, e.g.
    /// `memory: off: this kernel's verifier refused raw_alloc_return (...)`.
    pub fn refusals(&self) -> Vec<String> {
        self.each()
            .into_iter()
            .filter_map(|(name, state)| match state {
                State::Refused(why) => Some(format!("{name}: off: {why}")),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for Features {
    /// `cpu on, wall on, memory off (not asked)`, then each refusal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<String> = self
            .each()
            .into_iter()
            .map(|(name, state)| match state {
                State::On => format!("{name} on"),
                State::NotAsked => format!("{name} off (not asked)"),
                State::Refused(_) => format!("{name} OFF (refused by this kernel)"),
            })
            .collect();
        write!(f, "{}", words.join(", "))?;
        for refusal in self.refusals() {
            write!(f, "; {refusal}")?;
        }
        Ok(())
    }
}

/// The verifier's complaint in a load error's text: its last line that is
/// not a statistic, e.g. `combined stack size of 4 calls is 528. Too large`.
pub fn verifier_complaint(log: &str) -> Option<&str> {
    const STATISTICS: [&str; 3] = ["processed ", "stack depth", "verification time"];
    log.lines()
        .map(str::trim)
        .rev()
        .find(|line| !line.is_empty() && !STATISTICS.iter().any(|statistic| line.starts_with(statistic)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_dimension_and_the_reason() {
        let features = Features {
            cpu: State::On,
            wall: State::NotAsked,
            memory: State::Refused("this kernel's verifier refused raw_alloc_return: Too large".into()),
        };
        assert_eq!(
            features.to_string(),
            "cpu on, wall off (not asked), memory OFF (refused by this kernel); \
             memory: off: this kernel's verifier refused raw_alloc_return: Too large"
        );
    }

    #[test]
    fn the_complaint_is_the_last_line_that_is_not_a_statistic() {
        let log = "0: R1=ctx() R10=fp0\n; let x = 1;\ncombined stack size of 4 calls is 528. Too large\n\
                   verification time 1032 usec\nstack depth 0+256+0+32\nprocessed 97 insns (limit 1000000)\n";
        assert_eq!(verifier_complaint(log), Some("combined stack size of 4 calls is 528. Too large"));
        assert_eq!(verifier_complaint("\n\n"), None);
    }
}
