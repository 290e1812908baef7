//! slow-load: hostile slow clients for bench/bin/slow-clients.
//!
//! Opens `--slowloris N` connections that trickle a request head one byte
//! at a time and never finish it, and `--slow-posts M` connections that send
//! a whole head announcing a large body and then trickle the body.  Each
//! connection records when the server closed it (and, for the posts, the
//! status it answered).  After `--duration` seconds it prints one JSON line:
//! how many of each kind the server closed, when (percentiles, seconds after
//! connecting), and what it answered.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "common.rs"]
mod common;

struct Args {
    port: u16,
    slowloris: usize,
    slow_posts: usize,
    byte_every: Duration,
    duration: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        port: 0,
        slowloris: 1000,
        slow_posts: 300,
        byte_every: Duration::from_millis(500),
        duration: Duration::from_secs(30),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--port" => args.port = u16::try_from(number()?).map_err(|e| e.to_string())?,
            "--slowloris" => args.slowloris = number()? as usize,
            "--slow-posts" => args.slow_posts = number()? as usize,
            "--byte-every-ms" => args.byte_every = Duration::from_millis(number()?),
            "--duration" => args.duration = Duration::from_secs(number()?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.port == 0 {
        return Err("--port is required".into());
    }
    Ok(args)
}

/// How one slow connection ended.
struct Outcome {
    /// Seconds after connecting that the server closed it; None: still open.
    closed_after: Option<f64>,
    /// The status line's code, if the server answered.
    status: Option<u16>,
}

/// One slow client: `head` goes out at once when `head_at_once`, else one
/// byte per `every` like what follows it (the byte `trickle`, for ever).
/// It reads whatever the server says, until the server closes the
/// connection or time runs out.
async fn slow_client(
    port: u16,
    head: Vec<u8>,
    head_at_once: bool,
    trickle: u8,
    every: Duration,
    until: Instant,
) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        closed_after: None,
        status: None,
    };
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        outcome.closed_after = Some(0.0);
        return outcome;
    };
    let mut to_send = if head_at_once {
        if stream.write_all(&head).await.is_err() {
            outcome.closed_after = Some(started.elapsed().as_secs_f64());
            return outcome;
        }
        Vec::new().into_iter()
    } else {
        head.into_iter()
    };
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => return outcome,
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if outcome.status.is_none() && answer.len() >= 12 {
                        outcome.status = std::str::from_utf8(&answer[9..12]).ok().and_then(|s| s.parse().ok());
                    }
                }
            },
            _ = tick.tick() => {
                let byte = to_send.next().unwrap_or(trickle);
                if stream.write_all(&[byte]).await.is_err() {
                    break;
                }
            }
        }
    }
    outcome.closed_after = Some(started.elapsed().as_secs_f64());
    outcome
}

fn summary(name: &str, outcomes: &[Outcome]) -> String {
    let mut closed: Vec<f64> = outcomes.iter().filter_map(|o| o.closed_after).collect();
    closed.sort_by(|a, b| a.total_cmp(b));
    let mut statuses = std::collections::BTreeMap::new();
    for o in outcomes {
        let key = o.status.map_or("none".to_string(), |s| s.to_string());
        *statuses.entry(key).or_insert(0usize) += 1;
    }
    let statuses: Vec<String> = statuses
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    format!(
        "\"{name}\":{{\"total\":{},\"closed\":{},\"closed_p50\":{:.2},\"closed_max\":{:.2},\"statuses\":{{{}}}}}",
        outcomes.len(),
        closed.len(),
        common::percentile(&closed, 50.0),
        closed.last().copied().unwrap_or(0.0),
        statuses.join(","),
    )
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("slow-load: {e}");
            std::process::exit(2);
        }
    };
    let runtime = match common::runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("slow-load: {e}");
            std::process::exit(1);
        }
    };
    let (lorises, posts) = runtime.block_on(async {
        let until = Instant::now() + args.duration;
        let mut lorises = Vec::with_capacity(args.slowloris);
        for _ in 0..args.slowloris {
            let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec();
            lorises.push(tokio::spawn(slow_client(
                args.port,
                head,
                false,
                b'a',
                args.byte_every,
                until,
            )));
        }
        let mut posts = Vec::with_capacity(args.slow_posts);
        for _ in 0..args.slow_posts {
            let head =
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".to_vec();
            posts.push(tokio::spawn(slow_client(
                args.port,
                head,
                true,
                b'x',
                args.byte_every,
                until,
            )));
        }
        let mut a = Vec::new();
        for h in lorises {
            if let Ok(o) = h.await {
                a.push(o);
            }
        }
        let mut b = Vec::new();
        for h in posts {
            if let Ok(o) = h.await {
                b.push(o);
            }
        }
        (a, b)
    });
    println!(
        "{{{},{}}}",
        summary("slowloris", &lorises),
        summary("slow_posts", &posts)
    );
}
