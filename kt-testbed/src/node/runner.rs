//! `kt-testbed run-in-pod SPEC`: what sits between the kubelet and a container's program.
//! Single-threaded, so that namespace changes apply to the whole process: join the pod's
//! cgroup and network namespace, make a private mount (and UTS) namespace with the pod's
//! files bind-mounted, then exec the program. A mount point whose parent directories do not
//! exist on the host gets an overlay on its deepest existing ancestor, so nothing is ever
//! created on the host's file system.

use std::{
    ffi::CString,
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
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
    pub mounts: Vec<BindMount>,
    /// Where overlay upper/work directories go (the pod's state directory).
    pub scratch: PathBuf,
    pub env: Vec<(String, String)>,
    pub argv: Vec<String>,
    pub cwd: Option<PathBuf>,
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
            let e = cmd.exec();
            io::Error::new(e.kind(), format!("exec {}: {e}", spec.argv[0]))
        }
    }
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
    let mut overlays = 0;
    for m in &spec.mounts {
        ensure_target(&m.target, m.source.is_dir(), &spec.scratch, &mut overlays)?;
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

/// Makes `target` exist inside this mount namespace only.
fn ensure_target(target: &Path, dir: bool, scratch: &Path, overlays: &mut usize) -> io::Result<()> {
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
        return Err(io::Error::other(format!(
            "refusing to overlay / for {}",
            target.display()
        )));
    }
    *overlays += 1;
    let (upper, work) = (
        scratch.join(format!("ovl{overlays}/upper")),
        scratch.join(format!("ovl{overlays}/work")),
    );
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        ancestor.display(),
        upper.display(),
        work.display()
    );
    mount("overlay", &ancestor, "overlay", 0, &data)?;
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
