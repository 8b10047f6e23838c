//! `vmkit image build`: VM images made from the recipes in `images/`.
//!
//! An image is a directory `<images_dir>/<name>/` holding a kernel, an initramfs, an
//! ext4 root filesystem and a `manifest.json` that names them (paths relative to the
//! manifest's directory) with the image's part of the kernel command line. Recipes are
//! bash scripts compiled into this binary; each runs with `OUT` (an empty directory to
//! fill), `CACHE` (downloads kept between builds) and `AGENT` (the static vmkit-agent
//! to put in the image), and writes `vmlinuz`, `initramfs.img`, `rootfs.ext4`,
//! `kernel-release` and optionally `cmdline` into `OUT`.
//!
//! An image is rebuilt only when its digest changes: SHA-256 over the recipe and the
//! agent binary. It is built in a directory beside its final place and moved there
//! when complete, so a failed build leaves the previous image as it was.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The recipes compiled into this binary: image name and build script, each run as
/// `images/lib.sh` (shared functions) followed by the recipe's `build.sh`.
const RECIPES: &[(&str, &str)] = &[
    (
        "tiny",
        concat!(
            include_str!("../../../images/lib.sh"),
            include_str!("../../../images/tiny/build.sh")
        ),
    ),
    (
        "base",
        concat!(
            include_str!("../../../images/lib.sh"),
            include_str!("../../../images/base/build.sh")
        ),
    ),
];

/// The manifest's file name inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest format this module writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// The command line of an image whose recipe writes no `cmdline` file.
const DEFAULT_CMDLINE: &str = "root=/dev/vda rw rootfstype=ext4 panic=-1";

const KERNEL: &str = "vmlinuz";
const INITRAMFS: &str = "initramfs.img";
const ROOTFS: &str = "rootfs.ext4";
const KERNEL_RELEASE: &str = "kernel-release";
const CMDLINE: &str = "cmdline";

const AGENT_HOW_TO: &str = "build it with scripts/build-agent.sh";
/// Where the `vmkit` Debian package installs the static agent.
pub const PACKAGED_AGENT: &str = "/usr/lib/vmkit/vmkit-agent";

/// What `build` builds, from what, and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The recipe's name (see [`recipes`]), also the image's directory name.
    pub name: String,
    /// Where images live: `<data_dir>/images`.
    pub images_dir: PathBuf,
    /// Downloads kept between builds: `<data_dir>/cache`.
    pub cache_dir: PathBuf,
    /// The statically linked vmkit-agent to put in the image (see [`find_agent`]).
    pub agent: PathBuf,
    /// Rebuild even when the image is up to date.
    pub force: bool,
}

/// What `build` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutcome {
    /// The image's `manifest.json`.
    pub manifest_path: PathBuf,
    /// False when the existing image was up to date and left alone.
    pub rebuilt: bool,
}

/// An image's `manifest.json`. File names are relative to its directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    /// Hex SHA-256 over the recipe and the agent binary (see [`image_digest`]).
    pub digest: String,
    pub kernel: String,
    pub initramfs: String,
    pub rootfs: String,
    /// The image's part of the kernel command line; hypervisor backends append
    /// their own (`console=ttyS0`, ...).
    pub cmdline: String,
    pub kernel_release: String,
    pub agent_sha256: String,
    pub built_at_ms: u64,
}

impl Manifest {
    /// Reads and parses a manifest file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let manifest: Self = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid image manifest", path.display()))?;
        ensure!(
            manifest.format == MANIFEST_FORMAT,
            "{} has manifest format {}; this vmkit reads format {MANIFEST_FORMAT}",
            path.display(),
            manifest.format
        );
        Ok(manifest)
    }

    /// The image files this manifest names, relative to its directory.
    fn files(&self) -> [&str; 3] {
        [&self.kernel, &self.initramfs, &self.rootfs]
    }
}

/// The names of the recipes compiled into this binary.
pub fn recipes() -> impl Iterator<Item = &'static str> {
    RECIPES.iter().map(|(name, _)| *name)
}

fn recipe(name: &str) -> Result<&'static str> {
    RECIPES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, script)| *script)
        .with_context(|| {
            let known: Vec<_> = recipes().collect();
            format!("unknown image `{name}`; known images: {}", known.join(", "))
        })
}

/// Builds the image `opts.name` into `<images_dir>/<name>/` unless it is up to date.
///
/// Runs the recipe with bash; its output goes to stderr. Builds of the same image
/// wait for each other (a lock file in `images_dir`).
pub fn build(opts: &BuildOptions) -> Result<BuildOutcome> {
    build_recipe(opts, recipe(&opts.name)?)
}

