//! Jetson power rails through the mainline `ina3221` hwmon driver (JetPack 5+).
//!
//! Owns discovery of INA3221 hwmon directories and turning their per-rail voltage and current
//! into integrated joules. The chip has no energy counter, so power (V·I) is integrated between
//! reads; the kernel owns the chip on Jetson, so we read sysfs rather than opening I2C.
//! JetPack 4's `ina3221x` IIO driver is not supported.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{
    read_text, read_u64, Clock, EnergyError, EnergyMeter, Integrator, MeterKind, MonotonicClock,
    Sample, SYSFS_PERMISSION_ADVICE,
};

pub const DEFAULT_CLASS_ROOT: &str = "/sys/class/hwmon";
pub const DEFAULT_DRIVER_ROOT: &str = "/sys/bus/i2c/drivers/ina3221";

/// The rail that measures the whole module's input on Orin Nano/NX; when present it already
/// includes the others, so it is the default total (as jtop does).
pub const TOTAL_RAIL: &str = "VDD_IN";

/// Finds INA3221 hwmon directories. `hwmonN` numbering depends on probe order and changes
/// between boots, so look both for `name == ina3221` under the class and for whatever `hwmon*`
/// sits under the driver's devices; duplicates (the class entries are symlinks) are merged.
pub fn discover(class_root: &Path, driver_root: &Path) -> Result<Vec<PathBuf>, EnergyError> {
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    let mut add = |dir: PathBuf| {
        let key = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        if seen.insert(key) {
            found.push(dir);
        }
    };
    for dir in subdirs(driver_root) {
        for hw in subdirs(&dir.join("hwmon")) {
            if hw
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("hwmon"))
            {
                add(hw);
            }
        }
    }
    for dir in subdirs(class_root) {
        if read_text(&dir.join("name"), SYSFS_PERMISSION_ADVICE).is_ok_and(|n| n == "ina3221") {
            add(dir);
        }
    }
    if found.is_empty() {
        return Err(EnergyError::NotFound {
            kind: MeterKind::Hwmon,
            detail: format!(
                "no ina3221 hwmon device under {} or {}",
                driver_root.display(),
                class_root.display()
            ),
        });
    }
    Ok(found)
}

/// Subdirectories (following symlinks), sorted; a missing or unreadable directory is empty,
/// since absence is the normal case on boards without the chip.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// Which rails one meter sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RailSelection {
    /// [`TOTAL_RAIL`] when the chip has it, else every connected rail summed.
    Default,
    /// These labels, summed; each must exist.
    Labels(Vec<String>),
}

#[derive(Debug, Clone)]
struct Rail {
    label: String,
    /// `inN_input`: bus voltage in mV.
    volts_path: PathBuf,
    /// `currN_input`: current in mA.
    amps_path: PathBuf,
}

impl Rail {
    fn watts(&self) -> Result<f64, EnergyError> {
        let mv = read_u64(&self.volts_path, SYSFS_PERMISSION_ADVICE)?;
        let ma = read_u64(&self.amps_path, SYSFS_PERMISSION_ADVICE)?;
        Ok(mv as f64 * ma as f64 / 1e6)
    }
}

/// One INA3221 chip's selected rails, integrated.
#[derive(Debug)]
pub struct HwmonMeter {
    dir: PathBuf,
    chip: String,
    rails: Vec<Rail>,
    clock: Box<dyn Clock>,
    integrator: Integrator,
}

impl HwmonMeter {
    pub fn open(dir: &Path, selection: &RailSelection) -> Result<Self, EnergyError> {
        Self::open_with_clock(dir, selection, Box::new(MonotonicClock::default()))
    }

