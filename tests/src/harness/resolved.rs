//! systemd-resolved running the testbed workstation's DNS, as on an Ubuntu or Fedora
//! laptop: a D-Bus system bus of the workstation's own
//! ([`kt_testbed::cluster::WORKSTATION_SYSTEM_BUS`]), `resolved` with the workstation's
//! resolver (the testbed's upstream, `corp.example` search domain) as global DNS, and
//! `/etc/resolv.conf` a link to its `stub-resolv.conf` — all inside the workstation's
//! network namespace and the mount namespaces of `kt-testbed exec` (`workstation/mounts`),
//! never the host's.
//!
//! The programs come unpacked from Debian's `systemd-resolved` and `libsystemd-shared`
//! packages under [`ROOT`] (`tests/scripts/setup.sh`): installing the package would make
//! the host's `/etc/resolv.conf` a link to resolved's stub.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use kt_testbed::cluster::{Testbed, WORKSTATION_SYSTEM_BUS};

use super::workstation::{Background, run};

/// Where setup.sh unpacks systemd-resolved and its library.
pub const ROOT: &str = "/opt/kt-testbed/systemd-resolved";
/// resolved's file with its stub and every link's search domains, which the workstation's
/// `/etc/resolv.conf` links to.
pub const STUB_FILE: &str = "/run/systemd/resolve/stub-resolv.conf";

/// A D-Bus system bus that lets anyone own and call anything: the workstation's own.
const BUS_CONFIG: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>ADDRESS</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#;

/// resolved's settings: the testbed's upstream for every name no link claims; no
/// multicast name protocols.
const RESOLVED_CONF: &str =
    "[Resolve]\nDNS=172.30.0.1\nDomains=corp.example\nLLMNR=no\nMulticastDNS=no\n";

/// The bus and resolved, running; both killed when dropped.
pub struct Resolved {
    /// `resolvectl` for the workstation (a script setting the library path and the bus).
    pub resolvectl: PathBuf,
    // Dropped in this order: resolved before its bus.
    _resolved: Background,
    _bus: Background,
}

impl Resolved {
    /// Starts the bus and resolved in `tb`'s workstation, links its resolv.conf to the stub
    /// file, and waits until resolved answers for a name of the upstream's. Panics when
    /// setup.sh has not unpacked resolved.
    pub async fn start(tb: &Testbed) -> Self {
        let root = Path::new(ROOT);
        // Debian 12's package has it under /lib, later (merged /usr) ones under /usr/lib.
        let daemon = [
            "lib/systemd/systemd-resolved",
            "usr/lib/systemd/systemd-resolved",
        ]
        .into_iter()
        .map(|path| root.join(path))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("{ROOT} has no systemd-resolved: run tests/scripts/setup.sh"));
        let ws = tb.dir.join("workstation");
        let dir = ws.join("resolved");
        let run_systemd = dir.join("run-systemd");
        // resolved reads these as its own user, whatever this process's umask.
        for made in [&dir, &run_systemd, &run_systemd.join("resolved.conf.d")] {
            std::fs::create_dir_all(made).expect("resolved's directories");
            set_mode(made, 0o755);
        }
        let write = |path: &Path, content: &str, mode: u32| {
            std::fs::write(path, content).expect("resolved's files");
            set_mode(path, mode);
        };
        write(
            &run_systemd.join("resolved.conf.d/kt-testbed.conf"),
            RESOLVED_CONF,
            0o644,
        );
        let bus_config = dir.join("bus.conf");
        write(
            &bus_config,
            &BUS_CONFIG.replace("ADDRESS", WORKSTATION_SYSTEM_BUS),
            0o644,
        );
        // resolved drops root for its own user, which this machine need not have.
        for (file, entry) in [
            (
                "passwd",
                "systemd-resolve:x:991:991:systemd Resolver:/:/usr/sbin/nologin\n",
            ),
            ("group", "systemd-resolve:x:991:\n"),
        ] {
            let host = std::fs::read_to_string(Path::new("/etc").join(file)).expect("/etc file");
            let mut own = host.clone();
            if !host.lines().any(|l| l.starts_with("systemd-resolve:")) {
                own.push_str(entry);
            }
            write(&dir.join(file), &own, 0o644);
        }
        let library = root.join(format!(
            "usr/lib/{}-linux-gnu/systemd",
            std::env::consts::ARCH
        ));
        let library_path = format!("LD_LIBRARY_PATH={}", library.display());
        let resolvectl = dir.join("resolvectl");
        write(
            &resolvectl,
            &format!(
                "#!/bin/sh\nexec env {library_path} {} \"$@\"\n",
                root.join("usr/bin/resolvectl").display()
            ),
            0o755,
        );
        // resolvectl where ktctl looks for it (an overlay on /usr/local/sbin, in the
        // command's mount namespace only).
        std::fs::write(
            ws.join("mounts"),
            format!(
                "symlink /etc/resolv.conf {STUB_FILE}\n\
                 bind {} /run/systemd\n\
                 bind {} /etc/passwd\n\
                 bind {} /etc/group\n\
                 bind {} /usr/local/sbin/resolvectl\n",
                run_systemd.display(),
                dir.join("passwd").display(),
                dir.join("group").display(),
                resolvectl.display(),
            ),
        )
        .expect("workstation mounts");
        let bus = Background::spawn(
            tb,
            Path::new("dbus-daemon"),
            &[
                "--config-file",
                bus_config.to_str().expect("UTF-8 path"),
                "--nofork",
                "--nopidfile",
            ],
        );
        let bus_up = || {
            run(
                tb,
                &[
                    "dbus-send",
                    "--system",
                    "--print-reply",
                    "--dest=org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus.ListNames",
                ],
            )
            .0
        };
        for _ in 0..100 {
            if bus_up() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let resolved = Background::spawn(
            tb,
            Path::new("env"),
            &[&library_path, daemon.to_str().expect("UTF-8 path")],
        );
        let resolvectl_arg = resolvectl.to_str().expect("UTF-8 path");
        for _ in 0..100 {
            let (ok, out) = run(tb, &[resolvectl_arg, "query", "www.example.test"]);
            if ok && out.contains("192.0.2.10") {
                return Self {
                    resolvectl,
                    _resolved: resolved,
                    _bus: bus,
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "systemd-resolved did not answer: {}\nbus: {}",
            resolved.log(),
            bus.log()
        );
    }

    /// `resolvectl ARGS…` on the workstation: (exit ok, stdout).
    pub fn ctl(&self, tb: &Testbed, args: &[&str]) -> (bool, String) {
        let mut all = vec![self.resolvectl.to_str().expect("UTF-8 path")];
        all.extend_from_slice(args);
        run(tb, &all)
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
