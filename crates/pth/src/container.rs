//! The two file layouts `torch.save` writes, reduced to one pickle and a way to find storages.
//!
//! - **zip** (torch ≥ 1.6): an archive with one top folder holding `data.pkl`, the storages as
//!   `data/<key>` (stored uncompressed), `byteorder` and version records.
//! - **legacy**: five pickles back to back (a magic number, the protocol version, a dict of
//!   system facts, the object, the sorted list of storage keys), then for each key an 8-byte
//!   little-endian element count and the storage's raw bytes.
//!
//! Both hand the object's pickle to the parser and answer "the bytes of storage `key`"; every
//! declared size is checked against the file before it is used.

use crate::error::{PthError, Result};
use crate::pickle::{self, Node, Pickle, Value};
use std::collections::BTreeMap;
use std::io::Read;

/// Which layout a file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// torch's zip archive.
    Zip,
    /// The pre-1.6 sequence of pickles.
    Legacy,
}

/// The legacy format's first pickle: this number.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// A checkpoint opened: its object's pickle and its storages.
pub struct Opened<'a> {
    pub format: Format,
    pub pickle: Pickle,
    pub storages: Storages<'a>,
}

/// Where the storages' bytes are, by key.
pub struct Storages<'a> {
    kind: StorageKind<'a>,
    file: &'a str,
}

enum StorageKind<'a> {
    Zip {
        archive: zip::ZipArchive<std::io::Cursor<&'a [u8]>>,
        prefix: String,
        total: usize,
    },
    /// The bytes of each storage and the element count its record declares (checked when read).
    Legacy(BTreeMap<String, (u64, &'a [u8])>),
}

impl Storages<'_> {
    /// The raw bytes of storage `key`, which must hold `bytes` bytes.
    pub fn read(&mut self, key: &str, bytes: usize) -> Result<Vec<u8>> {
        let bad = |what: String| PthError::Storage {
            file: self.file.to_string(),
            key: key.to_string(),
            what,
        };
        match &mut self.kind {
            StorageKind::Zip {
                archive,
                prefix,
                total,
            } => {
                let name = format!("{prefix}data/{key}");
                let mut entry = archive
                    .by_name(&name)
                    .map_err(|_| bad(format!("the archive has no entry {name}")))?;
                let size = entry.size();
                if size != bytes as u64 {
                    return Err(bad(format!(
                        "the entry holds {size} bytes but the pickle declares {bytes}; the file is damaged"
                    )));
                }
                // torch stores storages uncompressed: an entry can't be larger than the file
                // unless it claims a compression ratio no checkpoint has.
                if size > (*total as u64).saturating_mul(4) {
                    return Err(bad(format!(
                        "the entry claims {size} bytes in a file of {total}"
                    )));
                }
                let mut out = Vec::with_capacity(bytes);
                entry
                    .by_ref()
                    .take(bytes as u64)
                    .read_to_end(&mut out)
                    .map_err(|e| bad(format!("cannot read it ({e}); the file is damaged")))?;
                if out.len() != bytes {
                    return Err(bad(format!(
                        "the entry ends after {} of {bytes} bytes; the file is truncated",
                        out.len()
                    )));
                }
                Ok(out)
            }
            StorageKind::Legacy(map) => {
                let Some(&(count, raw)) = map.get(key) else {
                    return Err(bad("the file has no record for it".into()));
                };
                if raw.len() != bytes {
                    return Err(bad(format!(
                        "its record holds {} bytes ({count} elements) but the pickle declares {bytes}",
                        raw.len()
                    )));
                }
                Ok(raw.to_vec())
            }
        }
    }
}

/// Opens `bytes` as a zip or legacy checkpoint; `allowed` is the parser's allow-list.
pub fn open<'a>(
    bytes: &'a [u8],
    file: &'a str,
    allowed: &dyn Fn(&str, &str) -> bool,
) -> Result<Opened<'a>> {
    if bytes.starts_with(b"PK\x03\x04") {
        open_zip(bytes, file, allowed)
    } else if bytes.len() >= 2 && bytes[0] == 0x80 && bytes[1] <= 5 {
        open_legacy(bytes, file, allowed)
    } else {
        Err(PthError::NotACheckpoint {
            file: file.into(),
            what: "it starts neither as a zip archive nor as a pickle".into(),
        })
    }
}

fn parse_at(
    data: &[u8],
    offset: usize,
    file: &str,
    allowed: &dyn Fn(&str, &str) -> bool,
) -> Result<(Pickle, usize)> {
    pickle::parse(data, allowed).map_err(|e| match e {
        pickle::ParseError::Disallowed(global) => PthError::Disallowed {
            file: file.into(),
            global,
        },
        pickle::ParseError::At(at, what) => PthError::Pickle {
            file: file.into(),
            offset: offset + at,
            what,
        },
    })
}

