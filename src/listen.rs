//! Listeners: the addresses the command line names (`--host`/`--port`,
//! `--socket`, `--listen`) and the sockets systemd passes in
//! (`LISTEN_FDS`), turned into bound, listening sockets.
//!
//! Nothing here needs a tokio runtime or starts a thread: the result is
//! plain non-blocking std sockets, ordinary descriptors that a process may
//! fork with.  The server registers them with its runtime later
//! (`server::Listener::from_bound`).
//!
//! A Unix socket file this process creates is removed when it ends, by the
//! process that created it only (see [`SocketFiles`]); a socket systemd
//! passed in belongs to systemd and is left alone.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use socket2::{Domain, SockAddr, Socket, Type};

/// `-b/--listener-backlog` when not given (the reference server's default).
pub const DEFAULT_BACKLOG: u32 = 2048;

/// Most listeners one server takes (the fork handler in calls.c keeps a
/// fixed table of their descriptors).
pub const MAX_LISTENERS: usize = 64;

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const SYSTEMD_FIRST_FD: RawFd = 3;

/// The longest Unix socket path bind accepts: sun_path less its NUL.
const MAX_UNIX_PATH: usize = 107;

/// Why no listener could be made.  Each names the address and the cause.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("cannot listen on {addr}: cannot resolve the host")]
    Resolve { addr: String },
    #[error(
        "cannot listen on unix:{}: the path exists and is not a socket; refusing to remove it",
        .0.display()
    )]
    NotASocket(PathBuf),
    #[error(
        "cannot listen on unix:{}: another process is accepting connections on it",
        .0.display()
    )]
    InUse(PathBuf),
    #[error(
        "cannot listen on unix:{}: the path is {len} bytes long; a Unix socket path is at most {MAX_UNIX_PATH}",
        path.display()
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("systemd socket activation: {0}")]
    Inherited(String),
    #[error("{0} listeners: at most {MAX_LISTENERS}")]
    TooMany(usize),
}

/// One address to listen on, as `--listen` writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A host name or IP address (IPv6 without its brackets) and a port.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            ListenAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The `--listen` forms: `HOST:PORT`, `[IPv6]:PORT`, `unix:PATH`, and (as
/// in the reference server) a path that starts with `/` or `.`.  A bare
/// name is refused rather than taken for a socket file in the current
/// directory: `--listen 8080` is far more likely a mistake.
impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<ListenAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, as in unix:/run/app.sock".into());
            }
            return Ok(ListenAddr::Unix(path.into()));
        }
        if s.starts_with('/') || s.starts_with('.') {
            return Ok(ListenAddr::Unix(s.into()));
        }
        if let Some(rest) = s.strip_prefix('[') {
            let Some((ip, port)) = rest.split_once("]:") else {
                return Err(
                    "an IPv6 address in brackets must be followed by :PORT, as in [::1]:5000"
                        .into(),
                );
            };
            if ip.parse::<Ipv6Addr>().is_err() {
                return Err(format!("'{ip}' is not an IPv6 address"));
            }
            return Ok(ListenAddr::Tcp {
                host: ip.to_string(),
                port: parse_port(port)?,
            });
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(
                "expected HOST:PORT, [IPv6]:PORT, unix:PATH, or a path starting with / or .".into(),
            );
        };
        if host.is_empty() {
            return Err(
                "no host before :PORT (0.0.0.0 listens on every IPv4 interface, [::] on every IPv6 one)"
                    .into(),
            );
        }
        if host.contains(':') {
            return Err(format!(
                "an IPv6 address needs brackets, as in [{host}]:{port}"
            ));
        }
        Ok(ListenAddr::Tcp {
            host: host.to_string(),
            port: parse_port(port)?,
        })
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{p}' is not a port (0 to 65535)"));
    }
    p.parse()
        .map_err(|_| format!("'{p}' is not a port (0 to 65535)"))
}

/// `--socket-mode`: octal permissions, as in the reference (`0660`; the
/// leading 0 may be left out).
pub fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix('0').filter(|d| d.len() == 3).unwrap_or(s);
    if digits.len() != 3 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!("'{s}' is not an octal mode like 0660"));
    }
    u32::from_str_radix(digits, 8).map_err(|e| e.to_string())
}

