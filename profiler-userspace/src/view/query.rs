//! What the page asks of an application's periods: samples per period (the
//! timeline), and for a time range a flame graph, a top table, or the
//! difference of two ranges.

use std::collections::HashMap;

use serde::Serialize;

use super::store::{Application, Kind, Period};
use crate::aggregate::sample_type::{self as table, Aggregation};

/// Which samples: a time range, a sample type, and labels they must have.
pub struct Selection {
    pub type_index: usize,
    /// Unix milliseconds; periods that start in `[from, to)`.
    pub from_ms: i64,
    pub to_ms: i64,
    /// `key=value` pairs: a sample must match one value of every key.
    pub filters: Vec<(String, String)>,
}

/// Boxes narrower than this share of the whole are not sent: at 2,000
/// pixels they would be a tenth of a pixel.
const MIN_NODE_SHARE: f64 = 0.000_05;
/// And never more boxes than this, so that a huge profile stays quick to
/// draw; the widest are kept.
const MAX_NODES: usize = 50_000;
/// Rows of each top table.
const MAX_ROWS: usize = 2_000;

#[derive(Serialize)]
pub struct Timeline {
    pub sample_types: Vec<SampleType>,
    /// `[start_ms, end_ms, value]` of each period, in order.
    pub periods: Vec<[i64; 3]>,
    /// Every label key with its values, sorted, for the filter.
    pub labels: Vec<(String, Vec<String>)>,
    pub unreadable: Vec<String>,
    /// `[read, to read]` while the files are being read.
    pub reading: Option<[usize; 2]>,
}

#[derive(Serialize)]
pub struct SampleType {
    pub r#type: String,
    pub unit: String,
}

/// A flame graph: its functions, and its boxes in depth-first order as
/// `depth, function, total, self` (and `base total, base self` for a diff),
/// flat, which the page reads quickly.
#[derive(Serialize)]
pub struct Flame {
    pub unit: String,
    pub total: i64,
    /// For a diff: the total of the base range.
    pub base_total: Option<i64>,
    pub periods: usize,
    pub functions: Vec<(String, String, Kind)>,
    pub nodes: Vec<i64>,
    /// Top tables: `function, self, total` and `function, line, self, total`.
    pub top_functions: Vec<[i64; 3]>,
    pub top_lines: Vec<[i64; 4]>,
}

/// Values of a label-set filter: which label sets a sample may have.
fn matching_label_sets(app: &Application, filters: &[(String, String)]) -> Vec<bool> {
    app.label_sets
        .items
        .iter()
        .map(|labels| {
            let mut keys = filters.iter().map(|(key, _)| key);
            keys.all(|key| {
                filters
                    .iter()
                    .filter(|(k, _)| k == key)
                    .any(|(k, v)| labels.iter().any(|(label, value)| label == k && value == v))
            })
        })
        .collect()
}

