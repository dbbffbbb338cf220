//! Energy meters: how many joules the board has used since we started looking.
//!
//! This module owns the [`EnergyMeter`] trait, the shared error type, meter detection and the
//! `edge-agent energy probe` logic. One file per source:
//!
//! - [`rapl`]: x86 RAPL powercap counters (dev/CI hosts).
//! - [`hwmon`]: the INA3221 hwmon driver on Jetson (JetPack 5+).
//! - [`ina219`]: an external INA219 on an I2C bus (Raspberry Pi 4 has no power ADC of its own).
//! - [`estimate`]: process CPU time × a per-board coefficient, the fallback when nothing measures.
//!
//! Every meter reports *cumulative* joules since it was opened, so a caller attributes energy to
//! an interval by differencing two samples; wraparound and integration live inside the meters.
//! [`sampler`] reads the chosen meter on its own thread; [`attribution`] splits the joules
//! between inferences and escalations for telemetry.

pub mod attribution;
pub mod estimate;
pub mod hwmon;
pub mod ina219;
pub mod rapl;
pub mod sampler;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where a meter's numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterKind {
    Rapl,
    Hwmon,
    Ina219,
    Estimate,
}

impl fmt::Display for MeterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MeterKind::Rapl => "rapl",
            MeterKind::Hwmon => "hwmon",
            MeterKind::Ina219 => "ina219",
            MeterKind::Estimate => "estimate",
        })
    }
}

/// One read of a meter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Joules since the meter was opened. Never decreases: counter wraparound and power
    /// integration are handled by the meter, so callers can difference any two samples.
    pub joules: f64,
    /// Power right now (or averaged since the previous read, for counter-based meters).
    /// `None` when there is no previous read to average over yet.
    pub watts: Option<f64>,
}

/// A [`Sample`] labelled with the meter it came from: what probe prints and what telemetry
/// will ship.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub meter: String,
    pub kind: MeterKind,
    pub estimated: bool,
    pub sample: Sample,
}

/// A source of energy readings.
pub trait EnergyMeter {
    /// Short, stable identifier such as `rapl:package-0` or `hwmon:1-0040`.
    fn name(&self) -> String;
    fn kind(&self) -> MeterKind;
    /// True when the numbers are modelled rather than measured; telemetry must flag them.
    fn estimated(&self) -> bool;
    /// Cumulative joules since the meter was opened.
    fn read(&mut self) -> Result<Sample, EnergyError>;
    /// Where the meter reads from (sysfs path, I2C bus and address, board profile).
    fn source(&self) -> String {
        String::new()
    }
    /// The rails or domains summed into this meter.
    fn rails(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Advice printed with a permission error, per source, so the operator knows what to change.
pub const RAPL_PERMISSION_ADVICE: &str = "energy_uj is root-only since CVE-2020-8694; grant \
     read access to the service user with a systemd-tmpfiles rule (e.g. \
     `z /sys/class/powercap/intel-rapl:*/energy_uj 0444 - - -` in /etc/tmpfiles.d/) or a udev \
     rule on SUBSYSTEM==\"powercap\" that does `chmod o+r`, or `chmod o+r` it by hand until the \
     next boot; or run `edge-agent energy probe` as root to check the counters work";
pub const SYSFS_PERMISSION_ADVICE: &str =
    "the service user cannot read this sysfs file; check its mode and any sandboxing \
     (ProtectKernelTunables, InaccessiblePaths) in the unit";
pub const I2C_PERMISSION_ADVICE: &str = "the service user cannot open the I2C bus; add it to the \
     `i2c` group (`adduser tierd i2c`; the .deb does so where the group exists) and allow the \
     device (DeviceAllow=/dev/i2c-1 rw; do not set PrivateDevices=yes)";

#[derive(Debug, Error)]
pub enum EnergyError {
    #[error("cannot read {}: permission denied; {advice}", path.display())]
    PermissionDenied { path: PathBuf, advice: &'static str },
    #[error(
        "{} has disappeared (driver unloaded or device removed?); \
         run `edge-agent energy probe` to see which meters remain",
        path.display()
    )]
    Gone { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("unexpected contents in {}: {content:?} ({what})", path.display())]
    Parse {
        path: PathBuf,
        content: String,
        what: &'static str,
    },
    #[error("no {kind} meter found: {detail}")]
    NotFound { kind: MeterKind, detail: String },
    #[error("I2C error talking to INA219 at {location}: {detail}; check wiring, address and bus")]
    Bus { location: String, detail: String },
    #[error("invalid energy meter configuration: {0}")]
    Config(String),
}

impl EnergyError {
    /// Maps an I/O error on `path` to an error that says what to do about it. Kept separate from
    /// the reads so the mapping is unit-tested directly: tests run as root, where a mode-000 file
    /// is still readable and permission denied cannot be produced on disk.
    pub fn from_io(path: &Path, err: io::Error, advice: &'static str) -> Self {
        match err.kind() {
            io::ErrorKind::PermissionDenied => EnergyError::PermissionDenied {
                path: path.to_path_buf(),
                advice,
            },
            io::ErrorKind::NotFound => EnergyError::Gone {
                path: path.to_path_buf(),
            },
            _ => EnergyError::Io {
                path: path.to_path_buf(),
                source: err,
            },
        }
    }
}

/// Reads a sysfs attribute and parses it as an unsigned integer.
pub(crate) fn read_u64(path: &Path, advice: &'static str) -> Result<u64, EnergyError> {
    let text = std::fs::read_to_string(path).map_err(|e| EnergyError::from_io(path, e, advice))?;
    text.trim().parse().map_err(|_| EnergyError::Parse {
        path: path.to_path_buf(),
        content: text.trim().to_string(),
        what: "expected an unsigned integer",
    })
}

/// Reads a short sysfs text attribute (`name`, `in1_label`), trimmed.
pub(crate) fn read_text(path: &Path, advice: &'static str) -> Result<String, EnergyError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| EnergyError::from_io(path, e, advice))
}

/// Monotonic time, injectable so integration can be tested with a fake clock.
pub trait Clock: Send + fmt::Debug {
    /// Time since an arbitrary fixed origin.
    fn now(&self) -> Duration;
}

/// The real clock: `Instant` since construction.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Integrates instantaneous power into joules with the trapezoid rule, for meters that have no
/// energy counter (INA3221, INA219). Accuracy depends on the read rate: power spikes between
/// reads are invisible, so callers should read at least once a second.
#[derive(Debug, Clone)]
pub(crate) struct Integrator {
    last: (Duration, f64),
    joules: f64,
}

impl Integrator {
    pub(crate) fn new(t: Duration, watts: f64) -> Self {
        Integrator {
            last: (t, watts),
            joules: 0.0,
        }
    }

