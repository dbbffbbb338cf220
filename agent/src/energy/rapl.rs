//! x86 RAPL through the powercap sysfs interface (dev and CI hosts; the ARM boards have none).
//!
//! Owns discovery of the top-level package domains (`intel-rapl:N`) and turning their wrapping
//! `energy_uj` counters into monotonic joules. AMD Zen exposes the same zones (kernel 5.8+), under
//! the same `intel-rapl` names.

use std::path::{Path, PathBuf};

use super::{
    read_text, read_u64, Clock, EnergyError, EnergyMeter, MeterKind, MonotonicClock, Sample,
    RAPL_PERMISSION_ADVICE,
};

pub const DEFAULT_ROOT: &str = "/sys/class/powercap";

#[derive(Debug)]
struct Domain {
    /// The `name` file, e.g. `package-0`.
    name: String,
    dir: PathBuf,
    /// The counter wraps back to 0 after this many µJ.
    max_uj: u64,
    last_uj: u64,
}

impl Domain {
    fn energy_path(&self) -> PathBuf {
        self.dir.join("energy_uj")
    }
}

/// Energy delta between two counter reads, allowing for one wraparound in between. More than
/// one wrap between reads is undetectable, which is why reads should be frequent (at ~100 W a
/// 2^32 µJ range wraps every ~43 s; most CPUs report a larger range).
pub fn counter_delta(old: u64, new: u64, max: u64) -> u64 {
    if new >= old {
        new - old
    } else {
        max.saturating_sub(old) + new
    }
}

/// Sum of every package domain, in joules since [`RaplMeter::open`].
#[derive(Debug)]
pub struct RaplMeter {
    root: PathBuf,
    domains: Vec<Domain>,
    total_uj: u128,
    clock: Box<dyn Clock>,
    last_t: std::time::Duration,
}

impl RaplMeter {
    pub fn open(root: &Path) -> Result<Self, EnergyError> {
        Self::open_with_clock(root, Box::new(MonotonicClock::default()))
    }

    /// Finds the package domains and takes the baseline read. Fails when there are none, or when
    /// the first read does (permission denied is the common case; see the advice in the error).
    pub fn open_with_clock(root: &Path, clock: Box<dyn Clock>) -> Result<Self, EnergyError> {
        let entries = std::fs::read_dir(root).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EnergyError::NotFound {
                kind: MeterKind::Rapl,
                detail: format!(
                    "{} does not exist (not x86, or no powercap)",
                    root.display()
                ),
            },
            _ => EnergyError::from_io(root, e, RAPL_PERMISSION_ADVICE),
        })?;
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| is_top_level_zone(&e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        let mut domains = Vec::new();
        for dir in dirs {
            let name = read_text(&dir.join("name"), RAPL_PERMISSION_ADVICE)?;
            // Only packages: a top-level `psys` zone (platform) already includes the packages,
            // and summing it with them would double-count.
            if !name.starts_with("package") {
                continue;
            }
            let max_uj = read_u64(&dir.join("max_energy_range_uj"), RAPL_PERMISSION_ADVICE)?;
            let last_uj = read_u64(&dir.join("energy_uj"), RAPL_PERMISSION_ADVICE)?;
            domains.push(Domain {
                name,
                dir,
                max_uj,
                last_uj,
            });
        }
        if domains.is_empty() {
            return Err(EnergyError::NotFound {
                kind: MeterKind::Rapl,
                detail: format!("no intel-rapl:N package domain under {}", root.display()),
            });
        }
        let last_t = clock.now();
        Ok(RaplMeter {
            root: root.to_path_buf(),
            domains,
            total_uj: 0,
            clock,
            last_t,
        })
    }
}

