//! Process management around the server: the environment mode (`-E`),
//! daemonizing (`-D`), the pid file (`--pid`), privileges (`--user`,
//! `--group`), and telling whoever waits for it that the server is ready.

use std::ffi::CString;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::cli::{EnvMode, Options};

// ---- -E / --env --------------------------------------------------------------

/// The mode and what decided it (shown in the startup line), as the
/// reference runner resolves it: `-E`, then `$PAGI_ENV`, then whether stdin
/// is a terminal (development) or not (production: systemd, docker, cron).
/// `PAGI_ENV` is set to the result, so that the app can read it.  Called
/// before any thread exists (setenv is not thread-safe).
pub fn resolve_env_mode(opts: &Options) -> ResolvedMode {
    let mut not_a_mode = None;
    let (mode, source) = if let Some(mode) = opts.env_mode {
        (mode, "--env")
    } else if let Some(value) = std::env::var_os("PAGI_ENV") {
        match value.to_str().and_then(EnvMode::parse) {
            Some(mode) => (mode, "PAGI_ENV"),
            None => {
                not_a_mode = Some(value.to_string_lossy().into_owned());
                (EnvMode::None, "PAGI_ENV")
            }
        }
    } else if io::stdin().is_terminal() {
        (EnvMode::Development, "tty")
    } else {
        (EnvMode::Production, "no tty")
    };
    std::env::set_var("PAGI_ENV", mode.as_str());
    ResolvedMode {
        mode,
        source,
        not_a_mode,
    }
}

/// `-E`'s outcome.  The mode is needed before the log exists (it chooses
/// the log's format), so a PAGI_ENV that names no mode is kept to be
/// logged once the log is set up.
pub struct ResolvedMode {
    pub mode: EnvMode,
    /// What decided it: `--env`, `PAGI_ENV`, `tty` or `no tty`.
    pub source: &'static str,
    /// PAGI_ENV's value when it is not a mode (`none` is used).
    pub not_a_mode: Option<String>,
}

// ---- telling the waiting parent ------------------------------------------------

/// Descriptors of processes waiting to hear that this server is ready: the
/// terminal's process under `-D` (it exits with the status byte written
/// here), and the old master of a binary upgrade (it retires on `R`).
struct Waiters {
    daemon: Option<OwnedFd>,
    upgrade: Option<OwnedFd>,
}

static WAITERS: Mutex<Waiters> = Mutex::new(Waiters {
    daemon: None,
    upgrade: None,
});

fn waiters() -> std::sync::MutexGuard<'static, Waiters> {
    // Two optional descriptors, valid whatever a panicking holder did.
    WAITERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server is serving: the `-D` parent exits 0, and the old master of a
/// binary upgrade retires its workers.
pub fn announce_ready() {
    let mut w = waiters();
    if let Some(fd) = w.daemon.take() {
        let _ = std::fs::File::from(fd).write_all(&[0]);
    }
    if let Some(fd) = w.upgrade.take() {
        let _ = std::fs::File::from(fd).write_all(b"R");
    }
}

/// The server could not start: the `-D` parent exits with `code` (the old
/// master of an upgrade sees the pipe close and keeps serving).
pub fn announce_failure(code: u8) {
    let mut w = waiters();
    if let Some(fd) = w.daemon.take() {
        let _ = std::fs::File::from(fd).write_all(&[code]);
    }
    w.upgrade = None;
}

/// In a process forked from the server (a worker): these belong to the
/// server, which announces; close this process's copies.
pub fn forget_waiters_in_child() {
    let mut w = waiters();
    w.daemon = None;
    w.upgrade = None;
}

/// A binary upgrade's new master tells the old one through this descriptor.
pub fn set_upgrade_waiter(fd: OwnedFd) {
    waiters().upgrade = Some(fd);
}

// ---- -D / --daemonize ----------------------------------------------------------