    pub(crate) fn update(&mut self, t: Duration, watts: f64) -> Sample {
        let (t0, w0) = self.last;
        // A clock that does not advance (two reads in the same tick) adds nothing rather than
        // going negative.
        let dt = t.saturating_sub(t0).as_secs_f64();
        self.joules += (w0 + watts) / 2.0 * dt;
        self.last = (t, watts);
        Sample {
            joules: self.joules,
            watts: Some(watts),
        }
    }
}

/// The system paths detection looks at; `Default` is the real system, tests point them at a
/// fake tree (the `JTOP_TESTING`/`/fake_sys` pattern).
#[derive(Debug, Clone)]
pub struct Roots {
    pub powercap: PathBuf,
    pub hwmon_class: PathBuf,
    pub ina3221_driver: PathBuf,
    pub device_tree_model: PathBuf,
    pub proc_self_stat: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            powercap: PathBuf::from(rapl::DEFAULT_ROOT),
            hwmon_class: PathBuf::from(hwmon::DEFAULT_CLASS_ROOT),
            ina3221_driver: PathBuf::from(hwmon::DEFAULT_DRIVER_ROOT),
            device_tree_model: PathBuf::from(estimate::DEFAULT_MODEL_PATH),
            proc_self_stat: PathBuf::from(estimate::DEFAULT_STAT_PATH),
        }
    }
}

/// An external INA219 to use; there is no way to probe for one safely, so it must be configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ina219Config {
    /// I2C bus device, e.g. `/dev/i2c-1`.
    pub bus: PathBuf,
    /// 7-bit address, 0x40–0x4F depending on A0/A1 straps.
    pub address: u8,
    /// Shunt resistor in ohms (0.1 on most breakout boards).
    pub shunt_ohms: f64,
    /// Largest current expected; sets the resolution (current LSB = max / 32768).
    pub max_current_a: f64,
}

/// Which source to use: `[energy] source = "..."` in agent.toml.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnergySource {
    /// Every measured source that works, else the estimate.
    #[default]
    Auto,
    Rapl,
    Hwmon,
    Ina219,
    Estimate,
}

/// What detection found, and why the other sources were skipped (probe prints both).
pub struct Detection {
    pub meters: Vec<Box<dyn EnergyMeter + Send>>,
    pub skipped: Vec<(MeterKind, EnergyError)>,
}

