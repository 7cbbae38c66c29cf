//! Writing one disk file of the image into the staging directory: sparsely (all-zero pieces
//! stay holes), and checked against what its qcow2 header says before most of it is read.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256, Sha512};

/// Bytes read from the layer at once.
const PIECE: usize = 1 << 20;
/// Zero detection granularity: a filesystem's block, as `qemu-img convert -S 4k` uses.
const BLOCK: usize = 4096;

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";

/// qcow2 metadata (L1/L2 tables, refcounts, header extensions) beyond the disk's own bytes is
/// about 1/64 of the disk at worst (512-byte clusters); 1/16 plus 64 MiB leaves ample room, and
/// a file larger than that cannot be a qcow2 image of that disk.
fn qcow2_file_bound(virtual_size: u64) -> u64 {
    virtual_size.saturating_add(virtual_size / 16).saturating_add(64 << 20)
}

/// Copies the `size` bytes of `member` (`shown`: its path in the image) into a new sparse
/// file at `target`. Refused after its first piece: a qcow2 file whose header shows a backing
/// file, or a virtual size that cannot explain `size` bytes; any disk larger than `free` bytes.
/// Returns the checksum of the file's bytes when asked for one.
pub(crate) fn write_sparse(
    member: &mut dyn Read,
    size: u64,
    shown: &str,
    target: &Path,
    free: u64,
    mut checksum: Option<Checksum>,
) -> Result<Option<String>> {
    let context = || format!("failed to write {}", target.display());
    let file = File::create_new(target).with_context(context)?;
    let mut buffer = vec![0u8; PIECE];
    let mut position = 0u64;
    loop {
        let filled = fill(member, &mut buffer).with_context(|| format!("failed to read /{shown} from the layer"))?;
        if position == 0 {
            check_size(&buffer[..filled], size, shown, free)?;
        }
        if filled == 0 {
            break;
        }
        if let Some(checksum) = &mut checksum {
            checksum.update(&buffer[..filled]);
        }
        write_nonzero_runs(&file, &buffer[..filled], position).with_context(context)?;
        position += filled as u64;
    }
    file.set_len(size).with_context(context)?;
    Ok(checksum.map(Checksum::hex))
}

/// The checksum of a disk file that kubevirt/containerdisks' `shasum` label states: SHA-256
/// (64 hex digits) for most distributions, SHA-512 (128) for Debian.
pub(crate) enum Checksum {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Checksum {
    /// The algorithm of a `shasum` label's value; `None` for a value that is no such checksum.
    pub(crate) fn for_label(value: &str) -> Option<Checksum> {
        if !value
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        {
            return None;
        }
        match value.len() {
            64 => Some(Checksum::Sha256(Sha256::new())),
            128 => Some(Checksum::Sha512(Sha512::new())),
            _ => None,
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Checksum::Sha256(hasher) => hasher.update(data),
            Checksum::Sha512(hasher) => hasher.update(data),
        }
    }

    fn hex(self) -> String {
        match self {
            Checksum::Sha256(hasher) => format!("{:x}", hasher.finalize()),
            Checksum::Sha512(hasher) => format!("{:x}", hasher.finalize()),
        }
    }
}

/// Writes the runs of blocks of `piece` that are not all zeros: a new file reads as zeros
/// wherever nothing was written.
fn write_nonzero_runs(file: &File, piece: &[u8], position: u64) -> io::Result<()> {
    let mut run: Option<usize> = None;
    for (index, block) in piece.chunks(BLOCK).enumerate() {
        let zero = block.iter().all(|&byte| byte == 0);
        match (run, zero) {
            (None, false) => run = Some(index * BLOCK),
            (Some(start), true) => {
                file.write_all_at(&piece[start..index * BLOCK], position + start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    match run {
        Some(start) => file.write_all_at(&piece[start..], position + start as u64),
        None => Ok(()),
    }
}

/// Reads until `buffer` is full or the member ends.
fn fill(reader: &mut dyn Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

fn check_size(head: &[u8], size: u64, shown: &str, free: u64) -> Result<()> {
    let disk_size = if head.starts_with(QCOW2_MAGIC) && head.len() >= 32 {
        check_qcow2_header(head, size, shown)?
    } else {
        size
    };
    if disk_size > free {
        bail!(
            "/{shown} holds a disk of {:.1} GB, more than the {:.1} GB free here: make room (tart prune) and pull again",
            disk_size as f64 / 1e9,
            free as f64 / 1e9
        );
    }
    Ok(())
}

/// The virtual size of a qcow2 file of `size` bytes that starts with `head`.
fn check_qcow2_header(head: &[u8], size: u64, shown: &str) -> Result<u64> {
    let field = |at: usize| u64::from_be_bytes(head[at..at + 8].try_into().expect("8 bytes"));
    let backing_offset = field(8);
    if backing_offset != 0 {
        let length = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
        let name = usize::try_from(backing_offset)
            .ok()
            .and_then(|start| head.get(start..start.checked_add(length)?))
            .map(|name| format!(" ({})", String::from_utf8_lossy(name)));
        bail!(
            "/{shown} is a qcow2 overlay on a backing file{}, which a containerDisk cannot carry: \
             the image must hold a standalone disk (qemu-img convert -O qcow2)",
            name.unwrap_or_default()
        );
    }
    let virtual_size = field(24);
    if size > qcow2_file_bound(virtual_size) {
        bail!(
            "/{shown} is {size} bytes, far more than a qcow2 file for its {virtual_size}-byte disk can be: \
             a broken image or a decompression bomb; refusing it"
        );
    }
    Ok(virtual_size)
}
