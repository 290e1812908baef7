//! `file` and `fh` response bodies: read by the network core in chunks,
//! kept one write ahead of the connection (`ExchangeConfig::file_window`).
//!
//! A regular file is read by position (`pread`), never by moving a file
//! offset: an `fh` body is a `dup` of the application's descriptor, which
//! shares its offset, so reading it sequentially would move the
//! application's handle.  Anything else (a pipe, a socket, a character
//! device) has no positions: it is read where it is, to EOF or `length`,
//! and that consumes it, for the application's handle too.  Its reads wait
//! on the blocking pool, polling, so that an exchange that ends while the
//! writer is silent stops the wait.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::exchange::{Exchange, Streamed};
use crate::interp::messages::ToPerl;

/// How often a read waiting on a silent pipe or socket checks whether the
/// exchange has ended.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Where the bytes of a body come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A regular file, read by position from this offset.
    Positional(u64),
    /// A pipe, socket or device, read where it is.
    Sequential,
}

impl Source {
    /// The source for `file`: positional from `offset` (None: the
    /// descriptor's current offset, read without moving it) when it is a
    /// regular file; sequential otherwise, where an offset is an error.
    pub fn of(file: &File, offset: Option<u64>) -> Result<Source, String> {
        let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
        if meta.is_dir() {
            return Err("is a directory".into());
        }
        if meta.is_file() {
            let offset = match offset {
                Some(o) => o,
                // SAFETY: lseek on a descriptor we own; SEEK_CUR with 0
                // reads the offset without changing it.
                None => match unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_CUR) } {
                    n if n >= 0 => n as u64,
                    _ => 0,
                },
            };
            return Ok(Source::Positional(offset));
        }
        if offset.is_some() {
            return Err(
                "an offset needs a regular file; a pipe, socket or device is read from where it is"
                    .into(),
            );
        }
        Ok(Source::Sequential)
    }
}

/// Stream `first` and then `file` (from `source`) for `length` bytes in all
/// (None: to EOF), then settle the application's send.
pub async fn stream(
    ex: Arc<Exchange>,
    file: File,
    source: Source,
    length: Option<u64>,
    first: Bytes,
) {
    let mut sent_any = false;
    let file = Arc::new(file);
    let result: Result<(), String> = async {
        let mut remaining = length.unwrap_or(u64::MAX);
        let mut position = match source {
            Source::Positional(o) => Some(o),
            Source::Sequential => None,
        };
        let mut first = Some(first).filter(|b| !b.is_empty());
        while remaining > 0 {
            let chunk = match first.take() {
                Some(mut bytes) => {
                    bytes.truncate(remaining.min(bytes.len() as u64) as usize);
                    bytes
                }
                None => {
                    let chunk = ex.config().write_buffer_size.max(1) as u64;
                    let want = remaining.min(chunk) as usize;
                    match read_chunk(&file, position, want, &ex).await {
                        Ok(Some(bytes)) => bytes,
                        // The exchange ended, or its body became unwanted
                        // (a 204 or 304), while a pipe was silent:
                        // end_streamed below ends the body if it still can.
                        Ok(None) => break,
                        Err(e) => return Err(format!("read failed: {e}")),
                    }
                }
            };
            if chunk.is_empty() {
                break;
            }
            remaining -= chunk.len() as u64;
            if let Some(p) = position.as_mut() {
                *p += chunk.len() as u64;
            }
            match ex.push_streamed(chunk).await {
                Streamed::Queued => sent_any = true,
                // The exchange ended underneath us; the send settles as a no-op.
                Streamed::Ended => return Ok(()),
                // A 204 or 304: nothing more is read, the body ends here.
                Streamed::NotWanted => break,
                Streamed::OverLength(declared) => {
                    return Err(format!(
                        "the file is longer than the declared Content-Length of {declared}"
                    ))
                }
            }
        }
        ex.end_streamed();
        Ok(())
    }
    .await;
    match result {
        Ok(()) => ex.mailbox_push(ToPerl::SendDone {
            id: ex.id,
            error: None,
        }),
        Err(e) => {
            // The send fails first, so the app sees why; then, if bytes
            // already reached the wire, the response is cut off (it cannot
            // be recovered and must be seen as truncated).
            ex.mailbox_push(ToPerl::SendDone {
                id: ex.id,
                error: Some(format!("cannot send file: {e}")),
            });
            if sent_any {
                ex.server_abort(
                    "server_error",
                    Some("a file body failed after part of it was sent".into()),
                    None,
                );
            }
        }
    }
}

/// Up to `want` bytes from `position` (None: where the descriptor is): at
/// once when the page cache holds them, else read on the blocking pool.
/// Ok(None) when the exchange ended, or wanted no more body, while a pipe
/// was silent.
async fn read_chunk(
    file: &Arc<File>,
    position: Option<u64>,
    want: usize,
    ex: &Arc<Exchange>,
) -> io::Result<Option<Bytes>> {
    if let Some(at) = position {
        if let Some(cached) = read_cached(file, at, want)? {
            return Ok(Some(cached));
        }
    }
    let file = file.clone();
    let ex = ex.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(want);
        let n = match position {
            Some(at) => retry_interrupted(|| file.read_at(&mut buf, at))?,
            None => loop {
                if !wait_readable(&file)? {
                    if ex.wants_no_more_body() {
                        return Ok(None);
                    }
                    continue;
                }
                match (&*file).read(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // The application's handle is non-blocking: the data
                    // went elsewhere; wait again.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            },
        };
        buf.truncate(n);
        Ok(Some(buf.freeze()))
    })
    .await
    .map_err(io::Error::other)?
}