/// Tries RAPL and hwmon (and the INA219 when configured); falls back to the CPU-time estimate
/// when nothing measured works, so there is always at least one meter.
pub fn detect(roots: &Roots, ina219: Option<&Ina219Config>) -> Vec<Box<dyn EnergyMeter + Send>> {
    detect_source(EnergySource::Auto, roots, ina219).meters
}

/// Detection restricted to `source`. An explicitly chosen source that fails still falls back to
/// the estimate, with the failure in `skipped`, so the agent keeps running.
pub fn detect_source(
    source: EnergySource,
    roots: &Roots,
    ina219: Option<&Ina219Config>,
) -> Detection {
    let mut found = Detection {
        meters: Vec::new(),
        skipped: Vec::new(),
    };
    let want = |k: EnergySource| source == EnergySource::Auto || source == k;
    if want(EnergySource::Rapl) {
        match rapl::RaplMeter::open(&roots.powercap) {
            Ok(m) => found.meters.push(Box::new(m)),
            Err(e) => found.skipped.push((MeterKind::Rapl, e)),
        }
    }
    if want(EnergySource::Hwmon) {
        match hwmon::discover(&roots.hwmon_class, &roots.ina3221_driver) {
            Ok(dirs) => {
                for dir in dirs {
                    match hwmon::HwmonMeter::open(&dir, &hwmon::RailSelection::Default) {
                        Ok(m) => found.meters.push(Box::new(m)),
                        Err(e) => found.skipped.push((MeterKind::Hwmon, e)),
                    }
                }
            }
            Err(e) => found.skipped.push((MeterKind::Hwmon, e)),
        }
    }
    if want(EnergySource::Ina219) {
        match ina219 {
            Some(cfg) => match ina219::open_linux(cfg) {
                Ok(m) => found.meters.push(m),
                Err(e) => found.skipped.push((MeterKind::Ina219, e)),
            },
            None if source == EnergySource::Ina219 => found.skipped.push((
                MeterKind::Ina219,
                EnergyError::Config("source is ina219 but no INA219 is configured".into()),
            )),
            None => {}
        }
    }
    if found.meters.is_empty() {
        match estimate::EstimateMeter::detect(&roots.device_tree_model, &roots.proc_self_stat) {
            Ok(m) => found.meters.push(Box::new(m)),
            Err(e) => found.skipped.push((MeterKind::Estimate, e)),
        }
    }
    found
}

/// Reads every meter once, labelling the results.
pub fn read_all(meters: &mut [Box<dyn EnergyMeter + Send>]) -> Vec<Result<Reading, EnergyError>> {
    meters
        .iter_mut()
        .map(|m| {
            m.read().map(|sample| Reading {
                meter: m.name(),
                kind: m.kind(),
                estimated: m.estimated(),
                sample,
            })
        })
        .collect()
}

/// `edge-agent energy probe`: list what was detected, then print one reading per meter per
/// second for `seconds` seconds. Writes to `out` so it can be tested.
pub fn probe(
    roots: &Roots,
    source: EnergySource,
    ina219: Option<&Ina219Config>,
    seconds: u64,
    out: &mut dyn io::Write,
) -> io::Result<()> {
    let Detection {
        mut meters,
        skipped,
    } = detect_source(source, roots, ina219);
    for (kind, why) in &skipped {
        writeln!(out, "skipped   {kind}: {why}")?;
    }
    if meters.is_empty() {
        writeln!(out, "no energy meter available")?;
        return Ok(());
    }
    for m in &meters {
        let rails = m.rails();
        writeln!(
            out,
            "meter     {} kind={} {} source={}{}",
            m.name(),
            m.kind(),
            if m.estimated() {
                "ESTIMATED"
            } else {
                "measured"
            },
            m.source(),
            if rails.is_empty() {
                String::new()
            } else {
                format!(" rails={}", rails.join("+"))
            }
        )?;
    }
    writeln!(
        out,
        "reading every 1 s for {seconds} s; each second spins one core for {} ms so the \
         readings move (the estimate only counts this process's CPU time)",
        PROBE_LOAD.as_millis()
    )?;
    for tick in 1..=seconds {
        spin(PROBE_LOAD);
        std::thread::sleep(Duration::from_secs(1).saturating_sub(PROBE_LOAD));
        let names: Vec<String> = meters.iter().map(|m| m.name()).collect();
        for (name, r) in names.iter().zip(read_all(&mut meters)) {
            match r {
                Ok(r) => writeln!(
                    out,
                    "t={tick:>3}s  {:<28} {:>9} {:>12.3} J{}",
                    r.meter,
                    r.sample
                        .watts
                        .map_or_else(|| "-".to_string(), |w| format!("{w:.3} W")),
                    r.sample.joules,
                    if r.estimated { "  (estimated)" } else { "" }
                )?,
                Err(e) => writeln!(out, "t={tick:>3}s  {name:<28} error: {e}")?,
            }
        }
    }
    Ok(())
}

