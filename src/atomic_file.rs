//! Replacing a small file atomically and cheaply, for state rewritten on every change (the
//! proxy's routing state, the HAProxy driver's counters).
//!
//! The new content goes into a spare file beside the target ([`spare_path`], which holds an
//! older version), then the two trade places in one `renameat2(RENAME_EXCHANGE)`. A crash of the
//! process leaves the target whole, old or new. No fsync: after a power cut either file may hold
//! old or mixed blocks, so readers fall back to the spare when the target does not parse (see
//! [`read_either`]).
//!
//! Why not a new temporary file renamed over the target: on ext4 a rename that replaces a file
//! makes the kernel start writing the new file's data out first (`auto_da_alloc`), and frees the
//! old file's blocks: about 0.8 ms per write, measured, on the critical path of every host
//! switch. Overwriting the spare in place (never truncated to zero, which triggers the same
//! flush) and exchanging costs about 0.15 ms. Where the target does not exist yet, or the
//! filesystem cannot exchange, the spare is renamed over it.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Replaces `path`'s content with `bytes` atomically, creating its directory if needed. Writers
/// of the same directory take turns (an `flock` on it): two processes, or a write abandoned by
/// its caller and the next one, never share the spare. A symlinked target is written where it
/// points.
pub fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path)
            .with_context(|| format!("cannot resolve the symlink {}", path.display()))?,
        _ => path.to_path_buf(),
    };
    let dir = match target.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let turn = match std::fs::File::open(&dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create the directory {}", dir.display()))?;
            std::fs::File::open(&dir)
                .with_context(|| format!("cannot open the directory {}", dir.display()))?
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot open the directory {}", dir.display()));
        }
    };
    // SAFETY: flock on an open descriptor; released when `turn` is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&turn), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot lock the directory {}", dir.display()));
    }
    let spare = spare_path(&target);
    write_over(&spare, bytes).with_context(|| format!("cannot write {}", spare.display()))?;
    match exchange(&spare, &target) {
        Ok(()) => Ok(()),
        // No target yet, or no exchange on this filesystem: rename over it (and the spare is
        // gone until the next write).
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
            ) || e.kind() == std::io::ErrorKind::Unsupported =>
        {
            std::fs::rename(&spare, &target).with_context(|| {
                format!("cannot rename {} to {}", spare.display(), target.display())
            })
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot exchange {} with {}",
                spare.display(),
                target.display()
            )
        }),
    }
}

/// Held across a read-modify-write of a file that [`replace`] writes: an exclusive `flock` on
/// `<name>.lock` beside it, released on drop. [`replace`] alone keeps each write whole, but two
/// processes that both read, change and write back (a deploy and a `cutover status` editing the
/// HAProxy state) would lose one change. The lock is taken through a new open file each time, so
/// it also excludes other threads of this process; it is not re-entrant.
#[derive(Debug)]
pub struct EditLock {
    _file: std::fs::File,
}

/// Takes the [`EditLock`] of `path`, waiting for its holder, and creates the directory if needed.
pub fn lock_for_edit(path: &Path) -> anyhow::Result<EditLock> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let lock = path.with_file_name(name);
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
    };
    let file = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = lock.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create the directory {}", dir.display()))?;
            }
            open()
        }
        other => other,
    }
    .with_context(|| format!("cannot open the lock file {}", lock.display()))?;
    loop {
        // SAFETY: flock on a descriptor this function owns; released when it is closed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } == 0 {
            return Ok(EditLock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).with_context(|| format!("cannot lock {}", lock.display()));
        }
    }
}

/// The target's companion, `<name>.prev`: scratch space for the next write, and meanwhile the
/// content before the last one.
pub fn spare_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".prev");
    path.with_file_name(name)
}

/// Replaces the content of `path` (created if missing) with `bytes`, without truncating it to
/// zero first.
fn write_over(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a symlink someone left at the spare's name.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all_at(bytes, 0)?;
    f.set_len(bytes.len() as u64)
}

/// Swaps two existing paths atomically.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Reads `path` with `parse`; when the target does not parse (a power cut during a write, see
/// the module docs) but the spare does, the spare's content, with a warning. `Ok(None)`: there
/// is no target.
pub fn read_either<T>(
    path: &Path,
    parse: impl Fn(&[u8]) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    match parse(&bytes) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let spare = spare_path(path);
            match std::fs::read(&spare)
                .map_err(anyhow::Error::from)
                .and_then(|b| parse(&b))
            {
                Ok(v) => {
                    tracing::warn!(
                        "{} does not parse ({e:#}); using {}, the content before its last write",
                        path.display(),
                        spare.display()
                    );
                    Ok(Some(v))
                }
                Err(_) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spare_holds_the_content_before_the_last_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        // A longer leftover in the spare (a write cut short by a crash) leaves no tail behind.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(spare_path(&path), "x".repeat(10_000)).unwrap();
        replace(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        replace(&path, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two, longer");
        assert_eq!(std::fs::read(spare_path(&path)).unwrap(), b"one");
        replace(&path, b"3").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"3");
        assert_eq!(std::fs::read(spare_path(&path)).unwrap(), b"two, longer");
    }

    #[test]
    fn edits_under_the_edit_lock_take_turns_across_threads_and_processes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/count");
        replace(&path, b"0").unwrap();
        // Read, wait, write back: without the lock most increments would be lost.
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let _held = lock_for_edit(&path).unwrap();
                    let n: u32 = String::from_utf8(std::fs::read(&path).unwrap())
                        .unwrap()
                        .parse()
                        .unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    replace(&path, (n + 1).to_string().as_bytes()).unwrap();
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"8");
        // Another process sees it taken while held, and free after.
        let try_lock = || {
            std::process::Command::new("flock")
                .args(["-n", "-E", "3"])
                .arg(dir.path().join("sub/count.lock"))
                .arg("true")
                .status()
                .unwrap()
                .code()
        };
        let held = lock_for_edit(&path).unwrap();
        assert_eq!(try_lock(), Some(3), "another process took a held edit lock");
        drop(held);
        assert_eq!(try_lock(), Some(0));
    }

    #[test]
    fn a_torn_target_is_read_from_the_spare() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace(&path, b"[1]").unwrap();
        replace(&path, b"[2]").unwrap();
        let parse = |b: &[u8]| -> anyhow::Result<Vec<u32>> { Ok(serde_json::from_slice(b)?) };
        assert_eq!(read_either(&path, parse).unwrap(), Some(vec![2]));
        std::fs::write(&path, b"[2, garb").unwrap();
        assert_eq!(read_either(&path, parse).unwrap(), Some(vec![1]));
        std::fs::write(spare_path(&path), b"also garbage").unwrap();
        assert!(read_either(&path, parse).is_err());
        assert_eq!(read_either(&dir.path().join("none"), parse).unwrap(), None);
    }

    #[test]
    fn a_symlinked_target_is_written_where_it_points() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.json");
        let link = dir.path().join("link.json");
        std::fs::write(&real, b"old").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        replace(&link, b"new").unwrap();
        replace(&link, b"newer").unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&real).unwrap(), b"newer");
    }

    #[test]
    fn a_missing_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/state.json");
        replace(&path, b"x").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }
}