/// What to listen on, from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    /// The addresses to serve, in order.
    pub addrs: Vec<ListenAddr>,
    /// False when `addrs` is only the `--host`/`--port` default: sockets
    /// systemd passes in then replace it instead of adding to it.
    pub explicit: bool,
    /// `--socket-mode`, for every Unix socket file bound here.
    pub socket_mode: Option<u32>,
    /// `-b/--listener-backlog`.
    pub backlog: u32,
    /// `--reuseport`: SO_REUSEPORT on TCP listeners.
    pub reuseport: bool,
}

impl Config {
    /// Checks that need no socket: options that do not fit together.
    pub fn validate(&self) -> Result<(), String> {
        if self.backlog == 0 || self.backlog > i32::MAX as u32 {
            return Err(format!(
                "--listener-backlog {} is out of range: 1 to {}",
                self.backlog,
                i32::MAX
            ));
        }
        if self.addrs.len() > MAX_LISTENERS {
            return Err(format!(
                "{} listeners: at most {MAX_LISTENERS}",
                self.addrs.len()
            ));
        }
        let unix: Vec<PathBuf> = self
            .addrs
            .iter()
            .filter_map(|a| match a {
                ListenAddr::Unix(p) => Some(absolute(p)),
                ListenAddr::Tcp { .. } => None,
            })
            .collect();
        if self.socket_mode.is_some() && unix.is_empty() {
            return Err("--socket-mode needs --socket PATH or --listen unix:PATH".into());
        }
        for (i, addr) in self.addrs.iter().enumerate() {
            let twice = self.addrs[..i].iter().any(|earlier| match (earlier, addr) {
                (ListenAddr::Unix(a), ListenAddr::Unix(b)) => absolute(a) == absolute(b),
                // Port 0 picks a fresh port each time.
                (ListenAddr::Tcp { port: 0, .. }, _) => false,
                (a, b) => a == b,
            });
            if twice {
                return Err(format!("{addr} is named twice"));
            }
            if let ListenAddr::Unix(p) = addr {
                if p.as_os_str().is_empty() {
                    return Err("--socket needs a path".into());
                }
            }
        }
        Ok(())
    }
}

/// A bound, listening, non-blocking socket.
#[derive(Debug)]
pub struct BoundListener {
    pub socket: Listening,
    pub origin: Origin,
}

#[derive(Debug)]
pub enum Listening {
    Tcp {
        listener: TcpListener,
        local: SocketAddr,
    },
    /// `path` is what the scope's `server` shows: absolute for a socket
    /// bound here; for one systemd passed, its bound name (`@name` for an
    /// abstract socket).
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

/// Where a listener came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Bound,
    /// Passed by systemd: the descriptor and its `LISTEN_FDNAMES` name.
    Systemd {
        fd: RawFd,
        name: Option<String>,
    },
    /// Passed by the master this one replaces (USR2), at this descriptor.
    Upgrade {
        fd: RawFd,
    },
}

impl BoundListener {
    pub fn fd(&self) -> RawFd {
        match &self.socket {
            Listening::Tcp { listener, .. } => listener.as_raw_fd(),
            Listening::Unix { listener, .. } => listener.as_raw_fd(),
        }
    }

