//! The facts an exchange keeps for its access-log line, and the line itself,
//! written once when the exchange ends.

use std::time::Instant;

use bytes::Bytes;

use super::Exchange;
use crate::access_log::Record;

/// Facts kept for the access log line.
pub struct RequestFacts {
    pub method: http::Method,
    pub raw_path: Bytes,
    pub query: Bytes,
    pub http_version: &'static str,
    pub client: crate::service::Peer,
    pub headers: Vec<(Bytes, Bytes)>,
    pub is_head: bool,
    pub started: Instant,
}

impl Exchange {
    /// One access-log line per exchange, written when it ends.
    pub fn write_access_log(&self) {
        let Some(log) = &self.config.access_log else {
            return;
        };
        let (status, bytes, end_reason) = {
            let mut st = self.lock();
            if st.logged {
                return;
            }
            st.logged = true;
            let end_reason = if st.long_lived {
                st.end_reason
                    .clone()
                    .or_else(|| st.disconnected.map(str::to_string))
            } else {
                None
            };
            // Application body bytes only: the server's own refusal bodies
            // are not counted, as in the reference server.
            (st.status, st.body_bytes, end_reason)
        };
        let f = &self.facts;
        log.write(&Record {
            client: Some(f.client),
            method: f.method.as_str(),
            raw_path: &f.raw_path,
            query: &f.query,
            http_version: f.http_version,
            status,
            body_bytes: bytes,
            duration: f.started.elapsed(),
            headers: &f.headers,
            end_reason: end_reason.as_deref(),
        });
    }
}
