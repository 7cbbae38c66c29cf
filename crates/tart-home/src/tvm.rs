//! `.tvm` files (`tart export` / `tart import`): a VM directory as an Apple Archive compressed
//! with LZFSE, the format macOS Tart reads and writes.
//!
//! Export streams the VM's files into the archive, passing the holes of a sparse disk as zero
//! runs that cost neither reads nor compression; the file appears under its name only once it
//! is complete and on stable storage. Import rebuilds the directory in `tmp/`, writing zero
//! runs as holes, and moves it into place with one rename like every other command.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apple_archive::{is_zero, ArchiveReader, ArchiveWriter, EntryType, Header, Key, PbzeWriter, Piece, Value};

use crate::error::io_context;
use crate::{Error, Result, TartHome, VmDir};

const IO_CHUNK: usize = 4 << 20;
/// Zero runs shorter than this inside data are written rather than punched as holes.
const HOLE_GRANULE: usize = 64 << 10;

impl VmDir {
    /// Bytes an export of this VM reads and archives (logical sizes, holes included).
    pub fn export_size(&self) -> Result<u64> {
        Ok(self.export_entries()?.iter().map(|(_, meta)| meta.len()).sum())
    }

    /// Writes the VM directory to `target` as a `.tvm`. The archive is built in an unnamed file
    /// beside `target` and linked there only when complete and synced, replacing any file of
    /// that name; a failed or killed export leaves nothing behind. No lock is taken, so a
    /// running VM can be exported (as with Tart), its disk as it is at that moment.
    pub fn export_archive(&self, target: &Path, progress: &dyn Fn(u64)) -> Result<()> {
        let dir = match target.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        let context = || format!("failed to write {}", target.display());
        let output = OutputFile::create(&dir).map_err(io_context(context()))?;
        let mut writer = ArchiveWriter::new(
            PbzeWriter::new(BufWriter::with_capacity(1 << 20, output.file())).map_err(io_context(context()))?,
        );
        for (relative, meta) in self.export_entries()? {
            let source = self.path().join(&relative);
            let header = entry_header(&relative, &meta, &source)?;
            writer.write_header(&header).map_err(archive_error(target))?;
            if meta.is_file() {
                archive_file_data(&source, meta.len(), &mut writer, progress).map_err(|err| match err {
                    FileError::Read(err) => io_context(format!("failed to read {}", source.display()))(err),
                    FileError::Archive(err) => archive_error(target)(err),
                })?;
            }
        }
        let buffered = writer
            .finish()
            .map_err(archive_error(target))?
            .finish()
            .map_err(io_context(context()))?;
        buffered
            .into_inner()
            .map_err(|err| io_context(context())(err.into_error()))?;
        output.persist(target).map_err(io_context(context()))
    }

    /// Everything in the VM directory that an archive carries, parents before children.
    /// Sockets, fifos and devices (a running VM's `control.sock`) mean nothing elsewhere.
    fn export_entries(&self) -> Result<Vec<(PathBuf, fs::Metadata)>> {
        let mut entries = Vec::new();
        let mut pending = vec![PathBuf::new()];
        while let Some(relative) = pending.pop() {
            let dir = self.path().join(&relative);
            let mut names: Vec<_> = fs::read_dir(&dir)
                .map_err(io_context(format!("failed to list {}", dir.display())))?
                .filter_map(|entry| entry.ok().map(|entry| entry.file_name()))
                .collect();
            names.sort();
            let mut subdirs = Vec::new();
            for name in names {
                let path = relative.join(&name);
                let full = self.path().join(&path);
                let meta =
                    fs::symlink_metadata(&full).map_err(io_context(format!("failed to stat {}", full.display())))?;
                let kind = meta.file_type();
                if kind.is_dir() {
                    subdirs.push(path.clone());
                } else if !kind.is_file() && !kind.is_symlink() {
                    continue;
                }
                entries.push((path, meta));
            }
            pending.extend(subdirs.into_iter().rev());
        }
        Ok(entries)
    }
}

