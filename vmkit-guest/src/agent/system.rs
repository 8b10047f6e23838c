//! Users, the host name, SSH keys and hardening.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::files::{Owner, write_bytes};
use super::{SystemHandler, TOOL_TIMEOUT, run_tool, systemd_is_init};
use crate::ops::{DEFAULT_DEPLOY_USER, HardenReport, HardenRequest};

/// First line of the block of keys vmkit manages in `authorized_keys`.
pub(super) const KEYS_BEGIN: &str = "# BEGIN vmkit managed keys (replaced by the vmkit agent)";
/// Last line of that block.
pub(super) const KEYS_END: &str = "# END vmkit managed keys";
/// Where the image names its default user.
const DEFAULT_USER_FILE: &str = "/etc/vmkit/default-user";
/// The sshd drop-in `harden` writes.
const SSHD_DROP_IN: &str = "/etc/ssh/sshd_config.d/50-vmkit.conf";
const SSHD_SETTINGS: &str = "# Written by the vmkit agent (harden); it is rewritten on the next harden.\n\
PermitRootLogin no\n\
PasswordAuthentication no\n\
KbdInteractiveAuthentication no\n";
/// The longest SSH public key line accepted.
const MAX_KEY: usize = 16 << 10;
/// The most keys one request may install.
const MAX_KEYS: usize = 1024;
/// Key types OpenSSH accepts in `authorized_keys`.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-ed25519-cert-v01@openssh.com",
    "ssh-rsa-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
];

/// A line of the passwd file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct User {
    pub(super) name: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) home: String,
    /// The login shell; `/bin/sh` when the entry names none.
    pub(super) shell: String,
}

/// A line of the group file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Group {
    pub(super) gid: u32,
    pub(super) members: Vec<String>,
}

fn read_optional(path: &Path) -> Result<Option<String>, String> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(format!("cannot read {}: {err}", path.display())),
    }
}

/// The user `name` (or with that uid, when `name` is a number) in `root`'s passwd file.
pub(super) fn lookup_user(root: &Path, name: &str) -> Result<Option<User>, String> {
    let passwd = read_optional(&root.join("etc/passwd"))?.unwrap_or_default();
    Ok(passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let [user, _, uid, gid, _, home, ..] = fields.as_slice() else {
            return None;
        };
        if *user != name && *uid != name {
            return None;
        }
        let shell = fields.get(6).copied().filter(|shell| !shell.is_empty());
        Some(User {
            name: (*user).to_owned(),
            uid: uid.parse().ok()?,
            gid: gid.parse().ok()?,
            home: (*home).to_owned(),
            shell: shell.unwrap_or("/bin/sh").to_owned(),
        })
    }))
}

/// The group `name` (or with that gid) in `root`'s group file.
pub(super) fn lookup_group(root: &Path, name: &str) -> Result<Option<Group>, String> {
    let groups = read_optional(&root.join("etc/group"))?.unwrap_or_default();
    Ok(groups.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let [group, _, gid, members, ..] = fields.as_slice() else {
            return None;
        };
        if *group != name && *gid != name {
            return None;
        }
        Some(Group {
            gid: gid.parse().ok()?,
            members: members
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }))
}

/// The gids of the groups that list `user` as a member in `root`'s group file.
pub(super) fn groups_of(root: &Path, user: &str) -> Result<Vec<u32>, String> {
    let groups = read_optional(&root.join("etc/group"))?.unwrap_or_default();
    Ok(groups
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let [_, _, gid, members, ..] = fields.as_slice() else {
                return None;
            };
            members
                .split(',')
                .any(|member| member == user)
                .then(|| gid.parse().ok())
                .flatten()
        })
        .collect())
}

/// The user the image names in `/etc/vmkit/default-user` (its first line), if any.
pub(super) fn image_default_user(handler: &SystemHandler) -> Option<String> {
    fs::read_to_string(handler.path(DEFAULT_USER_FILE))
        .ok()
        .and_then(|text| text.lines().next().map(|l| l.trim().to_owned()))
        .filter(|name| !name.is_empty())
}

/// The image's default user: the one in `/etc/vmkit/default-user`, else `root`.
fn default_user(handler: &SystemHandler) -> String {
    image_default_user(handler).unwrap_or_else(|| "root".to_owned())
}

/// Checks a host name: dot-separated labels of letters, digits and inner hyphens, at most
/// 64 bytes in all (the kernel's limit).
pub(super) fn check_hostname(hostname: &str) -> Result<(), String> {
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if hostname.is_empty() || hostname.len() > 64 || !hostname.split('.').all(valid_label) {
        return Err(format!("`{hostname}` is not a valid host name"));
    }
    Ok(())
}

