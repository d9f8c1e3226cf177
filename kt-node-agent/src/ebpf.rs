//! The eBPF side of the agent: load the embedded `kt-ebpf` object, attach its programs to a
//! cgroup2 directory, and program redirects through a typed API. Nothing outside this
//! module touches aya.
//!
//! Dropping a [`Redirector`] detaches every program: links are never pinned, so a dead
//! agent means traffic falls back to the real endpoints (fail-open).

use std::{
    fs::File,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError},
};
pub use kt_ebpf_common::Transport;
use kt_ebpf_common::{
    COUNTERS_MAP, Counter, PROGRAMS, Redirect, SKIP_CGROUP_MAP, SVC_STATS_MAP, SVC4_MAP, SVC6_MAP,
    SvcKey4, SvcKey6, SvcStats,
};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

/// What a service-map entry matches: traffic of one transport to one address (a
/// ClusterIP:port or an endpoint IP:port). A plain address is its TCP key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ServiceKey {
    pub addr: SocketAddr,
    pub transport: Transport,
}

impl ServiceKey {
    pub const fn tcp(addr: SocketAddr) -> Self {
        Self {
            addr,
            transport: Transport::Tcp,
        }
    }

    pub const fn udp(addr: SocketAddr) -> Self {
        Self {
            addr,
            transport: Transport::Udp,
        }
    }

    pub const fn new(addr: SocketAddr, transport: Transport) -> Self {
        Self { addr, transport }
    }
}

impl From<SocketAddr> for ServiceKey {
    fn from(addr: SocketAddr) -> Self {
        Self::tcp(addr)
    }
}

/// `10.96.0.10:80`, `10.96.0.10:53/udp`: TCP, the common case, keeps the address alone.
impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.transport {
            Transport::Tcp => write!(f, "{}", self.addr),
            Transport::Udp => write!(f, "{}/udp", self.addr),
        }
    }
}

/// The compiled eBPF object, built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kt-ebpf"));

