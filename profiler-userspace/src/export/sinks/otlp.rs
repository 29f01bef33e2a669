//! OTLP profiles (the OpenTelemetry protocol's profiles signal, still
//! `v1development`) over HTTP with protobuf, for an OpenTelemetry Collector:
//! `POST /v1development/profiles` with an `ExportProfilesServiceRequest`.
//!
//! Made from the upload's pprof, the interchange every sink shares: the
//! string table is kept as is; functions, locations, stacks and labels go to
//! the request's shared dictionary (whose first entries are the zero values
//! the protocol reserves); and since an OTLP profile has one sample type,
//! each pprof sample type becomes a profile. The application and the
//! profile's labels describe the resource.

use std::{collections::HashMap, io::Read};

use prost::Message;

use super::{DeliveryError, Upload};
use crate::export::pprof::proto as pprof;

/// The types prost made of the official .proto files (see `build.rs`), in
/// modules that follow their packages, as the generated code expects.
#[allow(dead_code, clippy::all)]
mod generated {
    pub mod opentelemetry {
        pub mod proto {
            pub mod common {
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/opentelemetry.proto.common.v1.rs"));
                }
            }
            pub mod resource {
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/opentelemetry.proto.resource.v1.rs"));
                }
            }
            pub mod profiles {
                pub mod v1development {
                    include!(concat!(env!("OUT_DIR"), "/opentelemetry.proto.profiles.v1development.rs"));
                }
            }
            pub mod collector {
                pub mod profiles {
                    pub mod v1development {
                        include!(concat!(env!("OUT_DIR"), "/opentelemetry.proto.collector.profiles.v1development.rs"));
                    }
                }
            }
        }
    }
}

use generated::opentelemetry::proto::{
    collector::profiles::v1development::ExportProfilesServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    profiles::v1development::{
        Function, KeyValueAndUnit, Line, Location, Mapping, Profile, ProfilesDictionary, ResourceProfiles, Sample,
        ScopeProfiles, Stack, ValueType,
    },
    resource::v1::Resource,
};

const PATH: &str = "/v1development/profiles";

pub struct Otlp {
    client: reqwest::Client,
    /// E.g. `http://collector:4318`, without the path.
    url: String,
}

impl Otlp {
    pub fn new(url: &str) -> Otlp {
        Otlp { client: reqwest::Client::new(), url: url.trim_end_matches('/').to_owned() }
    }

