//! Faults (issue 16, item 1), each injected for real on the testbed while kt carries
//! traffic (exchange, mesh and connect), with the behaviour kt promises after it: the
//! scenarios of `kt_tests::harness::faults`, run once each. How long recovery took is
//! printed; the `faults` benchmark reports medians. No time is a pass/fail condition here,
//! only a generous bound on waiting.

use kt_tests::harness::faults::{
    Probed, api_server_stopped_under_a_mesh_and_connect, api_server_stopped_under_an_exchange,
    direct_path_black_holed, every_port_forward_stream_dropped, holding_agent_killed,
    node_removed_for_good,
};

/// `ktctl forward` and a shadow-mode `ktctl exchange`, both over the API server's
/// port-forward, come back each of three times every port-forward stream is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn every_port_forward_stream_dropped_forward_and_exchange_come_back() {
    every_port_forward_stream_dropped(3).await;
}

/// An agent-mode exchange goes on through a 30 s API server outage, and a `kill -9` of
/// ktctl during a second one reverts within the lease once the API server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_api_server_stopped_for_30_s_keeps_an_agent_exchange_and_a_killed_ktctl_reverts() {
    let probed = Probed::start().await;
    api_server_stopped_under_an_exchange(&probed).await;
    probed.tb.stop().await;
}

/// An agent-mode mesh and connect go on through a 30 s API server outage, and a `kill -9`
/// of the mesh's ktctl during a second one reverts the header route within the lease once
/// the API server is back, connect untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_api_server_stopped_for_30_s_keeps_an_agent_mesh_and_connect_and_a_killed_mesh_reverts()
{
    let probed = Probed::start().await;
    api_server_stopped_under_a_mesh_and_connect(&probed).await;
    probed.tb.stop().await;
}

/// The holding agent killed mid-transfer fails open on its node, and its replacement
/// redirects again with nothing done by the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_holding_agent_killed_mid_transfer_fails_open_and_its_replacement_redirects_again() {
    let probed = Probed::start().await;
    let exchange = probed.exchange().await;
    holding_agent_killed(&probed, &exchange).await;
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    probed.tb.stop().await;
}

/// The direct path black-holed: ktctl moves the exchange to the port-forward by itself and
/// the agent keeps only the newer connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_direct_path_black_holed_moves_the_exchange_to_the_port_forward() {
    let probed = Probed::start().await;
    direct_path_black_holed(&probed).await;
    probed.tb.stop().await;
}

/// The holding agent's node removed for good: the session moves to the other agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_node_removed_for_good_moves_its_sessions_to_the_other_agent() {
    node_removed_for_good().await;
}
