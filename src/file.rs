//! `file` and `fh` response bodies: read by the network core in chunks,
//! paced by the same high-water mark as application sends.

use std::io::SeekFrom;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::exchange::{Exchange, Streamed};
use crate::interp::messages::ToPerl;

const CHUNK: usize = 64 * 1024;

/// Stream `file` from `offset` (None: its current position) for `length`
/// bytes (None: to EOF), then settle the application's send.
pub async fn stream(
    ex: Arc<Exchange>,
    file: std::fs::File,
    offset: Option<u64>,
    length: Option<u64>,
) {
    let mut sent_any = false;
    let result: Result<(), String> = async {
        let mut f = tokio::fs::File::from_std(file);
        if let Some(off) = offset {
            f.seek(SeekFrom::Start(off))
                .await
                .map_err(|e| format!("seek failed: {e}"))?;
        }
        let mut remaining = length.unwrap_or(u64::MAX);
        while remaining > 0 {
            let want = remaining.min(CHUNK as u64) as usize;
            let mut buf = BytesMut::zeroed(want);
            let n = f
                .read(&mut buf[..])
                .await
                .map_err(|e| format!("read failed: {e}"))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            remaining -= n as u64;
            match ex.push_streamed(buf.freeze()).await {
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