/// CPU load the probe generates each second.
const PROBE_LOAD: Duration = Duration::from_millis(200);

/// Busy-waits for `d`: a known load, so a meter that does not move is visibly broken.
fn spin(d: Duration) {
    let start = Instant::now();
    let mut x: u64 = 1;
    while start.elapsed() < d {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A clock tests advance by hand; clones share the time.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct FakeClock(Arc<AtomicU64>);

    impl FakeClock {
        pub(crate) fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    #[test]
    fn permission_denied_maps_to_advice() {
        let e = EnergyError::from_io(
            Path::new("/sys/class/powercap/intel-rapl:0/energy_uj"),
            io::Error::from(io::ErrorKind::PermissionDenied),
            RAPL_PERMISSION_ADVICE,
        );
        assert!(matches!(e, EnergyError::PermissionDenied { .. }));
        let msg = e.to_string();
        assert!(msg.contains("CVE-2020-8694"), "{msg}");
        assert!(msg.contains("tmpfiles"), "{msg}");
        assert!(msg.contains("udev"), "{msg}");
        assert!(msg.contains("edge-agent energy probe"), "{msg}");
    }

    #[test]
    fn not_found_maps_to_gone() {
        let e = EnergyError::from_io(
            Path::new("/x"),
            io::Error::from(io::ErrorKind::NotFound),
            SYSFS_PERMISSION_ADVICE,
        );
        assert!(matches!(e, EnergyError::Gone { .. }));
    }

    #[test]
    fn integrator_trapezoid() {
        let mut i = Integrator::new(Duration::ZERO, 2.0);
        let s = i.update(Duration::from_secs(2), 4.0);
        assert!((s.joules - 6.0).abs() < 1e-9);
        // Same instant again adds nothing.
        let s = i.update(Duration::from_secs(2), 4.0);
        assert!((s.joules - 6.0).abs() < 1e-9);
    }

    #[test]
    fn energy_source_serde_snake_case() {
        #[derive(Deserialize)]
        struct T {
            source: EnergySource,
        }
        let t: T = toml::from_str("source = \"ina219\"").expect("parse");
        assert_eq!(t.source, EnergySource::Ina219);
        let t: T = toml::from_str("source = \"auto\"").expect("parse");
        assert_eq!(t.source, EnergySource::Auto);
        assert!(toml::from_str::<T>("source = \"Rapl\"").is_err());
    }

    fn empty_roots(dir: &Path) -> Roots {
        Roots {
            powercap: dir.join("powercap"),
            hwmon_class: dir.join("hwmon"),
            ina3221_driver: dir.join("ina3221"),
            device_tree_model: dir.join("model"),
            proc_self_stat: PathBuf::from(estimate::DEFAULT_STAT_PATH),
        }
    }

    #[test]
    fn detect_falls_back_to_estimate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = detect_source(EnergySource::Auto, &empty_roots(dir.path()), None);
        assert_eq!(d.meters.len(), 1);
        assert_eq!(d.meters[0].kind(), MeterKind::Estimate);
        assert!(d.meters[0].estimated());
        assert!(d.skipped.iter().any(|(k, _)| *k == MeterKind::Rapl));
    }

    #[test]
    fn detect_prefers_measured_rapl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = empty_roots(dir.path());
        rapl::tests::fake_domain(&roots.powercap, "intel-rapl:0", "package-0", 1000, 1 << 32);
        let d = detect(&roots, None);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].kind(), MeterKind::Rapl);
        assert!(!d[0].estimated());
    }

    #[test]
    fn explicit_ina219_without_config_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = detect_source(EnergySource::Ina219, &empty_roots(dir.path()), None);
        assert!(d
            .skipped
            .iter()
            .any(|(k, e)| *k == MeterKind::Ina219 && matches!(e, EnergyError::Config(_))));
        assert_eq!(d.meters[0].kind(), MeterKind::Estimate);
    }

    #[test]
    fn probe_prints_meters_and_readings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = Vec::new();
        probe(
            &empty_roots(dir.path()),
            EnergySource::Auto,
            None,
            1,
            &mut out,
        )
        .expect("probe");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("kind=estimate ESTIMATED"), "{text}");
        assert!(text.contains("t=  1s"), "{text}");
    }
}
