//! Where tests find the real assets (images, the static agent) that
//! `scripts/test-assets.sh` prepares before the test suite runs.

use std::path::PathBuf;

use crate::image::{Image, ImageManifest};

/// The directory holding test assets: `$VMKIT_TEST_DATA`, or `target/vmkit-test` in
/// the workspace.
pub fn test_data_dir() -> PathBuf {
    match std::env::var_os("VMKIT_TEST_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("vmkit-test"),
    }
}

/// The images directory of the test assets.
pub fn test_images_dir() -> PathBuf {
    test_data_dir().join("images")
}

/// The built image `name` from the test assets.
///
/// # Panics
///
/// When the image has not been built, with the command that builds it: tests that
/// boot real VMs need it, and a missing asset is a failure, not a skip.
pub fn test_image(name: &str) -> Image {
    let dir = test_images_dir().join(name);
    let path = dir.join("manifest.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "test image {name:?} is missing ({}: {e}); run `scripts/test-assets.sh` \
             (the README's test command does) to build it",
            path.display()
        )
    });
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    Image::from_manifest(&dir, manifest)
        .unwrap_or_else(|e| panic!("test image {name:?} is unusable: {e}"))
}
