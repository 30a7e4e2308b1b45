//! Content hashing for cache keys and artifact checksums.
//!
//! SHA-256 over a canonical byte stream; every field is length-prefixed so that two different
//! sequences of fields can never produce the same stream.

use sha2::{Digest, Sha256};

/// An incremental hasher whose inputs are framed fields.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one field, prefixed with its length.
    pub fn field(&mut self, bytes: impl AsRef<[u8]>) -> &mut Self {
        let bytes = bytes.as_ref();
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// Adds raw bytes without a frame (for large tensor payloads whose length was framed before).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update(bytes);
        self
    }

    /// The 32-byte digest.
    pub fn bytes(self) -> [u8; 32] {
        self.0.finalize().into()
    }

    /// The lower-case hex digest.
    pub fn hex(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// SHA-256 hex of one byte string.
pub fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    let mut h = Hasher::new();
    h.raw(bytes.as_ref());
    h.hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_separates_fields() {
        let mut a = Hasher::new();
        a.field("ab").field("c");
        let mut b = Hasher::new();
        b.field("a").field("bc");
        assert_ne!(a.hex(), b.hex());
    }

    #[test]
    fn known_digest() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
