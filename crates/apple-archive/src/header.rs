//! `AA01` entry headers: a magic, the header's total size, then typed fields.

use crate::{Error, Result};

/// Magic of an Apple Archive entry header (`YAA1` is the older name of the same format).
pub const MAGIC: &[u8; 4] = b"AA01";
pub const LEGACY_MAGIC: &[u8; 4] = b"YAA1";
/// Magic and the u16 size field.
pub(crate) const PREFIX_LEN: usize = 6;

/// A three-letter field key such as `PAT` or `DAT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 3]);

impl Key {
    pub const TYP: Key = Key(*b"TYP");
    pub const PAT: Key = Key(*b"PAT");
    pub const LNK: Key = Key(*b"LNK");
    pub const DEV: Key = Key(*b"DEV");
    pub const DAT: Key = Key(*b"DAT");
    pub const UID: Key = Key(*b"UID");
    pub const GID: Key = Key(*b"GID");
    pub const MOD: Key = Key(*b"MOD");
    pub const FLG: Key = Key(*b"FLG");
    pub const MTM: Key = Key(*b"MTM");
    pub const BTM: Key = Key(*b"BTM");
    pub const CTM: Key = Key(*b"CTM");
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// A field's value, by the subtype letter that follows its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `*`: present, no value.
    Flag,
    /// `1`, `2`, `4`, `8`: a little-endian unsigned integer of that many bytes.
    Uint(u64),
    /// `P`: a u16 length and that many bytes (paths, link targets; not NUL-terminated).
    String(Vec<u8>),
    /// `F`..`J`: a digest of 4, 20, 32, 48 or 64 bytes (CRC32, SHA-1, SHA-256/384/512).
    Hash(Vec<u8>),
    /// `S`: seconds (8 bytes); `T`: seconds and nanoseconds (8 + 4 bytes).
    Time { seconds: i64, nanos: Option<u32> },
    /// `A`, `B`, `C`: the size of a blob (u16, u32, u64) whose bytes follow the header, blobs in
    /// the order of their fields.
    Blob(u64),
}

/// Entry types, the value of the `TYP` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    File,
    Directory,
    Symlink,
    /// Anything else (fifos, sockets, devices, metadata entries): its letter.
    Other(u8),
}

impl EntryType {
    pub fn from_letter(letter: u8) -> Self {
        match letter {
            b'F' => EntryType::File,
            b'D' => EntryType::Directory,
            b'L' => EntryType::Symlink,
            other => EntryType::Other(other),
        }
    }

