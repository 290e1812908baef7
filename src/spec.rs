//! Which PAGI the server speaks (`--spec-version`).
//!
//! The default is the current spec: core 0.5 with the Www sub-spec 0.6.
//! `--spec-version 0.3` keeps the behaviour an app written against Www 0.3
//! relies on (pagi-rs 0.1's behaviour): `websocket.close` before accept
//! answers 403, refusals use the `websocket.http.response.*` and
//! `sse.http.response.*` events, and an SSE app that returns ends its stream
//! cleanly.  Everything the later versions only add (the full
//! `pagi.connection`, `abort`, disconnect details) is there in both.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SpecVersion {
    /// Www 0.3 and core 0.4, for apps written against them.
    #[value(name = "0.3")]
    Www03,
    /// Www 0.6 and core 0.5: the current spec.
    #[default]
    #[value(name = "0.6")]
    Www06,
}

impl SpecVersion {
    /// `$scope->{pagi}{version}`: the core spec.
    pub fn core(self) -> &'static str {
        match self {
            SpecVersion::Www03 => "0.4",
            SpecVersion::Www06 => "0.5",
        }
    }

    /// `$scope->{pagi}{spec_version}` on http, websocket and sse scopes.
    pub fn www(self) -> &'static str {
        match self {
            SpecVersion::Www03 => "0.3",
            SpecVersion::Www06 => "0.6",
        }
    }

    /// Refusals are ordinary `http.response.*` responses, a returned SSE
    /// stream is incomplete, and a response body does not mix inline bytes
    /// with a file (Www 0.5 and later).
    pub fn is_current(self) -> bool {
        self == SpecVersion::Www06
    }
}