    /// How the startup line names it: `http://127.0.0.1:5000/`,
    /// `https://[::1]:8443/`, `unix:/run/app.sock`.
    pub fn describe(&self, tls: bool) -> String {
        match &self.socket {
            Listening::Tcp { local, .. } => {
                let scheme = if tls { "https" } else { "http" };
                match local {
                    SocketAddr::V6(a) => format!("{scheme}://[{}]:{}/", a.ip(), a.port()),
                    SocketAddr::V4(a) => format!("{scheme}://{a}/"),
                }
            }
            Listening::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }

    fn is_tcp(&self) -> bool {
        matches!(self.socket, Listening::Tcp { .. })
    }

    fn serves(&self, wanted: &Wanted) -> bool {
        match (&self.socket, wanted) {
            (Listening::Tcp { local, .. }, Wanted::Tcp { addrs, .. }) => {
                local.port() != 0 && addrs.contains(local)
            }
            (Listening::Unix { path, .. }, Wanted::Unix(p)) => path == &absolute(p),
            _ => false,
        }
    }
}

/// How the startup line names each listener (TLS, when configured, is on
/// the TCP ones only: see `server::Connection`), saying in the log which
/// came from systemd and which are cleartext despite `--ssl-cert`.
pub fn describe_all(listeners: &[BoundListener], tls: bool) -> Vec<String> {
    listeners
        .iter()
        .map(|l| {
            let shown = l.describe(tls && l.is_tcp());
            if let Origin::Systemd { fd, name } = &l.origin {
                let name = name
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default();
                tracing::info!("{shown}: descriptor {fd}{name} from systemd");
            }
            if tls && !l.is_tcp() {
                tracing::info!("{shown}: served in cleartext (TLS applies to TCP listeners)");
            }
            shown
        })
        .collect()
}

/// The listeners, and the socket files to remove when the server ends.
#[derive(Debug)]
pub struct Bound {
    pub listeners: Vec<BoundListener>,
    pub socket_files: SocketFiles,
}

/// An address resolved for binding.
enum Wanted {
    Tcp {
        shown: String,
        addrs: Vec<SocketAddr>,
    },
    Unix(PathBuf),
}

/// Bind what `config` names, taking an inherited socket in place of an
/// address it already serves, and serve every inherited socket.  With no
/// explicit address, the inherited sockets alone are served when there
/// are any (systemd decides where to listen), else the default.
pub fn bind_all(config: &Config, inherited: Vec<BoundListener>) -> Result<Bound, ListenError> {
    let mut inherited: Vec<Option<BoundListener>> = inherited.into_iter().map(Some).collect();
    let mut socket_files = SocketFiles::new();
    let mut listeners = Vec::new();
    let wanted: &[ListenAddr] = if config.explicit || inherited.is_empty() {
        &config.addrs
    } else {
        &[]
    };
    for addr in wanted {
        let wanted = resolve(addr)?;
        let adopted = inherited
            .iter_mut()
            .find(|slot| slot.as_ref().is_some_and(|l| l.serves(&wanted)))
            .and_then(Option::take);
        match adopted {
            Some(listener) => listeners.push(listener),
            None => listeners.push(bind_one(&wanted, config, &mut socket_files)?),
        }
    }
    listeners.extend(inherited.into_iter().flatten());
    if listeners.len() > MAX_LISTENERS {
        return Err(ListenError::TooMany(listeners.len()));
    }
    Ok(Bound {
        listeners,
        socket_files,
    })
}

fn resolve(addr: &ListenAddr) -> Result<Wanted, ListenError> {
    match addr {
        ListenAddr::Tcp { host, port } => {
            let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .map(Iterator::collect)
                .unwrap_or_default();
            if addrs.is_empty() {
                return Err(ListenError::Resolve {
                    addr: addr.to_string(),
                });
            }
            Ok(Wanted::Tcp {
                shown: addr.to_string(),
                addrs,
            })
        }
        ListenAddr::Unix(path) => Ok(Wanted::Unix(path.clone())),
    }
}

fn bind_one(
    wanted: &Wanted,
    config: &Config,
    files: &mut SocketFiles,
) -> Result<BoundListener, ListenError> {
    let socket = match wanted {
        // A name that resolves to several addresses is bound at the first,
        // as before --listen existed.
        Wanted::Tcp { shown, addrs } => {
            bind_tcp(addrs[0], config).map_err(|source| ListenError::Bind {
                addr: shown.clone(),
                source,
            })?
        }
        Wanted::Unix(path) => bind_unix(path, config, files)?,
    };
    Ok(BoundListener {
        socket,
        origin: Origin::Bound,
    })
}

fn bind_tcp(addr: SocketAddr, config: &Config) -> io::Result<Listening> {
    open_tcp(addr, config.reuseport, config.backlog)
}

/// One more SO_REUSEPORT socket at `local`, the address of a TCP listener
/// bound here with `--reuseport`: a worker's own accept queue (see
/// `accept_queues`).  The kernel adds it to the listener's group only when
/// the same effective user binds both.
pub fn bind_queue(local: SocketAddr, backlog: u32) -> io::Result<BoundListener> {
    Ok(BoundListener {
        socket: open_tcp(local, true, backlog)?,
        origin: Origin::Bound,
    })
}

fn open_tcp(addr: SocketAddr, reuseport: bool, backlog: u32) -> io::Result<Listening> {
    // socket2 opens it close-on-exec: a program the app runs does not
    // inherit the port (forked children are handled in calls.c).
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    let listener = TcpListener::from(socket);
    let local = listener.local_addr()?;
    Ok(Listening::Tcp { listener, local })
}

fn backlog(config: &Config) -> i32 {
    i32::try_from(config.backlog).unwrap_or(i32::MAX)
}

fn bind_unix(
    path: &Path,
    config: &Config,
    files: &mut SocketFiles,
) -> Result<Listening, ListenError> {
    let shown = absolute(path);
    let err = |source| ListenError::Bind {
        addr: format!("unix:{}", shown.display()),
        source,
    };
    let len = path.as_os_str().len();
    if len > MAX_UNIX_PATH {
        return Err(ListenError::PathTooLong { path: shown, len });
    }
    clear_stale_socket(path, &shown)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(err)?;
    if let Some(mode) = config.socket_mode {
        // Linux creates the file with the unbound socket's mode, less the
        // umask: set it first, so the file is never more open than MODE,
        // even for the moment before the chmod below.
        // SAFETY: fchmod on a descriptor this function owns.
        if unsafe { libc::fchmod(socket.as_raw_fd(), mode as libc::mode_t) } != 0 {
            tracing::debug!(
                "fchmod on the unbound socket failed ({}); the mode is set after bind",
                io::Error::last_os_error()
            );
        }
    }
    socket
        .bind(&SockAddr::unix(path).map_err(err)?)
        .map_err(err)?;
    // From here the file is ours: removed at exit, or now if what follows fails.
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    files.push(shown.clone(), meta.dev(), meta.ino());
    if let Some(mode) = config.socket_mode {
        // Adds back what the umask took; the file is not listening yet.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    socket.listen(backlog(config)).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(Listening::Unix {
        listener: UnixListener::from(OwnedFd::from(socket)),
        path: shown,
    })
}

