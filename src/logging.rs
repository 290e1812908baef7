//! Diagnostics through `tracing`, on stderr, filtered by --log-level/-q.

use std::io::IsTerminal;

use crate::cli::LogLevel;

pub fn init(level: LogLevel) {
    let max = match level {
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Error => tracing::Level::ERROR,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(max)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
