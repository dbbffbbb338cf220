//! The fallback when nothing measures: this process's CPU time × a per-board coefficient.
//!
//! Owns the board profiles and their auto-selection from the device tree. The figure is the
//! *active* power attributable to the agent's own CPU work; idle/baseline power and other
//! processes are deliberately not counted, since telemetry wants joules per inference, not the
//! board's bill. Always flagged `estimated`.
//!
//! CPU time comes from `/proc/self/stat` (utime + stime, all threads) rather than `sysinfo`:
//! it is two fields of one file, needs no dependency and no unsafe code. The cost is a
//! resolution of one clock tick (10 ms), fine for the once-a-second reads telemetry does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    read_text, Clock, EnergyError, EnergyMeter, MeterKind, MonotonicClock, Sample,
    SYSFS_PERMISSION_ADVICE,
};

pub const DEFAULT_MODEL_PATH: &str = "/proc/device-tree/model";
pub const DEFAULT_STAT_PATH: &str = "/proc/self/stat";

/// Ticks per second of the utime/stime fields. This is the userspace ABI constant USER_HZ,
/// fixed at 100 on x86 and arm64 whatever the kernel's CONFIG_HZ, so no sysconf call is needed.
const USER_HZ: u64 = 100;

/// Active power of one fully busy core on a given board.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoardProfile {
    pub name: &'static str,
    /// (power under full CPU load − idle power) / cores, in watts.
    pub watts_per_core: f64,
}

/// Coefficients are coarse; they exist so the agent reports something better than nothing.
/// Figures marked [U] are unverified and should be replaced by a measurement on the board.
pub const PROFILES: &[BoardProfile] = &[
    // Pi 4 measured at the USB supply (chipwired.com/raspberry-pi-power-use, three meters):
    // idle 2.2–3.0 W, load 4.7–6.3 W. Midpoints (5.5 − 2.6) / 4 cores ≈ 0.73 W.
    BoardProfile {
        name: "rpi4",
        watts_per_core: 0.73,
    },
    // Pi 5: [U] commonly quoted ~2.7 W idle, ~7 W all cores busy → (7 − 2.7) / 4 ≈ 1.1 W.
    BoardProfile {
        name: "rpi5",
        watts_per_core: 1.1,
    },
    // Orin Nano 8GB: [U] a public power budget (saltylab-firmware jetson/docs/power-budget.md)
    // puts the 6 A78AE cores at 1.5 W idle, 6 W loaded → 4.5 / 6 = 0.75 W. Jetsons normally
    // have the INA3221 (hwmon meter), so this is rarely used.
    BoardProfile {
        name: "jetson-orin-nano",
        watts_per_core: 0.75,
    },
    // Dev/CI hosts: [U] order of magnitude for a desktop/laptop core under load (65–125 W
    // packages over 8–16 cores). Hosts with readable RAPL use that instead.
    BoardProfile {
        name: "generic-x86",
        watts_per_core: 8.0,
    },
    // Unknown ARM board: [U] the Pi figures rounded up, erring towards over-reporting.
    BoardProfile {
        name: "generic-arm",
        watts_per_core: 1.0,
    },
];

pub fn profile(name: &str) -> Option<&'static BoardProfile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// Picks a profile from the device-tree model string (`None` when the file does not exist,
/// as on x86), falling back on the architecture.
pub fn pick_profile(model: Option<&str>) -> &'static BoardProfile {
    let by_model = model.and_then(|m| {
        if m.contains("Raspberry Pi 4") || m.contains("Compute Module 4") {
            profile("rpi4")
        } else if m.contains("Raspberry Pi 5") || m.contains("Compute Module 5") {
            profile("rpi5")
        } else if m.contains("Orin Nano") {
            profile("jetson-orin-nano")
        } else {
            None
        }
    });
    let fallback = if cfg!(target_arch = "x86_64") {
        &PROFILES[3]
    } else {
        &PROFILES[4]
    };
    by_model.unwrap_or(fallback)
}

/// Parses utime + stime out of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself contain spaces and ')', so fields are counted from the last ')'.
pub fn parse_cpu_time(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': fields[0] is field 3 (state), so utime (14) and stime (15) are 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = utime.checked_add(stime)?;
    Some(Duration::from_millis(ticks.checked_mul(1000 / USER_HZ)?))
}

/// CPU time (user + system, all threads) of the process whose `stat` file this is.
pub fn read_cpu_time(path: &Path) -> Result<Duration, EnergyError> {
    let text = read_text(path, SYSFS_PERMISSION_ADVICE)?;
    parse_cpu_time(&text).ok_or_else(|| EnergyError::Parse {
        path: path.to_path_buf(),
        content: text.chars().take(120).collect(),
        what: "expected a /proc/<pid>/stat line",
    })
}

#[derive(Debug)]
pub struct EstimateMeter {
    profile: &'static BoardProfile,
    stat_path: PathBuf,
    start_cpu: Duration,
    last_cpu: Duration,
    clock: Box<dyn Clock>,
    last_t: Duration,
}

impl EstimateMeter {
    /// Auto-picks the profile from `model_path` (absent on x86: that is fine) and reads CPU time
    /// from `stat_path`.
    pub fn detect(model_path: &Path, stat_path: &Path) -> Result<Self, EnergyError> {
        // The device-tree model ends in a NUL byte; read bytes so that is not an error.
        let model = std::fs::read(model_path).ok().map(|b| {
            String::from_utf8_lossy(&b)
                .trim_matches(['\0', '\n', ' '])
                .to_string()
        });
        Self::with_profile(
            pick_profile(model.as_deref()),
            stat_path,
            Box::new(MonotonicClock::default()),
        )
    }