/// A socket file left at `path` by a server that is gone is removed (a
/// connection to it is refused); one that a live server answers is not
/// ours to take, and anything that is not a socket is refused outright.
fn clear_stale_socket(path: &Path, shown: &Path) -> Result<(), ListenError> {
    let err = |source| ListenError::Bind {
        addr: format!("unix:{}", shown.display()),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket(shown.to_path_buf()));
    }
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(err)?;
    // Non-blocking: a live server with a full backlog answers EAGAIN
    // instead of holding startup up.
    probe.set_nonblocking(true).map_err(err)?;
    match probe.connect(&SockAddr::unix(path).map_err(err)?) {
        Ok(()) => Err(ListenError::InUse(shown.to_path_buf())),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            Err(ListenError::InUse(shown.to_path_buf()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!("removed the stale socket file {}", shown.display());
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(err(e)),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// `path` made absolute against the current directory (not resolving
/// links), so that what the scope shows and what is removed at exit do
/// not depend on a later chdir.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The Unix socket files this process created, removed when it is dropped
/// (the server ends, or startup fails after binding).  Only by the process
/// that created them, so that a forked child ending does not remove the
/// parent's socket; and only while the path is still the file bound here,
/// so that a file another server has since put there is left alone.
#[derive(Debug)]
pub struct SocketFiles {
    owner: u32,
    files: Vec<SocketFile>,
}

#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFiles {
    fn new() -> SocketFiles {
        SocketFiles {
            owner: std::process::id(),
            files: Vec::new(),
        }
    }

    fn push(&mut self, path: PathBuf, dev: u64, ino: u64) {
        self.files.push(SocketFile { path, dev, ino });
    }

    /// Remove the files now (also done on drop).
    pub fn remove(&mut self) {
        if std::process::id() != self.owner {
            self.files.clear();
            return;
        }
        for file in self.files.drain(..) {
            match std::fs::symlink_metadata(&file.path) {
                Ok(meta) if meta.dev() == file.dev && meta.ino() == file.ino => {
                    if let Err(e) = std::fs::remove_file(&file.path) {
                        tracing::warn!("cannot remove {}: {e}", file.path.display());
                    }
                }
                Ok(_) => tracing::warn!(
                    "{} is no longer the socket this server bound; left in place",
                    file.path.display()
                ),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot remove {}: {e}", file.path.display()),
            }
        }
    }
}

impl Drop for SocketFiles {
    fn drop(&mut self) {
        self.remove();
    }
}

/// systemd socket activation: the listening sockets passed in as
/// descriptors 3.. when `LISTEN_PID` is this process and `LISTEN_FDS`
/// counts them (sd_listen_fds(3)), named by `LISTEN_FDNAMES`.  The three
/// variables are removed either way, so that no child (an app's
/// subprocess) takes them for its own, and the descriptors are made
/// close-on-exec and non-blocking.
///
/// Call it before any other thread exists and before an interpreter is
/// built: it edits the environment, which Perl copies into `%ENV`.
pub fn take_inherited() -> Result<Vec<BoundListener>, ListenError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        tracing::debug!("LISTEN_PID={pid} is another process: its LISTEN_FDS are not ours");
        return Ok(Vec::new());
    }
    let count: usize = fds.trim().parse().map_err(|_| {
        ListenError::Inherited(format!("LISTEN_FDS={fds} is not a count of descriptors"))
    })?;
    if count > MAX_LISTENERS {
        return Err(ListenError::TooMany(count));
    }
    let names: Vec<&str> = names
        .as_deref()
        .map(|n| n.split(':').collect())
        .unwrap_or_default();
    (0..count)
        .map(|i| {
            let fd = SYSTEMD_FIRST_FD + i as RawFd;
            let name = names
                .get(i)
                .filter(|n| !n.is_empty() && names.len() == count)
                .map(|n| n.to_string());
            adopt(fd, name)
        })
        .collect()
}

