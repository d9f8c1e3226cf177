//! What runs on a simulated node: the kubelet (pods as processes in their own network
//! namespaces), the pod runner, the images the kubelet knows and the programs they run, the
//! kube-proxy (nftables) and the cluster DNS.

pub mod dns;
pub mod image_programs;
pub mod images;
pub mod kubelet;
pub mod netio;
pub mod proxy;
pub mod runner;
pub mod security;