/// `/etc/hosts` with its `127.0.1.1` line naming `hostname` (the full name, then the
/// first label), added after the `127.0.0.1` line when there was none.
pub(super) fn hosts_with(hosts: &str, hostname: &str) -> String {
    let short = hostname.split('.').next().unwrap_or(hostname);
    let entry = if short == hostname {
        format!("127.0.1.1\t{hostname}")
    } else {
        format!("127.0.1.1\t{hostname} {short}")
    };
    let is_ours = |line: &str| line.split_whitespace().next() == Some("127.0.1.1");
    let mut out = Vec::new();
    let mut placed = false;
    for line in hosts.lines() {
        if is_ours(line) {
            if !placed {
                out.push(entry.clone());
                placed = true;
            }
            continue;
        }
        out.push(line.to_owned());
    }
    if !placed {
        let at = out
            .iter()
            .position(|line| line.split_whitespace().next() == Some("127.0.0.1"))
            .map_or(0, |i| i + 1);
        out.insert(at, entry);
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

pub(super) async fn set_hostname(handler: &SystemHandler, hostname: &str) -> Result<(), String> {
    check_hostname(hostname)?;
    nix::unistd::sethostname(hostname)
        .map_err(|err| format!("sethostname({hostname}) failed: {err}"))?;
    write_bytes(
        handler.path("/etc/hostname"),
        format!("{hostname}\n").into_bytes(),
        0o644,
        Some(Owner { uid: 0, gid: 0 }),
    )
    .await?;
    let hosts_path = handler.path("/etc/hosts");
    let hosts = read_optional(&hosts_path)?.unwrap_or_else(|| {
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_owned()
    });
    let updated = hosts_with(&hosts, hostname);
    if updated != hosts {
        write_bytes(
            hosts_path,
            updated.into_bytes(),
            0o644,
            Some(Owner { uid: 0, gid: 0 }),
        )
        .await?;
    }
    Ok(())
}

/// Checks one public key line: one line, of bounded length, naming a key type OpenSSH
/// knows (options may come first).
pub(super) fn check_key(key: &str) -> Result<(), String> {
    let short: String = key.chars().take(40).collect();
    if key.is_empty() || key.len() > MAX_KEY || key.contains(['\n', '\r', '\0']) {
        return Err(format!("`{short}` is not a single-line SSH public key"));
    }
    if !key.split_whitespace().any(|word| KEY_TYPES.contains(&word)) {
        return Err(format!(
            "`{short}` is not an SSH public key of a known type"
        ));
    }
    Ok(())
}

/// The keys of vmkit's block in an `authorized_keys` text.
pub(super) fn managed_keys(text: &str) -> Vec<String> {
    let mut inside = false;
    let mut keys = Vec::new();
    for line in text.lines() {
        match line.trim_end() {
            KEYS_BEGIN => inside = true,
            KEYS_END => inside = false,
            key if inside && !key.is_empty() => keys.push(key.to_owned()),
            _ => {}
        }
    }
    keys
}

/// `text` with vmkit's block replaced by `keys` (at the end), or removed when there are
/// none; every other line is kept as it was.
pub(super) fn with_managed_keys(text: &str, keys: &[String]) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        match line.trim_end() {
            KEYS_BEGIN => inside = true,
            KEYS_END if inside => inside = false,
            _ if inside => {}
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if !keys.is_empty() {
        out.push_str(KEYS_BEGIN);
        out.push('\n');
        for key in keys {
            out.push_str(key.trim());
            out.push('\n');
        }
        out.push_str(KEYS_END);
        out.push('\n');
    }
    out
}

/// A user's home directory under the handler's root.
fn home_of(handler: &SystemHandler, user: &User) -> PathBuf {
    handler.path(&user.home)
}

/// Makes `dir` a directory owned by `owner` with `mode`, creating it when missing.
fn ensure_dir(dir: &Path, mode: u32, owner: Owner) -> Result<(), String> {
    let shown = dir.display();
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            if meta.uid() != owner.uid || meta.gid() != owner.gid {
                std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid))
                    .map_err(|err| format!("cannot give {shown} to its user: {err}"))?;
            }
            if meta.mode() & 0o7777 != mode {
                fs::set_permissions(dir, fs::Permissions::from_mode(mode))
                    .map_err(|err| format!("cannot set the mode of {shown}: {err}"))?;
            }
            Ok(())
        }
        Ok(_) => Err(format!("{shown} exists and is not a directory")),
        Err(_) => {
            fs::create_dir(dir).map_err(|err| format!("cannot create {shown}: {err}"))?;
            std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid))
                .map_err(|err| format!("cannot give {shown} to its user: {err}"))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))
                .map_err(|err| format!("cannot set the mode of {shown}: {err}"))
        }
    }
}