/// Up to `want` bytes at `at` if reading them cannot wait for the disk:
/// `preadv2` with `RWF_NOWAIT` copies what the page cache holds and refuses
/// (EAGAIN) rather than block.  None: some of it must come from the disk,
/// or the kernel or filesystem cannot tell; the blocking pool reads it.
///
/// A file served again and again (an asset, a download) is in the page
/// cache, and handing each 64 KiB of it to the blocking pool cost more than
/// the read: a thread woken per chunk, and a zeroed buffer it then
/// overwrote.
fn read_cached(file: &File, at: u64, want: usize) -> io::Result<Option<Bytes>> {
    let Ok(offset) = libc::off_t::try_from(at) else {
        return Ok(None);
    };
    let mut buf = BytesMut::with_capacity(want);
    let spare = buf.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len().min(want),
    };
    let n = loop {
        // SAFETY: one iovec over `buf`'s spare capacity, which outlives the
        // call; the kernel writes at most iov_len bytes into it.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Not all cached (EAGAIN), or no RWF_NOWAIT here (EOPNOTSUPP,
            // EINVAL, ENOSYS): the pool's plain read decides.
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => return Ok(None),
            _ => return Err(e),
        }
    };
    // SAFETY: the kernel initialised the first n bytes (n <= iov_len).
    unsafe { buf.set_len(n) };
    Ok(Some(buf.freeze()))
}

fn retry_interrupted(mut f: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Wait up to POLL_INTERVAL for `file` to be readable (or at EOF, or in
/// error: the read then says which).  False on timeout.
fn wait_readable(file: &File) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for a descriptor we own.
    let n = unsafe { libc::poll(&mut pfd, 1, POLL_INTERVAL.as_millis() as libc::c_int) };
    match n {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::fd::FromRawFd;

    fn dup(file: &File) -> File {
        // SAFETY: dup of an open descriptor; the result is checked and owned.
        let fd = unsafe { libc::dup(file.as_raw_fd()) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        unsafe { File::from_raw_fd(fd) }
    }

    fn temp_file(content: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "pagi-rs-file-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(content).unwrap();
        f
    }

    #[test]
    fn a_regular_file_defaults_to_the_current_offset_without_moving_it() {
        let mut f = temp_file(b"0123456789");
        f.seek(SeekFrom::Start(4)).unwrap();
        let d = dup(&f);
        assert_eq!(Source::of(&d, None).unwrap(), Source::Positional(4));
        assert_eq!(Source::of(&d, Some(7)).unwrap(), Source::Positional(7));
        let mut buf = [0u8; 3];
        d.read_at(&mut buf, 4).unwrap();
        assert_eq!(&buf, b"456");
        assert_eq!(
            f.stream_position().unwrap(),
            4,
            "a positional read through the dup leaves the shared offset alone"
        );
    }

    #[test]
    fn a_pipe_is_sequential_and_refuses_an_offset() {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both are fresh descriptors owned by nobody else.
        let (r, _w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        assert_eq!(Source::of(&r, None).unwrap(), Source::Sequential);
        assert!(Source::of(&r, Some(0))
            .unwrap_err()
            .contains("regular file"));
    }

    /// Whether this filesystem answers RWF_NOWAIT at all (tmpfs on older
    /// kernels does not: the pool then reads everything).
    fn nowait_supported(f: &File) -> bool {
        let mut byte = 0u8;
        let iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        // SAFETY: one iovec over a local byte.
        let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
        n >= 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
    }

    #[test]
    fn cached_bytes_are_read_at_once_by_position() {
        let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let f = temp_file(&content);
        if !nowait_supported(&f) {
            eprintln!("RWF_NOWAIT unsupported on the temp directory's filesystem; skipped");
            return;
        }
        // Just written, so in the page cache.
        let whole = read_cached(&f, 0, content.len()).unwrap().expect("cached");
        assert_eq!(&whole[..], &content[..]);
        let middle = read_cached(&f, 70_000, 65_536).unwrap().expect("cached");
        assert_eq!(&middle[..], &content[70_000..135_536]);
        let tail = read_cached(&f, 199_990, 65_536).unwrap().expect("cached");
        assert_eq!(&tail[..], &content[199_990..], "short at the end");
        let past = read_cached(&f, 300_000, 10).unwrap().expect("EOF is known");
        assert!(past.is_empty(), "past the end: empty, so the stream stops");
    }

    #[test]
    fn a_read_that_would_wait_is_left_to_the_pool() {
        // Errors other than "would wait" and "cannot tell" are the caller's:
        // a pipe (never read by position in `stream`, but the simplest
        // descriptor preadv2 refuses) gives ESPIPE...
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both are fresh descriptors owned by nobody else.
        let (r, _w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        assert!(read_cached(&r, 0, 10).is_err());
        // ...and an offset beyond off_t goes to the pool, whose read says why.
        let f = temp_file(b"abc");
        assert!(read_cached(&f, u64::MAX, 10).unwrap().is_none());
    }

    #[test]
    fn a_directory_is_refused() {
        let d = File::open(std::env::temp_dir()).unwrap();
        assert!(Source::of(&d, None).unwrap_err().contains("directory"));
    }
}