/// The fields macOS Tart's exports carry, in the order Apple's `aa` writes them.
fn entry_header(relative: &Path, meta: &fs::Metadata, source: &Path) -> Result<Header> {
    let kind = meta.file_type();
    let entry_type = if kind.is_dir() {
        EntryType::Directory
    } else if kind.is_symlink() {
        EntryType::Symlink
    } else {
        EntryType::File
    };
    let mut header = Header::new()
        .with(Key::TYP, Value::Uint(u64::from(entry_type.letter())))
        .with(Key::PAT, Value::String(relative.as_os_str().as_bytes().to_vec()));
    if entry_type == EntryType::Symlink {
        let target = fs::read_link(source).map_err(io_context(format!("failed to read {}", source.display())))?;
        header = header.with(Key::LNK, Value::String(target.as_os_str().as_bytes().to_vec()));
    }
    header = header
        .with(Key::UID, Value::Uint(u64::from(meta.uid())))
        .with(Key::GID, Value::Uint(u64::from(meta.gid())))
        .with(Key::MOD, Value::Uint(u64::from(meta.mode() & 0o7777)))
        .with(Key::FLG, Value::Uint(0))
        .with(Key::CTM, timestamp(meta.ctime(), meta.ctime_nsec()))
        .with(Key::MTM, timestamp(meta.mtime(), meta.mtime_nsec()));
    if entry_type == EntryType::File {
        header = header.with(Key::DAT, Value::Blob(meta.len()));
    }
    Ok(header)
}

fn timestamp(seconds: i64, nanos: i64) -> Value {
    Value::Time {
        seconds,
        nanos: (nanos != 0).then_some(nanos as u32),
    }
}

enum FileError {
    Read(io::Error),
    Archive(apple_archive::Error),
}

/// Streams `len` bytes of `source`: data regions are read in large pieces, holes (found with
/// SEEK_DATA/SEEK_HOLE) and all-zero pieces become zero runs. A file that shrinks meanwhile (a
/// running VM's) is padded with zeros, so the entry keeps the size its header announced.
fn archive_file_data<S: apple_archive::Sink>(
    source: &Path,
    len: u64,
    writer: &mut ArchiveWriter<S>,
    progress: &dyn Fn(u64),
) -> std::result::Result<(), FileError> {
    let file = File::open(source).map_err(FileError::Read)?;
    let mut buf = vec![0u8; IO_CHUNK];
    let mut offset = 0u64;
    while offset < len {
        let data_start = crate::copy::seek_data(&file, offset).map_err(FileError::Read)?.min(len);
        if data_start > offset {
            writer.write_zeros(data_start - offset).map_err(FileError::Archive)?;
            progress(data_start - offset);
            offset = data_start;
            continue;
        }
        let data_end = crate::copy::seek_hole(&file, offset).map_err(FileError::Read)?.min(len);
        while offset < data_end {
            let want = ((data_end - offset) as usize).min(buf.len());
            let got = read_at_most(&file, &mut buf[..want], offset).map_err(FileError::Read)?;
            if got == 0 {
                writer.write_zeros(len - offset).map_err(FileError::Archive)?;
                progress(len - offset);
                return Ok(());
            }
            for piece in buf[..got].chunks(HOLE_GRANULE) {
                if is_zero(piece) {
                    writer.write_zeros(piece.len() as u64)
                } else {
                    writer.write_data(piece)
                }
                .map_err(FileError::Archive)?;
            }
            offset += got as u64;
            progress(got as u64);
        }
    }
    Ok(())
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

fn archive_error(path: &Path) -> impl FnOnce(apple_archive::Error) -> Error + '_ {
    move |source| Error::Archive {
        path: path.to_owned(),
        source,
    }
}

/// The file an export writes: unnamed (`O_TMPFILE`) until it is complete, so a killed export
/// leaves nothing; where the filesystem lacks `O_TMPFILE`, a hidden name that is removed on
/// failure.
enum OutputFile {
    Unnamed { file: File, dir: PathBuf },
    Named { file: File, path: PathBuf, persisted: bool },
}

