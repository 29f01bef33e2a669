//! The messages of pprof's `profile.proto` (package `perftools.profiles`),
//! made by prost from the official file (see `build.rs`).
#![allow(dead_code, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/perftools.profiles.rs"));
