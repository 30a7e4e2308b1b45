//! Synthetic data sets in a real layout: textured JPEG photographs of CUB's sizes in the tree
//! that `data-manifests/cub.toml` describes.
//!
//! Why it exists: no machine here has held CUB and a GPU at once, so the paper configuration
//! (ResNet-50 at 224 px, the paper's batch sizes, the real-data loader, web folders with an
//! unreadable file) could never run end to end. `cargo xtask smoke` runs it on such a tree, one
//! epoch per stage, to check a machine and a build and to time each stage before a real run;
//! the benchmarks time the loader on the same photographs ([`photo`]). The accuracy it prints
//! means nothing: the pixels are a deterministic texture, not birds.

use crate::error::{DataError, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Pixel size of the photographs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhotoSize {
    /// Varied sizes around 500×375, like CUB's images.
    Cub,
    /// Every photograph `width × height`.
    Fixed(u32, u32),
}

impl PhotoSize {
    /// The size of photograph number `k`.
    pub fn of(self, k: usize) -> (u32, u32) {
        match self {
            PhotoSize::Cub => (440 + (k % 7) as u32 * 20, 330 + (k % 5) as u32 * 15),
            PhotoSize::Fixed(w, h) => (w, h),
        }
    }
}

/// Photograph number `k`: a deterministic texture with the high-frequency content that makes
/// JPEG decoding cost what it costs on photographs.
pub fn photo(width: u32, height: u32, k: usize) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        let v = (x * 7 + y * 3 + k as u32 * 13) ^ (x * y / 17);
        image::Rgb([
            (v % 251) as u8,
            ((v / 3) % 241) as u8,
            ((x + y) % 239) as u8,
        ])
    })
}

/// Writes photograph `k` as a JPEG file at `path`.
pub fn write_photo(path: &Path, size: PhotoSize, k: usize) -> Result<()> {
    let (w, h) = size.of(k);
    photo(w, h, k).save(path).map_err(|e| DataError::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// How many images a synthetic CUB tree holds per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CubTree {
    /// Training images of each base class.
    pub train: usize,
    /// Test images of every class.
    pub test: usize,
    /// Web images of each novel class.
    pub web: usize,
    /// Their pixel size.
    pub size: PhotoSize,
}

impl CubTree {
    /// The photographs the tree holds.
    pub fn photos(&self) -> Result<usize> {
        let (base, novel) = cub_split()?;
        Ok(base * (self.train + self.test) + novel * (self.test + self.web))
    }
}

/// CUB's 200 classes: how many are base and how many novel in the manifest's split.
pub fn cub_split() -> Result<(usize, usize)> {
    let novel = crate::layouts::novel_class_numbers(crate::DatasetKind::Cub)?.len();
    Ok((CUB_CLASSES as usize - novel, novel))
}

const CUB_CLASSES: u32 = 200;

/// Writes a CUB-200-2011 tree with the authors' web folders under `root`: `CUB_200_2011/`
/// (`images.txt`, `train_test_split.txt`, `images/NNN.Bird_NNN/*.jpg`) and `CUB_web/`. Base
/// classes get `train` training and `test` test images, novel classes (the manifest's split)
/// `test` test images and `web` web images; the web folder of the first novel class also holds
/// a corrupt JPEG file and a text file, which the data stage must skip and count. Returns the
/// number of photographs written. Deterministic: the same spec writes the same files.
pub fn cub_tree(root: &Path, spec: &CubTree) -> Result<usize> {
    let novel = crate::layouts::novel_class_numbers(crate::DatasetKind::Cub)?;
    let folder = |n: u32| format!("{n:03}.Bird_{n}");
    let images = root.join("CUB_200_2011");
    let mut files: Vec<PathBuf> = Vec::new();
    let (mut images_txt, mut split_txt) = (String::new(), String::new());
    let mut id = 0;
    for n in 1..=CUB_CLASSES {
        let is_novel = novel.contains(&n);
        let train = if is_novel { 0 } else { spec.train };
        for (i, is_train) in (0..train + spec.test).map(|i| (i, i < train)) {
            id += 1;
            let rel = format!("{}/img_{i}.jpg", folder(n));
            images_txt += &format!("{id} {rel}\n");
            split_txt += &format!("{id} {}\n", u8::from(is_train));
            files.push(images.join("images").join(rel));
        }
        if is_novel {
            for w in 0..spec.web {
                let path = root
                    .join("CUB_web")
                    .join(folder(n))
                    .join(format!("web_{w}.jpg"));
                files.push(path);
            }
        }
    }
    let folders: std::collections::BTreeSet<&Path> = files
        .iter()
        .map(|path| path.parent().expect("files lie in class folders"))
        .collect();
    for dir in folders {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    files
        .par_iter()
        .enumerate()
        .try_for_each(|(k, path)| write_photo(path, spec.size, k))?;
    let write = |path: PathBuf, bytes: &[u8]| {
        std::fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))
    };
    write(images.join("images.txt"), images_txt.as_bytes())?;
    write(images.join("train_test_split.txt"), split_txt.as_bytes())?;
    if let Some(&first) = novel.first() {
        let web = root.join("CUB_web").join(folder(first));
        std::fs::create_dir_all(&web).map_err(|e| DataError::io(&web, e))?;
        write(web.join("x_corrupt.jpg"), b"\xff\xd8\xff\xe0 not a jpeg")?;
        write(web.join("y_notes.txt"), b"not an image")?;
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_resolves_to_the_expected_splits() {
        let dir = tempfile::tempdir().unwrap();
        let spec = CubTree {
            train: 2,
            test: 1,
            web: 3,
            size: PhotoSize::Fixed(12, 10),
        };
        let written = cub_tree(dir.path(), &spec).unwrap();
        assert_eq!(written, 150 * 3 + 50 * (1 + 3));
        assert_eq!(spec.photos().unwrap(), written);
        assert_eq!(cub_split().unwrap(), (150, 50));
        let (index, metrics) = crate::layouts::build(crate::DatasetKind::Cub, dir.path()).unwrap();
        let counts = index.split_counts();
        let want = [
            ("base_train", 300),
            ("base_val", 0),
            ("base_test", 150),
            ("novel_web", 150),
            ("novel_test", 50),
        ];
        assert_eq!(counts, want.into_iter().collect(), "{counts:?}");
        assert_eq!(metrics["skipped_web_images"], 2, "{metrics}");
        // Varied CUB-like sizes, the same photograph for the same number.
        assert_ne!(PhotoSize::Cub.of(0), PhotoSize::Cub.of(1));
        assert_eq!(photo(8, 6, 3), photo(8, 6, 3));
    }
}