/// `intel-rapl:0` yes; `intel-rapl` (the control type) and `intel-rapl:0:1` (subzones, already
/// inside the package) no.
fn is_top_level_zone(name: &str) -> bool {
    name.strip_prefix("intel-rapl:")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl EnergyMeter for RaplMeter {
    fn name(&self) -> String {
        let names: Vec<&str> = self.domains.iter().map(|d| d.name.as_str()).collect();
        format!("rapl:{}", names.join("+"))
    }

    fn kind(&self) -> MeterKind {
        MeterKind::Rapl
    }

    fn estimated(&self) -> bool {
        false
    }

    fn source(&self) -> String {
        self.root.display().to_string()
    }

    fn rails(&self) -> Vec<String> {
        self.domains.iter().map(|d| d.name.clone()).collect()
    }

    fn read(&mut self) -> Result<Sample, EnergyError> {
        // Read every counter before updating any, so a failure leaves the state consistent.
        let mut raw = Vec::with_capacity(self.domains.len());
        for d in &self.domains {
            raw.push(read_u64(&d.energy_path(), RAPL_PERMISSION_ADVICE)?);
        }
        let now = self.clock.now();
        let mut delta_uj: u128 = 0;
        for (d, new) in self.domains.iter_mut().zip(raw) {
            delta_uj += u128::from(counter_delta(d.last_uj, new, d.max_uj));
            d.last_uj = new;
        }
        self.total_uj += delta_uj;
        let dt = now.saturating_sub(self.last_t).as_secs_f64();
        self.last_t = now;
        Ok(Sample {
            joules: self.total_uj as f64 / 1e6,
            watts: (dt > 0.0).then(|| delta_uj as f64 / 1e6 / dt),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::energy::tests::FakeClock;
    use std::time::Duration;

    pub(crate) fn fake_domain(root: &Path, zone: &str, name: &str, energy_uj: u64, max_uj: u64) {
        let dir = root.join(zone);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("name"), format!("{name}\n")).expect("name");
        std::fs::write(dir.join("energy_uj"), format!("{energy_uj}\n")).expect("energy");
        std::fs::write(dir.join("max_energy_range_uj"), format!("{max_uj}\n")).expect("max");
    }

    fn set_energy(root: &Path, zone: &str, energy_uj: u64) {
        std::fs::write(root.join(zone).join("energy_uj"), format!("{energy_uj}\n"))
            .expect("energy");
    }

    #[test]
    fn normal_delta_and_watts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fake_domain(
            root,
            "intel-rapl:0",
            "package-0",
            1_000_000,
            262_143_328_850,
        );
        let clock = FakeClock::default();
        let mut m = RaplMeter::open_with_clock(root, Box::new(clock.clone())).expect("open");
        assert_eq!(m.name(), "rapl:package-0");
        set_energy(root, "intel-rapl:0", 6_000_000);
        clock.advance(Duration::from_secs(1));
        let s = m.read().expect("read");
        assert!((s.joules - 5.0).abs() < 1e-9, "{s:?}");
        assert!((s.watts.expect("watts") - 5.0).abs() < 1e-9);
        set_energy(root, "intel-rapl:0", 8_000_000);
        clock.advance(Duration::from_secs(1));
        let s = m.read().expect("read");
        assert!((s.joules - 7.0).abs() < 1e-9, "{s:?}");
        assert!((s.watts.expect("watts") - 2.0).abs() < 1e-9);
    }

    #[test]
    fn wraparound() {
        assert_eq!(counter_delta(90, 10, 100), 20);
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fake_domain(
            root,
            "intel-rapl:0",
            "package-0",
            999_000_000,
            1_000_000_000,
        );
        let mut m = RaplMeter::open_with_clock(root, Box::new(FakeClock::default())).expect("open");
        set_energy(root, "intel-rapl:0", 2_000_000);
        let s = m.read().expect("read");
        // 1 J up to the wrap, 2 J after it.
        assert!((s.joules - 3.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.watts, None, "no time passed on the fake clock");
    }

    #[test]
    fn sums_packages_and_skips_subzones_and_psys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fake_domain(root, "intel-rapl:0", "package-0", 0, 1 << 40);
        fake_domain(root, "intel-rapl:1", "package-1", 0, 1 << 40);
        fake_domain(root, "intel-rapl:0:0", "core", 0, 1 << 40);
        fake_domain(root, "intel-rapl:2", "psys", 0, 1 << 40);
        std::fs::create_dir_all(root.join("intel-rapl")).expect("mkdir");
        let mut m = RaplMeter::open_with_clock(root, Box::new(FakeClock::default())).expect("open");
        assert_eq!(m.rails(), vec!["package-0", "package-1"]);
        set_energy(root, "intel-rapl:0", 1_000_000);
        set_energy(root, "intel-rapl:1", 2_000_000);
        set_energy(root, "intel-rapl:0:0", 50_000_000);
        set_energy(root, "intel-rapl:2", 50_000_000);
        let s = m.read().expect("read");
        assert!((s.joules - 3.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn missing_root_and_missing_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = RaplMeter::open(&dir.path().join("nope")).expect_err("no root");
        assert!(matches!(err, EnergyError::NotFound { .. }), "{err}");
        let err = RaplMeter::open(dir.path()).expect_err("empty root");
        assert!(matches!(err, EnergyError::NotFound { .. }), "{err}");

        fake_domain(dir.path(), "intel-rapl:0", "package-0", 0, 1 << 32);
        std::fs::remove_file(dir.path().join("intel-rapl:0/max_energy_range_uj")).expect("rm");
        let err = RaplMeter::open(dir.path()).expect_err("no max");
        assert!(matches!(err, EnergyError::Gone { .. }), "{err}");
        assert!(err.to_string().contains("max_energy_range_uj"), "{err}");
    }

    #[test]
    fn garbage_counter_is_a_parse_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_domain(dir.path(), "intel-rapl:0", "package-0", 0, 1 << 32);
        std::fs::write(dir.path().join("intel-rapl:0/energy_uj"), "lots\n").expect("write");
        let err = RaplMeter::open(dir.path()).expect_err("garbage");
        assert!(matches!(err, EnergyError::Parse { .. }), "{err}");
    }

    #[test]
    fn permission_denied_on_energy_uj_gives_rapl_advice() {
        // Root reads mode-000 files, so exercise the mapping the reads use directly.
        let path = Path::new("/sys/class/powercap/intel-rapl:0/energy_uj");
        let err = EnergyError::from_io(
            path,
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            RAPL_PERMISSION_ADVICE,
        );
        let msg = err.to_string();
        assert!(msg.contains("permission denied"), "{msg}");
        assert!(msg.contains("CVE-2020-8694"), "{msg}");
    }

    #[test]
    fn domain_disappearing_mid_run_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_domain(dir.path(), "intel-rapl:0", "package-0", 0, 1 << 32);
        let mut m = RaplMeter::open(dir.path()).expect("open");
        std::fs::remove_dir_all(dir.path().join("intel-rapl:0")).expect("rm");
        let err = m.read().expect_err("gone");
        assert!(matches!(err, EnergyError::Gone { .. }), "{err}");
        assert!(err.to_string().contains("disappeared"), "{err}");
    }
}
