//! The background thread that reads the chosen meter at a steady rate.
//!
//! Meter reads are blocking file or I2C reads, and the integrating meters (hwmon, INA219) are
//! only as accurate as their read rate, so they run on their own thread rather than on the
//! telemetry tick. Telemetry reads the latest cumulative figure from [`EnergyState`].
//!
//! A meter that fails keeps its last good total; one that disappears (driver unloaded, rail
//! gone) is replaced by the CPU-time estimate, flagged, with the reason kept for the report,
//! so the agent never reports a silent zero and never stops serving over a meter.

use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, warn};

use super::{detect_source, EnergyError, EnergyMeter, EnergySource, Ina219Config, Roots};

/// What telemetry needs from the meter: cumulative joules and where they come from.
#[derive(Debug, Clone, PartialEq)]
pub struct EnergyState {
    /// `kind:name` of the meter in use, or `none` when even the estimate failed.
    pub meter: String,
    pub estimated: bool,
    /// True for meters that only see this process (the estimate).
    pub process_only: bool,
    /// Joules since the sampler started; survives a switch of meter.
    pub joules: Option<f64>,
    pub watts: Option<f64>,
    pub error: Option<String>,
}

pub struct Sampler {
    state: Arc<Mutex<EnergyState>>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Detects the meter for `source` and starts sampling it every `every`.
    pub fn start(
        source: EnergySource,
        roots: Roots,
        ina219: Option<Ina219Config>,
        every: Duration,
    ) -> std::io::Result<Self> {
        let detection = detect_source(source, &roots, ina219.as_ref());
        for (kind, why) in &detection.skipped {
            if source == EnergySource::Auto {
                debug!(%kind, %why, "energy meter not used");
            } else {
                warn!(%kind, %why, "configured energy meter unavailable; using the estimate");
            }
        }
        let skipped_error = (source != EnergySource::Auto)
            .then(|| detection.skipped.first().map(|(_, e)| e.to_string()))
            .flatten();
        let meter = detection.meters.into_iter().next();
        let state = Arc::new(Mutex::new(EnergyState {
            meter: meter.as_ref().map(|m| m.name()).unwrap_or("none".into()),
            estimated: meter.as_ref().is_none_or(|m| m.estimated()),
            process_only: meter.as_ref().is_some_and(|m| m.estimated()),
            joules: None,
            watts: None,
            error: skipped_error.or_else(|| {
                meter
                    .is_none()
                    .then(|| "no energy meter works on this machine".into())
            }),
        }));
        let (stop, stop_rx) = mpsc::channel();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("energy-sampler".into())
            .spawn(move || sample_loop(meter, roots, every, &shared, &stop_rx))?;
        Ok(Sampler {
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn state(&self) -> EnergyState {
        match self.state.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sample_loop(
    mut meter: Option<Box<dyn EnergyMeter + Send>>,
    roots: Roots,
    every: Duration,
    state: &Mutex<EnergyState>,
    stop: &mpsc::Receiver<()>,
) {
    // Joules accumulated by meters replaced after failing, so the total never goes backwards.
    let mut carried = 0.0;
    let mut last_good = 0.0;
    loop {
        if let Some(m) = meter.as_mut() {
            let result = m.read();
            let Ok(mut s) = state.lock() else { return };
            match result {
                Ok(sample) => {
                    last_good = sample.joules;
                    s.joules = Some(carried + sample.joules);
                    s.watts = sample.watts;
                }
                Err(e) => {
                    warn!(meter = %s.meter, error = %e, "energy meter read failed");
                    s.error = Some(format!("{}: {e}", s.meter));
                    if matches!(e, EnergyError::Gone { .. }) && !m.estimated() {
                        carried += last_good;
                        last_good = 0.0;
                        let fallback = detect_source(EnergySource::Estimate, &roots, None)
                            .meters
                            .into_iter()
                            .next();
                        s.meter = fallback.as_ref().map(|m| m.name()).unwrap_or("none".into());
                        s.estimated = true;
                        s.process_only = true;
                        meter = fallback;
                    }
                }
            }
        }
        match stop.recv_timeout(every) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_rapl(dir: &std::path::Path, uj: u64) {
        let d = dir.join("intel-rapl:0");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("name"), "package-0\n").expect("w");
        std::fs::write(d.join("energy_uj"), format!("{uj}\n")).expect("w");
        std::fs::write(d.join("max_energy_range_uj"), "262143328850\n").expect("w");
    }

    fn roots(tmp: &std::path::Path) -> Roots {
        Roots {
            powercap: tmp.join("powercap"),
            hwmon_class: tmp.join("hwmon"),
            ina3221_driver: tmp.join("ina3221"),
            device_tree_model: tmp.join("model"),
            proc_self_stat: std::path::PathBuf::from(super::super::estimate::DEFAULT_STAT_PATH),
        }
    }

    fn wait_for(s: &Sampler, what: impl Fn(&EnergyState) -> bool) -> EnergyState {
        for _ in 0..500 {
            let st = s.state();
            if what(&st) {
                return st;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        s.state()
    }

    #[test]
    fn measured_meter_then_estimate_when_it_disappears() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let r = roots(tmp.path());
        fake_rapl(&r.powercap, 1_000_000);
        let s = Sampler::start(
            EnergySource::Auto,
            r.clone(),
            None,
            Duration::from_millis(5),
        )
        .expect("start");
        let st = s.state();
        assert!(st.meter.starts_with("rapl"), "{st:?}");
        assert!(!st.estimated);
        fake_rapl(&r.powercap, 3_500_000);
        let st = wait_for(&s, |st| st.joules == Some(2.5));
        assert_eq!(st.joules, Some(2.5));
        // The counter vanishes: the sampler keeps the 2.5 J and carries on with the estimate.
        std::fs::remove_dir_all(&r.powercap).expect("rm");
        let st = wait_for(&s, |st| st.estimated);
        assert!(st.meter.starts_with("estimate"), "{st:?}");
        assert!(
            st.error.as_deref().unwrap_or("").contains("disappeared"),
            "{st:?}"
        );
        assert!(st.joules.unwrap_or(0.0) >= 2.5, "{st:?}");
    }

    #[test]
    fn unavailable_configured_source_says_why() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = Sampler::start(
            EnergySource::Rapl,
            roots(tmp.path()),
            None,
            Duration::from_millis(5),
        )
        .expect("start");
        let st = s.state();
        assert!(st.estimated && st.meter.starts_with("estimate"), "{st:?}");
        assert!(st.error.is_some(), "{st:?}");
    }
}
