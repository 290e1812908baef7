//! WebSocket echo load generator for `bench/bin/ws-bench`.
//!
//! Opens `--connections` WebSocket connections to an echo server, then each
//! connection sends one message, waits for its echo, checks it and sends the
//! next, for `--duration` seconds. Prints the total messages/s and the p50,
//! p99 and maximum round-trip times, wrk-style, on stdout. Every echo is
//! compared with what was sent (a mismatch counts as an error).
//!
//! `--check` instead sends a fixed set of text and binary messages (empty,
//! the frame-length boundaries 125/126/65535/65536 bytes, multi-byte UTF-8,
//! all 256 byte values, a pipelined burst) on every connection and exits 1
//! unless each comes back unchanged, with the same type and in order.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[path = "common.rs"]
mod common;

#[derive(Parser, Debug)]
#[command(about = "WebSocket echo load generator (messages/s and round-trip percentiles)")]
struct Args {
    /// Server URL, e.g. ws://127.0.0.1:5002/
    url: String,

    /// Concurrent connections, each with one message in flight.
    #[arg(short, long, default_value_t = 50)]
    connections: usize,

    /// Seconds to send for (after all connections are open).
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,

    /// Message size in bytes.
    #[arg(short, long, default_value_t = 32)]
    size: usize,

    /// Send binary messages instead of text.
    #[arg(long)]
    binary: bool,

    /// Client threads (1 = a current-thread runtime).
    #[arg(short, long, default_value_t = 1)]
    threads: usize,

    /// Verify echo content for a fixed set of messages instead of measuring.
    #[arg(long)]
    check: bool,
}

/// What one connection did during the timed run.
#[derive(Default)]
struct ConnStats {
    messages: u64,
    /// Round-trip times in nanoseconds.
    rtts: Vec<u64>,
    mismatches: u64,
    error: Option<String>,
    finished: Option<Instant>,
}

async fn connect(url: &str) -> Result<Ws, String> {
    // `true`: disable Nagle, as the servers do.
    let (ws, _response) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    Ok(ws)
}

/// Opens `n` connections concurrently; fails if any of them fails.
async fn connect_all(url: &str, n: usize) -> Result<Vec<Ws>, String> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move { connect(&url).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await.map_err(|e| e.to_string())??);
    }
    Ok(out)
}

/// A message of exactly `size` bytes that names its connection and sequence
/// number, so an echo of the wrong message cannot pass the comparison.
fn payload(conn: usize, seq: u64, size: usize) -> String {
    let mut s = String::with_capacity(size.max(24));
    let _ = write!(s, "{conn}.{seq}.");
    while s.len() < size {
        s.push('x');
    }
    s.truncate(size);
    s
}

/// Waits for the next data message, skipping control frames.
async fn next_data(ws: &mut Ws) -> Result<Message, String> {
    loop {
        match ws.next().await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Ok(m),
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("server closed the connection: {frame:?}"))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("connection closed".into()),
        }
    }
}

fn same(sent: &Message, got: &Message) -> bool {
    match (sent, got) {
        (Message::Text(a), Message::Text(b)) => a.as_str() == b.as_str(),
        (Message::Binary(a), Message::Binary(b)) => a == b,
        _ => false,
    }
}

fn describe(m: &Message) -> String {
    match m {
        Message::Text(t) => format!("text of {} bytes", t.len()),
        Message::Binary(b) => format!("binary of {} bytes", b.len()),
        other => format!("{other:?}"),
    }
}

async fn close(mut ws: Ws) {
    // Best effort: send our close frame, then read until the server's reply.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

async fn run_connection(mut ws: Ws, id: usize, args: &Args, deadline: Instant) -> ConnStats {
    let mut st = ConnStats {
        rtts: Vec::with_capacity(1 << 16),
        ..ConnStats::default()
    };
    let mut seq = 0u64;
    while Instant::now() < deadline {
        let text = payload(id, seq, args.size);
        let msg = if args.binary {
            Message::Binary(Bytes::from(text.into_bytes()))
        } else {
            Message::Text(text.into())
        };
        let t0 = Instant::now();
        if let Err(e) = ws.send(msg.clone()).await {
            st.error = Some(format!("send: {e}"));
            break;
        }
        match next_data(&mut ws).await {
            Ok(got) => {
                st.rtts.push(t0.elapsed().as_nanos() as u64);
                st.messages += 1;
                if !same(&msg, &got) {
                    st.mismatches += 1;
                }
            }
            Err(e) => {
                st.error = Some(e);
                break;
            }
        }
        seq += 1;
    }
    st.finished = Some(Instant::now());
    if st.error.is_none() {
        close(ws).await;
    }
    st
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

async fn bench(args: &'static Args) -> Result<bool, String> {
    let conns = connect_all(&args.url, args.connections).await?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.duration);
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(id, ws)| tokio::spawn(run_connection(ws, id, args, deadline)))
        .collect();
    let mut all = Vec::with_capacity(handles.len());
    for h in handles {
        all.push(h.await.map_err(|e| e.to_string())?);
    }

    let end = all.iter().filter_map(|s| s.finished).max().unwrap_or(start);
    let elapsed = end.duration_since(start).as_secs_f64();
    let messages: u64 = all.iter().map(|s| s.messages).sum();
    let mismatches: u64 = all.iter().map(|s| s.mismatches).sum();
    let mut rtts: Vec<u64> = all.iter_mut().flat_map(|s| s.rtts.drain(..)).collect();
    rtts.sort_unstable();
    let errors: Vec<&str> = all.iter().filter_map(|s| s.error.as_deref()).collect();

    println!(
        "ws-load: {}, {} connections, {}-byte {} messages, {:.2} s",
        args.url,
        args.connections,
        args.size,
        if args.binary { "binary" } else { "text" },
        elapsed
    );
    println!("Messages:      {messages}");
    println!(
        "Messages/sec:  {:.2}",
        if elapsed > 0.0 {
            messages as f64 / elapsed
        } else {
            0.0
        }
    );
    println!(
        "RTT p50:       {:.3} ms",
        ms(common::percentile(&rtts, 50.0))
    );
    println!(
        "RTT p99:       {:.3} ms",
        ms(common::percentile(&rtts, 99.0))
    );
    println!(
        "RTT max:       {:.3} ms",
        ms(rtts.last().copied().unwrap_or(0))
    );
    println!("Mismatches:    {mismatches}");
    println!("Errors:        {}", errors.len());
    for e in errors.iter().take(5) {
        println!("  error: {e}");
    }
    Ok(errors.is_empty() && mismatches == 0)
}