/// Writes `keys` as vmkit's block of `user`'s `authorized_keys`; returns whether the
/// file changed.
async fn write_keys(handler: &SystemHandler, user: &User, keys: &[String]) -> Result<bool, String> {
    let home = home_of(handler, user);
    if !home.is_dir() {
        return Err(format!(
            "{}'s home directory {} does not exist",
            user.name,
            home.display()
        ));
    }
    let owner = Owner {
        uid: user.uid,
        gid: user.gid,
    };
    let ssh = home.join(".ssh");
    ensure_dir(&ssh, 0o700, owner)?;
    let path = ssh.join("authorized_keys");
    let existing = read_optional(&path)?;
    let updated = with_managed_keys(existing.as_deref().unwrap_or_default(), keys);
    let same_file = fs::metadata(&path)
        .is_ok_and(|m| m.uid() == owner.uid && m.gid() == owner.gid && m.mode() & 0o7777 == 0o600);
    if existing.as_deref() == Some(updated.as_str()) && same_file {
        return Ok(false);
    }
    write_bytes(path, updated.into_bytes(), 0o600, Some(owner)).await?;
    Ok(true)
}

fn check_keys(keys: &[String]) -> Result<(), String> {
    if keys.len() > MAX_KEYS {
        return Err(format!(
            "{} keys are more than the {MAX_KEYS} allowed",
            keys.len()
        ));
    }
    keys.iter().try_for_each(|key| check_key(key))
}

pub(super) async fn install_ssh_keys(
    handler: &SystemHandler,
    user: Option<String>,
    keys: Vec<String>,
) -> Result<(), String> {
    check_keys(&keys)?;
    let name = user.unwrap_or_else(|| default_user(handler));
    let user = lookup_user(&handler.root, &name)?.ok_or_else(|| format!("no user `{name}`"))?;
    write_keys(handler, &user, &keys).await.map(|_| ())
}

/// Checks a user name as `useradd` would take it on Debian.
fn check_user_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    let rest_ok =
        bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !first_ok || !rest_ok || name.len() > 32 {
        return Err(format!("`{name}` is not a valid user name"));
    }
    Ok(())
}

/// Arguments that point `useradd`/`usermod` at the handler's root.
fn root_args(handler: &SystemHandler) -> Vec<String> {
    if handler.is_live() {
        Vec::new()
    } else {
        vec!["--root".to_owned(), handler.root.display().to_string()]
    }
}

async fn run_owned(program: &str, args: Vec<String>) -> Result<String, String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool(program, &args, TOOL_TIMEOUT).await
}

