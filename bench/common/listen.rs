//! What the plain Rust baselines share: the startup line the bench scripts
//! parse to learn the port, and an accept loop that hands each connection to
//! its own task.  Included by each baseline with `#[path]`.

use std::future::Future;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Listen on `host:port` (0: an ephemeral port) and run `connection` on its
/// own task for every accepted connection, forever.
pub async fn serve<F, Fut>(name: &str, host: &str, port: u16, connection: F) -> std::io::Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind((host, port)).await?;
    // The benchmark scripts parse this line to learn the ephemeral port.
    eprintln!("{name}: listening on http://{}/", listener.local_addr()?);
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Typically EMFILE under heavy load: back off instead of spinning.
                eprintln!("{name}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Same as pagi-rs: small responses should not wait for Nagle.
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream));
    }
}
