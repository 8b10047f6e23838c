//! An in-memory image catalog.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::image::{Image, ImageCatalog, ImageError};

/// A catalog holding the images it was given.
#[derive(Debug, Default)]
pub struct FakeImages {
    images: Mutex<BTreeMap<String, Image>>,
}

impl FakeImages {
    /// A catalog with synthetic images named `names`.
    pub fn with(names: &[&str]) -> Self {
        let catalog = Self::default();
        for name in names {
            catalog.insert(Image::synthetic(name));
        }
        catalog
    }

    /// Adds or replaces an image.
    pub fn insert(&self, image: Image) {
        self.images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(image.name.clone(), image);
    }
}

#[async_trait]
impl ImageCatalog for FakeImages {
    async fn resolve(&self, name: &str) -> Result<Image, ImageError> {
        let images = self.images.lock().unwrap_or_else(|p| p.into_inner());
        images
            .get(name)
            .cloned()
            .ok_or_else(|| ImageError::NotFound {
                name: name.to_owned(),
                known: images.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    async fn list(&self) -> Result<Vec<String>, ImageError> {
        let images = self.images.lock().unwrap_or_else(|p| p.into_inner());
        Ok(images.keys().cloned().collect())
    }
}