fn build_recipe(opts: &BuildOptions, recipe: &str) -> Result<BuildOutcome> {
    let name = opts.name.as_str();
    let agent_path = std::path::absolute(&opts.agent)
        .with_context(|| format!("bad agent path {}", opts.agent.display()))?;
    check_agent(&agent_path)?;
    let agent = fs::read(&agent_path)
        .with_context(|| format!("cannot read the agent {}", agent_path.display()))?;
    let digest = image_digest(recipe.as_bytes(), &agent);

    let images_dir = std::path::absolute(&opts.images_dir)
        .with_context(|| format!("bad images directory {}", opts.images_dir.display()))?;
    let cache_dir = std::path::absolute(&opts.cache_dir)
        .with_context(|| format!("bad cache directory {}", opts.cache_dir.display()))?;
    for dir in [&images_dir, &cache_dir] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let target = images_dir.join(name);
    let manifest_path = target.join(MANIFEST_FILE);

    let lock_path = images_dir.join(format!(".{name}.lock"));
    let lock = File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;

    if !opts.force && is_current(&target, name, &digest) {
        return Ok(BuildOutcome {
            manifest_path,
            rebuilt: false,
        });
    }
    remove_leftovers(&images_dir, name)?;

    let work = TempDir::create(images_dir.join(format!(".{name}.build-{}", std::process::id())))?;
    let out = work.path().join("image");
    fs::create_dir(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let script = work.path().join("build.sh");
    fs::write(&script, recipe).with_context(|| format!("cannot write {}", script.display()))?;
    run_recipe(name, &script, &out, &cache_dir, &agent_path)?;

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: name.to_owned(),
        digest,
        kernel: KERNEL.to_owned(),
        initramfs: INITRAMFS.to_owned(),
        rootfs: ROOTFS.to_owned(),
        cmdline: read_optional_line(&out.join(CMDLINE))?
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned()),
        kernel_release: read_optional_line(&out.join(KERNEL_RELEASE))?.with_context(|| {
            format!("the `{name}` recipe wrote no {KERNEL_RELEASE} file (a recipe bug)")
        })?,
        agent_sha256: hex(&Sha256::digest(&agent)),
        built_at_ms: now_ms(),
    };
    for file in manifest.files() {
        let path = out.join(file);
        let meta = fs::metadata(&path)
            .with_context(|| format!("the `{name}` recipe wrote no {file} (a recipe bug)"))?;
        ensure!(
            meta.is_file() && meta.len() > 0,
            "the `{name}` recipe wrote an empty {file}"
        );
    }
    let mut json = serde_json::to_vec_pretty(&manifest).context("cannot encode the manifest")?;
    json.push(b'\n');
    fs::write(out.join(MANIFEST_FILE), json).context("cannot write the manifest")?;
    sync_dir_contents(&out)?;

    replace_dir(
        &out,
        &target,
        &images_dir.join(format!(".{name}.old-{}", std::process::id())),
    )?;
    sync_path(&images_dir)?;
    Ok(BuildOutcome {
        manifest_path,
        rebuilt: true,
    })
}

/// SHA-256 over the recipe and the agent, each preceded by its length (u64 LE) so
/// that no two different pairs give the same input.
pub fn image_digest(recipe: &[u8], agent: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [recipe, agent] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex(&hasher.finalize())
}

/// Whether `target` holds a complete image of `name` built with `digest`.
fn is_current(target: &Path, name: &str, digest: &str) -> bool {
    Manifest::read(&target.join(MANIFEST_FILE)).is_ok_and(|m| {
        m.name == name && m.digest == digest && m.files().iter().all(|f| target.join(f).is_file())
    })
}

