use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Copies `src` to a new file `dst` as cheaply as the filesystem allows: a reflink (shared
/// extents, instant) where supported, otherwise a copy of the data regions only, so holes in
/// a sparse disk image stay holes. `dst` must not exist.
pub fn clone_file(src: &Path, dst: &Path) -> io::Result<()> {
    let source = File::open(src)?;
    let target = OpenOptions::new().write(true).create_new(true).open(dst)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both descriptors are ours.
    if unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let len = source.metadata()?.len();
    target.set_len(len)?;
    copy_sparse_range(&source, 0, &target, 0, len)?;
    target.sync_all()
}

/// Copies `len` bytes of `source` from `source_start` to `target` at `target_start`, data
/// regions only (found with SEEK_DATA/SEEK_HOLE), each with copy_file_range, which the kernel
/// may turn into a reflink. Holes in the source are not written: the target range must read as
/// zeros already (a fresh sparse file, or a punched range).
pub fn copy_sparse_range(
    source: &File,
    source_start: u64,
    target: &File,
    target_start: u64,
    len: u64,
) -> io::Result<()> {
    let end = source_start + len;
    let mut offset = source_start;
    while offset < end {
        let data_start = seek_data(source, offset)?;
        if data_start >= end {
            return Ok(());
        }
        let data_end = seek_hole(source, data_start)?.min(end);
        let shift = |pos: u64| pos - source_start + target_start;
        copy_range(source, target, data_start, shift(data_start), data_end - data_start)?;
        offset = data_end;
    }
    Ok(())
}

/// Start of the first data region at or after `offset`: `u64::MAX` when only a hole follows,
/// `offset` itself where the filesystem cannot tell (no SEEK_DATA), so callers read everything.
pub fn seek_data(file: &File, offset: u64) -> io::Result<u64> {
    match lseek(file, offset, libc::SEEK_DATA) {
        Ok(start) => Ok(start),
        Err(err) if err.raw_os_error() == Some(libc::ENXIO) => Ok(u64::MAX),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(offset),
        Err(err) => Err(err),
    }
}

/// End of the data region that contains `offset`: `u64::MAX` where the filesystem cannot tell.
pub(crate) fn seek_hole(file: &File, offset: u64) -> io::Result<u64> {
    Ok(lseek(file, offset, libc::SEEK_HOLE).unwrap_or(u64::MAX))
}

/// Makes the entries of `dir` (names created, renamed or removed) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes a tree durable before a rename publishes it: every file's data and size, then the
/// entries of every directory, deepest first. Files already synced while they were written cost
/// little here; without this, a power loss after the rename could leave a complete-looking VM
/// or cache entry whose disk reads as zeros.
pub(crate) fn sync_tree(root: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(root)
}

/// `create_dir_all` whose new directories survive a power loss: each one's parent is synced.
pub(crate) fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs_durably(parent)?;
        match std::fs::create_dir(dir) {
            Err(err) if err.kind() != io::ErrorKind::AlreadyExists => return Err(err),
            _ => sync_dir(parent)?,
        }
    }
    Ok(())
}

fn copy_range(source: &File, target: &File, source_start: u64, target_start: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut src_off = (source_start + done) as libc::loff_t;
        let mut dst_off = (target_start + done) as libc::loff_t;
        let chunk = (len - done).min(1 << 30) as usize;
        // SAFETY: valid descriptors and offset pointers that live across the call.
        let copied = unsafe {
            libc::copy_file_range(
                source.as_raw_fd(),
                &mut src_off,
                target.as_raw_fd(),
                &mut dst_off,
                chunk,
                0,
            )
        };
        match copied {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "source file shrank during the copy",
                ))
            }
            n if n > 0 => done += n as u64,
            _ => {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        return copy_range_by_hand(
                            source,
                            target,
                            source_start + done,
                            target_start + done,
                            len - done,
                        );
                    }
                    _ => return Err(err),
                }
            }
        }
    }
    Ok(())
}

/// The portable fallback: read and write, skipping all-zero blocks so they stay holes.
fn copy_range_by_hand(source: &File, target: &File, source_start: u64, target_start: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        source.read_exact_at(&mut buf[..want], source_start + done)?;
        if buf[..want].iter().any(|&b| b != 0) {
            target.write_all_at(&buf[..want], target_start + done)?;
        }
        done += want as u64;
    }
    Ok(())
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor we own.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if pos < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pos as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_file_clones_without_filling_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        let file = File::create(&src).unwrap();
        file.set_len(256 << 20).unwrap();
        file.write_all_at(&[7u8; 4096], 0).unwrap();
        file.write_all_at(&[9u8; 8192], 128 << 20).unwrap();
        file.write_all_at(&[1u8; 10], (256 << 20) - 10).unwrap();
        drop(file);

        clone_file(&src, &dst).unwrap();

        let copied = std::fs::read(&dst).unwrap();
        assert_eq!(copied, std::fs::read(&src).unwrap());
        let allocated = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            allocated < 16 << 20,
            "clone allocated {allocated} bytes of a 256 MiB mostly-hole file"
        );
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"data").unwrap();
        std::fs::write(dir.path().join("dst"), b"keep").unwrap();
        assert!(clone_file(&src, &dir.path().join("dst")).is_err());
        assert_eq!(std::fs::read(dir.path().join("dst")).unwrap(), b"keep");
    }
}