/// Take `fd`, which must be an open, listening stream socket (TCP or Unix).
pub fn adopt(fd: RawFd, name: Option<String>) -> Result<BoundListener, ListenError> {
    let refuse = |why: String| ListenError::Inherited(format!("descriptor {fd} {why}"));
    // SAFETY: F_GETFD only reads the flags of a descriptor number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(refuse(format!(
            "is not open ({})",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: the descriptor is open (checked above) and systemd handed it
    // to this process, which nothing else here owns; from now on `socket`
    // owns it and closes it on drop.
    let socket = unsafe { Socket::from_raw_fd(fd) };
    let not_a_listener = |e: io::Error| refuse(format!("is not a socket ({e})"));
    if socket.r#type().map_err(not_a_listener)? != Type::STREAM {
        return Err(refuse("is not a stream socket".into()));
    }
    if !socket.is_listener().map_err(not_a_listener)? {
        return Err(refuse(
            "is not listening (systemd's Accept=no is needed)".into(),
        ));
    }
    let local = socket.local_addr().map_err(not_a_listener)?;
    let prepare = |s: &Socket| {
        s.set_cloexec(true)?;
        s.set_nonblocking(true)
    };
    prepare(&socket).map_err(|e| refuse(format!("cannot be set up: {e}")))?;
    let socket = if let Some(addr) = local.as_socket() {
        Listening::Tcp {
            listener: TcpListener::from(socket),
            local: addr,
        }
    } else if local.is_unix() {
        Listening::Unix {
            path: unix_name(&local),
            listener: UnixListener::from(OwnedFd::from(socket)),
        }
    } else {
        return Err(refuse("is neither a TCP nor a Unix socket".into()));
    };
    Ok(BoundListener {
        socket,
        origin: Origin::Systemd { fd, name },
    })
}

