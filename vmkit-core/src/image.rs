//! Images: a kernel, an initramfs and a root filesystem, described by a manifest.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// The manifest format this version reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// `manifest.json` as written by `vmkit image build`. Paths are relative to the
/// manifest's directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ImageManifest {
    /// Manifest format version.
    pub format: u32,
    /// Image name.
    pub name: String,
    /// Hex digest of the recipe inputs; identifies this build.
    pub digest: String,
    /// Kernel file.
    pub kernel: String,
    /// Initramfs file, if the image has one.
    pub initramfs: Option<String>,
    /// Root filesystem (raw ext4).
    pub rootfs: String,
    /// The image's part of the kernel command line; backends append their console.
    pub cmdline: String,
    /// `uname -r` of the kernel.
    #[serde(default)]
    pub kernel_release: String,
    /// Build time, milliseconds since the epoch.
    #[serde(default)]
    pub built_at_ms: u64,
}

/// An image ready to boot: the manifest with absolute paths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Image {
    /// Image name.
    pub name: String,
    /// Build digest.
    pub digest: String,
    /// Kernel.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: Option<PathBuf>,
    /// Root filesystem.
    pub rootfs: PathBuf,
    /// The image's part of the kernel command line.
    pub cmdline: String,
}

impl Image {
    /// Resolves `manifest` found in directory `dir`.
    pub fn from_manifest(dir: &Path, manifest: ImageManifest) -> Result<Self, ImageError> {
        if manifest.format != MANIFEST_FORMAT {
            return Err(ImageError::Invalid {
                name: manifest.name,
                reason: format!(
                    "manifest format {} is not {MANIFEST_FORMAT}; rebuild it with `vmkit image build`",
                    manifest.format
                ),
            });
        }
        let file = |f: &str| -> Result<PathBuf, ImageError> {
            let relative = Path::new(f);
            if f.is_empty()
                || relative.is_absolute()
                || relative
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(ImageError::Invalid {
                    name: manifest.name.clone(),
                    reason: format!("file name {f:?} leaves the image directory"),
                });
            }
            Ok(dir.join(relative))
        };
        Ok(Self {
            kernel: file(&manifest.kernel)?,
            initramfs: manifest.initramfs.as_deref().map(file).transpose()?,
            rootfs: file(&manifest.rootfs)?,
            name: manifest.name.clone(),
            digest: manifest.digest.clone(),
            cmdline: manifest.cmdline.clone(),
        })
    }

    /// A stand-in image whose files need not exist, for fakes and tests.
    #[cfg(feature = "testing")]
    pub fn synthetic(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            digest: format!("synthetic-{name}"),
            kernel: PathBuf::from(format!("/nonexistent/{name}/vmlinuz")),
            initramfs: None,
            rootfs: PathBuf::from(format!("/nonexistent/{name}/rootfs.ext4")),
            cmdline: "root=/dev/vda rw".to_owned(),
        }
    }
}

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// No image of that name.
    #[error("image {name:?} not found; build it with `vmkit image build {name}` (known: {known})")]
    NotFound {
        /// Requested name.
        name: String,
        /// Images that exist, comma separated.
        known: String,
    },
    /// The image is present but unusable.
    #[error("image {name:?} is invalid: {reason}")]
    Invalid {
        /// Image name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading the image directory failed.
    #[error("cannot read image {name:?} at {path}")]
    Io {
        /// Image name.
        name: String,
        /// Path read.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Where the manager finds images by name.
#[async_trait]
pub trait ImageCatalog: Send + Sync {
    /// The image called `name`.
    async fn resolve(&self, name: &str) -> Result<Image, ImageError>;
    /// Names of the images available.
    async fn list(&self) -> Result<Vec<String>, ImageError>;
}

/// Images as directories `<root>/<name>/manifest.json`, the layout `vmkit image build`
/// writes.
#[derive(Clone, Debug)]
pub struct DirImageCatalog {
    root: PathBuf,
}

impl DirImageCatalog {
    /// A catalog over the directory `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The catalog's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[async_trait]
impl ImageCatalog for DirImageCatalog {
    async fn resolve(&self, name: &str) -> Result<Image, ImageError> {
        let valid = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        let dir = self.root.join(name);
        let path = dir.join("manifest.json");
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) if valid => b,
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ImageError::Io {
                    name: name.to_owned(),
                    path,
                    source: e,
                });
            }
            _ => {
                return Err(ImageError::NotFound {
                    name: name.to_owned(),
                    known: self.list().await.unwrap_or_default().join(", "),
                });
            }
        };
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
                name: name.to_owned(),
                reason: format!("manifest.json does not parse: {e}"),
            })?;
        Image::from_manifest(&dir, manifest)
    }

    async fn list(&self) -> Result<Vec<String>, ImageError> {
        let mut names = Vec::new();
        let mut dir = match tokio::fs::read_dir(&self.root).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => {
                return Err(ImageError::Io {
                    name: String::new(),
                    path: self.root.clone(),
                    source: e,
                });
            }
        };
        while let Ok(Some(entry)) = dir.next_entry().await {
            if entry.path().join("manifest.json").is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(kernel: &str) -> ImageManifest {
        ImageManifest {
            format: MANIFEST_FORMAT,
            name: "tiny".into(),
            digest: "d".into(),
            kernel: kernel.into(),
            initramfs: Some("initramfs.img".into()),
            rootfs: "rootfs.ext4".into(),
            cmdline: "root=/dev/vda".into(),
            kernel_release: String::new(),
            built_at_ms: 0,
        }
    }

    #[tokio::test]
    async fn catalog_resolves_a_built_image_to_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tiny")).unwrap();
        std::fs::write(
            dir.path().join("tiny/manifest.json"),
            serde_json::to_vec(&manifest("vmlinuz")).unwrap(),
        )
        .unwrap();
        let catalog = DirImageCatalog::new(dir.path());
        let image = catalog.resolve("tiny").await.unwrap();
        assert_eq!(image.kernel, dir.path().join("tiny/vmlinuz"));
        assert_eq!(catalog.list().await.unwrap(), vec!["tiny".to_owned()]);
    }

    #[tokio::test]
    async fn missing_image_error_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = DirImageCatalog::new(dir.path())
            .resolve("base")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("vmkit image build base"), "{err}");
    }

    #[test]
    fn manifest_paths_cannot_leave_the_image_directory() {
        let err = Image::from_manifest(Path::new("/img"), manifest("../../etc/passwd"));
        assert!(matches!(err, Err(ImageError::Invalid { .. })));
    }
}