/// Oldest kernel with every hook and helper the object uses (getpeername hooks and the
/// ring buffer of aya-log came with 5.8).
pub const MIN_KERNEL: (u32, u32) = (5, 8);

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("kernel {found} is older than {}.{}, which kt's eBPF programs need", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
    #[error("failed to read the kernel version")]
    KernelVersion(#[source] io::Error),
    #[error("failed to load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("the kernel refused eBPF program {program}")]
    ProgramLoad {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("failed to open cgroup {}", path.display())]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to attach {program} to cgroup {}", cgroup.display())]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("eBPF map {name} failed")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("failed to read the id of cgroup {}", path.display())]
    CgroupId {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to set up the eBPF log reader")]
    Logger(#[source] io::Error),
}

/// The redirect programs, loaded into the kernel, with typed access to their maps.
pub struct Redirector {
    /// Owns the programs and their links; dropping it detaches them.
    ebpf: Ebpf,
    svc4: HashMap<MapData, SvcKey4, Redirect>,
    svc6: HashMap<MapData, SvcKey6, Redirect>,
    skip_cgroup: HashMap<MapData, u64, u8>,
    counters: PerCpuArray<MapData, u64>,
    svc_stats: PerCpuArray<MapData, SvcStats>,
    attached: Vec<PathBuf>,
}

/// Sums of the per-CPU global counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters([u64; Counter::ALL.len()]);

impl Counters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// `(name, value)` of every counter, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL.iter().map(|c| (c.name(), self.get(*c)))
    }
}

/// Whether this kernel can run the programs; the reason when it cannot.
pub fn check_kernel() -> Result<(), EbpfError> {
    let version = aya::util::KernelVersion::current()
        .map_err(|e| EbpfError::KernelVersion(io::Error::other(e)))?;
    if version < aya::util::KernelVersion::new(MIN_KERNEL.0 as u8, MIN_KERNEL.1 as u8, 0) {
        return Err(EbpfError::KernelTooOld {
            found: format!("{version:?}"),
        });
    }
    Ok(())
}

impl Redirector {
    /// Loads the object and every program into the kernel (the verifier runs here), without
    /// attaching anything.
    pub fn load() -> Result<Self, EbpfError> {
        check_kernel()?;
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(EbpfError::Load)?;
        for name in PROGRAMS {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| EbpfError::ProgramLoad {
                    program: name,
                    source,
                })?;
        }
        Ok(Self {
            svc4: typed_map(&mut ebpf, SVC4_MAP)?,
            svc6: typed_map(&mut ebpf, SVC6_MAP)?,
            skip_cgroup: typed_map(&mut ebpf, SKIP_CGROUP_MAP)?,
            counters: typed_map(&mut ebpf, COUNTERS_MAP)?,
            svc_stats: typed_map(&mut ebpf, SVC_STATS_MAP)?,
            ebpf,
            attached: Vec::new(),
        })
    }

    /// Attaches every program to a cgroup2 directory: connects from sockets of processes in
    /// it or below it are redirected. Never pass a host's cgroup root in a test.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), EbpfError> {
        let dir = File::open(cgroup).map_err(|source| EbpfError::OpenCgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        for name in PROGRAMS {
            program(&mut self.ebpf, name)?
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| EbpfError::Attach {
                    program: name,
                    cgroup: cgroup.to_owned(),
                    source,
                })?;
        }
        tracing::info!(cgroup = %cgroup.display(), programs = PROGRAMS.len(), "eBPF redirect attached");
        self.attached.push(cgroup.to_owned());
        Ok(())
    }

    /// The cgroups the programs are attached to.
    pub fn attached(&self) -> &[PathBuf] {
        &self.attached
    }

    /// Sends new connects (and, for UDP, datagrams of unconnected sockets) to `service` to
    /// `redirect`'s target. A v4-mapped IPv6 address is stored as its IPv4 address, which is
    /// what the programs look up.
    pub fn insert(
        &mut self,
        service: impl Into<ServiceKey>,
        redirect: Redirect,
    ) -> Result<(), EbpfError> {
        let service = service.into();
        let result = match canonical(service.addr) {
            SocketAddr::V4(a) => self
                .svc4
                .insert(SvcKey4::new(a, service.transport), redirect, 0),
            SocketAddr::V6(a) => self
                .svc6
                .insert(SvcKey6::new(a, service.transport), redirect, 0),
        };
        result.map_err(|source| EbpfError::Map {
            name: service_map(service.addr),
            source,
        })
    }

    /// Stops redirecting new connects and datagrams to `service`; returns whether it was
    /// redirected. Connections already redirected stay where they are.
    pub fn remove(&mut self, service: impl Into<ServiceKey>) -> Result<bool, EbpfError> {
        let service = service.into();
        let result = match canonical(service.addr) {
            SocketAddr::V4(a) => self.svc4.remove(&SvcKey4::new(a, service.transport)),
            SocketAddr::V6(a) => self.svc6.remove(&SvcKey6::new(a, service.transport)),
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if is_missing_key(&e) => Ok(false),
            Err(source) => Err(EbpfError::Map {
                name: service_map(service.addr),
                source,
            }),
        }
    }

    /// The redirect of `service`, if any.
    pub fn get(&self, service: impl Into<ServiceKey>) -> Result<Option<Redirect>, EbpfError> {
        let service = service.into();
        let result = match canonical(service.addr) {
            SocketAddr::V4(a) => self.svc4.get(&SvcKey4::new(a, service.transport), 0),
            SocketAddr::V6(a) => self.svc6.get(&SvcKey6::new(a, service.transport), 0),
        };
        match result {
            Ok(r) => Ok(Some(r)),
            Err(e) if is_missing_key(&e) => Ok(None),
            Err(source) => Err(EbpfError::Map {
                name: service_map(service.addr),
                source,
            }),
        }
    }

    /// Every redirect in the maps (an entry of a protocol kt never writes is left out).
    pub fn entries(&self) -> Result<Vec<(ServiceKey, Redirect)>, EbpfError> {
        let map_err = |name| move |source| EbpfError::Map { name, source };
        let mut out = Vec::new();
        for entry in self.svc4.iter() {
            let (k, v) = entry.map_err(map_err(SVC4_MAP))?;
            if let Some(transport) = Transport::of(k.proto) {
                out.push((ServiceKey::new(k.socket_addr().into(), transport), v));
            }
        }
        for entry in self.svc6.iter() {
            let (k, v) = entry.map_err(map_err(SVC6_MAP))?;
            if let Some(transport) = Transport::of(k.proto) {
                out.push((ServiceKey::new(k.socket_addr().into(), transport), v));
            }
        }
        Ok(out)
    }

    /// Never redirects sockets created by processes of this cgroup (the agent's own, so that
    /// it can dial the real endpoints). Nested cgroups are not covered: add them too.
    pub fn skip_cgroup(&mut self, cgroup: &Path) -> Result<u64, EbpfError> {
        let id = crate::cgroup::cgroup_id(cgroup).map_err(|source| EbpfError::CgroupId {
            path: cgroup.to_owned(),
            source,
        })?;
        self.skip_cgroup
            .insert(id, 1, 0)
            .map_err(|source| EbpfError::Map {
                name: SKIP_CGROUP_MAP,
                source,
            })?;
        Ok(id)
    }

    /// The global counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, EbpfError> {
        let mut out = Counters::default();
        for counter in Counter::ALL {
            let per_cpu =
                self.counters
                    .get(&(counter as u32), 0)
                    .map_err(|source| EbpfError::Map {
                        name: COUNTERS_MAP,
                        source,
                    })?;
            out.0[counter as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// The statistics of one `svc_id`, summed over CPUs.
    pub fn service_stats(&self, svc_id: u32) -> Result<SvcStats, EbpfError> {
        let per_cpu = self
            .svc_stats
            .get(&svc_id, 0)
            .map_err(|source| EbpfError::Map {
                name: SVC_STATS_MAP,
                source,
            })?;
        Ok(per_cpu.iter().fold(SvcStats::default(), |mut sum, s| {
            sum += *s;
            sum
        }))
    }

    /// Forwards the programs' aya-log records to `tracing` (through the `log` bridge that
    /// the subscriber installs) until `shutdown`. Without it, records stay in the ring
    /// buffer and are dropped when it is full.
    pub fn log_forwarder(
        &mut self,
        shutdown: CancellationToken,
    ) -> Result<impl Future<Output = ()> + use<>, EbpfError> {
        let logger = aya_log::EbpfLogger::init(&mut self.ebpf)
            .map_err(|e| EbpfError::Logger(io::Error::other(e)))?;
        // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the
        // logger, and `as_raw_fd` always returns that same fd.
        let mut logger =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
                .map_err(|e| EbpfError::Logger(io::Error::other(e.to_string())))?;
        Ok(async move {
            loop {
                let mut guard = tokio::select! {
                    () = shutdown.cancelled() => break,
                    guard = logger.readable_mut() => match guard {
                        Ok(guard) => guard,
                        Err(error) => {
                            tracing::warn!(%error, "eBPF log reader stopped");
                            break;
                        }
                    },
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        })
    }
}

impl Drop for Redirector {
    fn drop(&mut self) {
        if !self.attached.is_empty() {
            tracing::info!(cgroups = ?self.attached, "eBPF redirect detached");
        }
    }
}

/// Ids of kt's programs loaded in the kernel right now, by any process. An agent that is
/// not running should leave none: links are never pinned, so nothing outlives it.
pub fn loaded_kt_programs() -> Result<Vec<u32>, EbpfError> {
    let mut ids = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(|source| EbpfError::ProgramLoad {
            program: "(listing)",
            source,
        })?;
        if info
            .name_as_str()
            .is_some_and(|name| PROGRAMS.contains(&name))
        {
            ids.push(info.id());
        }
    }
    Ok(ids)
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, EbpfError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram { name })?;
    program.try_into().map_err(|source| EbpfError::ProgramLoad {
        program: name,
        source,
    })
}

fn typed_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap { name })?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// aya reports a missing key as `KeyNotFound` on lookup but as the raw `ENOENT` of
/// `bpf_map_delete_elem` on removal.
fn is_missing_key(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// `::ffff:a.b.c.d` is the IPv4 service a.b.c.d to the programs.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn service_map(addr: SocketAddr) -> &'static str {
    if canonical(addr).is_ipv4() {
        SVC4_MAP
    } else {
        SVC6_MAP
    }
}

