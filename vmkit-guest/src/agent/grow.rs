//! Growing filesystems to their disks, in the guest.
//!
//! The host only enlarges a VM's disks; parsing a filesystem the guest wrote is the
//! guest kernel's job, never the host's. So the agent grows the ext4 filesystems
//! mounted at `/` and `/data` online, with the kernel's `EXT4_IOC_RESIZE_FS` (what
//! `resize2fs` and `systemd-growfs` do on a mounted filesystem): no tool is needed,
//! so busybox-only images grow too.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::ops::{FilesystemGrowth, GrowReport};

/// The mount points the host asks about: the root disk and the data disk.
pub(super) const GROWN_MOUNTS: [&str; 2] = ["/", "/data"];

// EXT4_IOC_RESIZE_FS: _IOW('f', 16, __u64), the new size in filesystem blocks.
nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// One line of `/proc/self/mountinfo`, the fields that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    /// Where it is mounted, unescaped.
    pub(super) point: String,
    /// The device's major and minor numbers.
    pub(super) dev: (u32, u32),
    /// The filesystem type.
    pub(super) fstype: String,
    /// The mount source (`/dev/vdb`).
    pub(super) source: String,
}

/// Parses `/proc/self/mountinfo` (proc(5)); lines that do not parse are skipped.
pub(super) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut left = left.split(' ');
            let dev = left.nth(2)?;
            let point = left.nth(1)?;
            let (major, minor) = dev.split_once(':')?;
            let mut right = right.split(' ');
            Some(Mount {
                point: unescape(point),
                dev: (major.parse().ok()?, minor.parse().ok()?),
                fstype: right.next()?.to_owned(),
                source: unescape(right.next()?),
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Grows the ext4 filesystems mounted at `points` (the last mount on each point
/// counts) to fill their block devices. A point with nothing mounted, or another
/// filesystem type, is left out of the report; a filesystem that cannot be grown is
/// reported in `failures`, and the others are still grown.
pub(super) fn grow(points: &[&Path]) -> GrowReport {
    let mounts = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => parse_mountinfo(&text),
        Err(e) => {
            return GrowReport {
                filesystems: Vec::new(),
                failures: vec![format!("cannot read /proc/self/mountinfo: {e}")],
            };
        }
    };
    let mut report = GrowReport::default();
    for point in points {
        let Some(mount) = mounts.iter().rev().find(|m| Path::new(&m.point) == *point) else {
            continue;
        };
        if mount.fstype != "ext4" {
            continue;
        }
        match grow_one(mount) {
            Ok(growth) => {
                if growth.grew() {
                    tracing::info!(mount = %growth.mount, device = %growth.device, from = growth.before_bytes, to = growth.after_bytes, "grew the filesystem to its disk");
                }
                report.filesystems.push(growth);
            }
            Err(failure) => {
                tracing::warn!(mount = %mount.point, "{failure}");
                report.failures.push(failure);
            }
        }
    }
    report
}

/// The size in bytes of block device `major:minor`, from sysfs.
fn device_bytes((major, minor): (u32, u32)) -> Result<u64, String> {
    let path = format!("/sys/dev/block/{major}:{minor}/size");
    let sectors: u64 = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {path}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{path} does not hold a number: {e}"))?;
    Ok(sectors.saturating_mul(512))
}

fn grow_one(mount: &Mount) -> Result<FilesystemGrowth, String> {
    let what = format!("{} on {}", mount.source, mount.point);
    let device = device_bytes(mount.dev)?;
    let dir = File::open(&mount.point).map_err(|e| format!("cannot open {what}: {e}"))?;
    let size = |dir: &File| {
        nix::sys::statvfs::fstatvfs(dir)
            .map(|s| {
                (
                    s.fragment_size(),
                    s.blocks().saturating_mul(s.fragment_size()),
                )
            })
            .map_err(|e| format!("cannot stat {what}: {e}"))
    };
    let (block, before) = size(&dir)?;
    if block == 0 {
        return Err(format!("{what} reports a block size of 0"));
    }
    let blocks: u64 = device / block;
    // SAFETY: `dir` is an open descriptor on the mounted filesystem for the whole
    // call, and the kernel reads one u64 from a pointer to a live local.
    let resized = unsafe { ext4_resize_fs(dir.as_raw_fd(), &blocks) };
    resized.map_err(|e| format!("cannot grow {what} to {device} bytes: {e}"))?;
    let (_, after) = size(&dir)?;
    Ok(FilesystemGrowth {
        mount: mount.point.clone(),
        device: mount.source.clone(),
        before_bytes: before,
        after_bytes: after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_gives_each_mount_its_point_device_and_type() {
        let text = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
25 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=4k\n\
31 22 254:16 / /data rw,relatime shared:9 master:3 - ext4 /dev/vdb rw\n\
32 22 254:32 / /mnt/with\\040space rw - ext4 /dev/vdc rw\n\
garbage\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[2],
            Mount {
                point: "/data".into(),
                dev: (254, 16),
                fstype: "ext4".into(),
                source: "/dev/vdb".into(),
            }
        );
        assert_eq!(mounts[1].fstype, "devtmpfs");
        assert_eq!(mounts[3].point, "/mnt/with space");
    }

    #[test]
    fn only_ext4_filesystems_mounted_at_the_points_asked_are_grown() {
        // /proc is mounted but not ext4; nothing is mounted on the other.
        let report = grow(&[Path::new("/proc"), Path::new("/nonexistent-mount")]);
        assert_eq!(report, GrowReport::default());
    }
}