pub(super) async fn harden(
    handler: &SystemHandler,
    req: HardenRequest,
) -> Result<HardenReport, String> {
    let name = req.user.unwrap_or_else(|| DEFAULT_DEPLOY_USER.to_owned());
    check_user_name(&name)?;
    check_keys(&req.keys)?;
    let mut changes = Vec::new();

    // The user, in the sudo group (and the docker group, when there is one).
    if lookup_user(&handler.root, &name)?.is_none() {
        let shell = if handler.path("/bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        let mut args = root_args(handler);
        args.extend(["--create-home", "--shell", shell, "--user-group"].map(str::to_owned));
        args.push(name.clone());
        run_owned("useradd", args).await?;
        changes.push(format!("created user {name}"));
    }
    for group in ["sudo", "docker"] {
        let Some(found) = lookup_group(&handler.root, group)? else {
            continue;
        };
        if found.members.contains(&name) {
            continue;
        }
        let mut args = root_args(handler);
        args.extend(["--append", "--groups", group, name.as_str()].map(str::to_owned));
        run_owned("usermod", args).await?;
        changes.push(format!("added {name} to group {group}"));
    }
    let user = lookup_user(&handler.root, &name)?
        .ok_or_else(|| format!("useradd did not create `{name}`"))?;

    // sudo without a password: the user has none.
    let sudoers_dir = handler.path("/etc/sudoers.d");
    if sudoers_dir.is_dir() {
        let path = sudoers_dir.join(format!("50-vmkit-{name}"));
        let rule =
            format!("# Written by the vmkit agent (harden).\n{name} ALL=(ALL) NOPASSWD:ALL\n");
        if read_optional(&path)?.as_deref() != Some(rule.as_str()) {
            write_bytes(
                path,
                rule.into_bytes(),
                0o440,
                Some(Owner { uid: 0, gid: 0 }),
            )
            .await?;
            changes.push(format!("let {name} use sudo without a password"));
        }
    }

    // The keys of the default user (those vmkit installed) and the request's.
    let mut keys = match lookup_user(&handler.root, &default_user(handler))? {
        Some(owner) if owner.name != name => {
            let path = home_of(handler, &owner).join(".ssh/authorized_keys");
            managed_keys(&read_optional(&path)?.unwrap_or_default())
        }
        _ => Vec::new(),
    };
    for key in req.keys {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    if write_keys(handler, &user, &keys).await? {
        changes.push(format!("installed {} SSH keys for {name}", keys.len()));
    }

    // sshd: no root login, no passwords.
    let mut sshd_reloaded = false;
    if handler.path("/etc/ssh").is_dir() {
        let drop_in = handler.path(SSHD_DROP_IN);
        let previous = read_optional(&drop_in)?;
        if previous.as_deref() != Some(SSHD_SETTINGS) {
            if let Some(dir) = drop_in.parent() {
                fs::create_dir_all(dir)
                    .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
            }
            write_bytes(
                drop_in.clone(),
                SSHD_SETTINGS.as_bytes().to_vec(),
                0o644,
                Some(Owner { uid: 0, gid: 0 }),
            )
            .await?;
            changes.push("set sshd to refuse root logins and passwords".to_owned());
            if handler.is_live() {
                sshd_reloaded = reload_sshd(&drop_in, previous).await?;
            }
        }
    }
    Ok(HardenReport {
        user: name,
        changes,
        sshd_reloaded,
    })
}

/// Checks sshd's configuration and reloads it when systemd runs it; puts the previous
/// drop-in back when the check fails.
async fn reload_sshd(drop_in: &Path, previous: Option<String>) -> Result<bool, String> {
    if let Err(err) = run_tool("sshd", &["-t"], TOOL_TIMEOUT).await {
        let restored = match previous {
            Some(text) => write_bytes(drop_in.to_path_buf(), text.into_bytes(), 0o644, None).await,
            None => fs::remove_file(drop_in).map_err(|e| e.to_string()),
        };
        return Err(format!(
            "sshd rejects the hardened configuration, so it was not applied ({err}){}",
            restored
                .err()
                .map(|e| format!("; restoring the previous one failed: {e}"))
                .unwrap_or_default()
        ));
    }
    if !systemd_is_init() {
        return Ok(false);
    }
    // Debian's unit is ssh.service; reload only if it runs.
    run_tool(
        "systemctl",
        &["try-reload-or-restart", "ssh.service"],
        TOOL_TIMEOUT,
    )
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0nJ8BxX/7l8M1q1a7n user@host";

    #[test]
    fn hosts_line_is_replaced_in_place() {
        let hosts = "127.0.0.1\tlocalhost\n127.0.1.1\told\n::1\tlocalhost\n";
        assert_eq!(
            hosts_with(hosts, "new"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tnew\n::1\tlocalhost\n"
        );
    }

    #[test]
    fn hosts_line_is_added_after_localhost() {
        let hosts = "# comment\n127.0.0.1 localhost\n::1 localhost\n";
        assert_eq!(
            hosts_with(hosts, "box.example.org"),
            "# comment\n127.0.0.1 localhost\n127.0.1.1\tbox.example.org box\n::1 localhost\n"
        );
    }

    #[test]
    fn host_names_are_checked() {
        assert!(check_hostname("my-vm").is_ok());
        assert!(check_hostname("a.b-c.d").is_ok());
        for bad in ["", "-x", "x-", "a..b", "a b", "a_b", &"x".repeat(65)] {
            assert!(check_hostname(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key(KEY).is_ok());
        assert!(check_key(&format!("from=\"10.0.0.1\" {KEY}")).is_ok());
        assert!(check_key("not a key").is_err());
        assert!(check_key(&format!("{KEY}\nssh-rsa AAAA evil")).is_err());
    }

    #[test]
    fn managed_block_replaces_only_itself() {
        let text = format!("ssh-rsa AAAA mine\n{KEYS_BEGIN}\nssh-rsa OLD\n{KEYS_END}\n# after\n");
        let updated = with_managed_keys(&text, &[KEY.to_owned()]);
        assert_eq!(
            updated,
            format!("ssh-rsa AAAA mine\n# after\n{KEYS_BEGIN}\n{KEY}\n{KEYS_END}\n")
        );
        assert_eq!(managed_keys(&updated), vec![KEY.to_owned()]);
        assert_eq!(
            with_managed_keys(&updated, &[]),
            "ssh-rsa AAAA mine\n# after\n"
        );
    }

    #[test]
    fn user_names_are_checked() {
        assert!(check_user_name("deploy").is_ok());
        assert!(check_user_name("_x-1").is_ok());
        for bad in ["", "Deploy", "1x", "a:b", "a b", &"x".repeat(33)] {
            assert!(check_user_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