    pub fn letter(self) -> u8 {
        match self {
            EntryType::File => b'F',
            EntryType::Directory => b'D',
            EntryType::Symlink => b'L',
            EntryType::Other(letter) => letter,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub fields: Vec<(Key, Value)>,
}

impl Header {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, key: Key, value: Value) -> Self {
        self.fields.push((key, value));
        self
    }

    pub fn get(&self, key: Key) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn uint(&self, key: Key) -> Option<u64> {
        match self.get(key) {
            Some(Value::Uint(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn string(&self, key: Key) -> Option<&[u8]> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn entry_type(&self) -> Option<EntryType> {
        // TYP is a one-byte uint holding an ASCII letter.
        self.uint(Key::TYP).map(|letter| EntryType::from_letter(letter as u8))
    }

    /// Blobs that follow this header, in stream order.
    pub fn blobs(&self) -> impl Iterator<Item = (Key, u64)> + '_ {
        self.fields.iter().filter_map(|(key, value)| match value {
            Value::Blob(size) => Some((*key, *size)),
            _ => None,
        })
    }

    /// The header's bytes. Integers and blob sizes take the narrowest width that holds them,
    /// as Apple's writer does.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[0, 0]);
        for (key, value) in &self.fields {
            out.extend_from_slice(&key.0);
            match value {
                Value::Flag => out.push(b'*'),
                Value::Uint(v) => {
                    let width = uint_width(*v);
                    out.push(b'0' + width as u8);
                    out.extend_from_slice(&v.to_le_bytes()[..width]);
                }
                Value::String(s) => {
                    let len = u16::try_from(s.len())
                        .map_err(|_| Error::Invalid(format!("{key} field is longer than 65535 bytes")))?;
                    out.push(b'P');
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(s);
                }
                Value::Hash(digest) => {
                    let letter = match digest.len() {
                        4 => b'F',
                        20 => b'G',
                        32 => b'H',
                        48 => b'I',
                        64 => b'J',
                        n => return Err(Error::Invalid(format!("{key} digest of {n} bytes"))),
                    };
                    out.push(letter);
                    out.extend_from_slice(digest);
                }
                Value::Time { seconds, nanos } => match nanos {
                    Some(nanos) => {
                        out.push(b'T');
                        out.extend_from_slice(&seconds.to_le_bytes());
                        out.extend_from_slice(&nanos.to_le_bytes());
                    }
                    None => {
                        out.push(b'S');
                        out.extend_from_slice(&seconds.to_le_bytes());
                    }
                },
                Value::Blob(size) => {
                    let (letter, width) = match *size {
                        s if s <= u64::from(u16::MAX) => (b'A', 2),
                        s if s <= u64::from(u32::MAX) => (b'B', 4),
                        _ => (b'C', 8),
                    };
                    out.push(letter);
                    out.extend_from_slice(&size.to_le_bytes()[..width]);
                }
            }
        }
        let total =
            u16::try_from(out.len()).map_err(|_| Error::Invalid("entry header is larger than 65535 bytes".into()))?;
        out[4..6].copy_from_slice(&total.to_le_bytes());
        Ok(out)
    }

    /// Parses the fields that follow the magic and size (`body` is the rest of the header).
    pub(crate) fn decode_fields(mut body: &[u8]) -> Result<Self> {
        let mut fields = Vec::new();
        while !body.is_empty() {
            let (key, subtype) = match body {
                [a, b, c, subtype, ..] => (Key([*a, *b, *c]), *subtype),
                _ => return Err(corrupt("a field is cut off at the end of its header")),
            };
            body = &body[4..];
            let value = match subtype {
                b'*' => Value::Flag,
                b'1' | b'2' | b'4' | b'8' => Value::Uint(read_uint(&mut body, usize::from(subtype - b'0'), key)?),
                b'P' => {
                    let len = read_uint(&mut body, 2, key)? as usize;
                    Value::String(take(&mut body, len, key)?.to_vec())
                }
                b'F' | b'G' | b'H' | b'I' | b'J' => {
                    let len = [4, 20, 32, 48, 64][usize::from(subtype - b'F')];
                    Value::Hash(take(&mut body, len, key)?.to_vec())
                }
                b'S' => Value::Time {
                    seconds: read_uint(&mut body, 8, key)? as i64,
                    nanos: None,
                },
                b'T' => Value::Time {
                    seconds: read_uint(&mut body, 8, key)? as i64,
                    nanos: Some(read_uint(&mut body, 4, key)? as u32),
                },
                b'A' => Value::Blob(read_uint(&mut body, 2, key)?),
                b'B' => Value::Blob(read_uint(&mut body, 4, key)?),
                b'C' => Value::Blob(read_uint(&mut body, 8, key)?),
                other => {
                    return Err(corrupt(format!(
                        "field {key} has an unknown type {:?}",
                        char::from(other)
                    )))
                }
            };
            fields.push((key, value));
        }
        Ok(Header { fields })
    }
}

fn uint_width(v: u64) -> usize {
    match v {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => 8,
    }
}

fn take<'a>(body: &mut &'a [u8], len: usize, key: Key) -> Result<&'a [u8]> {
    if body.len() < len {
        return Err(corrupt(format!("field {key} is cut off at the end of its header")));
    }
    let (value, rest) = body.split_at(len);
    *body = rest;
    Ok(value)
}

fn read_uint(body: &mut &[u8], width: usize, key: Key) -> Result<u64> {
    let bytes = take(body, width, key)?;
    let mut le = [0u8; 8];
    le[..width].copy_from_slice(bytes);
    Ok(u64::from_le_bytes(le))
}

pub(crate) fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt(what.into())
}
