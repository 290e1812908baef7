//! `--cpu-affinity N`: each serving process (the whole server, or each
//! worker) keeps its threads on N CPUs of its own.
//!
//! A request passes from the network thread to the interpreter and back.
//! On a host whose CPUs are all busy (the load generator or other
//! services beside the server) the two threads on one CPU share its caches
//! and hand over without waking another CPU: hello world served 13 % more
//! on the 2-core test machine at 10 and 50 connections (bench/README.md,
//! session 41).  The price is that a process uses N CPUs at most: at 256
//! connections, where the network thread has work for a CPU of its own,
//! one bound process served 15 % less.  So it is off unless asked for.
//!
//! Worker k (numbered from 1) takes the N CPUs after the (k - 1) × N
//! first of the process's allowed set, wrapping around; the allowed set is
//! what the server was started with (`taskset`, a container's cpuset), so
//! the option divides that set rather than the whole machine.  A worker
//! started again in the same slot gets the same CPUs.

use std::io;

/// Which CPUs the process in `slot` (0 for the whole server, `worker - 1`
/// for a worker) keeps its threads on: `per_process` CPUs of `allowed`,
/// wrapping around.  `None` when nothing is to be restricted: the option
/// is off (0), or it asks for at least as many CPUs as are allowed.
pub fn cpus_for(allowed: &[usize], per_process: usize, slot: usize) -> Option<Vec<usize>> {
    if per_process == 0 || per_process >= allowed.len() {
        return None;
    }
    let first = slot.checked_mul(per_process)? % allowed.len();
    let mut cpus: Vec<usize> = (0..per_process)
        .map(|i| allowed[(first + i) % allowed.len()])
        .collect();
    cpus.sort_unstable();
    Some(cpus)
}

/// What binding the process came to, for its log line.
#[derive(Debug, PartialEq, Eq)]
pub enum Binding {
    /// The threads now run only on these CPUs.
    Bound(Vec<usize>),
    /// The option asks for as many CPUs as the process may use, or more.
    AllAllowed { allowed: usize },
}

/// Binds every thread of this process to its share of the CPUs it may use
/// (see `cpus_for`).  Called before the runtime and the interpreter
/// threads start, which then inherit the binding; threads already running
/// (the logger's, in a process that did not fork) are bound one by one,
/// since the kernel's affinity is per thread.
pub fn bind_this_process(per_process: usize, slot: usize) -> io::Result<Binding> {
    let allowed = allowed_cpus()?;
    let Some(cpus) = cpus_for(&allowed, per_process, slot) else {
        return Ok(Binding::AllAllowed {
            allowed: allowed.len(),
        });
    };
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is the
    // empty set; CPU_SET writes inside it for any index below
    // CPU_SETSIZE, which every index from sched_getaffinity is.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in &cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        set
    };
    for tid in this_process_threads()? {
        // SAFETY: `set` is a valid cpu_set_t of the size passed; a thread
        // that has exited since the listing makes the call fail (ESRCH),
        // which is left alone below.
        let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err);
            }
        }
    }
    Ok(Binding::Bound(cpus))
}

/// The CPUs this thread may run on, in order.
fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: all zeroes is the empty cpu_set_t; sched_getaffinity fills
    // at most the size given, and CPU_ISSET reads within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect())
    }
}

fn this_process_threads() -> io::Result<Vec<libc::pid_t>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        {
            tids.push(tid);
        }
    }
    Ok(tids)
}

/// `0-1,4` style, as `taskset` and `/proc/PID/status` write CPU lists.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if end == start {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{cpu_list, cpus_for};

    #[test]
    fn each_worker_takes_the_next_cpus_of_the_allowed_set() {
        let allowed = [0, 1, 2, 3];
        assert_eq!(cpus_for(&allowed, 1, 0), Some(vec![0]));
        assert_eq!(cpus_for(&allowed, 1, 1), Some(vec![1]));
        assert_eq!(cpus_for(&allowed, 2, 1), Some(vec![2, 3]));
        // More workers than CPUs: they wrap around.
        assert_eq!(cpus_for(&allowed, 1, 5), Some(vec![1]));
        assert_eq!(cpus_for(&allowed, 3, 1), Some(vec![0, 1, 3]));
    }

    #[test]
    fn the_allowed_set_is_divided_not_the_machine() {
        // Started under `taskset -c 4,6,7`.
        let allowed = [4, 6, 7];
        assert_eq!(cpus_for(&allowed, 1, 0), Some(vec![4]));
        assert_eq!(cpus_for(&allowed, 1, 2), Some(vec![7]));
        assert_eq!(cpus_for(&allowed, 2, 1), Some(vec![4, 7]));
    }

    #[test]
    fn off_or_asking_for_every_allowed_cpu_binds_nothing() {
        assert_eq!(cpus_for(&[0, 1], 0, 0), None);
        assert_eq!(cpus_for(&[0, 1], 2, 0), None);
        assert_eq!(cpus_for(&[0, 1], 9, 3), None);
        assert_eq!(cpus_for(&[], 1, 0), None);
        assert_eq!(cpus_for(&[0, 1, 2], 2, usize::MAX), None);
    }

    #[test]
    fn lists_are_written_as_taskset_writes_them() {
        assert_eq!(cpu_list(&[0]), "0");
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(cpu_list(&[]), "");
    }
}
