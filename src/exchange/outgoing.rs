//! The response frames queued for the network task, with small body pieces
//! joined into one frame.
//!
//! An SSE stream sends thousands of events of a few bytes each, and an app
//! may stream its body a line at a time.  As one `Frame` each, every piece
//! cost an allocation on the interpreter thread, a queue slot (a stream
//! 64 KiB behind held about 6,000 of them, and growing that queue faulted in
//! fresh pages), a poll of the body and a chunk header from hyper, and a
//! free on the network thread.  Pieces below [`JOIN_BELOW`] bytes are
//! instead copied into one growing buffer, which leaves as a single frame
//! when the network task next asks: what the client receives is the same
//! bytes, in fewer chunks.  Larger pieces stay frames of their own, so a body
//! lent by Perl is still not copied.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::Frame;

/// Body pieces shorter than this are joined with their neighbours.
const JOIN_BELOW: usize = 4096;

#[derive(Default)]
pub(super) struct OutgoingFrames {
    /// Frames ready to go, in order.
    frames: VecDeque<Frame<Bytes>>,
    /// Small pieces queued after every frame in `frames`, joined.
    joined: BytesMut,
}

impl OutgoingFrames {
    /// Queue body bytes the caller does not own, in frames of at most
    /// `max_frame` bytes.
    pub(super) fn push_slice(&mut self, data: &[u8], max_frame: usize) {
        if !self.join(data, max_frame) {
            self.push_bytes(Bytes::copy_from_slice(data), max_frame);
        }
    }

    /// Queue body bytes, in frames of at most `max_frame` bytes.
    pub(super) fn push_bytes(&mut self, mut data: Bytes, max_frame: usize) {
        if data.is_empty() || self.join(&data, max_frame) {
            return;
        }
        self.seal_joined();
        let max_frame = max_frame.max(1);
        while data.len() > max_frame {
            self.frames.push_back(Frame::data(data.split_to(max_frame)));
        }
        self.frames.push_back(Frame::data(data));
    }

    pub(super) fn push_trailers(&mut self, trailers: HeaderMap) {
        self.seal_joined();
        self.frames.push_back(Frame::trailers(trailers));
    }

    /// The next frame for the network, oldest first.
    pub(super) fn pop(&mut self) -> Option<Frame<Bytes>> {
        if let Some(frame) = self.frames.pop_front() {
            return Some(frame);
        }
        if self.joined.is_empty() {
            return None;
        }
        Some(Frame::data(self.joined.split().freeze()))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.joined.is_empty()
    }

    pub(super) fn clear(&mut self) {
        self.frames.clear();
        self.joined.clear();
    }

    /// Copy a small piece in with the ones waiting (false: not small).  A
    /// joined frame holds at most `max_frame` bytes; a piece that would
    /// take it past that starts the next one.
    fn join(&mut self, data: &[u8], max_frame: usize) -> bool {
        if data.is_empty() || data.len() >= JOIN_BELOW || data.len() > max_frame {
            return false;
        }
        if self.joined.len() + data.len() > max_frame {
            self.seal_joined();
        }
        self.joined.extend_from_slice(data);
        true
    }

    /// Close the joined pieces into a frame, so that what follows goes
    /// after them.
    fn seal_joined(&mut self) {
        if !self.joined.is_empty() {
            self.frames
                .push_back(Frame::data(self.joined.split().freeze()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(out: &mut OutgoingFrames) -> Vec<Frame<Bytes>> {
        std::iter::from_fn(|| out.pop()).collect()
    }

    fn data(frame: &Frame<Bytes>) -> &[u8] {
        frame.data_ref().expect("a data frame")
    }

    #[test]
    fn small_pieces_leave_as_one_frame_in_order() {
        let mut out = OutgoingFrames::default();
        for i in 1..=1000 {
            out.push_slice(format!("data: {i}\n\n").as_bytes(), 64 * 1024);
        }
        let frames = drain(&mut out);
        assert_eq!(frames.len(), 1);
        let expected: String = (1..=1000).map(|i| format!("data: {i}\n\n")).collect();
        assert_eq!(data(&frames[0]), expected.as_bytes());
        assert!(out.is_empty());
    }

    #[test]
    fn joined_frames_stay_within_the_frame_size() {
        let mut out = OutgoingFrames::default();
        for _ in 0..10 {
            out.push_slice(&[b'x'; 300], 1000);
        }
        let sizes: Vec<usize> = drain(&mut out).iter().map(|f| data(f).len()).collect();
        assert_eq!(sizes, vec![900, 900, 900, 300]);
    }

    #[test]
    fn a_large_piece_follows_the_small_ones_before_it_without_a_copy() {
        let mut out = OutgoingFrames::default();
        out.push_slice(b"head ", 64 * 1024);
        let big = Bytes::from(vec![b'b'; 10_000]);
        let big_ptr = big.as_ptr();
        out.push_bytes(big, 4096 * 4);
        out.push_slice(b" tail", 64 * 1024);
        let frames = drain(&mut out);
        assert_eq!(frames.len(), 3);
        assert_eq!(data(&frames[0]), b"head ");
        assert_eq!(data(&frames[1]).len(), 10_000);
        assert_eq!(data(&frames[1]).as_ptr(), big_ptr, "not copied");
        assert_eq!(data(&frames[2]), b" tail");
    }

    #[test]
    fn large_pieces_are_split_at_the_frame_size() {
        let mut out = OutgoingFrames::default();
        out.push_bytes(Bytes::from(vec![0u8; 10_000]), 4096);
        let sizes: Vec<usize> = drain(&mut out).iter().map(|f| data(f).len()).collect();
        assert_eq!(sizes, vec![4096, 4096, 1808]);
    }

    #[test]
    fn trailers_come_after_the_joined_body() {
        let mut out = OutgoingFrames::default();
        out.push_slice(b"body", 64 * 1024);
        out.push_trailers(HeaderMap::new());
        let frames = drain(&mut out);
        assert_eq!(frames.len(), 2);
        assert_eq!(data(&frames[0]), b"body");
        assert!(frames[1].is_trailers());
    }

    #[test]
    fn pieces_queued_after_a_pop_form_the_next_frame() {
        let mut out = OutgoingFrames::default();
        out.push_slice(b"one", 64 * 1024);
        assert_eq!(data(&out.pop().unwrap()), b"one");
        assert!(out.pop().is_none());
        out.push_slice(b"two", 64 * 1024);
        out.push_bytes(Bytes::new(), 64 * 1024);
        assert_eq!(data(&out.pop().unwrap()), b"two");
        out.push_slice(b"gone", 64 * 1024);
        out.clear();
        assert!(out.is_empty() && out.pop().is_none());
    }
}