fn open_zip<'a>(
    bytes: &'a [u8],
    file: &'a str,
    allowed: &dyn Fn(&str, &str) -> bool,
) -> Result<Opened<'a>> {
    let truncated = |what: String| PthError::Truncated {
        file: file.into(),
        what,
    };
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| truncated(format!("the zip archive does not open ({e})")))?;
    let names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let pkl: Vec<&String> = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .collect();
    let [pkl] = pkl.as_slice() else {
        return Err(PthError::NotACheckpoint {
            file: file.into(),
            what: format!(
                "a zip archive with {} data.pkl records where torch writes one",
                pkl.len()
            ),
        });
    };
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let read = |archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, name: &str| {
        let mut entry = archive
            .by_name(name)
            .map_err(|e| truncated(format!("{name}: {e}")))?;
        if entry.size() > bytes.len() as u64 {
            return Err(truncated(format!(
                "{name} claims {} bytes in a file of {}",
                entry.size(),
                bytes.len()
            )));
        }
        let mut out = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut out)
            .map_err(|e| truncated(format!("{name}: {e}")))?;
        Ok(out)
    };
    let byteorder = format!("{prefix}byteorder");
    if names.contains(&byteorder) {
        let order = read(&mut archive, &byteorder)?;
        if order != b"little" {
            return Err(PthError::NotACheckpoint {
                file: file.into(),
                what: format!(
                    "its byte order is `{}`; only little-endian checkpoints are read (load and save it again on a little-endian machine)",
                    String::from_utf8_lossy(&order)
                ),
            });
        }
    }
    let data = read(&mut archive, pkl)?;
    let (pickle, _) = parse_at(&data, 0, file, allowed)?;
    Ok(Opened {
        format: Format::Zip,
        pickle,
        storages: Storages {
            kind: StorageKind::Zip {
                archive,
                prefix,
                total: bytes.len(),
            },
            file,
        },
    })
}

fn open_legacy<'a>(
    bytes: &'a [u8],
    file: &'a str,
    allowed: &dyn Fn(&str, &str) -> bool,
) -> Result<Opened<'a>> {
    let mut pos = 0;
    let next = |pos: &mut usize| -> Result<Pickle> {
        let (p, used) = parse_at(&bytes[*pos..], *pos, file, allowed)?;
        *pos += used;
        Ok(p)
    };
    let magic = next(&mut pos)?;
    let is_magic = matches!(&magic.root, Value::BigInt(b) if b.as_slice() == LEGACY_MAGIC);
    if !is_magic {
        return Err(PthError::NotACheckpoint {
            file: file.into(),
            what: "a pickle, but not torch's legacy format (its magic number is missing)".into(),
        });
    }
    let _protocol = next(&mut pos)?;
    let _sys_info = next(&mut pos)?;
    let object = next(&mut pos)?;
    let keys = next(&mut pos)?;
    let Some(Node::List(keys)) = keys.node(&keys.root) else {
        return Err(PthError::Pickle {
            file: file.into(),
            offset: pos,
            what: "the list of storage keys is not a list".into(),
        });
    };
    let elem_sizes = legacy_element_sizes(&object);
    let mut storages = BTreeMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err(PthError::Pickle {
                file: file.into(),
                offset: pos,
                what: "a storage key is not a string".into(),
            });
        };
        let truncated = |what: String| PthError::Truncated {
            file: file.into(),
            what,
        };
        let head = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| truncated(format!("the record of storage {key} is missing")))?;
        let count = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        pos += 8;
        let size = *elem_sizes
            .get(key.as_str())
            .ok_or_else(|| PthError::Storage {
                file: file.into(),
                key: key.clone(),
                what: "no tensor of the pickle uses it, so its element size is unknown".into(),
            })?;
        let len = count
            .checked_mul(size as u64)
            .filter(|&n| n <= (bytes.len() - pos) as u64)
            .ok_or_else(|| {
                truncated(format!(
                    "storage {key} declares {count} elements of {size} bytes but {} bytes remain",
                    bytes.len() - pos
                ))
            })? as usize;
        storages.insert(key.clone(), (count, &bytes[pos..pos + len]));
        pos += len;
    }
    Ok(Opened {
        format: Format::Legacy,
        pickle: object,
        storages: Storages {
            kind: StorageKind::Legacy(storages),
            file,
        },
    })
}

/// The element size of every storage key the legacy object's persistent ids name.
fn legacy_element_sizes(p: &Pickle) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for node in &p.nodes {
        if let Node::PersId(pid) = node {
            if let Some(Node::Tuple(t)) = p.node(pid) {
                if let (Some(Value::Str(kind)), Some(ty), Some(Value::Str(key))) =
                    (t.first(), t.get(1), t.get(2))
                {
                    if kind == "storage" {
                        if let Some(Node::Global { name, .. }) = p.node(ty) {
                            if let Some((_, size)) = crate::tensors::storage_dtype(name) {
                                out.insert(key.clone(), size);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}