#[cfg(test)]
mod tests {
    use kt_ebpf_common::{MAPS, PROGRAMS};

    use super::*;

    /// Parses the embedded object without a kernel: every program and map that userspace
    /// names must exist in it, as a cgroup sock_addr program of the right attach type.
    #[test]
    fn embedded_object_has_every_named_program_and_map() {
        let object = aya_obj::Object::parse(OBJECT).expect("embedded object parses");
        for name in PROGRAMS {
            let program = object
                .programs
                .get(name)
                .unwrap_or_else(|| panic!("program {name} missing from the object"));
            let section = format!("{:?}", program.section);
            let hook = name.trim_start_matches("kt_");
            assert!(
                section.contains("CgroupSockAddr") && section.to_lowercase().contains(hook),
                "program {name} has section {section}"
            );
        }
        for name in MAPS {
            assert!(
                object.maps.contains_key(name),
                "map {name} missing; have {:?}",
                object.maps.keys()
            );
        }
    }

    #[test]
    fn v4_mapped_services_use_the_ipv4_map() {
        let mapped: SocketAddr = "[::ffff:10.96.0.10]:80".parse().unwrap();
        assert_eq!(
            canonical(mapped),
            "10.96.0.10:80".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(service_map(mapped), SVC4_MAP);
        assert_eq!(service_map("[fd00::1]:80".parse().unwrap()), SVC6_MAP);
    }
}