/// Detach from the terminal: fork, start a new session, fork again.  The
/// original process waits until the daemon is ready or failed and exits
/// with its status (0, or the startup error's), so that `pagi-rs -D` in a
/// script fails when the server does not start; the daemon keeps the
/// terminal for its error messages until then ([`detach_stdio`]).  The
/// working directory is kept, so relative paths in the app keep working.
/// Called before any thread exists.
pub fn daemonize() -> io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned here.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists; the parent only waits and exits.
    match unsafe { libc::fork() } {
        -1 => return Err(io::Error::last_os_error()),
        0 => {}
        _ => {
            drop(write);
            let mut status = [1u8];
            let got = std::fs::File::from(read).read(&mut status).unwrap_or(0);
            // SAFETY: _exit ends this process without running anything of
            // the daemon's (whose memory this process shares a copy of).
            unsafe { libc::_exit(if got == 1 { i32::from(status[0]) } else { 1 }) };
        }
    }
    drop(read);
    // SAFETY: the child of a fork is not a process group leader.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Again, so that the daemon, not being a session leader, can never
    // acquire a controlling terminal.
    // SAFETY: as above; the intermediate process only exits.
    match unsafe { libc::fork() } {
        -1 => return Err(io::Error::last_os_error()),
        0 => {}
        // SAFETY: see above.
        _ => unsafe { libc::_exit(0) },
    }
    waiters().daemon = Some(write);
    Ok(())
}

/// Once a daemon is ready: stdin from /dev/null, and stdout and stderr to
/// /dev/null where they are a terminal.  Where they are a file or a pipe
/// (`pagi-rs -D app.pl 2>>server.log`), the logs keep going there.
pub fn detach_stdio() {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    let terminal = [
        false,
        io::stdout().is_terminal(),
        io::stderr().is_terminal(),
    ];
    for (fd, is_terminal) in terminal.iter().enumerate() {
        if fd == 0 || *is_terminal {
            // SAFETY: dup2 replaces a standard descriptor of this process
            // with /dev/null; nothing holds a reference to the old one.
            unsafe { libc::dup2(null.as_raw_fd(), fd as RawFd) };
        }
    }
}

// ---- --pid ---------------------------------------------------------------------

/// `--pid FILE`: holds the server's pid while it runs; removed on drop if it
/// still names this process (a binary upgrade's new master rewrites it).
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Write this process's pid to `path`.  A file naming a live process
    /// refuses the start (unless it is `replacing`, the old master of a
    /// binary upgrade); one naming a process that is gone is stale and
    /// replaced, with a note.
    pub fn create(path: &Path, replacing: Option<u32>) -> Result<PidFile, String> {
        if let Ok(text) = std::fs::read_to_string(path) {
            match text.trim().parse::<i32>() {
                Ok(pid) if pid > 0 && Some(pid as u32) != replacing && process_alive(pid) => {
                    return Err(format!(
                        "pid file {} names process {pid}, which is running: is the server already started?",
                        path.display()
                    ));
                }
                Ok(pid) if Some(pid as u32) != replacing => tracing::info!(
                    "pid file {} was stale (process {pid} is gone); replacing it",
                    path.display()
                ),
                Ok(_) => {}
                Err(_) => tracing::info!("pid file {} held no pid; replacing it", path.display()),
            }
        }
        let pid = std::process::id();
        // Written whole under another name, then renamed: a reader never
        // sees a half-written pid.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{pid}.tmp"));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, format!("{pid}\n"))
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("cannot write pid file {}: {e}", path.display())
            })?;
        Ok(PidFile {
            path: path.to_path_buf(),
            pid,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            == Some(self.pid);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!("cannot remove pid file {}: {e}", self.path.display());
            }
        }
    }
}

/// Whether process `pid` exists (EPERM: it does, owned by someone else).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

// ---- --user / --group ----------------------------------------------------------