    pub async fn deliver(&self, upload: &Upload) -> Result<(), DeliveryError> {
        let request = export_request(upload).map_err(|error| DeliveryError::Refused(format!("{error:#}")))?;
        let response = self
            .client
            .post(format!("{}{PATH}", self.url))
            .header("Content-Type", "application/x-protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
            .map_err(|error| DeliveryError::Retry(super::error_chain(&error)))?;
        let status = response.status().as_u16();
        super::outcome(status, &response.text().await.unwrap_or_default())
    }
}

/// The OTLP request for an upload.
pub fn export_request(upload: &Upload) -> anyhow::Result<ExportProfilesServiceRequest> {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(&upload.pprof_gz[..]).read_to_end(&mut bytes)?;
    let source = pprof::Profile::decode(&bytes[..])?;
    let mut dictionary = ProfilesDictionary {
        // The protocol reserves index 0 of every table for a zero value.
        mapping_table: vec![Mapping::default()],
        location_table: vec![Location::default()],
        function_table: vec![Function::default()],
        link_table: vec![Default::default()],
        string_table: source.string_table.clone(),
        attribute_table: vec![KeyValueAndUnit::default()],
        stack_table: vec![Stack::default()],
    };
    let locations = add_locations(&source, &mut dictionary);
    let keys = add_samples(&source, &locations, &mut dictionary);
    let profiles = profiles(&source, &keys);
    let mut resource_attributes = vec![key_value("service.name", &upload.application)];
    resource_attributes.extend(upload.labels.iter().map(|(key, value)| {
        // The semantic conventions' name for the host label.
        key_value(if key == "host" { "host.name" } else { key }, value)
    }));
    Ok(ExportProfilesServiceRequest {
        resource_profiles: vec![ResourceProfiles {
            resource: Some(Resource { attributes: resource_attributes, ..Default::default() }),
            scope_profiles: vec![ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: "ferroscope".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                profiles,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
        dictionary: Some(dictionary),
    })
}

/// An index in one of the dictionary's tables.
fn index(value: usize) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// A pprof string id as an index in the dictionary's string table (the
/// same table).
fn string(id: i64) -> i32 {
    i32::try_from(id).unwrap_or(0)
}

/// Adds the functions and locations of `source` to the dictionary: the
/// index of each location there, by its pprof id.
fn add_locations(source: &pprof::Profile, dictionary: &mut ProfilesDictionary) -> HashMap<u64, i32> {
    let mut functions = HashMap::new();
    for function in &source.function {
        functions.insert(function.id, index(dictionary.function_table.len()));
        dictionary.function_table.push(Function {
            name_strindex: string(function.name),
            system_name_strindex: string(function.system_name),
            filename_strindex: string(function.filename),
            start_line: function.start_line,
        });
    }
    let mut locations = HashMap::new();
    for location in &source.location {
        locations.insert(location.id, index(dictionary.location_table.len()));
        let lines = location
            .line
            .iter()
            .map(|line| Line {
                function_index: functions.get(&line.function_id).copied().unwrap_or(0),
                line: line.line,
                column: 0,
            })
            .collect();
        dictionary.location_table.push(Location { lines, ..Default::default() });
    }
    locations
}

/// Adds the stacks and labels of the samples of `source` to the dictionary:
/// per sample, the index of its stack and of its attributes there.
fn add_samples(
    source: &pprof::Profile,
    locations: &HashMap<u64, i32>,
    dictionary: &mut ProfilesDictionary,
) -> Vec<(i32, Vec<i32>)> {
    let mut stacks: HashMap<Vec<i32>, i32> = HashMap::new();
    let mut attributes: HashMap<(i64, i64), i32> = HashMap::new();
    let mut keys = Vec::with_capacity(source.sample.len());
    for sample in &source.sample {
        let location_indices: Vec<i32> =
            sample.location_id.iter().map(|id| locations.get(id).copied().unwrap_or(0)).collect();
        let stack_index = *stacks.entry(location_indices.clone()).or_insert_with(|| {
            dictionary.stack_table.push(Stack { location_indices });
            index(dictionary.stack_table.len() - 1)
        });
        let attribute_indices = sample
            .label
            .iter()
            .map(|label| {
                *attributes.entry((label.key, label.str)).or_insert_with(|| {
                    let value = source.string_table.get(label.str as usize).cloned().unwrap_or_default();
                    dictionary.attribute_table.push(KeyValueAndUnit {
                        key_strindex: string(label.key),
                        value: Some(string_value(value)),
                        unit_strindex: 0,
                    });
                    index(dictionary.attribute_table.len() - 1)
                })
            })
            .collect::<Vec<_>>();
        keys.push((stack_index, attribute_indices));
    }
    keys
}

/// A profile per sample type of `source`, with the samples that have a
/// value of that type; `keys`: the stack and attributes of each sample.
fn profiles(source: &pprof::Profile, keys: &[(i32, Vec<i32>)]) -> Vec<Profile> {
    let value_type = |value_type: &pprof::ValueType| ValueType {
        type_strindex: string(value_type.r#type),
        unit_strindex: string(value_type.unit),
    };
    source
        .sample_type
        .iter()
        .enumerate()
        .map(|(column, sample_type)| Profile {
            sample_type: Some(value_type(sample_type)),
            samples: source
                .sample
                .iter()
                .zip(keys)
                .filter(|(sample, _)| sample.value.get(column).is_some_and(|&value| value != 0))
                .map(|(sample, (stack_index, attribute_indices))| Sample {
                    stack_index: *stack_index,
                    attribute_indices: attribute_indices.clone(),
                    values: vec![sample.value[column]],
                    ..Default::default()
                })
                .collect(),
            time_unix_nano: u64::try_from(source.time_nanos).unwrap_or(0),
            duration_nano: u64::try_from(source.duration_nanos).unwrap_or(0),
            period_type: source.period_type.as_ref().map(value_type),
            period: source.period,
            ..Default::default()
        })
        .collect()
}

fn string_value(value: String) -> AnyValue {
    AnyValue { value: Some(any_value::Value::StringValue(value)) }
}

fn key_value(key: &str, value: &str) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(string_value(value.to_owned())), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;
    use crate::aggregate::{Measurement, PeriodProfile};
    use crate::stack::{Frame, FrameKind, Thread};

    #[test]
    fn a_profile_per_sample_type_over_one_dictionary() {
        let start = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let labels = BTreeMap::from([("host".to_owned(), "web-1".to_owned())]);
        let mut profile = PeriodProfile::new("checkout".into(), labels, start, 10_000_000);
        profile.end = start + Duration::from_secs(45);
        let frame = |function: &str, line| Frame {
            kind: FrameKind::Python,
            function: function.into(),
            file: "/srv/app.py".into(),
            start_line: 1,
            line,
        };
        let thread = Thread {
            pid: 7,
            container_pid: None,
            container_id: None,
            tid: 8,
            thread_name: "w".into(),
            process_name: "python".into(),
            context: None,
        };
        profile.add(&[frame("crunch", 3), frame("main", 9)], &thread, Measurement::Cpu);
        profile.add(&[frame("crunch", 3), frame("main", 9)], &thread, Measurement::Cpu);
        profile.add(&[frame("main", 10)], &thread, Measurement::Cpu);
        let upload = Upload::new(&profile, crate::export::pprof::encode_gzipped(&profile).unwrap());

        let request = export_request(&upload).unwrap();
        let dictionary = request.dictionary.as_ref().unwrap();
        let string = |index: i32| dictionary.string_table[index as usize].as_str();
        let resource = request.resource_profiles[0].resource.as_ref().unwrap();
        let attribute = |key: &str| {
            resource.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()).and_then(|v| v.value)
        };
        assert_eq!(attribute("service.name"), Some(any_value::Value::StringValue("checkout".into())));
        assert_eq!(attribute("host.name"), Some(any_value::Value::StringValue("web-1".into())));
        let profiles = &request.resource_profiles[0].scope_profiles[0].profiles;
        let types: Vec<_> =
            profiles.iter().map(|profile| string(profile.sample_type.as_ref().unwrap().type_strindex)).collect();
        assert_eq!(types, ["samples", "cpu"]);
        let samples = &profiles[1].samples;
        assert_eq!(samples.len(), 2, "one per stack");
        let cpu_of = |function: &str| -> i64 {
            samples
                .iter()
                .filter(|sample| {
                    let stack = &dictionary.stack_table[sample.stack_index as usize];
                    let leaf = &dictionary.location_table[stack.location_indices[0] as usize];
                    string(dictionary.function_table[leaf.lines[0].function_index as usize].name_strindex) == function
                })
                .map(|sample| sample.values[0])
                .sum()
        };
        assert_eq!((cpu_of("crunch"), cpu_of("main")), (20_000_000, 10_000_000));
        // Index 0 of every table is the zero value.
        assert_eq!(dictionary.function_table[0], Function::default());
        assert_eq!(dictionary.stack_table[0], Stack::default());
        let labels: Vec<_> = samples[0]
            .attribute_indices
            .iter()
            .map(|&index| string(dictionary.attribute_table[index as usize].key_strindex))
            .collect();
        assert!(labels.contains(&"tid"), "{labels:?}");
    }
}