/// Removes what an interrupted build of `name` left in `images_dir`. The caller holds
/// the image's lock, so no build of it is running.
fn remove_leftovers(images_dir: &Path, name: &str) -> Result<()> {
    let prefixes = [format!(".{name}.build-"), format!(".{name}.old-")];
    let entries = fs::read_dir(images_dir)
        .with_context(|| format!("cannot list {}", images_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", images_dir.display()))?;
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if prefixes.iter().any(|p| file_name.starts_with(p.as_str())) {
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn run_recipe(name: &str, script: &Path, out: &Path, cache: &Path, agent: &Path) -> Result<()> {
    // The recipe's stdout goes to our stderr, so that our stdout stays for results.
    let stderr = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot duplicate stderr")?;
    let status = Command::new("bash")
        .arg(script)
        .env("OUT", out)
        .env("CACHE", cache)
        .env("AGENT", agent)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr))
        .status()
        .context("cannot run bash, which runs image recipes")?;
    ensure!(
        status.success(),
        "building the `{name}` image failed ({status}); the recipe's output above says why \
         (a missing tool: run scripts/install-deps.sh)"
    );
    Ok(())
}

/// The first line of a file, trimmed, or `None` when the file does not exist.
fn read_optional_line(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let line = text.lines().next().unwrap_or_default().trim();
            ensure!(!line.is_empty(), "{} is empty", path.display());
            Ok(Some(line.to_owned()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Moves the directory `new` to `target`, replacing what is there: the old directory
/// is first renamed to `old`, then removed.
fn replace_dir(new: &Path, target: &Path, old: &Path) -> Result<()> {
    let had_old = match fs::rename(target, old) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(e).with_context(|| format!("cannot move {} aside", target.display()));
        }
    };
    if let Err(e) = fs::rename(new, target) {
        if had_old {
            // Put the previous image back; if even that fails, it stays in `old`
            // and the next build removes it.
            let _ = fs::rename(old, target);
        }
        return Err(e)
            .with_context(|| format!("cannot move the new image to {}", target.display()));
    }
    if had_old {
        fs::remove_dir_all(old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}

/// Flushes every file in `dir` and the directory itself to disk, so that a crash
/// after the image is moved into place cannot leave a manifest naming lost data.
fn sync_dir_contents(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        sync_path(&entry.path())?;
    }
    sync_path(dir)
}

fn sync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush {} to disk", path.display()))
}

/// A directory removed, with its contents, when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn create(path: PathBuf) -> Result<Self> {
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

// ---------------------------------------------------------------------------------
// Finding the agent

/// Finds the vmkit-agent binary to put in images: `explicit` if given, else
/// `vmkit-agent` beside this executable, else what scripts/build-agent.sh builds
/// (`$CARGO_TARGET_DIR/agent/<triple>/release/vmkit-agent`, then `target/agent/...`
/// in the current directory and in the workspace this binary was built from), else
/// the one the Debian package installs ([`PACKAGED_AGENT`]).
///
/// The agent runs in the guest with no libraries, so it must be statically linked;
/// dynamically linked candidates (such as the one `cargo build` puts beside the CLI)
/// are skipped.
pub fn find_agent(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        check_agent(path)?;
        return std::path::absolute(path)
            .with_context(|| format!("bad agent path {}", path.display()));
    }
    let candidates = agent_candidates();
    let mut rejected = Vec::new();
    for path in &candidates {
        if !path.is_file() {
            continue;
        }
        match check_agent(path) {
            Ok(()) => {
                return std::path::absolute(path)
                    .with_context(|| format!("bad agent path {}", path.display()));
            }
            Err(e) => rejected.push(format!("{e:#}")),
        }
    }
    let looked: Vec<_> = candidates.iter().map(|p| p.display().to_string()).collect();
    let mut message = format!(
        "no statically linked vmkit-agent found; {AGENT_HOW_TO}, or name one explicitly \
         (looked at: {})",
        looked.join(", ")
    );
    for reason in rejected {
        message.push_str("; ");
        message.push_str(&reason);
    }
    bail!(message)
}

fn agent_candidates() -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(Path::parent)
    {
        candidates.push(dir.join("vmkit-agent"));
    }
    let mut target_dirs = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        target_dirs.push(PathBuf::from(dir));
    }
    target_dirs.push(PathBuf::from("target"));
    // The workspace this binary was built from: bins/vmkit/../..
    if let Some(workspace) = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2) {
        target_dirs.push(workspace.join("target"));
    }
    let arch = std::env::consts::ARCH;
    for dir in target_dirs {
        for libc in ["gnu", "musl"] {
            candidates.push(
                dir.join("agent")
                    .join(format!("{arch}-unknown-linux-{libc}"))
                    .join("release/vmkit-agent"),
            );
        }
    }
    // Last, so that a build in a checkout wins over an installed package.
    candidates.push(PathBuf::from(PACKAGED_AGENT));
    candidates
}

