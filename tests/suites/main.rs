//! kt's suites, one test binary (one link of the harness, the testbed and the agent instead
//! of one per suite). Tiers, as `cargo test` sees them:
//!
//! - unprivileged, run by default: `api_conformance`, `controllers`, `rbac` and part of
//!   `kubectl` (the API server alone, as any user);
//! - privileged (`--features privileged`, root): `ebpf`, `nftables`;
//! - end to end (`--features e2e`, root, a simulated cluster): `agent`, `connect`,
//!   `exchange`, `faults`, `hostile`, `kubeconfig`, `ops`, the rest of `kubectl`, `seed`, `shapes`, `testbed`,
//!   `tunnel`, `workloads`.
//!
//! Without the features the others are listed as ignored, with the reason; `tests/run test`
//! runs them all.

mod agent;
mod api_conformance;
mod connect;
mod controllers;
mod ebpf;
mod exchange;
mod faults;
mod hostile;
mod kubeconfig;
mod kubectl;
mod mesh;
mod nftables;
mod ops;
mod preview;
mod rbac;
mod seed;
mod shapes;
mod testbed;
mod tunnel;
mod workloads;
