//! CPU placement and accounting for benchmarks: which cores a process or
//! thread may run on, and how much CPU time a process has used.
//!
//! The source-overhead benchmark puts the source database and its writers
//! on some cores and Tally with its target on the others, so that what the
//! source pays for capture (its walsender's decoding) is measured apart from
//! the aggregator's own work, as it would be on two machines.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The CPUs this process may run on, in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // writes at most size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

fn cpu_set(cpus: &[usize]) -> io::Result<libc::cpu_set_t> {
    // SAFETY: as above; CPU_SET only writes inside the set for cpu < CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "CPU {cpu} is beyond the {} this system can address",
                    libc::CPU_SETSIZE
                ),
            ));
        }
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    Ok(set)
}

/// Restricts the calling thread to `set`: one system call, no allocation,
/// so it may also run between fork and exec.
fn set_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread (and the threads it starts later) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    set_affinity(&cpu_set(cpus)?)
}

/// Makes the process `command` starts (and everything it forks, such as a
/// PostgreSQL server's backends and walsenders) run only on `cpus`. An empty
/// list leaves the command as it is.
pub fn pin_command(command: &mut Command, cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let set = cpu_set(cpus)?;
    // SAFETY: the closure runs in the forked child before exec and makes one
    // async-signal-safe system call on a set built before the fork.
    unsafe {
        command.pre_exec(move || set_affinity(&set));
    }
    Ok(())
}

/// `cpus` as `taskset` writes them: `0`, `0,1`, `2,3`.
pub fn describe(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, …
/// (`proc(5)` numbers them from 3). The name may hold spaces and
/// parentheses, so the fields start after the last `)`.
pub(crate) fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU seconds `pid` has used, all its threads together;
/// with `reaped_children`, also those of the children it has waited for.
pub fn process_cpu_seconds(pid: u32, reaped_children: bool) -> Option<f64> {
    let fields = proc_stat_fields(pid)?;
    // utime, stime, cutime, cstime: proc(5) fields 14 to 17.
    let ticks = |field: usize| fields.get(field - 3)?.parse::<f64>().ok();
    let mut total = ticks(14)? + ticks(15)?;
    if reaped_children {
        total += ticks(16)? + ticks(17)?;
    }
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(total / per_second.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_command_sees_only_its_cpus() {
        let cpus = allowed_cpus().unwrap();
        let first = cpus[0];
        let mut command = Command::new("grep");
        command.args(["Cpus_allowed_list", "/proc/self/status"]);
        pin_command(&mut command, &[first]).unwrap();
        let output = command.output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            text.split_whitespace().last(),
            Some(first.to_string().as_str()),
            "{text}"
        );
    }

    #[test]
    fn a_pinned_thread_sees_only_its_cpus() {
        let cpus = allowed_cpus().unwrap();
        let last = *cpus.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current_thread(&[last]).unwrap();
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, vec![last]);
        // The rest of the process keeps all of them.
        assert_eq!(allowed_cpus().unwrap(), cpus);
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let me = std::process::id();
        let before = process_cpu_seconds(me, false).unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let after = process_cpu_seconds(me, true).unwrap();
        assert!(after - before >= 0.1, "{before} -> {after}");
        assert!(process_cpu_seconds(u32::MAX, false).is_none());
    }

    #[test]
    fn a_cpu_beyond_the_set_is_refused() {
        let error = cpu_set(&[libc::CPU_SETSIZE as usize]).unwrap_err();
        assert!(error.to_string().contains("beyond"), "{error}");
    }
}
