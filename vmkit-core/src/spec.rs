//! What a VM is asked to be: image, vCPUs, memory and data disk.

use serde::{Deserialize, Serialize};

/// The resources and image a VM is created with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmSpec {
    /// Name of the image to boot (a directory under the images directory).
    pub image: String,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Size of the persistent data disk in GiB; 0 means no data disk.
    pub disk_gib: u64,
    /// Size of the root disk in GiB; 0 (or less than the image) keeps the image's
    /// size. Images that grow their root filesystem at boot (`base`:
    /// `x-systemd.growfs`) fill it; the root disk is thin (sparse, an overlay or a
    /// thin volume), so unused space costs nothing.
    #[serde(default)]
    pub root_gib: u64,
}

impl VmSpec {
    /// A spec for `image` with the default resources (1 vCPU, 512 MiB, no data disk).
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            ..Self::default()
        }
    }

    /// Sets the vCPU count.
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// Sets the memory size in MiB.
    pub fn memory_mib(mut self, memory_mib: u64) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    /// Sets the data disk size in GiB.
    pub fn disk_gib(mut self, disk_gib: u64) -> Self {
        self.disk_gib = disk_gib;
        self
    }

    /// Sets the root disk size in GiB (0: the image's size).
    pub fn root_gib(mut self, root_gib: u64) -> Self {
        self.root_gib = root_gib;
        self
    }

    /// Checks the spec against the host's limits.
    pub fn validate(&self, limits: &SpecLimits) -> Result<(), SpecError> {
        if self.image.is_empty()
            || self.image.len() > 64
            || !self
                .image
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            || self.image.starts_with('.')
        {
            return Err(SpecError::InvalidImage(self.image.clone()));
        }
        check(
            "vcpus",
            u64::from(self.vcpus),
            1,
            u64::from(limits.max_vcpus),
        )?;
        check(
            "memory_mib",
            self.memory_mib,
            limits.min_memory_mib,
            limits.max_memory_mib,
        )?;
        check("disk_gib", self.disk_gib, 0, limits.max_disk_gib)?;
        check("root_gib", self.root_gib, 0, limits.max_disk_gib)?;
        Ok(())
    }
}

fn check(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), SpecError> {
    if value < min || value > max {
        return Err(SpecError::OutOfRange {
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

/// The image a VM boots when its request names none: the Debian base image users
/// live in (systemd, sshd, apt). `tiny` boots in seconds and suits tests.
pub const DEFAULT_IMAGE: &str = "base";

impl Default for VmSpec {
    /// [`DEFAULT_IMAGE`], one vCPU, 512 MiB, no data disk.
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 0,
            root_gib: 0,
        }
    }
}

/// The largest (and smallest) VM a host accepts, whatever the user's quota. Start
/// from `default()` and use the setters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SpecLimits {
    /// Most vCPUs one VM may have.
    pub max_vcpus: u32,
    /// Least memory one VM may have, in MiB.
    pub min_memory_mib: u64,
    /// Most memory one VM may have, in MiB.
    pub max_memory_mib: u64,
    /// Largest data disk, in GiB.
    pub max_disk_gib: u64,
}

impl Default for SpecLimits {
    fn default() -> Self {
        Self {
            max_vcpus: 32,
            min_memory_mib: 128,
            max_memory_mib: 256 * 1024,
            max_disk_gib: 2048,
        }
    }
}

impl SpecLimits {
    /// Sets the most vCPUs of one VM.
    pub fn max_vcpus(mut self, max_vcpus: u32) -> Self {
        self.max_vcpus = max_vcpus;
        self
    }

    /// Sets the least memory of one VM, in MiB.
    pub fn min_memory_mib(mut self, min_memory_mib: u64) -> Self {
        self.min_memory_mib = min_memory_mib;
        self
    }

    /// Sets the most memory of one VM, in MiB.
    pub fn max_memory_mib(mut self, max_memory_mib: u64) -> Self {
        self.max_memory_mib = max_memory_mib;
        self
    }

    /// Sets the largest data disk, in GiB.
    pub fn max_disk_gib(mut self, max_disk_gib: u64) -> Self {
        self.max_disk_gib = max_disk_gib;
        self
    }
}

/// Why a [`VmSpec`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// A numeric field lies outside what the host allows.
    #[error("{field} = {value} is out of range; this host allows {min} to {max}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The requested value.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// The image name is not a plain name.
    #[error(
        "image name {0:?} is invalid; use letters, digits, '-', '_' or '.', as listed by `vmkit image ls`"
    )]
    InvalidImage(String),
    /// A data disk cannot shrink.
    #[error("the data disk is {from} GiB and cannot shrink to {to} GiB; disks only grow")]
    DiskShrink {
        /// Its size now.
        from: u64,
        /// The size asked for.
        to: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_is_valid() {
        assert_eq!(VmSpec::default().validate(&SpecLimits::default()), Ok(()));
    }

    #[test]
    fn oversize_spec_names_the_field_and_the_limit() {
        let err = VmSpec::new("tiny")
            .vcpus(64)
            .validate(&SpecLimits::default())
            .unwrap_err();
        assert_eq!(
            err,
            SpecError::OutOfRange {
                field: "vcpus",
                value: 64,
                min: 1,
                max: 32
            }
        );
        let err = VmSpec::new("tiny")
            .memory_mib(64)
            .validate(&SpecLimits::default())
            .unwrap_err();
        assert!(matches!(
            err,
            SpecError::OutOfRange {
                field: "memory_mib",
                ..
            }
        ));
    }

    #[test]
    fn image_names_cannot_escape_the_images_directory() {
        for bad in ["../etc", "a/b", "", ".hidden"] {
            assert!(matches!(
                VmSpec::new(bad).validate(&SpecLimits::default()),
                Err(SpecError::InvalidImage(_))
            ));
        }
    }
}