pub fn timeline(app: &Application, type_index: usize, filters: &[(String, String)]) -> Timeline {
    let matching = matching_label_sets(app, filters);
    let periods = app
        .periods
        .iter()
        .map(|period| {
            let value = period
                .samples
                .iter()
                .enumerate()
                .filter(|(_, sample)| matching[sample.labels as usize])
                .map(|(index, _)| period.value(index, type_index))
                .sum();
            [period.start_ms, period.end_ms, value]
        })
        .collect();
    let mut labels: HashMap<&str, Vec<&str>> = HashMap::new();
    for set in &app.label_sets.items {
        for (key, value) in set.iter() {
            labels.entry(key).or_default().push(value);
        }
    }
    let mut labels: Vec<_> = labels
        .into_iter()
        .map(|(key, mut values)| {
            values.sort_unstable();
            values.dedup();
            (key.to_owned(), values.into_iter().map(str::to_owned).collect())
        })
        .collect();
    labels.sort();
    Timeline {
        sample_types: app
            .sample_types
            .iter()
            .map(|(kind, unit)| SampleType { r#type: kind.clone(), unit: unit.clone() })
            .collect(),
        periods,
        labels,
        unreadable: app.unreadable(),
        reading: app.reading().map(|(done, total)| [done, total]),
    }
}

/// The value of each stack over the selection, and how many periods it
/// took. Heap in use is a level, not a flow: a range shows each series'
/// last period, not their sum.
fn stack_values(app: &Application, selection: &Selection) -> (Vec<i64>, usize) {
    let matching = matching_label_sets(app, &selection.filters);
    let in_range: Vec<&Period> = app
        .periods
        .iter()
        .filter(|period| period.start_ms >= selection.from_ms && period.start_ms < selection.to_ms)
        .collect();
    let is_level = is_level(&app.sample_types[selection.type_index].0);
    let periods: Vec<&Period> = if is_level {
        let mut last: HashMap<&str, &Period> = HashMap::new();
        for period in in_range {
            last.insert(&period.series, period);
        }
        last.into_values().collect()
    } else {
        in_range
    };
    let mut values = vec![0; app.stacks.items.len()];
    for period in &periods {
        for (index, sample) in period.samples.iter().enumerate() {
            if matching[sample.labels as usize] {
                values[sample.stack as usize] += period.value(index, selection.type_index);
            }
        }
    }
    (values, periods.len())
}

/// Whether sample type `name` is a level (what is in use), averaged over
/// time rather than summed: Ferroscope's types as its table says, those of
/// other writers by Go's names for them (`inuse_space`, `inuse_objects`).
fn is_level(name: &str) -> bool {
    match table::SampleType::named(name).map(|sample_type| sample_type.row().aggregation) {
        Some(aggregation) => aggregation == Aggregation::Average,
        None => name.starts_with("inuse_"),
    }
}

/// The flame graph and top tables of `selection`; with `base`, the flame
/// graph carries the base's values too, for a diff.
pub fn flame(app: &Application, selection: &Selection, base: Option<&Selection>) -> Flame {
    let (values, periods) = stack_values(app, selection);
    let base_values = base.map(|base| stack_values(app, base).0);
    let tree = Tree::build(app, &values, base_values.as_deref());
    let mut used = Renumbered::default();
    let nodes = tree.flatten(app, &mut used);
    let (top_functions, top_lines) = top(app, &values, &mut used);
    let unit = app.sample_types[selection.type_index].1.clone();
    Flame {
        unit,
        total: tree.nodes[0].total[0],
        base_total: base.map(|_| tree.nodes[0].total[1]),
        periods,
        functions: used
            .functions
            .into_iter()
            .map(|id| {
                let function = &app.functions.items[id as usize];
                (function.name.clone(), function.file.clone(), function.kind)
            })
            .collect(),
        nodes,
        top_functions,
        top_lines,
    }
}

/// The functions a reply uses, numbered from 0 in the order first used.
#[derive(Default)]
struct Renumbered {
    ids: HashMap<u32, i64>,
    functions: Vec<u32>,
}

impl Renumbered {
    fn id(&mut self, function: u32) -> i64 {
        *self.ids.entry(function).or_insert_with(|| {
            self.functions.push(function);
            self.functions.len() as i64 - 1
        })
    }
}

struct Node {
    function: u32,
    total: [i64; 2],
    own: [i64; 2],
    children: Vec<u32>,
}

/// The call tree: stacks merged by function from the root.
struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    fn build(app: &Application, values: &[i64], base: Option<&[i64]>) -> Tree {
        let root = Node { function: u32::MAX, total: [0; 2], own: [0; 2], children: Vec::new() };
        let mut tree = Tree { nodes: vec![root] };
        let mut child_of: HashMap<(u32, u32), u32> = HashMap::new();
        for (stack, frames) in app.stacks.items.iter().enumerate() {
            let value = [values[stack], base.map_or(0, |base| base[stack])];
            if value == [0, 0] {
                continue;
            }
            let mut node = 0;
            tree.nodes[0].total = add(tree.nodes[0].total, value);
            for &line in frames.iter().rev() {
                let function = app.lines.items[line as usize].function;
                node = *child_of.entry((node, function)).or_insert_with(|| {
                    let id = tree.nodes.len() as u32;
                    tree.nodes.push(Node { function, total: [0; 2], own: [0; 2], children: Vec::new() });
                    tree.nodes[node as usize].children.push(id);
                    id
                });
                tree.nodes[node as usize].total = add(tree.nodes[node as usize].total, value);
            }
            tree.nodes[node as usize].own = add(tree.nodes[node as usize].own, value);
        }
        tree
    }

    /// The boxes wide enough to see, depth first with children by name.
    fn flatten(&self, app: &Application, used: &mut Renumbered) -> Vec<i64> {
        let width = |node: &Node| {
            let share = |i: usize| node.total[i] as f64 / (self.nodes[0].total[i].max(1)) as f64;
            share(0).max(share(1))
        };
        let mut threshold = MIN_NODE_SHARE;
        if self.nodes.len() > MAX_NODES {
            let mut widths: Vec<f64> = self.nodes.iter().map(width).collect();
            let (_, nth, _) = widths.select_nth_unstable_by(MAX_NODES, |a, b| b.total_cmp(a));
            // A child is never wider than its parent, so what is kept
            // stays one tree.
            threshold = threshold.max(*nth + f64::EPSILON);
        }
        let diff = self.nodes[0].total[1] != 0;
        let mut flat = Vec::new();
        let mut stack = vec![(0u32, 0i64)];
        while let Some((id, depth)) = stack.pop() {
            let node = &self.nodes[id as usize];
            let function = if id == 0 { -1 } else { used.id(node.function) };
            flat.extend([depth, function, node.total[0], node.own[0]]);
            if diff {
                flat.extend([node.total[1], node.own[1]]);
            }
            let mut children: Vec<u32> = node
                .children
                .iter()
                .copied()
                .filter(|&child| width(&self.nodes[child as usize]) >= threshold)
                .collect();
            // By name (then file): the same order whatever order the files
            // were read in. Reversed, as the stack pops the last first.
            children.sort_by(|a, b| {
                let function = |id: &u32| {
                    let function = &app.functions.items[self.nodes[*id as usize].function as usize];
                    (&function.name, &function.file, function.kind as u8)
                };
                function(b).cmp(&function(a))
            });
            stack.extend(children.into_iter().map(|child| (child, depth + 1)));
        }
        flat
    }
}

fn add(a: [i64; 2], b: [i64; 2]) -> [i64; 2] {
    [a[0] + b[0], a[1] + b[1]]
}

/// Self and total of each function and of each line, cProfile's `tottime`
/// and `cumtime`: a function that recurses counts once per sample in total.
fn top(app: &Application, values: &[i64], used: &mut Renumbered) -> (Vec<[i64; 3]>, Vec<[i64; 4]>) {
    let mut functions = vec![[0i64; 2]; app.functions.items.len()];
    let mut lines = vec![[0i64; 2]; app.lines.items.len()];
    // The last stack that counted each function and line.
    let mut function_seen = vec![usize::MAX; functions.len()];
    let mut line_seen = vec![usize::MAX; lines.len()];
    for (stack, frames) in app.stacks.items.iter().enumerate() {
        let value = values[stack];
        if value == 0 {
            continue;
        }
        for (depth, &line) in frames.iter().enumerate() {
            let own = if depth == 0 { value } else { 0 };
            let function = app.lines.items[line as usize].function as usize;
            if function_seen[function] != stack {
                function_seen[function] = stack;
                functions[function] = [functions[function][0] + own, functions[function][1] + value];
            }
            if line_seen[line as usize] != stack {
                line_seen[line as usize] = stack;
                let entry = &mut lines[line as usize];
                *entry = [entry[0] + own, entry[1] + value];
            }
        }
    }
    // The heaviest first; ties by name, file and line, so that answers do
    // not change with the order files were read in.
    let by_name = |function: usize| {
        let function = &app.functions.items[function];
        (&function.name, &function.file, function.kind as u8)
    };
    let mut functions: Vec<(usize, [i64; 2])> =
        functions.into_iter().enumerate().filter(|(_, [_, total])| *total != 0).collect();
    functions.sort_unstable_by(|&(a, [a_own, a_total]), &(b, [b_own, b_total])| {
        (b_own, b_total).cmp(&(a_own, a_total)).then_with(|| by_name(a).cmp(&by_name(b)))
    });
    functions.truncate(MAX_ROWS);
    let mut lines: Vec<(usize, [i64; 2])> =
        lines.into_iter().enumerate().filter(|(_, [_, total])| *total != 0).collect();
    lines.sort_unstable_by(|&(a, [a_own, a_total]), &(b, [b_own, b_total])| {
        let line = |id: usize| (by_name(app.lines.items[id].function as usize), app.lines.items[id].line);
        (b_own, b_total).cmp(&(a_own, a_total)).then_with(|| line(a).cmp(&line(b)))
    });
    lines.truncate(MAX_ROWS);
    (
        functions.into_iter().map(|(function, [own, total])| [used.id(function as u32), own, total]).collect(),
        lines
            .into_iter()
            .map(|(line, [own, total])| {
                let line = &app.lines.items[line];
                [used.id(line.function), line.line, own, total]
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::{export::pprof::proto, view::resolve::Resolved};

    /// A sample of a test period: its stack (root first), values and labels.
    type TestSample<'a> = (&'a [&'a str], Vec<i64>, &'a [(&'a str, &'a str)]);

    /// A period of `profile`'s making: samples as (stack root first, values, labels).
    struct Period<'a> {
        start_ms: i64,
        types: &'a [&'a str],
        samples: Vec<TestSample<'a>>,
    }

    /// A pprof profile of `period`: functions named as given, in `app.py`, line 1.
    fn profile(period: &Period) -> proto::Profile {
        let mut strings = vec![String::new()];
        let mut string = |text: &str| match strings.iter().position(|known| known == text) {
            Some(id) => id as i64,
            None => {
                strings.push(text.to_owned());
                strings.len() as i64 - 1
            }
        };
        let file = string("app.py");
        let sample_type =
            period.types.iter().map(|kind| proto::ValueType { r#type: string(kind), unit: string("count") }).collect();
        let mut function = Vec::new();
        let mut location = Vec::new();
        let sample = period
            .samples
            .iter()
            .map(|(stack, values, labels)| proto::Sample {
                location_id: stack
                    .iter()
                    .rev()
                    .map(|name| {
                        let name = string(name);
                        let id = function.len() as u64 + 1;
                        function.push(proto::Function { id, name, filename: file, ..Default::default() });
                        location.push(proto::Location {
                            id,
                            line: vec![proto::Line { function_id: id, line: 1, column: 0 }],
                            ..Default::default()
                        });
                        id
                    })
                    .collect(),
                value: values.clone(),
                label: labels
                    .iter()
                    .map(|(key, value)| proto::Label { key: string(key), str: string(value), ..Default::default() })
                    .collect(),
            })
            .collect();
        proto::Profile {
            sample_type,
            sample,
            location,
            function,
            string_table: strings,
            time_nanos: period.start_ms * 1_000_000,
            duration_nanos: 10_000_000_000,
            ..Default::default()
        }
    }

    fn application(periods: &[(&str, Period)]) -> Application {
        let mut app = Application::default();
        for (file, period) in periods {
            app.add(file, Resolved::new(&profile(period).encode_to_vec()).unwrap());
        }
        app
    }

    fn everything(app: &Application, kind: &str) -> Selection {
        Selection { type_index: app.sample_type(kind).unwrap(), from_ms: 0, to_ms: i64::MAX, filters: Vec::new() }
    }

    /// The boxes as `(depth, name, total, self)`.
    fn boxes(flame: &Flame, stride: usize) -> Vec<(i64, &str, i64, i64)> {
        flame
            .nodes
            .chunks(stride)
            .map(|node| {
                let name = if node[1] < 0 { "all" } else { flame.functions[node[1] as usize].0.as_str() };
                (node[0], name, node[2], node[3])
            })
            .collect()
    }

    const CPU: &[&str] = &["cpu"];

    #[test]
    fn stacks_merge_from_the_root_and_children_go_by_name() {
        let app = application(&[(
            "p.pb.gz",
            Period {
                start_ms: 1_000,
                types: CPU,
                samples: vec![
                    (&["main", "b", "a"], vec![1], &[]),
                    (&["main", "a"], vec![3], &[]),
                    (&["main"], vec![2], &[]),
                ],
            },
        )]);
        let flame = flame(&app, &everything(&app, "cpu"), None);
        assert_eq!(flame.total, 6);
        assert_eq!(
            boxes(&flame, 4),
            [(0, "all", 6, 0), (1, "main", 6, 2), (2, "a", 3, 3), (2, "b", 1, 0), (3, "a", 1, 1)]
        );
        let name = |id: i64| flame.functions[id as usize].0.as_str();
        let top: Vec<_> = flame.top_functions.iter().map(|row| (name(row[0]), row[1], row[2])).collect();
        assert_eq!(top, [("a", 4, 4), ("main", 2, 6), ("b", 0, 1)]);
    }

    #[test]
    fn a_recursive_function_counts_once_per_sample_in_its_total() {
        let app = application(&[(
            "p.pb.gz",
            Period { start_ms: 0, types: CPU, samples: vec![(&["main", "walk", "walk", "walk"], vec![5], &[])] },
        )]);
        let flame = flame(&app, &everything(&app, "cpu"), None);
        let walk = flame.top_functions.iter().find(|row| flame.functions[row[0] as usize].0 == "walk").unwrap();
        assert_eq!((walk[1], walk[2]), (5, 5));
        assert_eq!(flame.top_lines.len(), 2, "main:1 and walk:1");
    }

    #[test]
    fn ranges_filters_and_the_timeline() {
        let labels_1: &[(&str, &str)] = &[("pid", "1"), ("wait", "lock")];
        let labels_2: &[(&str, &str)] = &[("pid", "2")];
        let app = application(&[
            ("1.pb.gz", Period { start_ms: 0, types: CPU, samples: vec![(&["a"], vec![1], labels_1)] }),
            (
                "2.pb.gz",
                Period {
                    start_ms: 10_000,
                    types: CPU,
                    samples: vec![(&["a"], vec![2], labels_1), (&["b"], vec![4], labels_2)],
                },
            ),
        ]);
        let filters = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let timeline = timeline(&app, 0, &filters(&[("pid", "2")]));
        assert_eq!(timeline.periods, [[0, 10_000, 0], [10_000, 20_000, 4]]);
        assert!(timeline.labels.contains(&("pid".into(), vec!["1".into(), "2".into()])));

        let total = |from_ms, to_ms, pairs: &[(&str, &str)]| {
            flame(&app, &Selection { type_index: 0, from_ms, to_ms, filters: filters(pairs) }, None).total
        };
        assert_eq!(total(0, i64::MAX, &[]), 7);
        assert_eq!(total(5_000, i64::MAX, &[]), 6, "periods that start in the range");
        assert_eq!(total(0, i64::MAX, &[("pid", "1"), ("pid", "2")]), 7, "one key: any of its values");
        assert_eq!(total(0, i64::MAX, &[("pid", "2"), ("wait", "lock")]), 0, "two keys: both");
        assert_eq!(total(0, i64::MAX, &[("pid", "1"), ("wait", "lock")]), 3);
    }

    #[test]
    fn heap_in_use_is_the_last_level_of_each_series_not_a_sum() {
        let types: &[&str] = &["alloc_space", "inuse_space"];
        let period = |start_ms, alloc, inuse| Period {
            start_ms,
            types,
            samples: vec![(&["main", "load"] as &[&str], vec![alloc, inuse], &[] as &[(&str, &str)])],
        };
        let app = application(&[
            ("0-1.pb.gz", period(0, 100, 50)),
            ("1-2.pb.gz", period(10_000, 100, 70)),
            ("0-1-pod2.pb.gz", period(0, 10, 5)),
        ]);
        assert_eq!(flame(&app, &everything(&app, "alloc_space"), None).total, 210);
        // One function each, however many files name it.
        assert_eq!(app.functions.items.len(), 2);
        assert_eq!(flame(&app, &everything(&app, "inuse_space"), None).total, 75);
    }

    #[test]
    fn levels_are_the_tables_averaged_types_and_other_writers_inuse_types() {
        for sample_type in table::SampleType::ALL {
            let row = sample_type.row();
            assert_eq!(is_level(row.name), row.aggregation == Aggregation::Average, "{}", row.name);
        }
        assert!(is_level("inuse_vms"), "another writer's level");
        assert!(!is_level("contentions"));
    }

    #[test]
    fn a_diff_carries_both_ranges_values() {
        let app = application(&[
            (
                "1.pb.gz",
                Period { start_ms: 0, types: CPU, samples: vec![(&["a"], vec![3], &[]), (&["b"], vec![1], &[])] },
            ),
            ("2.pb.gz", Period { start_ms: 10_000, types: CPU, samples: vec![(&["a"], vec![1], &[])] }),
        ]);
        let range = Selection { type_index: 0, from_ms: 10_000, to_ms: i64::MAX, filters: Vec::new() };
        let base = Selection { type_index: 0, from_ms: 0, to_ms: 10_000, filters: Vec::new() };
        let diff = flame(&app, &range, Some(&base));
        assert_eq!((diff.total, diff.base_total), (1, Some(4)));
        let rows: Vec<_> = diff.nodes.chunks(6).map(|node| (node[2], node[3], node[4], node[5])).collect();
        // all; a; b, which only the base has.
        assert_eq!(rows, [(1, 0, 4, 0), (1, 1, 3, 3), (0, 0, 1, 1)]);
    }

    #[test]
    fn boxes_too_narrow_to_see_are_not_sent() {
        let names: Vec<String> = (0..30_000).map(|i| format!("tiny_{i}")).collect();
        let mut samples: Vec<TestSample> = vec![(&["main", "heavy"], vec![1_000_000], &[])];
        let stacks: Vec<[&str; 2]> = names.iter().map(|name| ["main", name.as_str()]).collect();
        samples.extend(stacks.iter().map(|stack| (&stack[..], vec![1], &[] as &[(&str, &str)])));
        let app = application(&[("1.pb.gz", Period { start_ms: 0, types: CPU, samples })]);
        let flame = flame(&app, &everything(&app, "cpu"), None);
        assert_eq!(
            boxes(&flame, 4),
            [(0, "all", 1_030_000, 0), (1, "main", 1_030_000, 0), (2, "heavy", 1_000_000, 1_000_000)]
        );
        assert_eq!(flame.top_functions.len(), MAX_ROWS, "the top table keeps every function up to its limit");
    }
}
