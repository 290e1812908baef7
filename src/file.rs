//! `file` and `fh` response bodies: read by the network core in chunks,
//! paced by the same high-water mark as application sends.
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
                        // The exchange ended while a pipe was silent.
                        Ok(None) => return Ok(()),
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

/// Up to `want` bytes from `position` (None: where the descriptor is), read
/// on the blocking pool.  Ok(None) when the exchange ended while waiting.
async fn read_chunk(
    file: &Arc<File>,
    position: Option<u64>,
    want: usize,
    ex: &Arc<Exchange>,
) -> io::Result<Option<Bytes>> {
    let file = file.clone();
    let ex = ex.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(want);
        let n = match position {
            Some(at) => retry_interrupted(|| file.read_at(&mut buf, at))?,
            None => loop {
                if !wait_readable(&file)? {
                    if ex.has_ended() {
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

    #[test]
    fn a_directory_is_refused() {
        let d = File::open(std::env::temp_dir()).unwrap();
        assert!(Source::of(&d, None).unwrap_err().contains("directory"));
    }
}
