//! Plain tokio-tungstenite WebSocket echo server: the reference point that
//! `bench/bin/ws-bench` compares pagi-rs (running `bench/apps/ws-echo.pl`)
//! against. It accepts every upgrade and sends each text or binary message
//! back unchanged, on a multi-thread tokio runtime with no Perl at all, so the
//! ratio shows what the interpreter and the PAGI protocol cost per message.

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[path = "common/listen.rs"]
mod listen;
#[path = "common/runtime.rs"]
mod runtime;

#[derive(Parser, Debug)]
#[command(about = "Plain tokio-tungstenite WebSocket echo server (benchmark baseline)")]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Port to bind; 0 picks a free ephemeral port.
    #[arg(short, long, default_value_t = 5002)]
    port: u16,
}

async fn echo(stream: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        // Not a WebSocket handshake (or the client went away): just drop it.
        return;
    };
    while let Some(msg) = ws.next().await {
        let reply = match msg {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => m,
            // tungstenite answers pings itself and replies to a close frame.
            Ok(Message::Close(_)) => break,
            Ok(_) => continue,
            Err(_) => return,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
    // Flush the close reply queued by tungstenite; errors mean the peer is gone.
    let _ = ws.close(None).await;
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    runtime::run(serve(args))?
}

async fn serve(args: Args) -> std::io::Result<()> {
    listen::serve("ws-baseline", &args.host, args.port, echo).await
}