    /// Reads the rail labels, applies `selection` and takes the first power reading, which
    /// starts the integration.
    pub fn open_with_clock(
        dir: &Path,
        selection: &RailSelection,
        clock: Box<dyn Clock>,
    ) -> Result<Self, EnergyError> {
        let mut all = Vec::new();
        for n in 1..=3 {
            let Ok(label) = read_text(&dir.join(format!("in{n}_label")), SYSFS_PERMISSION_ADVICE)
            else {
                continue; // channel without a label: not wired up on this board
            };
            // "NC" marks an unconnected channel (AGX Orin's second chip); jtop skips them too.
            if label.is_empty() || label.starts_with("NC") {
                continue;
            }
            all.push(Rail {
                label,
                volts_path: dir.join(format!("in{n}_input")),
                amps_path: dir.join(format!("curr{n}_input")),
            });
        }
        let rails: Vec<Rail> = match selection {
            RailSelection::Default => match all.iter().find(|r| r.label == TOTAL_RAIL) {
                Some(total) => vec![total.clone()],
                None => all.clone(),
            },
            RailSelection::Labels(wanted) => {
                let mut picked = Vec::new();
                for w in wanted {
                    match all.iter().find(|r| &r.label == w) {
                        Some(r) => picked.push(r.clone()),
                        None => {
                            let have: Vec<&str> = all.iter().map(|r| r.label.as_str()).collect();
                            return Err(EnergyError::Config(format!(
                                "rail {w:?} not found in {}; it has {have:?}",
                                dir.display()
                            )));
                        }
                    }
                }
                picked
            }
        };
        if rails.is_empty() {
            return Err(EnergyError::NotFound {
                kind: MeterKind::Hwmon,
                detail: format!("no labelled rails in {}", dir.display()),
            });
        }
        let watts = sum_watts(&rails)?;
        let integrator = Integrator::new(clock.now(), watts);
        Ok(HwmonMeter {
            dir: dir.to_path_buf(),
            chip: chip_id(dir),
            rails,
            clock,
            integrator,
        })
    }
}

fn sum_watts(rails: &[Rail]) -> Result<f64, EnergyError> {
    rails.iter().map(Rail::watts).sum()
}