impl OutputFile {
    fn create(dir: &Path) -> io::Result<Self> {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o644)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
        {
            Ok(file) => Ok(OutputFile::Unnamed {
                file,
                dir: dir.to_owned(),
            }),
            Err(err) if matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {
                let path = dir.join(format!(".tart-export-{}.partial", uuid::Uuid::new_v4()));
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&path)?;
                Ok(OutputFile::Named {
                    file,
                    path,
                    persisted: false,
                })
            }
            Err(err) => Err(err),
        }
    }

    fn file(&self) -> &File {
        match self {
            OutputFile::Unnamed { file, .. } | OutputFile::Named { file, .. } => file,
        }
    }

    /// Syncs the data, gives the file its name (replacing what was there) and syncs the name.
    fn persist(mut self, target: &Path) -> io::Result<()> {
        self.file().sync_all()?;
        let dir = match &mut self {
            OutputFile::Unnamed { file, dir } => {
                // linkat() cannot replace a name: link under a fresh one, then rename over.
                let staged = dir.join(format!(".tart-export-{}.partial", uuid::Uuid::new_v4()));
                link_unnamed(file, &staged)?;
                if let Err(err) = fs::rename(&staged, target) {
                    let _ = fs::remove_file(&staged);
                    return Err(err);
                }
                dir.clone()
            }
            OutputFile::Named { path, persisted, .. } => {
                fs::rename(&*path, target)?;
                *persisted = true;
                path.parent().map(Path::to_owned).unwrap_or_default()
            }
        };
        crate::copy::sync_dir(&dir)
    }
}

/// Gives an `O_TMPFILE` file a name. Through `/proc/self/fd` because `AT_EMPTY_PATH` needs
/// CAP_DAC_READ_SEARCH.
fn link_unnamed(file: &File, name: &Path) -> io::Result<()> {
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file)))?;
    let to = std::ffi::CString::new(name.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let OutputFile::Named {
            path, persisted: false, ..
        } = self
        {
            let _ = fs::remove_file(path);
        }
    }
}

impl TartHome {
    /// `tart import`: extracts a `.tvm` into a new local VM `name`.
    pub fn import_vm(&self, archive: &Path, name: &str, force: bool, progress: &dyn Fn(u64)) -> Result<()> {
        let target = self.vacant_target(name, force)?;
        let input = File::open(archive).map_err(io_context(format!("failed to open {}", archive.display())))?;
        let mut reader = ArchiveReader::new(Progressing { input, progress })
            .map_err(|source| invalid_archive(archive, source.to_string()))?;
        let staging = self.staging_dir()?;
        let staged = VmDir::new(staging.path().to_owned());
        while let Some(header) = reader.next_entry().map_err(archive_error(archive))? {
            extract_entry(&header, staging.path(), &mut reader, archive)?;
        }
        for required in ["config.json", "disk.img"] {
            if !staging.path().join(required).is_file() {
                return Err(invalid_archive(
                    archive,
                    format!("it has no {required}, so it is not a Tart VM"),
                ));
            }
        }
        staged.config()?;
        let keep_mac = staged.state_path().exists();
        self.adopt_staged_vm(staging, &target, name, force, keep_mac)
    }
}

/// Counts compressed bytes as the reader consumes them.
struct Progressing<'a> {
    input: File,
    progress: &'a dyn Fn(u64),
}

impl Read for Progressing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

fn invalid_archive(path: &Path, reason: String) -> Error {
    Error::InvalidArchive {
        path: path.to_owned(),
        reason,
    }
}

