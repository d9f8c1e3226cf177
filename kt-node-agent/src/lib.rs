//! The kt node agent: runs on every node (DaemonSet) and redirects exchanged Service
//! traffic in the kernel with the programs of `kt-ebpf`.
//!
//! Modules: [`agent`] is role `agent` (the DaemonSet: redirects from session objects, the
//! SSH server holding sessions, the mesh router, health and metrics); [`router_role`] is
//! role `router` (v0.3.7's mesh router pod); [`shadow`] is the SSH endpoint of role
//! `shadow`, and [`dns_relay`] its cluster DNS relay; [`ebpf`] loads, attaches and programs
//! the eBPF object; [`cgroup`] finds the cgroup2 hierarchy and cgroup ids; [`tasks`] runs a
//! role's named tasks, stopping all of them at the first failure; [`admission`] bounds the
//! connections the SSH and HTTP servers hold before a client has proved anything.

mod admission;
pub mod agent;
pub mod cgroup;
pub mod dns_relay;
pub mod ebpf;
pub mod navigator;
pub mod router_role;
pub mod shadow;
mod ssh_server;
pub mod tasks;
