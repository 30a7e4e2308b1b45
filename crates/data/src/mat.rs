//! Reading the one MATLAB file the Car layout needs (`make_model_name.mat`).
//!
//! CompCars ships its model-id → model-name table only as a MATLAB level-5 MAT-file (a cell
//! array `model_names` of character rows). This is a small reader for exactly that: MAT v5
//! headers of either byte order, compressed (zlib) or plain variables, cell arrays and char
//! arrays (UTF-8, 8- or 16-bit characters). Anything else in the file is skipped; a MAT v7.3
//! (HDF5) file is refused with a message saying how to make the text table instead.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;
const MX_CELL: u8 = 1;
const MX_CHAR: u8 = 4;

/// A parsed MATLAB value, as far as we need one.
#[derive(Debug, Clone, PartialEq)]
pub enum MatValue {
    /// A cell array, column-major.
    Cell(Vec<MatValue>),
    /// A character array; only its first row is kept.
    Char(String),
    /// Anything else.
    Other,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    little: bool,
}

impl<'a> Reader<'a> {
    fn u32_at(&self, at: usize) -> Result<u32, String> {
        let s = self
            .b
            .get(at..at + 4)
            .ok_or("the file ends inside an element tag")?;
        let a = [s[0], s[1], s[2], s[3]];
        Ok(if self.little {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        })
    }

    /// The next element: its type and data; `None` at the end.
    fn next(&mut self) -> Result<Option<(u32, &'a [u8])>, String> {
        if self.pos + 8 > self.b.len() {
            return Ok(None);
        }
        let first = self.u32_at(self.pos)?;
        if first >> 16 != 0 {
            // Small data element: type and size in one word, up to 4 bytes of data after it.
            let (ty, size) = (first & 0xffff, (first >> 16) as usize);
            if size > 4 {
                return Err("malformed small data element".into());
            }
            let data = &self.b[self.pos + 4..self.pos + 4 + size];
            self.pos += 8;
            return Ok(Some((ty, data)));
        }
        let size = self.u32_at(self.pos + 4)? as usize;
        let start = self.pos + 8;
        let data = self
            .b
            .get(start..start + size)
            .ok_or("an element runs past the end of the file (truncated?)")?;
        self.pos = if first == MI_COMPRESSED {
            start + size
        } else {
            start + size.div_ceil(8) * 8
        };
        Ok(Some((first, data)))
    }
}

