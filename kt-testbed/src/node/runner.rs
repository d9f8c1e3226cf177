//! `kt-testbed run-in-pod SPEC`: what sits between the kubelet and a container's program.
//! Single-threaded, so that namespace changes apply to the whole process: join the pod's
//! cgroup and network namespace, make a private mount (and UTS) namespace with the pod's
//! files bind-mounted, then exec the program. A mount point whose parent directories do not
//! exist on the host gets an overlay on its deepest existing ancestor; one right under `/`
//! (`/data`) gets a root of the pod's own, a tmpfs holding binds of the host's top-level
//! entries. Nothing is ever created on the host's file system. Last, just before the exec,
//! the process gets the capabilities and `no_new_privs` of the container's
//! `securityContext` ([`crate::node::security`]).

use std::{
    ffi::CString,
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};

use crate::node::security::ProcessSecurity;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// A symbolic link `path` → `points_to` in place of whatever `path` is, made in the new
/// mount namespace only (an overlay on `path`'s directory): a workstation whose
/// `/etc/resolv.conf` links to systemd-resolved's stub file, as on Ubuntu.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Symlink {
    pub path: PathBuf,
    pub points_to: PathBuf,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunSpec {
    /// cgroup2 directory to join, if any.
    pub cgroup: Option<PathBuf>,
    /// Network namespace to join (the node's for hostNetwork pods); `None` stays in the
    /// caller's.
    pub netns: Option<PathBuf>,
    /// Join the mount and UTS namespaces of this process (exec into a running container)
    /// instead of making new ones.
    pub join_pid: Option<u32>,
    pub hostname: String,
    /// Made before `mounts` (whose binds an overlay made later would hide).
    #[serde(default)]
    pub symlinks: Vec<Symlink>,
    pub mounts: Vec<BindMount>,
    /// Where overlay upper/work directories go (the pod's state directory).
    pub scratch: PathBuf,
    pub env: Vec<(String, String)>,
    pub argv: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// Capabilities and `no_new_privs` for the program; the default keeps the runner's own
    /// (root's) sets.
    #[serde(default)]
    pub security: ProcessSecurity,
}

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}

fn setns(path: &Path, kind: libc::c_int) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    // SAFETY: plain syscall on a valid fd; this process is single-threaded.
    check(
        unsafe { libc::setns(file.as_raw_fd(), kind) },
        &format!("setns {}", path.display()),
    )
}

fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (source, fstype, data) = (
        CString::new(source)?,
        CString::new(fstype)?,
        CString::new(data)?,
    );
    let target = cstr(target)?;
    let data_ptr = if data.is_empty() {
        std::ptr::null()
    } else {
        data.as_ptr().cast()
    };
    // SAFETY: valid C strings that outlive the call.
    check(
        unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                data_ptr,
            )
        },
        &format!("mount {}", target.to_string_lossy()),
    )
}

/// Sets up the process as `spec` says and execs the program; returns only on failure.
pub fn exec(spec: &RunSpec) -> io::Error {
    match prepare(spec) {
        Err(e) => e,
        Ok(()) => {
            let mut cmd = Command::new(&spec.argv[0]);
            cmd.args(&spec.argv[1..])
                .env_clear()
                .envs(spec.env.iter().map(|(k, v)| (k, v)));
            if let Some(cwd) = &spec.cwd {
                cmd.current_dir(cwd);
            }
            let security = spec.security.clone();
            // SAFETY: this process is single-threaded (see the module docs), so the hook may
            // allocate; it runs right before execve, after every mount above needed root's
            // capabilities.
            unsafe {
                cmd.pre_exec(move || restrict(&security));
            }
            let e = cmd.exec();
            io::Error::new(e.kind(), format!("exec {}: {e}", spec.argv[0]))
        }
    }
}

/// Limits this process to `security`'s capabilities, as runc does for a container: the
/// bounding set first (dropping needs `CAP_SETPCAP`, which is still held), then inheritable
/// and ambient emptied, then permitted and effective. A root process's permitted set after
/// execve is its bounding set (the kernel treats root as holding every file capability),
/// so the bounding set is what limits the program. A wanted capability this process does
/// not hold itself (the machine's own bounding set lacks it) cannot be granted: it is
/// named on stderr, the container's log, and left out.
fn restrict(security: &ProcessSecurity) -> io::Result<()> {
    use caps::CapSet;
    if let Some(names) = &security.capabilities {
        let held = caps::read(None, CapSet::Permitted).map_err(io::Error::other)?;
        let mut keep = caps::CapsHashSet::new();
        for name in names {
            let cap: caps::Capability = name.parse().map_err(io::Error::other)?;
            if held.contains(&cap) {
                keep.insert(cap);
            } else {
                eprintln!("kt-testbed run-in-pod: this node cannot grant {name}; left out");
            }
        }
        let fail = |what: &'static str| {
            move |e: caps::errors::CapsError| {
                io::Error::other(format!("set {what} capabilities: {e}"))
            }
        };
        // The bounding set can only be dropped from, one capability at a time.
        for cap in caps::read(None, CapSet::Bounding).map_err(fail("bounding"))? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(fail("bounding"))?;
            }
        }
        caps::clear(None, CapSet::Ambient).map_err(fail("ambient"))?;
        caps::clear(None, CapSet::Inheritable).map_err(fail("inheritable"))?;
        caps::set(None, CapSet::Effective, &keep).map_err(fail("effective"))?;
        caps::set(None, CapSet::Permitted, &keep).map_err(fail("permitted"))?;
    }
    if security.no_new_privs {
        // SAFETY: plain prctl with constant arguments.
        check(
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            "prctl(PR_SET_NO_NEW_PRIVS)",
        )?;
    }
    Ok(())
}

