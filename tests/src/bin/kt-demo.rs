//! The README demo (root): kt's eBPF redirect in a throwaway network namespace.
//!
//! A fake Service 10.96.0.10:80 is served by an "app pod"; a client in a pod cgroup calls
//! it; kt's programs are attached to that cgroup and the Service is redirected to a
//! "workstation tunnel" listener, then the redirect is removed. Everything is created in
//! namespaces and cgroups named `ktt-demo-*` and removed at the end, also on failure.

use std::{net::SocketAddr, process::ExitCode};

use kt_ebpf_common::{Counter, Mode, Redirect};
use kt_node_agent::ebpf::Redirector;
use kt_tests::harness::{
    self, cgroup::TestCgroup, netns::NetNs, probe, server::TagServer, unique_name,
};

fn main() -> ExitCode {
    if let Some(reason) = harness::ebpf_unsupported_reason() {
        eprintln!("this machine cannot run kt's eBPF redirect: {reason}");
        return ExitCode::FAILURE;
    }
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("the demo needs root (network namespaces, cgroups, eBPF)");
        return ExitCode::FAILURE;
    }
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo failed: {error}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let service: SocketAddr = "10.96.0.10:80".parse()?;
    let netns = NetNs::new(unique_name("demo"))?;
    netns.add_local_addrs(&["10.96.0.10/32"])?;
    let _app = TagServer::start(&netns, service, "app-pod")?;
    let tunnel = TagServer::start(&netns, "127.0.0.1:0".parse()?, "workstation")?;
    let pods = TestCgroup::new(&unique_name("demo-pods"))?;
    println!(
        "== a simulated node: netns {}, pods in cgroup {}",
        netns.name(),
        pods.path().display()
    );
    println!("   Service {service} is served by an app pod");

    let call = |what: &str| -> Result<(), Box<dyn std::error::Error>> {
        let seen = probe::connect(&netns, Some(pods.path()), service)?;
        println!(
            "   {what}: client -> {service} answered by '{}' (client's getpeername: {})",
            seen.server, seen.peer
        );
        Ok(())
    };
    call("before")?;

    println!("== kt-node-agent loads its eBPF programs and attaches them to the pods' cgroup");
    let mut redirector = Redirector::load()?;
    redirector.attach(pods.path())?;
    println!(
        "== exchange: {service} -> workstation tunnel listener {}",
        tunnel.addr()
    );
    redirector.insert(service, Redirect::to(tunnel.addr(), 1, Mode::Exchange))?;
    call("exchanged")?;
    call("exchanged")?;

    println!("== exchange ends: the map entry is removed");
    redirector.remove(service)?;
    call("after")?;

    let counters = redirector.counters()?;
    println!(
        "== counters: {} connects seen, {} redirected, {} getpeername restored",
        counters.get(Counter::ConnectSeen),
        counters.get(Counter::ConnectRedirected),
        counters.get(Counter::PeernameRestored)
    );
    drop(redirector);
    println!("== programs detached; namespace and cgroup are removed on exit");
    Ok(())
}