/// `1-0040` for `.../ina3221/1-0040/hwmon/hwmon2` (bus-address, stable across boots), else the
/// directory's own name.
fn chip_id(dir: &Path) -> String {
    let real = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let parent = real.parent();
    match (
        parent.and_then(Path::file_name),
        parent.and_then(Path::parent),
    ) {
        (Some(p), Some(gp)) if p == "hwmon" => gp
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        _ => real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

impl EnergyMeter for HwmonMeter {
    fn name(&self) -> String {
        format!("hwmon:{}", self.chip)
    }

    fn kind(&self) -> MeterKind {
        MeterKind::Hwmon
    }

    fn estimated(&self) -> bool {
        false
    }

    fn source(&self) -> String {
        self.dir.display().to_string()
    }

    fn rails(&self) -> Vec<String> {
        self.rails.iter().map(|r| r.label.clone()).collect()
    }

    fn read(&mut self) -> Result<Sample, EnergyError> {
        let watts = sum_watts(&self.rails)?;
        Ok(self.integrator.update(self.clock.now(), watts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::tests::FakeClock;
    use std::time::Duration;

    fn fake_chip(dir: &Path, rails: &[(u32, &str, u64, u64)]) {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("name"), "ina3221\n").expect("name");
        for &(n, label, mv, ma) in rails {
            std::fs::write(dir.join(format!("in{n}_label")), format!("{label}\n")).expect("w");
            set_rail(dir, n, mv, ma);
        }
    }

    fn set_rail(dir: &Path, n: u32, mv: u64, ma: u64) {
        std::fs::write(dir.join(format!("in{n}_input")), format!("{mv}\n")).expect("w");
        std::fs::write(dir.join(format!("curr{n}_input")), format!("{ma}\n")).expect("w");
    }

    const ORIN_NANO: &[(u32, &str, u64, u64)] = &[
        (1, "VDD_IN", 5000, 1000),
        (2, "VDD_CPU_GPU_CV", 5000, 200),
        (3, "VDD_SOC", 5000, 300),
    ];

    #[test]
    fn discovers_chips_whatever_their_hwmon_number() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let class = tmp.path().join("class");
        let driver = tmp.path().join("driver");
        // Chip 1 via the driver, with the class entry a symlink to it (as in real sysfs).
        let chip1 = driver.join("1-0040/hwmon/hwmon7");
        fake_chip(&chip1, ORIN_NANO);
        std::fs::create_dir_all(&class).expect("mkdir");
        std::os::unix::fs::symlink(&chip1, class.join("hwmon7")).expect("symlink");
        // An unrelated sensor.
        std::fs::create_dir_all(class.join("hwmon0")).expect("mkdir");
        std::fs::write(class.join("hwmon0/name"), "coretemp\n").expect("w");
        // Chip 2 only visible through the class (driver dir absent for it).
        fake_chip(&class.join("hwmon12"), &[(1, "VDDQ_VDD2_1V8AO", 1800, 100)]);

        let found = discover(&class, &driver).expect("discover");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.contains(&chip1));
        assert!(found.contains(&class.join("hwmon12")));
        let m = HwmonMeter::open(&chip1, &RailSelection::Default).expect("open");
        assert_eq!(m.name(), "hwmon:1-0040");
    }

    #[test]
    fn discovery_without_chip_is_not_found() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = discover(&tmp.path().join("a"), &tmp.path().join("b")).expect_err("none");
        assert!(matches!(err, EnergyError::NotFound { .. }), "{err}");
    }

    #[test]
    fn integrates_power_over_two_reads() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("hwmon3");
        fake_chip(&dir, ORIN_NANO);
        let clock = FakeClock::default();
        let mut m =
            HwmonMeter::open_with_clock(&dir, &RailSelection::Default, Box::new(clock.clone()))
                .expect("open");
        // 5 V × 1 A = 5 W at open; 5 V × 2 A = 10 W two seconds later: (5 + 10) / 2 × 2 = 15 J.
        set_rail(&dir, 1, 5000, 2000);
        clock.advance(Duration::from_secs(2));
        let s = m.read().expect("read");
        assert!((s.joules - 15.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.watts, Some(10.0));
        clock.advance(Duration::from_secs(1));
        let s = m.read().expect("read");
        assert!((s.joules - 25.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn rail_selection() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("hwmon1");
        fake_chip(&dir, ORIN_NANO);
        let m = HwmonMeter::open(&dir, &RailSelection::Default).expect("open");
        assert_eq!(m.rails(), vec!["VDD_IN"]);

        let pick = RailSelection::Labels(vec!["VDD_SOC".into(), "VDD_CPU_GPU_CV".into()]);
        let clock = FakeClock::default();
        let mut m =
            HwmonMeter::open_with_clock(&dir, &pick, Box::new(clock.clone())).expect("open");
        assert_eq!(m.rails(), vec!["VDD_SOC", "VDD_CPU_GPU_CV"]);
        clock.advance(Duration::from_secs(1));
        // 5 V × (0.3 + 0.2) A = 2.5 W for 1 s.
        let s = m.read().expect("read");
        assert!((s.joules - 2.5).abs() < 1e-9, "{s:?}");

        let err = HwmonMeter::open(&dir, &RailSelection::Labels(vec!["VDD_GPU".into()]))
            .expect_err("no such rail");
        assert!(matches!(err, EnergyError::Config(_)), "{err}");
        assert!(
            err.to_string().contains("VDD_SOC"),
            "lists what exists: {err}"
        );
    }

    #[test]
    fn default_sums_all_rails_without_vdd_in_and_skips_nc() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("hwmon1");
        fake_chip(
            &dir,
            &[
                (1, "VDD_GPU_SOC", 5000, 1000),
                (2, "VDD_CPU_CV", 5000, 1000),
                (3, "NC", 5000, 1000),
            ],
        );
        let clock = FakeClock::default();
        let mut m =
            HwmonMeter::open_with_clock(&dir, &RailSelection::Default, Box::new(clock.clone()))
                .expect("open");
        assert_eq!(m.rails(), vec!["VDD_GPU_SOC", "VDD_CPU_CV"]);
        clock.advance(Duration::from_secs(1));
        let s = m.read().expect("read");
        assert!((s.joules - 10.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn rail_disappearing_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("hwmon1");
        fake_chip(&dir, ORIN_NANO);
        let mut m = HwmonMeter::open(&dir, &RailSelection::Default).expect("open");
        std::fs::remove_file(dir.join("curr1_input")).expect("rm");
        let err = m.read().expect_err("gone");
        assert!(matches!(err, EnergyError::Gone { .. }), "{err}");
        assert!(err.to_string().contains("curr1_input"), "{err}");
    }
}