fn prepare(spec: &RunSpec) -> io::Result<()> {
    if spec.argv.is_empty() {
        return Err(io::Error::other("no command"));
    }
    if let Some(cgroup) = &spec.cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).map_err(
            |e| io::Error::new(e.kind(), format!("join cgroup {}: {e}", cgroup.display())),
        )?;
    }
    if let Some(netns) = &spec.netns {
        setns(netns, libc::CLONE_NEWNET)?;
    }
    if let Some(pid) = spec.join_pid {
        setns(
            Path::new(&format!("/proc/{pid}/ns/uts")),
            libc::CLONE_NEWUTS,
        )?;
        return setns(Path::new(&format!("/proc/{pid}/ns/mnt")), libc::CLONE_NEWNS);
    }
    // SAFETY: plain syscall; single-threaded process.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS) },
        "unshare",
    )?;
    mount(
        "none",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        "",
    )?;
    if !spec.hostname.is_empty() {
        let name = CString::new(spec.hostname.as_str())?;
        // SAFETY: valid buffer and length.
        check(
            unsafe { libc::sethostname(name.as_ptr(), spec.hostname.len()) },
            "sethostname",
        )?;
    }
    let mut made = Made::default();
    for link in &spec.symlinks {
        let dir = link
            .path
            .parent()
            .ok_or_else(|| io::Error::other("a symlink at / has no directory"))?
            .canonicalize()?;
        if dir == Path::new("/") {
            return Err(io::Error::other("symlinks in / are not supported"));
        }
        overlay(&dir, &spec.scratch, &mut made)?;
        match std::fs::remove_file(&link.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::os::unix::fs::symlink(&link.points_to, &link.path)?;
    }
    for m in &spec.mounts {
        ensure_target(&m.target, m.source.is_dir(), &spec.scratch, &mut made)?;
        mount(
            &m.source.to_string_lossy(),
            &m.target,
            "",
            libc::MS_BIND | libc::MS_REC,
            "",
        )?;
        if m.read_only {
            mount(
                "none",
                &m.target,
                "",
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                "",
            )?;
        }
    }
    Ok(())
}

/// What [`ensure_target`] made so far in this mount namespace.
#[derive(Default)]
struct Made {
    overlays: usize,
    /// Whether `/` is the pod's own root already.
    own_root: bool,
}

/// Makes `target` exist inside this mount namespace only.
fn ensure_target(target: &Path, dir: bool, scratch: &Path, made: &mut Made) -> io::Result<()> {
    if target.exists() {
        return Ok(());
    }
    let mut ancestor = target.parent();
    while let Some(a) = ancestor {
        if a.exists() {
            break;
        }
        ancestor = a.parent();
    }
    let ancestor = ancestor.unwrap_or(Path::new("/")).canonicalize()?;
    if ancestor == Path::new("/") {
        if !made.own_root {
            own_root(scratch)?;
            made.own_root = true;
        }
    } else {
        overlay(&ancestor, scratch, made)?;
    }
    // Resolve the target through the (possibly symlinked) ancestor we overlaid.
    if dir {
        std::fs::create_dir_all(target)
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(target, b"")
    }
}

/// Mounts a writable overlay on `dir` (its upper and work directories under `scratch`):
/// what is changed in it stays in this mount namespace.
fn overlay(dir: &Path, scratch: &Path, made: &mut Made) -> io::Result<()> {
    made.overlays += 1;
    let n = made.overlays;
    let (upper, work) = (
        scratch.join(format!("ovl{n}/upper")),
        scratch.join(format!("ovl{n}/work")),
    );
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        dir.display(),
        upper.display(),
        work.display()
    );
    mount("overlay", dir, "overlay", 0, &data)
}

/// Makes this mount namespace's root a tmpfs holding a bind of each of the host's
/// top-level entries (symlinks copied), so that new top-level directories are the pod's
/// alone. `pivot_root` rather than `chroot`: `kubectl exec` joins the namespace and gets
/// its root.
fn own_root(scratch: &Path) -> io::Result<()> {
    let root = scratch.join("root");
    std::fs::create_dir_all(&root)?;
    mount("tmpfs", &root, "tmpfs", 0, "mode=755")?;
    for entry in std::fs::read_dir("/")? {
        let entry = entry?;
        let (host, own) = (entry.path(), root.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&host)?, &own)?;
            continue;
        }
        if kind.is_dir() {
            std::fs::create_dir(&own)?;
        } else {
            std::fs::write(&own, b"")?;
        }
        mount(
            &host.to_string_lossy(),
            &own,
            "",
            libc::MS_BIND | libc::MS_REC,
            "",
        )?;
    }
    let old = root.join(".host-root");
    std::fs::create_dir(&old)?;
    let (new_root, put_old) = (cstr(&root)?, cstr(&old)?);
    // SAFETY: valid C strings; this process is single-threaded and alone in its mount
    // namespace, whose mounts are private.
    let pivoted =
        unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(if pivoted == 0 { 0 } else { -1 }, "pivot_root")?;
    std::env::set_current_dir("/")?;
    // SAFETY: a valid C string.
    check(
        unsafe { libc::umount2(c"/.host-root".as_ptr(), libc::MNT_DETACH) },
        "umount the host's root",
    )?;
    std::fs::remove_dir("/.host-root")
}
