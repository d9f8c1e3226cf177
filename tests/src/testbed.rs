//! The testbed: a simulated Kubernetes cluster faithful enough for kube-rs and kubectl.
//! See `tests/README.md` for what it is and what it knowingly is not.

pub mod admission;
pub mod api;
pub mod apitier;
pub mod auth;
pub mod cluster;
pub mod controllers;
pub mod dns;
pub mod images;
pub mod kubeconfig;
pub mod kubelet;
pub mod netio;
pub mod patch;
pub mod protobuf;
pub mod proxy;
pub mod resources;
pub mod runner;
pub mod selector;
pub mod servers;
pub mod status;
pub mod store;
pub mod streams;
pub mod tls;
pub mod topology;
