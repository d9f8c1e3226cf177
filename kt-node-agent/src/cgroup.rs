//! cgroup v2 lookups: where the hierarchy is mounted and the id of a cgroup.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// The mount point of the cgroup2 hierarchy seen by this process (`/sys/fs/cgroup` on pure
/// v2 hosts, `/sys/fs/cgroup/unified` on hybrid ones), if any.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    cgroup2_mount_in(&mounts)
}

/// [`cgroup2_mount`] over the text of a `/proc/<pid>/mounts` file.
fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape_mount_path(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest
            .get(pos + 1..pos + 4)
            .and_then(|s| u8::from_str_radix(s, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The id of a cgroup2 directory, as `bpf_get_current_cgroup_id()` reports it for tasks
/// in that cgroup: the inode number of the directory.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    Ok(fs::metadata(dir)?.ino())
}

/// The cgroup2 directory of a process (`0::/path` in `/proc/<pid>/cgroup`), below `mount`.
pub fn cgroup_of_pid(mount: &Path, pid: u32) -> io::Result<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 entry"))?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// The pods' cgroup (what the redirect attaches to), from the agent's own cgroup path
/// relative to the cgroup2 mount: the topmost `kubepods*` directory (`kubepods.slice` with the
/// systemd driver, `kubepods` with cgroupfs); failing that, the parent of the agent's pod
/// directory (`pod<uid>`, `…-pod<uid>.slice`). `None` when neither is found.
pub fn pods_root(own: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = own.split('/').filter(|p| !p.is_empty()).collect();
    if let Some(i) = parts.iter().position(|p| p.starts_with("kubepods")) {
        return Some(parts[..=i].iter().collect());
    }
    let is_pod = |p: &&str| {
        let name = p.trim_end_matches(".slice");
        name.starts_with("pod") || name.contains("-pod")
    };
    let i = parts.iter().rposition(is_pod)?;
    Some(parts[..i].iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_cgroup_is_found_from_the_agents_own() {
        let systemd = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b.slice/cri-containerd-9f.scope";
        assert_eq!(pods_root(systemd), Some(PathBuf::from("kubepods.slice")));
        let cgroupfs = "/kubepods/burstable/pod1a2b/9f";
        assert_eq!(pods_root(cgroupfs), Some(PathBuf::from("kubepods")));
        // The testbed: <test cgroup>/<node>/pod<uid>.
        let testbed = "/ktt-ab12/node-1/pod5c8e";
        assert_eq!(pods_root(testbed), Some(PathBuf::from("ktt-ab12/node-1")));
        assert_eq!(pods_root("/system.slice/kt.service"), None);
        assert_eq!(pods_root("/"), None);
    }

    #[test]
    fn finds_cgroup2_on_hybrid_and_pure_hosts() {
        let hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mount_in(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_octal_sequences() {
        assert_eq!(unescape_mount_path(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape_mount_path(r"/x\\y"), r"/x\\y");
    }

    #[test]
    fn cgroup_id_is_the_directory_inode() {
        let dir = std::env::temp_dir();
        assert_eq!(cgroup_id(&dir).unwrap(), fs::metadata(&dir).unwrap().ino());
    }
}