    pub fn with_profile(
        profile: &'static BoardProfile,
        stat_path: &Path,
        clock: Box<dyn Clock>,
    ) -> Result<Self, EnergyError> {
        let cpu = read_cpu_time(stat_path)?;
        let last_t = clock.now();
        Ok(EstimateMeter {
            profile,
            stat_path: stat_path.to_path_buf(),
            start_cpu: cpu,
            last_cpu: cpu,
            clock,
            last_t,
        })
    }

    pub fn profile(&self) -> &'static BoardProfile {
        self.profile
    }
}

impl EnergyMeter for EstimateMeter {
    fn name(&self) -> String {
        format!("estimate:{}", self.profile.name)
    }

    fn kind(&self) -> MeterKind {
        MeterKind::Estimate
    }

    fn estimated(&self) -> bool {
        true
    }

    fn source(&self) -> String {
        format!(
            "{} x {} W/core",
            self.stat_path.display(),
            self.profile.watts_per_core
        )
    }

    fn read(&mut self) -> Result<Sample, EnergyError> {
        let cpu = read_cpu_time(&self.stat_path)?;
        let now = self.clock.now();
        let k = self.profile.watts_per_core;
        let joules = cpu.saturating_sub(self.start_cpu).as_secs_f64() * k;
        let dt = now.saturating_sub(self.last_t).as_secs_f64();
        let watts = (dt > 0.0).then(|| cpu.saturating_sub(self.last_cpu).as_secs_f64() / dt * k);
        self.last_cpu = cpu;
        self.last_t = now;
        Ok(Sample { joules, watts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::tests::FakeClock;
    use std::time::Instant;

    fn stat_line(utime: u64, stime: u64) -> String {
        // Real layout, with an awkward comm to exercise the ')' handling.
        format!(
            "4242 (edge agent) (x)) S 1 4242 4242 0 -1 4194560 500 0 0 0 {utime} {stime} 0 0 \
             20 0 8 0 12345 100000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 \
             0 0 0 0 0\n"
        )
    }

    #[test]
    fn parses_proc_stat() {
        assert_eq!(
            parse_cpu_time(&stat_line(150, 50)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(parse_cpu_time("garbage"), None);
        assert_eq!(parse_cpu_time("1 (x) S 1 2"), None);
    }

    #[test]
    fn joules_are_cpu_seconds_times_coefficient() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let stat = tmp.path().join("stat");
        std::fs::write(&stat, stat_line(100, 50)).expect("w");
        let clock = FakeClock::default();
        let p = profile("rpi4").expect("rpi4");
        let mut m = EstimateMeter::with_profile(p, &stat, Box::new(clock.clone())).expect("open");
        assert!(m.estimated());
        std::fs::write(&stat, stat_line(300, 100)).expect("w"); // +2.5 s CPU
        clock.advance(Duration::from_secs(5));
        let s = m.read().expect("read");
        assert!((s.joules - 2.5 * 0.73).abs() < 1e-9, "{s:?}");
        // Half a core busy on average over 5 s.
        assert!((s.watts.expect("watts") - 0.5 * 0.73).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn picks_profile_from_device_tree_model() {
        let name = |m: Option<&str>| pick_profile(m).name;
        assert_eq!(name(Some("Raspberry Pi 4 Model B Rev 1.4")), "rpi4");
        assert_eq!(name(Some("Raspberry Pi 5 Model B Rev 1.0")), "rpi5");
        assert_eq!(
            name(Some("NVIDIA Jetson Orin Nano Developer Kit")),
            "jetson-orin-nano"
        );
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(name(None), "generic-x86");
            assert_eq!(name(Some("Some Other Board")), "generic-x86");
        }
    }

    #[test]
    fn detect_reads_model_with_trailing_nul() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let model = tmp.path().join("model");
        std::fs::write(&model, b"Raspberry Pi 5 Model B Rev 1.0\0").expect("w");
        let m = EstimateMeter::detect(&model, Path::new(DEFAULT_STAT_PATH)).expect("detect");
        assert_eq!(m.profile().name, "rpi5");
        assert_eq!(m.kind(), MeterKind::Estimate);
    }

    #[test]
    fn unreadable_stat_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = EstimateMeter::detect(&tmp.path().join("m"), &tmp.path().join("stat"))
            .expect_err("no stat");
        assert!(matches!(err, EnergyError::Gone { .. }), "{err}");
    }

    #[test]
    fn real_cpu_work_gives_nonzero_joules() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut m = EstimateMeter::detect(&tmp.path().join("none"), Path::new(DEFAULT_STAT_PATH))
            .expect("detect");
        // Spin until the kernel has accounted at least a few ticks to us (bounded, so a
        // broken clock fails the assert instead of hanging the test).
        let start = Instant::now();
        let mut x: u64 = 0;
        let mut joules = 0.0;
        while start.elapsed() < Duration::from_secs(5) {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
            std::hint::black_box(x);
            joules = m.read().expect("read").joules;
            if joules > 0.0 && start.elapsed() > Duration::from_millis(50) {
                break;
            }
        }
        assert!(joules > 0.0, "CPU work must register, got {joules}");
    }
}