fn numbers(ty: u32, data: &[u8], little: bool) -> Vec<i64> {
    let word = |c: &[u8]| {
        let a = [c[0], c[1], c[2], c[3]];
        if little {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    match ty {
        MI_INT32 => data
            .chunks_exact(4)
            .map(|c| word(c) as i32 as i64)
            .collect(),
        MI_UINT32 => data.chunks_exact(4).map(|c| word(c) as i64).collect(),
        _ => vec![],
    }
}

fn chars(ty: u32, data: &[u8], little: bool, rows: usize) -> String {
    let all: Vec<u32> = match ty {
        MI_UINT8 | MI_INT8 | MI_UTF8 => {
            return String::from_utf8_lossy(data)
                .chars()
                .step_by(rows.max(1))
                .collect()
        }
        MI_UINT16 | MI_UTF16 => data
            .chunks_exact(2)
            .map(|c| {
                if little {
                    u16::from_le_bytes([c[0], c[1]]) as u32
                } else {
                    u16::from_be_bytes([c[0], c[1]]) as u32
                }
            })
            .collect(),
        _ => data
            .chunks_exact(4)
            .map(|c| {
                let a = [c[0], c[1], c[2], c[3]];
                if little {
                    u32::from_le_bytes(a)
                } else {
                    u32::from_be_bytes(a)
                }
            })
            .collect(),
    };
    // Column-major: the first row is every `rows`-th character.
    all.into_iter()
        .step_by(rows.max(1))
        .map(|c| char::from_u32(c).unwrap_or('\u{fffd}'))
        .collect()
}

/// Parses the contents of a miMATRIX element into its name and value.
fn matrix(data: &[u8], little: bool) -> Result<(String, MatValue), String> {
    if data.is_empty() {
        return Ok((String::new(), MatValue::Char(String::new())));
    }
    let mut r = Reader {
        b: data,
        pos: 0,
        little,
    };
    let (_, flags) = r.next()?.ok_or("array without flags")?;
    let class = if flags.len() < 4 {
        return Err("array flags too short".into());
    } else if little {
        flags[0]
    } else {
        flags[3]
    };
    let (dty, dims) = r.next()?.ok_or("array without dimensions")?;
    let dims = numbers(dty, dims, little);
    let (_, name) = r.next()?.ok_or("array without a name")?;
    let name = String::from_utf8_lossy(name).into_owned();
    let count: i64 = dims.iter().product();
    let value = match class {
        MX_CELL => {
            let mut cells = Vec::with_capacity(count.max(0) as usize);
            for _ in 0..count {
                let (ty, d) = r
                    .next()?
                    .ok_or("a cell array has fewer cells than its size")?;
                if ty != MI_MATRIX {
                    return Err(format!("a cell holds element type {ty}, not an array"));
                }
                cells.push(matrix(d, little)?.1);
            }
            MatValue::Cell(cells)
        }
        MX_CHAR => match r.next()? {
            None => MatValue::Char(String::new()),
            Some((ty, d)) => MatValue::Char(chars(
                ty,
                d,
                little,
                dims.first().copied().unwrap_or(1).max(1) as usize,
            )),
        },
        _ => MatValue::Other,
    };
    Ok((name, value))
}

/// Reads every top-level variable of a MAT v5 file.
pub fn read_variables(bytes: &[u8]) -> Result<HashMap<String, MatValue>, String> {
    if bytes.starts_with(b"\x89HDF")
        || (bytes.len() >= 512 && &bytes[512..516.min(bytes.len())] == b"\x89HDF")
    {
        return Err("a MATLAB v7.3 (HDF5) file, which this reader does not support".into());
    }
    if bytes.len() < 128 || !bytes.starts_with(b"MATLAB 5.0") {
        return Err("not a MATLAB 5.0 MAT-file".into());
    }
    let little = match &bytes[126..128] {
        b"IM" => true,
        b"MI" => false,
        _ => return Err("the MAT-file header has no byte-order mark".into()),
    };
    let mut r = Reader {
        b: bytes,
        pos: 128,
        little,
    };
    let mut vars = HashMap::new();
    while let Some((ty, data)) = r.next()? {
        let inflated;
        let (ty, data) = if ty == MI_COMPRESSED {
            let mut out = Vec::new();
            flate2::read::ZlibDecoder::new(data)
                .read_to_end(&mut out)
                .map_err(|e| format!("a compressed variable is corrupt ({e})"))?;
            inflated = out;
            let mut inner = Reader {
                b: &inflated,
                pos: 0,
                little,
            };
            match inner.next()? {
                Some(e) => e,
                None => continue,
            }
        } else {
            (ty, data)
        };
        if ty == MI_MATRIX {
            let (name, value) = matrix(data, little)?;
            vars.insert(name, value);
        }
    }
    Ok(vars)
}

/// The `model_names` cell array of CompCars' `make_model_name.mat`, by 1-based model id: the
/// trimmed name, or `unknown` for an empty cell (as the reference does).
pub fn model_names(path: &Path) -> std::result::Result<HashMap<u32, String>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot be read ({e})"))?;
    let vars = read_variables(&bytes)?;
    let Some(MatValue::Cell(cells)) = vars.get("model_names") else {
        return Err("has no cell array `model_names`".into());
    };
    Ok(cells
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = match c {
                MatValue::Char(s) if !s.is_empty() => s.trim().to_string(),
                _ => "unknown".to_string(),
            };
            (i as u32 + 1, name)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> HashMap<u32, String> {
        let v: HashMap<String, String> =
            serde_json::from_str(include_str!("../tests/golden/model_names_expected.json"))
                .unwrap();
        v.into_iter()
            .map(|(k, v)| (k.parse().unwrap(), v))
            .collect()
    }

    #[test]
    fn reads_scipy_written_files_like_the_reference() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");
        for name in ["model_names_plain.mat", "model_names_compressed.mat"] {
            let got = model_names(&Path::new(dir).join(name)).unwrap();
            assert_eq!(got, expected(), "{name}");
        }
    }

    #[test]
    fn refuses_other_files_with_a_reason() {
        assert!(read_variables(b"hello")
            .unwrap_err()
            .contains("not a MATLAB 5.0"));
        assert!(read_variables(b"\x89HDF\r\n").unwrap_err().contains("v7.3"));
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");
        let bytes = std::fs::read(Path::new(dir).join("model_names_plain.mat")).unwrap();
        let err = read_variables(&bytes[..bytes.len() - 40]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }
}
