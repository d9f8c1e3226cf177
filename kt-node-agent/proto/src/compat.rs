//! Labels, annotations and names of the objects kt creates, exactly as ktctl v0.3.7 writes
//! them (`../shared/reference/ktctl-v0.3.7.md` §2), so that kt and the Go ktctl understand
//! each other's objects (`recover`, `clean`, conflicts).

/// Label on everything kt creates.
pub const CONTROL_BY: &str = "control-by";
pub const CONTROL_BY_KT: &str = "kt";
/// Label: the role of a kt pod.
pub const ROLE: &str = "kt-role";
pub const ROLE_SHADOW_CONNECT: &str = "shadow-connect";
pub const ROLE_SHADOW_EXCHANGE: &str = "shadow-exchange";
pub const ROLE_SHADOW_MESH: &str = "shadow-mesh";
pub const ROLE_SHADOW_PREVIEW: &str = "shadow-preview";
pub const ROLE_ROUTER: &str = "router";
/// Label: 20 random letters, the unique selector of a kt pod.
pub const TARGET: &str = "kt-target";
/// Annotation: Unix seconds of the last heartbeat.
pub const LAST_HEARTBEAT: &str = "kt-last-heart-beat";
/// Annotation: references to a shared shadow or router.
pub const REF_COUNT: &str = "kt-ref-count";
/// Annotation: the local user who owns the object.
pub const USER: &str = "kt-user";
/// Annotation: `k=v,k=v` details per role.
pub const CONFIG: &str = "kt-config";
/// Annotation on a user's Service: JSON of its original selector.
pub const SELECTOR: &str = "kt-selector";
/// Annotation on a user's Service: Unix time of a lock.
pub const LOCK: &str = "kt-lock";

/// The container name in every kt pod.
pub const CONTAINER: &str = "standalone";
/// ConfigMap key of the authorized public key, and of the private key.
pub const AUTHORIZED_KEY: &str = "authorized";
pub const PRIVATE_KEY: &str = "privateKey";
/// Volume of the authorized key in a shadow pod, and where it is mounted.
pub const SSH_VOLUME: &str = "ssh-public-key";
pub const SSH_MOUNT: &str = "/root/authorized";
/// The file name of the authorized key inside the mount.
pub const SSH_AUTHORIZED_FILE: &str = "authorized_keys";
/// The shadow's SSH port and its user.
pub const SSH_PORT: u16 = 22;
pub const SSH_USER: &str = "root";

/// `kt-connect-shadow-<5 lowercase letters>`: a connect shadow (and its ConfigMap).
pub fn connect_shadow_name(random: &str) -> String {
    format!("kt-connect-shadow-{random}")
}

/// The shared connect shadow (`--shareShadow`).
pub const SHARED_SHADOW: &str = "kt-connect-shadow-daemon";

/// `<5 lowercase letters>` for names.
pub fn random_lower(n: usize, mut next: impl FnMut() -> u32) -> String {
    (0..n)
        .map(|_| char::from(b'a' + (next() % 26) as u8))
        .collect()
}

/// `<20 letters>` for the `kt-target` label.
pub fn random_target(mut next: impl FnMut() -> u32) -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..20)
        .map(|_| char::from(LETTERS[(next() % LETTERS.len() as u32) as usize]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_v0_3_7() {
        let mut n = 0;
        let name = connect_shadow_name(&random_lower(5, || {
            n += 7;
            n
        }));
        assert!(
            name.starts_with("kt-connect-shadow-") && name.len() == 23,
            "{name}"
        );
        assert!(name[18..].chars().all(|c| c.is_ascii_lowercase()));
        let target = random_target(|| 51);
        assert_eq!(target, "Z".repeat(20));
    }
}
