//! Reading IDX files (the format of MNIST and Fashion-MNIST), gzipped or raw.
//!
//! The demo benchmark is built from IDX files found on disk or embedded in the library; this
//! module turns their bytes into arrays and reports malformed files by name.

use crate::error::{DataError, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// An unsigned-byte IDX array: its dimensions and row-major data.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses IDX bytes (gzip-compressed when they start with the gzip magic). `name` names the
/// file in error messages.
pub fn parse_idx(bytes: &[u8], name: &str) -> Result<IdxArray> {
    let err = |reason: String| DataError::Idx {
        file: name.to_string(),
        reason,
    };
    let raw;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| {
                err(format!(
                    "gzip stream is corrupt ({e}); download the file again"
                ))
            })?;
        raw = out;
        &raw[..]
    } else {
        bytes
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(err(
            "not an IDX file (the magic number must start with two zero bytes)".into(),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(err(format!(
            "element type 0x{:02x} is not supported; only unsigned bytes (0x08) are",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(err(format!("truncated header ({ndim} dimensions)")));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            let b = &bytes[4 + 4 * d..8 + 4 * d];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let expected: usize = dims.iter().product();
    let payload = &bytes[header..];
    if payload.len() != expected {
        return Err(err(format!(
            "dimensions {dims:?} need {expected} bytes of data but the file has {}; the file is truncated or corrupt",
            payload.len()
        )));
    }
    Ok(IdxArray {
        dims,
        data: payload.to_vec(),
    })
}

/// Reads and parses an IDX file.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    parse_idx(&bytes, &path.display().to_string())
}

/// The file of an IDX set in a folder: `<stem>` or `<stem>.gz`, whichever exists.
pub fn find_in(dir: &Path, stem: &str) -> Option<PathBuf> {
    [dir.join(format!("{stem}.gz")), dir.join(stem)]
        .into_iter()
        .find(|p| p.is_file())
}

/// Images (`[N, H, W]`) and labels (`[N]`) of one file pair.
#[derive(Debug, Clone)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// `count · height · width` bytes.
    pub pixels: Vec<u8>,
    /// One label per image, if the set has labels.
    pub labels: Option<Vec<u8>>,
    /// Where they came from, for messages and metrics.
    pub origin: String,
}

impl IdxImages {
    /// Combines an image array and an optional label array, checking that they agree.
    pub fn new(
        images: IdxArray,
        labels: Option<IdxArray>,
        images_name: &str,
        labels_name: &str,
    ) -> Result<Self> {
        if images.dims.len() != 3 {
            return Err(DataError::Idx {
                file: images_name.to_string(),
                reason: format!(
                    "expected an image array [N, H, W], found dimensions {:?}",
                    images.dims
                ),
            });
        }
        let (count, height, width) = (images.dims[0], images.dims[1], images.dims[2]);
        let labels = match labels {
            None => None,
            Some(l) => {
                if l.dims != [count] {
                    return Err(DataError::Idx {
                        file: labels_name.to_string(),
                        reason: format!(
                            "expected {count} labels to match {images_name}, found dimensions {:?}",
                            l.dims
                        ),
                    });
                }
                Some(l.data)
            }
        };
        Ok(IdxImages {
            count,
            height,
            width,
            pixels: images.data,
            labels,
            origin: images_name.to_string(),
        })
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.height * self.width;
        &self.pixels[i * n..(i + 1) * n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn raw_and_gzipped_files_parse_to_the_same_array() {
        let raw = idx_bytes(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let gz = gz.finish().unwrap();
        let a = parse_idx(&raw, "a").unwrap();
        let b = parse_idx(&gz, "b").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.dims, vec![2, 2, 3]);
        assert_eq!(a.data[11], 12);
    }

    #[test]
    fn malformed_files_are_named_in_the_error() {
        let err = parse_idx(&idx_bytes(&[5], &[1, 2]), "labels.idx")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("labels.idx") && err.contains("truncated"),
            "{err}"
        );
        let err = parse_idx(b"hello world", "x.png").unwrap_err().to_string();
        assert!(err.contains("x.png") && err.contains("not an IDX"), "{err}");
        let mut f = idx_bytes(&[1], &[0, 0, 0, 0]);
        f[2] = 0x0d;
        let err = parse_idx(&f, "f.idx").unwrap_err().to_string();
        assert!(err.contains("0x0d"), "{err}");
        let err = parse_idx(&[0x1f, 0x8b, 1, 2, 3], "bad.gz")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.gz") && err.contains("gzip"), "{err}");
    }

    #[test]
    fn images_and_labels_must_agree() {
        let im = parse_idx(&idx_bytes(&[2, 1, 1], &[1, 2]), "im").unwrap();
        let lb = parse_idx(&idx_bytes(&[3], &[0, 1, 2]), "lb").unwrap();
        let err = IdxImages::new(im, Some(lb), "im", "lb")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lb") && err.contains("2 labels"), "{err}");
    }
}