fn extract_entry(header: &Header, root: &Path, reader: &mut ArchiveReader, archive: &Path) -> Result<()> {
    let raw_path = header
        .string(Key::PAT)
        .ok_or_else(|| invalid_archive(archive, "an entry has no path".into()))?;
    let Some(relative) = safe_relative_path(raw_path).map_err(|reason| {
        invalid_archive(
            archive,
            format!("entry {:?} {reason}", String::from_utf8_lossy(raw_path)),
        )
    })?
    else {
        return Ok(()); // the archive's root: the staging directory itself
    };
    let path = root.join(&relative);
    let shown = relative.display().to_string();
    let mode = header.uint(Key::MOD).map(|mode| mode as u32 & 0o777);
    match header.entry_type() {
        Some(EntryType::Directory) => {
            fs::create_dir_all(&path).map_err(io_context(format!("failed to create {shown}")))?;
            if let Some(mode) = mode {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o700))
                    .map_err(io_context(format!("failed to set the mode of {shown}")))?;
            }
        }
        Some(EntryType::File) => {
            create_parent(&path, &shown)?;
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode.unwrap_or(0o644) | 0o600)
                .open(&path)
                .map_err(|err| match err.kind() {
                    io::ErrorKind::AlreadyExists => {
                        invalid_archive(archive, format!("it holds {shown} more than once"))
                    }
                    _ => io_context(format!("failed to create {shown}"))(err),
                })?;
            let len = extract_file_data(&file, reader, archive, &shown)?;
            file.set_len(len)
                .map_err(io_context(format!("failed to write {shown}")))?;
            if let Some(Value::Time { seconds, nanos }) = header.get(Key::MTM) {
                if let Ok(seconds) = u64::try_from(*seconds) {
                    let when = UNIX_EPOCH + Duration::new(seconds, nanos.unwrap_or(0).min(999_999_999));
                    let _ = file.set_modified(when.min(SystemTime::now()));
                }
            }
        }
        Some(EntryType::Symlink) => {
            let target = header
                .string(Key::LNK)
                .ok_or_else(|| invalid_archive(archive, format!("symlink {shown} has no target")))?;
            if safe_relative_path(target).is_err() {
                return Err(invalid_archive(
                    archive,
                    format!(
                        "symlink {shown} points outside the VM directory (to {:?})",
                        String::from_utf8_lossy(target)
                    ),
                ));
            }
            create_parent(&path, &shown)?;
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &path)
                .map_err(io_context(format!("failed to create {shown}")))?;
        }
        // Sockets, fifos, devices and metadata entries (a running VM's control.sock): nothing
        // a VM directory needs.
        Some(EntryType::Other(_)) => {}
        None => return Err(invalid_archive(archive, format!("entry {shown} has no type"))),
    }
    Ok(())
}

fn create_parent(path: &Path, shown: &str) -> Result<()> {
    match path.parent() {
        Some(parent) => {
            fs::create_dir_all(parent).map_err(io_context(format!("failed to create the directory of {shown}")))
        }
        None => Ok(()),
    }
}

/// Writes the entry's `DAT` blob into `file`, zero runs as holes; returns its length.
fn extract_file_data(file: &File, reader: &mut ArchiveReader, archive: &Path, shown: &str) -> Result<u64> {
    let mut offset = 0u64;
    while let Some((key, _)) = reader.next_blob().map_err(archive_error(archive))? {
        if key != Key::DAT {
            // Extended attributes and ACLs of macOS files: not kept on Linux.
            while reader.read_blob(u64::MAX).map_err(archive_error(archive))?.is_some() {}
            continue;
        }
        while let Some(piece) = reader.read_blob(u64::MAX).map_err(archive_error(archive))? {
            match piece {
                Piece::Zeros(len) => offset += len,
                Piece::Bytes(bytes) => {
                    for part in bytes.chunks(HOLE_GRANULE) {
                        if !is_zero(part) {
                            file.write_all_at(part, offset)
                                .map_err(io_context(format!("failed to write {shown}")))?;
                        }
                        offset += part.len() as u64;
                    }
                }
            }
        }
    }
    Ok(offset)
}

/// An archive path as a relative path that stays inside the directory it is extracted to:
/// `None` for the root itself, an error for absolute paths and `..`.
fn safe_relative_path(raw: &[u8]) -> std::result::Result<Option<PathBuf>, &'static str> {
    if raw.contains(&0) {
        return Err("has a NUL byte in its path");
    }
    let path = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("leads out of the VM directory with \"..\""),
            Component::RootDir | Component::Prefix(_) => return Err("has an absolute path"),
        }
    }
    Ok((!relative.as_os_str().is_empty()).then_some(relative))
}

#[cfg(test)]
mod tests {
    use super::safe_relative_path;

    #[test]
    fn archive_paths_stay_inside() {
        assert_eq!(safe_relative_path(b"").unwrap(), None);
        assert_eq!(safe_relative_path(b".").unwrap(), None);
        assert_eq!(
            safe_relative_path(b"./disk.img").unwrap().unwrap().to_str(),
            Some("disk.img")
        );
        assert_eq!(safe_relative_path(b"a//b").unwrap().unwrap().to_str(), Some("a/b"));
        assert!(safe_relative_path(b"/etc/passwd").is_err());
        assert!(safe_relative_path(b"../x").is_err());
        assert!(safe_relative_path(b"a/../../x").is_err());
        assert!(safe_relative_path(b"a\0b").is_err());
    }
}