/// A Unix socket's bound name as a path; `@name` for an abstract one.
fn unix_name(addr: &SockAddr) -> PathBuf {
    if let Some(path) = addr.as_pathname() {
        return path.to_path_buf();
    }
    if let Some(abstract_name) = addr.as_abstract_namespace() {
        let mut shown = b"@".to_vec();
        shown.extend_from_slice(abstract_name);
        return PathBuf::from(std::ffi::OsStr::from_bytes(&shown));
    }
    PathBuf::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> ListenAddr {
        ListenAddr::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn listen_forms_parse() {
        assert_eq!("127.0.0.1:5000".parse(), Ok(tcp("127.0.0.1", 5000)));
        assert_eq!("0.0.0.0:0".parse(), Ok(tcp("0.0.0.0", 0)));
        assert_eq!("localhost:65535".parse(), Ok(tcp("localhost", 65535)));
        assert_eq!("[::1]:8080".parse(), Ok(tcp("::1", 8080)));
        assert_eq!("[::]:80".parse(), Ok(tcp("::", 80)));
        assert_eq!("[fe80::1:2]:443".parse(), Ok(tcp("fe80::1:2", 443)));
        assert_eq!(
            "unix:/run/app.sock".parse(),
            Ok(ListenAddr::Unix("/run/app.sock".into()))
        );
        assert_eq!(
            "unix:app.sock".parse(),
            Ok(ListenAddr::Unix("app.sock".into()))
        );
        // A path with a colon is still a path.
        assert_eq!(
            "unix:/tmp/a:1".parse(),
            Ok(ListenAddr::Unix("/tmp/a:1".into()))
        );
        assert_eq!(
            "/var/run/app:8080".parse(),
            Ok(ListenAddr::Unix("/var/run/app:8080".into()))
        );
        assert_eq!(
            "./pagi.sock".parse(),
            Ok(ListenAddr::Unix("./pagi.sock".into()))
        );
    }

    #[test]
    fn malformed_listen_values_are_refused_saying_why() {
        for (bad, says) in [
            ("", "expected HOST:PORT"),
            ("8080", "expected HOST:PORT"),
            ("pagi.sock", "expected HOST:PORT"),
            ("unix:", "needs a path"),
            (":8080", "no host"),
            ("127.0.0.1:", "is not a port"),
            ("127.0.0.1:http", "is not a port"),
            ("127.0.0.1:65536", "is not a port"),
            ("127.0.0.1:-1", "is not a port"),
            ("127.0.0.1:+80", "is not a port"),
            ("127.0.0.1: 80", "is not a port"),
            ("::1:8080", "needs brackets"),
            ("[::1]", "must be followed by :PORT"),
            ("[::1]8080", "must be followed by :PORT"),
            ("[::1]:", "is not a port"),
            ("[127.0.0.1]:80", "is not an IPv6 address"),
            ("[]:80", "is not an IPv6 address"),
            ("[::1]:99999", "is not a port"),
        ] {
            let err = bad.parse::<ListenAddr>().unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn listen_addresses_print_as_they_are_written() {
        for form in ["127.0.0.1:5000", "[::1]:80", "unix:/run/a.sock", "host:1"] {
            assert_eq!(form.parse::<ListenAddr>().unwrap().to_string(), form);
        }
    }

    #[test]
    fn socket_modes_are_three_octal_digits() {
        assert_eq!(parse_socket_mode("0660"), Ok(0o660));
        assert_eq!(parse_socket_mode("660"), Ok(0o660));
        assert_eq!(parse_socket_mode("0777"), Ok(0o777));
        assert_eq!(parse_socket_mode("000"), Ok(0));
        for bad in [
            "",
            "0",
            "66",
            "0668",
            "06600",
            "4660",
            "rw-rw----",
            "0x1b0",
            "-660",
        ] {
            assert!(parse_socket_mode(bad).is_err(), "{bad:?}");
        }
    }

    fn config(addrs: Vec<ListenAddr>) -> Config {
        Config {
            addrs,
            explicit: true,
            socket_mode: None,
            backlog: DEFAULT_BACKLOG,
            reuseport: false,
        }
    }

    #[test]
    fn configs_that_do_not_fit_together_are_refused() {
        let mut c = config(vec![tcp("127.0.0.1", 1)]);
        assert!(c.validate().is_ok());
        c.socket_mode = Some(0o660);
        assert!(c.validate().unwrap_err().contains("--socket-mode"));
        c.addrs.push(ListenAddr::Unix("/tmp/x.sock".into()));
        assert!(c.validate().is_ok());
        c.addrs.push(ListenAddr::Unix("/tmp/../tmp/x.sock".into()));
        // absolute() does not fold "..": two spellings are two paths here,
        // and the second bind finds the first's socket live.
        assert!(c.validate().is_ok());
        c.addrs.push(ListenAddr::Unix("/tmp/x.sock".into()));
        assert!(c.validate().unwrap_err().contains("named twice"));

        let c = config(vec![tcp("127.0.0.1", 0), tcp("127.0.0.1", 0)]);
        assert!(c.validate().is_ok(), "port 0 twice is two ports");
        let c = config(vec![tcp("127.0.0.1", 80), tcp("127.0.0.1", 80)]);
        assert!(c
            .validate()
            .unwrap_err()
            .contains("127.0.0.1:80 is named twice"));

        for backlog in [0, u32::MAX] {
            let mut c = config(vec![tcp("127.0.0.1", 1)]);
            c.backlog = backlog;
            assert!(c.validate().unwrap_err().contains("--listener-backlog"));
        }
        let c = config(vec![tcp("127.0.0.1", 0); MAX_LISTENERS + 1]);
        assert!(c.validate().unwrap_err().contains("at most"));
    }

    #[test]
    fn binds_tcp_and_unix_and_removes_only_its_own_socket_file() {
        let dir = std::env::temp_dir().join(format!("pagi-listen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.sock");
        let mut c = config(vec![tcp("127.0.0.1", 0), ListenAddr::Unix(path.clone())]);
        c.socket_mode = Some(0o640);
        let mut bound = bind_all(&c, Vec::new()).unwrap();
        assert_eq!(bound.listeners.len(), 2);
        assert!(bound.listeners[0]
            .describe(false)
            .starts_with("http://127.0.0.1:"));
        assert_eq!(
            bound.listeners[1].describe(true),
            format!("unix:{}", path.display())
        );
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);

        // A live socket is not taken over.
        let again = bind_all(&config(vec![ListenAddr::Unix(path.clone())]), Vec::new());
        assert!(matches!(again, Err(ListenError::InUse(_))), "{again:?}");

        bound.socket_files.remove();
        assert!(!path.exists());

        // A stale one is; a regular file is refused and left.
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let b = bind_all(&config(vec![ListenAddr::Unix(stale.clone())]), Vec::new()).unwrap();
        drop(b);
        assert!(!stale.exists(), "removed at drop");
        let plain = dir.join("plain");
        std::fs::write(&plain, b"keep me").unwrap();
        let refused = bind_all(&config(vec![ListenAddr::Unix(plain.clone())]), Vec::new());
        assert!(
            matches!(refused, Err(ListenError::NotASocket(_))),
            "{refused:?}"
        );
        assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");

        // A file replaced after binding is not this server's to remove.
        let swapped = dir.join("swapped.sock");
        let b = bind_all(&config(vec![ListenAddr::Unix(swapped.clone())]), Vec::new()).unwrap();
        std::fs::remove_file(&swapped).unwrap();
        std::fs::write(&swapped, b"another's").unwrap();
        drop(b);
        assert_eq!(std::fs::read(&swapped).unwrap(), b"another's");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_overlong_socket_path_is_refused_before_binding() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        let r = bind_all(&config(vec![ListenAddr::Unix(long)]), Vec::new());
        assert!(
            matches!(r, Err(ListenError::PathTooLong { len: 125, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn an_inherited_socket_stands_in_for_the_address_it_serves() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let inherited = || BoundListener {
            socket: Listening::Tcp {
                local: held.local_addr().unwrap(),
                listener: held.try_clone().unwrap(),
            },
            origin: Origin::Systemd { fd: 3, name: None },
        };
        // Named on the command line: the inherited socket serves it.
        let b = bind_all(&config(vec![tcp("127.0.0.1", port)]), vec![inherited()]).unwrap();
        assert_eq!(b.listeners.len(), 1);
        assert!(matches!(b.listeners[0].origin, Origin::Systemd { .. }));
        // Something else named: both.
        let b = bind_all(&config(vec![tcp("127.0.0.1", 0)]), vec![inherited()]).unwrap();
        assert_eq!(b.listeners.len(), 2);
        assert_eq!(b.listeners[0].origin, Origin::Bound);
        // Nothing named (the default): the inherited one alone.
        let mut c = config(vec![tcp("127.0.0.1", 0)]);
        c.explicit = false;
        let b = bind_all(&c, vec![inherited()]).unwrap();
        assert_eq!(b.listeners.len(), 1);
        assert!(matches!(b.listeners[0].origin, Origin::Systemd { .. }));
        let b = bind_all(&c, Vec::new()).unwrap();
        assert_eq!(b.listeners[0].origin, Origin::Bound);
    }
}
