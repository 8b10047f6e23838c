//! Pieces shared by the file and LVM backends: building vmkit-core's storage types,
//! and the names both backends give volumes and base images.

use std::path::PathBuf;

use vmkit_core::{
    BaseImage, CloneMethod, DiskFormat, StorageCapabilities, StorageError, VmId, Volume, VolumeKind,
};

/// A [`Volume`] with every field given.
pub(crate) fn volume(
    id: String,
    vm: VmId,
    kind: VolumeKind,
    path: PathBuf,
    format: DiskFormat,
    size_bytes: u64,
) -> Volume {
    let mut v = Volume::new(vm, kind, path, format, size_bytes);
    v.id = id;
    v
}

/// A [`BaseImage`] with every field given.
pub(crate) fn base_image(
    name: String,
    digest: String,
    path: PathBuf,
    size_bytes: u64,
) -> BaseImage {
    BaseImage::new(name, digest, path, size_bytes)
}

/// [`StorageCapabilities`] with every field given.
pub(crate) fn capabilities(
    clone_method: CloneMethod,
    data_volumes: bool,
    resize: bool,
) -> StorageCapabilities {
    StorageCapabilities::new(clone_method, data_volumes, resize)
}

/// Parses a volume id of the form [`Volume::id_for`] makes (`root-` or `data-`
/// followed by sixteen lowercase hex digits) back into its VM and kind.
pub(crate) fn parse_volume_id(id: &str) -> Option<(VmId, VolumeKind)> {
    let (kind, hex) = if let Some(hex) = id.strip_prefix("root-") {
        (VolumeKind::Root, hex)
    } else if let Some(hex) = id.strip_prefix("data-") {
        (VolumeKind::Data, hex)
    } else {
        return None;
    };
    let lower_hex = hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex {
        return None;
    }
    let vm: VmId = hex.parse().ok()?;
    (Volume::id_for(vm, kind) == id).then_some((vm, kind))
}

/// Checks that `volume.id` is one of vmkit's volume ids and matches the volume's VM
/// and kind; returns the id's VM and kind.
pub(crate) fn check_volume_id(volume: &Volume) -> Result<(VmId, VolumeKind), StorageError> {
    match parse_volume_id(&volume.id) {
        Some((vm, kind)) if vm == volume.vm && kind == volume.kind => Ok((vm, kind)),
        _ => Err(StorageError::Refused(format!(
            "{:?} is not the id of {}'s {:?} volume (expected root-/data- and 16 hex digits)",
            volume.id, volume.vm, volume.kind
        ))),
    }
}

/// Checks that an image digest can name a file or a logical volume: 1 to 128 ASCII
/// letters, digits, `_` or `-`.
pub(crate) fn check_digest(digest: &str) -> Result<(), StorageError> {
    let ok = !digest.is_empty()
        && digest.len() <= 128
        && digest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StorageError::Refused(format!(
            "image digest {digest:?} is not 1-128 letters, digits, '_' or '-'; rebuild the image with `vmkit image build`"
        )))
    }
}