/// Checks that `path` is an executable for this machine's architecture that needs no
/// dynamic loader.
fn check_agent(path: &Path) -> Result<()> {
    let info = read_elf(path).with_context(|| {
        format!(
            "{} is not a usable vmkit-agent; {AGENT_HOW_TO}",
            path.display()
        )
    })?;
    if let Some(machine) = HOST_ELF_MACHINE {
        ensure!(
            info.machine == machine,
            "{} is built for another architecture (ELF machine {}); {AGENT_HOW_TO}",
            path.display(),
            info.machine
        );
    }
    ensure!(
        !info.dynamic,
        "{} is dynamically linked, but the guest has no libraries for it; {AGENT_HOW_TO}, \
         which links it statically",
        path.display()
    );
    Ok(())
}

/// The ELF `e_machine` of this build's architecture, where known.
const HOST_ELF_MACHINE: Option<u16> = if cfg!(target_arch = "x86_64") {
    Some(62)
} else if cfg!(target_arch = "aarch64") {
    Some(183)
} else {
    None
};

/// What the ELF headers say about a binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ElfInfo {
    machine: u16,
    /// Has a `PT_INTERP` program header: the kernel starts its dynamic loader.
    dynamic: bool,
}

fn read_elf(path: &Path) -> Result<ElfInfo> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    parse_elf(&mut file)
}

