//! CPU time another process (the server under load) spent, read from `/proc/PID/stat`, so a run
//! can report the server's CPU per message.

use std::time::Duration;

use thiserror::Error;

/// Why a process's CPU time could not be read.
#[derive(Debug, Error)]
pub enum CpuReadError {
    #[error("cannot read /proc/{pid}/stat (is the process running with that pid?)")]
    Read { pid: u32, source: std::io::Error },
    #[error("/proc/{pid}/stat: {reason}")]
    Parse { pid: u32, reason: &'static str },
}

/// User plus system CPU time of all threads of process `pid` so far (`utime + stime`; the time
/// of children it waited for, `cutime`/`cstime`, is not included).
pub fn process_cpu_time(pid: u32) -> Result<Duration, CpuReadError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| CpuReadError::Read { pid, source })?;
    let ticks = parse_cpu_ticks(&stat).map_err(|reason| CpuReadError::Parse { pid, reason })?;
    Ok(ticks_to_duration(ticks, clock_ticks_per_second()))
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the times in `/proc/PID/stat`. Usually 100 on Linux, but
/// it is the kernel's `USER_HZ` and read rather than assumed.
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// `utime + stime`, in clock ticks, from the text of a `/proc/PID/stat` file.
///
/// The second field, `(comm)`, is the process name in parentheses, and the name itself may hold
/// spaces and parentheses (`(a) b (c)`), so fields are counted from the last `)` of the line:
/// after it come `state` (field 3) and the rest, `utime` and `stime` being fields 14 and 15.
pub fn parse_cpu_ticks(stat: &str) -> Result<u64, &'static str> {
    let (_, after_comm) = stat.rsplit_once(')').ok_or("no ')' closing the command name")?;
    // Fields 3, 4, ... after the command name; utime is field 14, stime field 15.
    let mut fields = after_comm.split_ascii_whitespace().skip(14 - 3);
    let mut next_number = |missing| -> Result<u64, &'static str> {
        fields.next().ok_or(missing)?.parse::<u64>().map_err(|_| "utime or stime is not a number")
    };
    let utime = next_number("too few fields (no utime)")?;
    let stime = next_number("too few fields (no stime)")?;
    Ok(utime + stime)
}

fn ticks_to_duration(ticks: u64, ticks_per_second: u64) -> Duration {
    let per_second = ticks_per_second.max(1);
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

/// CPU time of one process between two points of a run.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    pid: u32,
    at_start: Duration,
}

impl CpuMeter {
    /// Reads the process's CPU time now; an error means the pid is wrong (a setup mistake).
    pub fn start(pid: u32) -> Result<Self, CpuReadError> {
        Ok(Self { pid, at_start: process_cpu_time(pid)? })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// CPU time the process used since [`CpuMeter::start`].
    pub fn elapsed(&self) -> Result<Duration, CpuReadError> {
        Ok(process_cpu_time(self.pid)?.saturating_sub(self.at_start))
    }
}

/// Microseconds of CPU per message, `None` without messages.
pub fn micros_per_message(cpu: Duration, messages: u64) -> Option<f64> {
    (messages > 0).then(|| cpu.as_secs_f64() * 1e6 / messages as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line from a 6.x kernel, `mosquitto` with utime 1234 and stime 567.
    const MOSQUITTO: &str = "4242 (mosquitto) S 1 4242 4242 0 -1 4194624 1290 0 0 0 1234 567 0 0 20 0 1 0 \
        123456 12345678 1500 18446744073709551615 1 1 0 0 0 0 0 4096 17991 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn utime_and_stime_are_fields_14_and_15() {
        assert_eq!(parse_cpu_ticks(MOSQUITTO), Ok(1234 + 567));
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let tricky = MOSQUITTO.replace("(mosquitto)", "(we ir) (x) 9 9 9)");
        assert_eq!(parse_cpu_ticks(&tricky), Ok(1234 + 567));
        let empty = MOSQUITTO.replace("(mosquitto)", "()");
        assert_eq!(parse_cpu_ticks(&empty), Ok(1234 + 567));
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(parse_cpu_ticks("").is_err());
        assert!(parse_cpu_ticks("12 (weir S 1 2").is_err(), "no closing parenthesis");
        assert!(parse_cpu_ticks("12 (weir) S 1 2 3 4 5 6 7 8 9 10").is_err(), "cut before utime");
        assert!(parse_cpu_ticks("12 (weir) S 1 2 3 4 5 6 7 8 9 10 x 5").is_err(), "not a number");
    }

    #[test]
    fn ticks_convert_at_the_given_rate() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(3, 1000), Duration::from_millis(3));
        assert_eq!(ticks_to_duration(1, 3), Duration::from_nanos(333_333_333));
    }

    #[test]
    fn this_process_uses_cpu() {
        assert!(clock_ticks_per_second() > 0);
        let meter = CpuMeter::start(std::process::id()).unwrap();
        // Spin until the reading moves past a few ticks; on a busy machine that takes longer
        // than the CPU time itself, so the wall-clock bound is only a safety net.
        let wall = std::time::Instant::now();
        let mut x = 0u64;
        while meter.elapsed().unwrap() < Duration::from_millis(30) && wall.elapsed() < Duration::from_secs(30)
        {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
        }
        assert!(meter.elapsed().unwrap() >= Duration::from_millis(30), "{:?}", meter.elapsed());
        assert!(CpuMeter::start(u32::MAX).is_err(), "no such pid");
    }

    #[test]
    fn micros_per_message_needs_messages() {
        assert_eq!(micros_per_message(Duration::from_millis(5), 1000), Some(5.0));
        assert_eq!(micros_per_message(Duration::from_millis(5), 0), None);
    }
}
