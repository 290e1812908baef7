//! `file` and `fh` response bodies: read by the network core in chunks,
//! paced by the same high-water mark as application sends.

use std::io::SeekFrom;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::exchange::Exchange;
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
    let result: std::io::Result<()> = async {
        let mut f = tokio::fs::File::from_std(file);
        if let Some(off) = offset {
            f.seek(SeekFrom::Start(off)).await?;
        }
        let mut remaining = length.unwrap_or(u64::MAX);
        while remaining > 0 {
            let want = remaining.min(CHUNK as u64) as usize;
            let mut buf = BytesMut::zeroed(want);
            let n = f.read(&mut buf[..]).await?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            remaining -= n as u64;
            sent_any = true;
            if !ex.push_streamed(buf.freeze()).await {
                // The exchange ended underneath us; the send settles as a no-op.
                return Ok(());
            }
        }
        ex.end_streamed();
        Ok(())
    }
    .await;
    let error = match result {
        Ok(()) => None,
        Err(e) => {
            if sent_any {
                // Bytes already reached the wire: the response cannot be
                // recovered and must be seen as truncated.
                ex.server_abort("server_error", None);
            }
            Some(format!("cannot send file: read failed: {e}"))
        }
    };
    ex.mailbox_push(ToPerl::SendDone { id: ex.id, error });
}
