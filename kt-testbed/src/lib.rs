//! kt-testbed: a simulated Kubernetes cluster faithful enough for kube-rs and the installed
//! kubectl, built from network namespaces, cgroups and processes on one machine. See
//! `kt-testbed/README.md` for what it is and what it knowingly is not.
//!
//! - [`api`]: the API server stand-in (store, verbs, watch, RBAC, subresources) and
//!   [`api::api_only::UnprivilegedApi`], the API server alone for unprivileged tests;
//! - [`node`]: what runs on a node: the kubelet, the pod runner, the test images, the
//!   kube-proxy and the cluster DNS;
//! - [`controllers`]: workloads, scheduler, endpoints, garbage collection;
//! - [`cluster::Testbed`]: all of it on a [`topology`] of namespaces;
//! - [`sys`]: network namespaces, cgroups and temporary directories that clean up after
//!   themselves.

pub mod api;
pub mod cluster;
pub mod controllers;
pub mod kubeconfig;
pub mod node;
pub mod runtime;
pub mod sys;
pub mod topology;
pub mod upstream_dns;
