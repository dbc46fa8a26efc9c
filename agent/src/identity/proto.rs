//! Istio's `istio.v1.auth` certificate API, generated from
//! `agent/proto/ca.proto` by `build.rs`.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("istio.v1.auth");