/// Run as `user` and/or `group` from now on (after binding, before the app
/// loads).  Needs root, unless the process already runs as them (the new
/// master of a binary upgrade inherits the old one's identity).
pub fn drop_privileges(user: Option<&str>, group: Option<&str>) -> Result<(), String> {
    let account = match user {
        Some(name) => Some(lookup_user(name)?),
        None => None,
    };
    let gid = match group {
        Some(name) => lookup_group(name)?,
        None => match &account {
            Some(a) => a.gid,
            None => return Ok(()),
        },
    };
    // SAFETY: getuid/getgid/getegid only read ids.
    let (uid_now, gid_now, egid_now) =
        unsafe { (libc::geteuid(), libc::getgid(), libc::getegid()) };
    let wanted_uid = account.as_ref().map_or(uid_now, |a| a.uid);
    if uid_now == wanted_uid && gid_now == gid && egid_now == gid && uid_now != 0 {
        return Ok(());
    }
    if uid_now != 0 {
        return Err(format!(
            "--user/--group need root to change identity (running as uid {uid_now})"
        ));
    }
    // Supplementary groups first, while still root: the user's own (so that
    // group-readable files stay readable), or just `gid`.
    let groups_set = match &account {
        Some(a) if group.is_none() => {
            let cname = CString::new(a.name.as_str()).map_err(|e| e.to_string())?;
            // SAFETY: initgroups reads the group database for a valid C string.
            unsafe { libc::initgroups(cname.as_ptr(), gid) }
        }
        // SAFETY: setgroups reads one gid from the array we own.
        _ => unsafe { libc::setgroups(1, &gid) },
    };
    if groups_set != 0 {
        return Err(format!(
            "cannot set supplementary groups: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: setgid/setuid change this process's ids; results are checked.
    if unsafe { libc::setgid(gid) } != 0 {
        return Err(format!(
            "cannot change to group {gid}: {}",
            io::Error::last_os_error()
        ));
    }
    if let Some(a) = &account {
        // SAFETY: as above.
        if unsafe { libc::setuid(a.uid) } != 0 {
            return Err(format!(
                "cannot change to user {}: {}",
                a.name,
                io::Error::last_os_error()
            ));
        }
        // Real, effective and saved ids all changed (setuid as root sets
        // the three): there is no way back to root.
        let (mut r, mut e, mut saved) = (0, 0, 0);
        // SAFETY: getresuid writes three ids into variables we own.
        unsafe { libc::getresuid(&mut r, &mut e, &mut saved) };
        if (r, e, saved) != (a.uid, a.uid, a.uid) {
            return Err(format!("changing to user {} did not take", a.name));
        }
    }
    Ok(())
}

struct Account {
    name: String,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

fn lookup_user(name: &str) -> Result<Account, String> {
    let cname = CString::new(name).map_err(|_| format!("bad user name {name:?}"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwnam_r fills `pwd` with pointers into `buf`, both ours and
    // alive for this function; `result` says whether an entry was found.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return Err(format!("unknown user: {name}"));
        }
        Ok(Account {
            name: name.to_string(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

fn lookup_group(name: &str) -> Result<libc::gid_t, String> {
    let cname = CString::new(name).map_err(|_| format!("bad group name {name:?}"))?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: as in lookup_user, with getgrnam_r.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return Err(format!("unknown group: {name}"));
        }
        Ok(grp.gr_gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_naming_a_live_process_refuses_and_a_stale_one_is_replaced() {
        let dir = std::env::temp_dir().join(format!("pagi-rs-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("server.pid");
        // This test's own parent is alive.
        let parent = std::os::unix::process::parent_id();
        std::fs::write(&path, format!("{parent}\n")).unwrap();
        let err = PidFile::create(&path, None)
            .err()
            .expect("a live pid refuses");
        assert!(err.contains("is running"), "{err}");
        // ...unless it is the master being replaced.
        let pf = PidFile::create(&path, Some(parent)).expect("the replaced master's pid is fine");
        drop(pf);
        assert!(!path.exists(), "removed on drop");
        // A pid no process has (beyond pid_max) is stale.
        std::fs::write(&path, "2147483646\n").unwrap();
        let pf = PidFile::create(&path, None).expect("stale is replaced");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        // A file that names another process by then is left alone.
        std::fs::write(&path, "1\n").unwrap();
        drop(pf);
        assert!(path.exists(), "not ours any more: kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_accounts_are_named() {
        assert_eq!(
            drop_privileges(Some("no-such-user-pagi-rs"), None).unwrap_err(),
            "unknown user: no-such-user-pagi-rs"
        );
        assert_eq!(
            drop_privileges(None, Some("no-such-group-pagi-rs")).unwrap_err(),
            "unknown group: no-such-group-pagi-rs"
        );
    }
}
