//! Files breakwater writes (decision log, DLQ spool, parked messages, cursors) hold request
//! digests, bodies and credentials-adjacent metadata: they are created 0600 in directories
//! created 0700, whatever the process umask, so other local users on the node cannot read
//! them.
//!
//! The mode is set at creation (`OpenOptionsExt::mode`, `DirBuilderExt::mode`) and then
//! explicitly (`set_permissions`), because a umask can only remove bits and an odd umask
//! (say 0o777) would otherwise leave a file the process itself cannot read. A file left by an
//! older version with wider bits is tightened when it is opened again. Directories that
//! already existed are the operator's and are left alone.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every file breakwater creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory breakwater creates.
pub const DIR_MODE: u32 = 0o700;

/// `create_dir_all`, each directory it creates being 0700.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all(parent)?;
    }
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)),
        // Another thread or process made it between the check and now: theirs to keep.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens `path` with `options`, creating it 0600. A file found with group or other bits
/// (made by an older version) is tightened to 0600; when that is not allowed (a file owned
/// by another user), it says so and the file is used as it is.
pub fn open(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
    let file = options.mode(FILE_MODE).open(path)?;
    if let Err(e) = tighten(&file) {
        tracing::warn!(path = %path.display(), error = %e, "cannot make the file private (0600)");
    }
    Ok(file)
}

/// `std::fs::write` for a private file (0600).
pub fn write(path: &Path, contents: impl AsRef<[u8]>) -> io::Result<()> {
    use std::io::Write;
    let mut file = open(
        OpenOptions::new().write(true).create(true).truncate(true),
        path,
    )?;
    file.write_all(contents.as_ref())
}

fn tighten(file: &File) -> io::Result<()> {
    let mode = file.metadata()?.permissions().mode() & 0o777;
    if mode != FILE_MODE {
        file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_dirs_are_0700_and_files_0600_and_old_files_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let before = mode(root.path());
        let deep = root.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&root.path().join(d)), DIR_MODE, "{d}");
        }
        // A directory that was there already is not ours to change.
        assert_eq!(mode(root.path()), before);

        let f = deep.join("x");
        write(&f, b"1").unwrap();
        assert_eq!(mode(&f), FILE_MODE);

        let old = deep.join("old");
        std::fs::write(&old, b"1").unwrap();
        std::fs::set_permissions(&old, Permissions::from_mode(0o644)).unwrap();
        open(OpenOptions::new().append(true), &old).unwrap();
        assert_eq!(mode(&old), FILE_MODE);
    }
}