fn parse_elf(file: &mut (impl Read + Seek)) -> Result<ElfInfo> {
    const PT_INTERP: u32 = 3;
    let mut header = [0u8; 64];
    file.read_exact(&mut header[..52])
        .context("too short for an ELF header")?;
    ensure!(header[..4] == *b"\x7fELF", "not an ELF file");
    let is_64 = match header[4] {
        1 => false,
        2 => true,
        class => bail!("unknown ELF class {class}"),
    };
    let little = match header[5] {
        1 => true,
        2 => false,
        data => bail!("unknown ELF data encoding {data}"),
    };
    if is_64 {
        file.read_exact(&mut header[52..])
            .context("too short for an ELF header")?;
    }
    let u16_at = |b: &[u8], at: usize| {
        let v = [b[at], b[at + 1]];
        if little {
            u16::from_le_bytes(v)
        } else {
            u16::from_be_bytes(v)
        }
    };
    let u32_at = |b: &[u8], at: usize| {
        let v = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if little {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    let machine = u16_at(&header, 18);
    let (phoff, phentsize, phnum) = if is_64 {
        let lo = u64::from(u32_at(&header, 32));
        let hi = u64::from(u32_at(&header, 36));
        let phoff = if little { hi << 32 | lo } else { lo << 32 | hi };
        (phoff, u16_at(&header, 54), u16_at(&header, 56))
    } else {
        (
            u64::from(u32_at(&header, 28)),
            u16_at(&header, 42),
            u16_at(&header, 44),
        )
    };
    ensure!(
        phentsize >= 4 || phnum == 0,
        "bad ELF program header size {phentsize}"
    );
    let mut table = vec![0u8; usize::from(phentsize) * usize::from(phnum)];
    file.seek(SeekFrom::Start(phoff))
        .context("bad ELF program header offset")?;
    file.read_exact(&mut table)
        .context("truncated ELF program headers")?;
    let dynamic = table
        .chunks_exact(usize::from(phentsize.max(4)))
        .any(|ph| u32_at(ph, 0) == PT_INTERP);
    Ok(ElfInfo { machine, dynamic })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// A 64-bit little-endian ELF header and program headers of the given types.
    fn elf64(machine: u16, program_headers: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&u16::try_from(program_headers.len()).unwrap().to_le_bytes());
        for &p_type in program_headers {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&p_type.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    const PT_LOAD: u32 = 1;
    const PT_INTERP: u32 = 3;
    const PT_DYNAMIC: u32 = 2;

    fn host_machine() -> u16 {
        HOST_ELF_MACHINE.unwrap()
    }

    #[test]
    fn elf_without_interp_is_static() {
        let info = parse_elf(&mut Cursor::new(elf64(62, &[PT_LOAD, PT_LOAD]))).unwrap();
        assert_eq!(
            info,
            ElfInfo {
                machine: 62,
                dynamic: false
            }
        );
    }

    #[test]
    fn elf_with_interp_is_dynamic() {
        let elf = elf64(62, &[PT_LOAD, PT_INTERP, PT_DYNAMIC]);
        assert!(parse_elf(&mut Cursor::new(elf)).unwrap().dynamic);
    }

    #[test]
    fn truncated_program_headers_are_rejected() {
        let mut elf = elf64(62, &[PT_LOAD, PT_LOAD]);
        elf.truncate(100);
        assert!(parse_elf(&mut Cursor::new(elf)).is_err());
    }

    #[test]
    fn script_is_not_an_elf() {
        assert!(parse_elf(&mut Cursor::new(b"#!/bin/sh\necho hi\n".to_vec())).is_err());
    }

    #[test]
    fn this_test_binary_is_dynamically_linked() {
        let info = read_elf(&std::env::current_exe().unwrap()).unwrap();
        assert_eq!(
            info,
            ElfInfo {
                machine: host_machine(),
                dynamic: true
            }
        );
    }

    #[test]
    fn find_agent_rejects_an_explicit_dynamic_binary() {
        let err = find_agent(Some(&std::env::current_exe().unwrap())).unwrap_err();
        assert!(
            format!("{err:#}").contains("scripts/build-agent.sh"),
            "{err:#}"
        );
    }

    #[test]
    fn find_agent_accepts_an_explicit_static_binary() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("vmkit-agent");
        fs::write(&agent, elf64(host_machine(), &[PT_LOAD])).unwrap();
        assert_eq!(find_agent(Some(&agent)).unwrap(), agent);
    }

    #[test]
    fn find_agent_rejects_another_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("vmkit-agent");
        fs::write(&agent, elf64(host_machine() ^ 1, &[PT_LOAD])).unwrap();
        assert!(find_agent(Some(&agent)).is_err());
    }

    #[test]
    fn digest_depends_on_both_inputs_and_their_boundary() {
        let base = image_digest(b"ab", b"c");
        assert_ne!(base, image_digest(b"a", b"bc"));
        assert_ne!(base, image_digest(b"ab", b"d"));
        assert_ne!(base, image_digest(b"ac", b"c"));
        assert_eq!(base, image_digest(b"ab", b"c"));
        assert_eq!(base.len(), 64);
    }

    #[test]
    fn unknown_image_error_lists_the_known_ones() {
        let err = recipe("huge").unwrap_err().to_string();
        assert_eq!(err, "unknown image `huge`; known images: tiny, base");
    }

    #[test]
    fn tiny_recipe_is_embedded() {
        assert!(recipe("tiny").unwrap().starts_with("#!/usr/bin/env bash"));
    }

    /// A stand-in recipe that writes what a real one does, plus a count of its runs.
    const FAKE_RECIPE: &str = r#"set -euo pipefail
[ -z "$(ls -A "$OUT")" ]
cmp -s "$AGENT" "$AGENT"
printf kernel > "$OUT/vmlinuz"
printf initrd > "$OUT/initramfs.img"
printf rootfs > "$OUT/rootfs.ext4"
echo 6.1.0-test-cloud-amd64 > "$OUT/kernel-release"
echo run >> "$CACHE/runs"
"#;

    struct Fixture {
        _dir: tempfile::TempDir,
        opts: BuildOptions,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("vmkit-agent");
        fs::write(&agent, elf64(host_machine(), &[PT_LOAD])).unwrap();
        let opts = BuildOptions {
            name: "tiny".to_owned(),
            images_dir: dir.path().join("data/images"),
            cache_dir: dir.path().join("data/cache"),
            agent,
            force: false,
        };
        Fixture { _dir: dir, opts }
    }

    fn runs(opts: &BuildOptions) -> usize {
        fs::read_to_string(opts.cache_dir.join("runs"))
            .unwrap()
            .lines()
            .count()
    }

    #[test]
    fn build_writes_manifest_beside_the_image_files() {
        let f = fixture();
        let outcome = build_recipe(&f.opts, FAKE_RECIPE).unwrap();
        let dir = f.opts.images_dir.join("tiny");
        assert_eq!(
            outcome,
            BuildOutcome {
                manifest_path: dir.join(MANIFEST_FILE),
                rebuilt: true
            }
        );
        let m = Manifest::read(&outcome.manifest_path).unwrap();
        assert_eq!(
            (
                m.format,
                m.name.as_str(),
                m.kernel_release.as_str(),
                m.cmdline.as_str()
            ),
            (1, "tiny", "6.1.0-test-cloud-amd64", DEFAULT_CMDLINE)
        );
        let agent = fs::read(&f.opts.agent).unwrap();
        assert_eq!(m.digest, image_digest(FAKE_RECIPE.as_bytes(), &agent));
        assert_eq!(m.agent_sha256, hex(&Sha256::digest(&agent)));
        assert_eq!(fs::read(dir.join(&m.rootfs)).unwrap(), b"rootfs");
        let names: Vec<_> = fs::read_dir(&f.opts.images_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "only the image and its lock file remain: {names:?}"
        );
    }

    #[test]
    fn unchanged_image_is_not_rebuilt() {
        let f = fixture();
        build_recipe(&f.opts, FAKE_RECIPE).unwrap();
        let outcome = build_recipe(&f.opts, FAKE_RECIPE).unwrap();
        assert!(!outcome.rebuilt);
        assert_eq!(runs(&f.opts), 1);
    }

    #[test]
    fn changed_recipe_agent_or_force_rebuilds() {
        let mut f = fixture();
        build_recipe(&f.opts, FAKE_RECIPE).unwrap();
        let changed = format!("{FAKE_RECIPE}# changed\n");
        assert!(build_recipe(&f.opts, &changed).unwrap().rebuilt);
        fs::write(&f.opts.agent, elf64(host_machine(), &[PT_LOAD, PT_LOAD])).unwrap();
        assert!(build_recipe(&f.opts, &changed).unwrap().rebuilt);
        f.opts.force = true;
        assert!(build_recipe(&f.opts, &changed).unwrap().rebuilt);
        assert_eq!(runs(&f.opts), 4);
    }

    #[test]
    fn failed_build_leaves_the_previous_image_intact() {
        let mut f = fixture();
        let first = build_recipe(&f.opts, FAKE_RECIPE).unwrap();
        let before = fs::read(&first.manifest_path).unwrap();
        f.opts.force = true;
        let failing = "printf partial > \"$OUT/vmlinuz\"\nexit 3\n";
        let err = build_recipe(&f.opts, failing).unwrap_err();
        assert!(format!("{err:#}").contains("exit status: 3"), "{err:#}");
        assert_eq!(fs::read(&first.manifest_path).unwrap(), before);
        assert_eq!(
            fs::read(f.opts.images_dir.join("tiny/vmlinuz")).unwrap(),
            b"kernel"
        );
        assert_eq!(fs::read_dir(&f.opts.images_dir).unwrap().count(), 2);
    }

    #[test]
    fn recipe_without_kernel_release_is_an_error() {
        let f = fixture();
        let recipe = FAKE_RECIPE.replace("echo 6.1.0-test-cloud-amd64 >", "true >");
        let err = build_recipe(&f.opts, &recipe).unwrap_err();
        assert!(err.to_string().contains("kernel-release"), "{err:#}");
        assert!(!f.opts.images_dir.join("tiny").exists());
    }

    #[test]
    fn recipe_cmdline_file_goes_into_the_manifest() {
        let f = fixture();
        let recipe = format!("{FAKE_RECIPE}echo 'root=/dev/vda ro' > \"$OUT/cmdline\"\n");
        let outcome = build_recipe(&f.opts, &recipe).unwrap();
        assert_eq!(
            Manifest::read(&outcome.manifest_path).unwrap().cmdline,
            "root=/dev/vda ro"
        );
    }

    /// Builds the real tiny image: downloads Debian's cloud kernel (once, into
    /// `$VMKIT_TEST_CACHE` or a temporary cache) and needs the static agent
    /// (`$VMKIT_TEST_AGENT` or what `find_agent` finds). The image is kept in
    /// `$VMKIT_TEST_IMAGES` when that is set.
    /// The real recipe end to end. Uses the download cache and the static agent that
    /// `scripts/test-assets.sh` prepares (the README's test command runs it first).
    #[test]
    fn builds_the_tiny_image_and_rebuilds_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let data = std::env::var_os("VMKIT_TEST_DATA")
            .map_or_else(|| workspace.join("target/vmkit-test"), PathBuf::from);
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace.join("target"), PathBuf::from);
        let built = target.join("agent/x86_64-unknown-linux-gnu/release/vmkit-agent");
        let agent = find_agent(Some(&built)).unwrap_or_else(|e| {
            panic!("{e:#}\nrun `scripts/test-assets.sh` first (the README's test command does)")
        });
        let opts = BuildOptions {
            name: "tiny".to_owned(),
            images_dir: dir.path().join("images"),
            cache_dir: data.join("cache"),
            agent,
            force: false,
        };
        let outcome = build(&opts).unwrap();
        let m = Manifest::read(&outcome.manifest_path).unwrap();
        assert!(m.kernel_release.ends_with("-cloud-amd64"), "{m:?}");
        assert!(!build(&opts).unwrap().rebuilt);
    }
}