/// The messages `--check` sends on every connection, in order.
fn check_messages(conn: usize) -> Vec<Message> {
    let mut msgs = Vec::new();
    for size in [0, 1, 32, 125, 126, 127, 1000, 65535, 65536] {
        msgs.push(Message::Text(payload(conn, size as u64, size).into()));
    }
    let utf8 = "héllo wörld ✓ 𝄞 ".repeat(500);
    msgs.push(Message::Text(utf8.into()));
    for size in [0, 1, 125, 126, 65536] {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + conn) as u8).collect();
        msgs.push(Message::Binary(Bytes::from(bytes)));
    }
    // Not valid UTF-8: must come back as binary, untouched.
    msgs.push(Message::Binary(Bytes::from_static(
        b"\xff\xfe\x00\x80 binary",
    )));
    msgs
}

async fn check_connection(mut ws: Ws, id: usize) -> Result<usize, String> {
    let mut n = 0;
    // One at a time: each echo must match before the next is sent.
    for (i, msg) in check_messages(id).into_iter().enumerate() {
        ws.send(msg.clone())
            .await
            .map_err(|e| format!("send #{i}: {e}"))?;
        let got = next_data(&mut ws).await?;
        if !same(&msg, &got) {
            return Err(format!(
                "message #{i}: sent {}, got {} back",
                describe(&msg),
                describe(&got)
            ));
        }
        n += 1;
    }
    // Pipelined: 200 messages written before any echo is read; they must
    // come back complete and in order.
    let burst: Vec<Message> = (0..200)
        .map(|i| {
            let text = payload(id, 1_000_000 + i, 32 + i as usize % 64);
            if i % 2 == 0 {
                Message::Text(text.into())
            } else {
                Message::Binary(Bytes::from(text.into_bytes()))
            }
        })
        .collect();
    for msg in &burst {
        ws.feed(msg.clone())
            .await
            .map_err(|e| format!("send: {e}"))?;
    }
    ws.flush().await.map_err(|e| format!("flush: {e}"))?;
    for (i, msg) in burst.iter().enumerate() {
        let got = next_data(&mut ws).await?;
        if !same(msg, &got) {
            return Err(format!(
                "pipelined message #{i}: sent {}, got {} back",
                describe(msg),
                describe(&got)
            ));
        }
        n += 1;
    }
    close(ws).await;
    Ok(n)
}

async fn check(args: &'static Args) -> Result<bool, String> {
    let conns = connect_all(&args.url, args.connections).await?;
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(id, ws)| tokio::spawn(check_connection(ws, id)))
        .collect();
    let (mut ok, mut total) = (true, 0);
    for (id, h) in handles.into_iter().enumerate() {
        match h.await.map_err(|e| e.to_string())? {
            Ok(n) => total += n,
            Err(e) => {
                ok = false;
                println!("ws-load --check: connection {id}: {e}");
            }
        }
    }
    if ok {
        println!(
            "ws-load --check: OK, {total} messages echoed unchanged over {} connection(s)",
            args.connections
        );
    } else {
        println!("ws-load --check: FAILED");
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let args: &'static Args = Box::leak(Box::new(Args::parse()));
    if args.connections == 0 || args.threads == 0 || args.duration <= 0.0 {
        eprintln!("ws-load: --connections, --threads and --duration must be positive");
        return ExitCode::from(2);
    }
    let rt = match common::runtime(args.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        if args.check {
            check(args).await
        } else {
            bench(args).await
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ws-load: {e}");
            ExitCode::from(2)
        }
    }
}
