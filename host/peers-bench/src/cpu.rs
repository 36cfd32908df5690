//! Where a point's CPU went: the time each server process and this load generator spent on a
//! CPU (user and system, from `/proc/<pid>/stat`), and how busy the whole machine was (from
//! `/proc/stat`), between the start and the end of the measured seconds. A point whose machine
//! is nearly all busy is bounded by CPU, and the time per request says whose.

use anyhow::Context;
use serde::Serialize;

/// CPU counters at one moment, for the processes asked for and for the machine.
pub struct Sample {
    /// Each process's user + system time, in clock ticks; none for one that is gone.
    processes: Vec<Option<u64>>,
    /// This load generator's own.
    own: u64,
    /// The machine's busy and total ticks, summed over every CPU.
    machine: (u64, u64),
}

/// What the CPU did over a point's measured seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    /// CPU time per answered request of each server process (its nodes or members, in order),
    /// in microseconds; none for a process that ended during the point.
    pub per_process_us: Vec<Option<f64>>,
    /// The load generator's CPU time per answered request, in microseconds.
    pub load_generator_us: f64,
    /// The share of all the machine's CPU time that was busy (0 to 1).
    pub machine_busy: f64,
}

impl Usage {
    /// The server processes' CPU time per answered request, together.
    pub fn servers_us(&self) -> f64 {
        self.per_process_us.iter().flatten().sum()
    }
}

impl Sample {
    pub fn take(pids: &[u32]) -> anyhow::Result<Sample> {
        Ok(Sample {
            processes: pids.iter().map(|&pid| process_ticks(&format!("/proc/{pid}/stat")).ok()).collect(),
            own: process_ticks("/proc/self/stat")?,
            machine: machine_ticks(&std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?)?,
        })
    }

    /// The usage from `self` to `later`, for `answered` requests.
    pub fn until(&self, later: &Sample, answered: u64) -> Usage {
        let per_second = ticks_per_second();
        let per_request = |ticks: u64| ticks as f64 / per_second * 1e6 / answered.max(1) as f64;
        let per_process_us = self
            .processes
            .iter()
            .zip(&later.processes)
            .map(|(a, b)| Some(per_request(b.as_ref()?.checked_sub(*a.as_ref()?)?)))
            .collect();
        let busy = later.machine.0.saturating_sub(self.machine.0);
        let total = later.machine.1.saturating_sub(self.machine.1);
        Usage {
            per_process_us,
            load_generator_us: per_request(later.own.saturating_sub(self.own)),
            machine_busy: if total == 0 { 0.0 } else { busy as f64 / total as f64 },
        }
    }
}

/// Clock ticks per second, the unit of `/proc`'s CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// A process's user + system time (fields 14 and 15 of `/proc/<pid>/stat`), in clock ticks.
fn process_ticks(path: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    parse_process(&stat).with_context(|| format!("{path} is not a process's stat line"))
}

fn parse_process(stat: &str) -> Option<u64> {
    // The command name, in parentheses, may hold spaces and parentheses itself: the fields
    // counted from 3 (state) start after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// The machine's busy and total ticks from `/proc/stat`'s `cpu` line: idle and I/O wait are not
/// busy; guest time is already counted in user time.
fn machine_ticks(stat: &str) -> anyhow::Result<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu ")).context("/proc/stat has no cpu line")?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    anyhow::ensure!(ticks.len() >= 5, "/proc/stat's cpu line is short: {line}");
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks[3] + ticks[4];
    Ok((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_time_is_user_plus_system_whatever_its_name_holds() {
        let stat = "4242 (tokio (worker) 1) S 1 4242 4242 0 -1 4194560 2031 0 0 0 1500 320 0 0 20 0 9 0";
        assert_eq!(parse_process(stat), Some(1820));
        assert_eq!(parse_process("4242 (x) S 1"), None);
        assert_eq!(parse_process("no parenthesis"), None);
    }

    #[test]
    fn the_machine_is_busy_outside_idle_and_io_wait() {
        let stat = "cpu  100 5 45 800 50 0 0 0 0 0\ncpu0 50 2 20 400 25 0 0 0 0 0\nintr 1 2\n";
        assert_eq!(machine_ticks(stat).unwrap(), (150, 1000));
        assert!(machine_ticks("intr 1 2\n").is_err());
        assert!(machine_ticks("cpu  1 2 x\n").is_err());
    }

    #[test]
    fn usage_is_per_answered_request_and_a_gone_process_has_none() {
        let tick_us = 1e6 / ticks_per_second();
        let before = Sample { processes: vec![Some(100), Some(50), Some(7)], own: 10, machine: (300, 1000) };
        let after = Sample { processes: vec![Some(300), Some(150), None], own: 30, machine: (1100, 2000) };
        let usage = before.until(&after, 100);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.max(1.0);
        assert!(close(usage.per_process_us[0].unwrap(), 2.0 * tick_us), "{usage:?}");
        assert!(close(usage.per_process_us[1].unwrap(), tick_us), "{usage:?}");
        assert_eq!(usage.per_process_us[2], None);
        assert!(close(usage.servers_us(), 3.0 * tick_us));
        assert!(close(usage.load_generator_us, 0.2 * tick_us));
        assert!(close(usage.machine_busy, 0.8));
    }

    #[test]
    fn this_process_and_the_machine_can_be_sampled() {
        let pid = std::process::id();
        let a = Sample::take(&[pid, u32::MAX]).unwrap();
        // Some work, so that at least a tick passes on this process.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let b = Sample::take(&[pid, u32::MAX]).unwrap();
        let usage = a.until(&b, 1);
        assert!(usage.per_process_us[0].is_some() && usage.per_process_us[1].is_none(), "{usage:?}");
        assert!((0.0..=1.0).contains(&usage.machine_busy), "{usage:?}");
    }
}
