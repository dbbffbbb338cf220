//! An external TI INA219 current/power monitor on an I2C bus (Raspberry Pi 4, which has no power
//! ADC, or any board with one wired into its supply).
//!
//! Owns the calibration maths, the register reads and integrating the power register into
//! joules. Generic over `embedded_hal::i2c::I2c` (1.0) so tests run against embedded-hal-mock;
//! on Linux [`Ina219Meter::open`] uses `/dev/i2c-N` through linux-embedded-hal.
//!
//! Why not the `ina219` crate (0.2.1): its constructor resets the chip, polls, and (default
//! `paranoid` feature) reads back every register, and whether it uses combined I2C transactions
//! is a compile-time feature (`no_transaction`, required on the Pi). That makes the exact bus
//! traffic depend on feature flags, so mock tests would pin the crate's internals, and its
//! errors carry the bus handle back. We need four registers; owning them is ~50 lines with bus
//! traffic we control.

use embedded_hal::i2c::I2c;

use super::{Clock, EnergyError, EnergyMeter, Integrator, MeterKind, MonotonicClock, Sample};

const REG_BUS_VOLTAGE: u8 = 0x02;
const REG_POWER: u8 = 0x03;
const REG_CALIBRATION: u8 = 0x05;

/// Bus voltage register bit 0: the power/current calculation overflowed, so the power register
/// is meaningless for this conversion.
const BUS_OVF: u16 = 0x0001;

/// Calibration register value and the resulting power LSB in watts (datasheet §8.5.1:
/// `Cal = trunc(0.04096 / (Current_LSB × R_shunt))`, `Power_LSB = 20 × Current_LSB`).
pub fn calibration(shunt_ohms: f64, max_current_a: f64) -> Result<(u16, f64), EnergyError> {
    if !(shunt_ohms.is_finite() && shunt_ohms > 0.0) {
        return Err(EnergyError::Config(format!(
            "INA219 shunt_ohms must be > 0, got {shunt_ohms}"
        )));
    }
    if !(max_current_a.is_finite() && max_current_a > 0.0) {
        return Err(EnergyError::Config(format!(
            "INA219 max_current_a must be > 0, got {max_current_a}"
        )));
    }
    // The current register is signed 16-bit, so the smallest LSB that still fits max current.
    let current_lsb = max_current_a / 32768.0;
    let cal = (0.04096 / (current_lsb * shunt_ohms)).trunc();
    if !(2.0..=65534.0).contains(&cal) {
        return Err(EnergyError::Config(format!(
            "INA219 calibration {cal} out of range for shunt {shunt_ohms} Ω and \
             max {max_current_a} A; check both values"
        )));
    }
    // Bit 0 of the register is read-only zero; use the value the chip will actually hold and
    // derive the LSB back from it so rounding does not bias every reading.
    let cal = (cal as u16) & 0xFFFE;
    let actual_current_lsb = 0.04096 / (f64::from(cal) * shunt_ohms);
    Ok((cal, 20.0 * actual_current_lsb))
}

/// An INA219 meter; `I2C` is the bus (a mock in tests).
pub struct Ina219Meter<I2C> {
    i2c: I2C,
    address: u8,
    /// `bus:0xADDR`, for names and error messages.
    location: String,
    power_lsb_w: f64,
    clock: Box<dyn Clock>,
    integrator: Integrator,
}

// By hand: the bus handle (I2cdev) is not Debug, and callers only need the location.
impl<I2C> std::fmt::Debug for Ina219Meter<I2C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ina219Meter")
            .field("location", &self.location)
            .field("address", &self.address)
            .field("power_lsb_w", &self.power_lsb_w)
            .field("integrator", &self.integrator)
            .finish_non_exhaustive()
    }
}

impl<I2C: I2c> Ina219Meter<I2C> {
    pub fn new(
        i2c: I2C,
        address: u8,
        shunt_ohms: f64,
        max_current_a: f64,
        location: String,
    ) -> Result<Self, EnergyError> {
        Self::with_clock(
            i2c,
            address,
            shunt_ohms,
            max_current_a,
            location,
            Box::new(MonotonicClock::default()),
        )
    }

    /// Writes the calibration register (the power register reads 0 until it is set) and takes
    /// the first power reading, which starts the integration. The power-on configuration
    /// (32 V range, ±320 mV shunt, 12-bit, continuous) is left as is.
    pub fn with_clock(
        i2c: I2C,
        address: u8,
        shunt_ohms: f64,
        max_current_a: f64,
        location: String,
        clock: Box<dyn Clock>,
    ) -> Result<Self, EnergyError> {
        if !(0x40..=0x4F).contains(&address) {
            return Err(EnergyError::Config(format!(
                "INA219 address 0x{address:02x} is outside 0x40-0x4f"
            )));
        }
        let (cal, power_lsb_w) = calibration(shunt_ohms, max_current_a)?;
        let mut meter = Ina219Meter {
            i2c,
            address,
            location,
            power_lsb_w,
            integrator: Integrator::new(clock.now(), 0.0),
            clock,
        };
        let [hi, lo] = cal.to_be_bytes();
        meter
            .i2c
            .write(address, &[REG_CALIBRATION, hi, lo])
            .map_err(|e| meter.bus_error(e))?;
        let watts = meter.read_watts()?;
        meter.integrator = Integrator::new(meter.clock.now(), watts);
        Ok(meter)
    }

    /// Gives the bus back (tests call `done()` on the mock).
    pub fn release(self) -> I2C {
        self.i2c
    }

    fn bus_error(&self, e: I2C::Error) -> EnergyError {
        EnergyError::Bus {
            location: self.location.clone(),
            detail: format!("{e:?}"),
        }
    }

    /// Set the register pointer, then read. A plain write followed by a plain read rather than
    /// `write_read`: the pointer persists, and the Pi's I2C controller rejects combined
    /// transactions ("operation not supported"). This assumes no other master moves the
    /// pointer in between, which holds when the agent is the only user of the chip.
    fn read_register(&mut self, reg: u8) -> Result<u16, EnergyError> {
        self.i2c
            .write(self.address, &[reg])
            .map_err(|e| self.bus_error(e))?;
        let mut buf = [0u8; 2];
        self.i2c
            .read(self.address, &mut buf)
            .map_err(|e| self.bus_error(e))?;
        Ok(u16::from_be_bytes(buf))
    }

    fn read_watts(&mut self) -> Result<f64, EnergyError> {
        let bus = self.read_register(REG_BUS_VOLTAGE)?;
        if bus & BUS_OVF != 0 {
            return Err(EnergyError::Config(format!(
                "INA219 at {} overflowed: current is beyond max_current_a or the shunt range; \
                 raise max_current_a",
                self.location
            )));
        }
        let power = self.read_register(REG_POWER)?;
        Ok(f64::from(power) * self.power_lsb_w)
    }
}

impl<I2C: I2c> EnergyMeter for Ina219Meter<I2C> {
    fn name(&self) -> String {
        format!("ina219:{}", self.location)
    }

    fn kind(&self) -> MeterKind {
        MeterKind::Ina219
    }

    fn estimated(&self) -> bool {
        false
    }

    fn source(&self) -> String {
        self.location.clone()
    }

    fn read(&mut self) -> Result<Sample, EnergyError> {
        let watts = self.read_watts()?;
        Ok(self.integrator.update(self.clock.now(), watts))
    }
}

#[cfg(target_os = "linux")]
impl Ina219Meter<linux_embedded_hal::I2cdev> {
    /// Opens `bus_path` (e.g. `/dev/i2c-1`) and calibrates the INA219 at `addr`.
    pub fn open(
        bus_path: &std::path::Path,
        addr: u8,
        shunt_ohms: f64,
        max_current_a: f64,
    ) -> Result<Self, EnergyError> {
        // Open once with std first: I2cdev's error type hides the io::ErrorKind we need to say
        // "add the user to the i2c group" rather than a bare errno.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(bus_path)
            .map_err(|e| EnergyError::from_io(bus_path, e, super::I2C_PERMISSION_ADVICE))?;
        let location = format!("{}:0x{addr:02x}", bus_path.display());
        let i2c = linux_embedded_hal::I2cdev::new(bus_path).map_err(|e| EnergyError::Bus {
            location: location.clone(),
            detail: e.to_string(),
        })?;
        Self::new(i2c, addr, shunt_ohms, max_current_a, location)
    }
}

/// The configured INA219 as a boxed meter, for detection.
#[cfg(target_os = "linux")]
pub fn open_linux(cfg: &super::Ina219Config) -> Result<Box<dyn EnergyMeter + Send>, EnergyError> {
    Ok(Box::new(Ina219Meter::open(
        &cfg.bus,
        cfg.address,
        cfg.shunt_ohms,
        cfg.max_current_a,
    )?))
}

#[cfg(not(target_os = "linux"))]
pub fn open_linux(_cfg: &super::Ina219Config) -> Result<Box<dyn EnergyMeter + Send>, EnergyError> {
    Err(EnergyError::Config(
        "INA219 over /dev/i2c is only supported on Linux".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::tests::FakeClock;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};
    use std::time::Duration;

    const ADDR: u8 = 0x40;
    /// 0.1 Ω shunt and 3.2768 A max give Cal = 4096 (0x1000), Current_LSB = 100 µA and
    /// Power_LSB = 2 mW: round numbers to check against.
    const SHUNT: f64 = 0.1;
    const MAX_A: f64 = 3.2768;

    fn read_reg(reg: u8, value: u16) -> [Transaction; 2] {
        [
            Transaction::write(ADDR, vec![reg]),
            Transaction::read(ADDR, value.to_be_bytes().to_vec()),
        ]
    }

    /// 5 V on the bus, conversion ready, no overflow.
    const BUS_5V: u16 = (1250 << 3) | 0x0002;

    #[test]
    fn calibration_maths() {
        let (cal, lsb) = calibration(SHUNT, MAX_A).expect("cal");
        assert_eq!(cal, 0x1000);
        assert!((lsb - 0.002).abs() < 1e-12);
        // A typical breakout: 0.1 Ω, 3.2 A → 4194 (even, so kept as is).
        assert_eq!(calibration(0.1, 3.2).expect("cal").0, 4194);
        assert!(calibration(0.0, 1.0).is_err());
        assert!(calibration(0.1, -1.0).is_err());
        assert!(calibration(100.0, 100.0).is_err(), "cal rounds to 0");
    }

    #[test]
    fn calibrates_then_integrates_power() {
        let mut expect = vec![Transaction::write(ADDR, vec![REG_CALIBRATION, 0x10, 0x00])];
        expect.extend(read_reg(REG_BUS_VOLTAGE, BUS_5V));
        expect.extend(read_reg(REG_POWER, 2500)); // 5 W
        expect.extend(read_reg(REG_BUS_VOLTAGE, BUS_5V));
        expect.extend(read_reg(REG_POWER, 5000)); // 10 W
        let mock = Mock::new(&expect);
        let clock = FakeClock::default();
        let mut m = Ina219Meter::with_clock(
            mock,
            ADDR,
            SHUNT,
            MAX_A,
            "/dev/i2c-1:0x40".into(),
            Box::new(clock.clone()),
        )
        .expect("open");
        assert_eq!(m.name(), "ina219:/dev/i2c-1:0x40");
        assert!(!m.estimated());
        clock.advance(Duration::from_secs(1));
        let s = m.read().expect("read");
        assert!((s.watts.expect("watts") - 10.0).abs() < 1e-9, "{s:?}");
        // Trapezoid: (5 + 10) / 2 × 1 s.
        assert!((s.joules - 7.5).abs() < 1e-9, "{s:?}");
        m.release().done();
    }

    #[test]
    fn bus_error_on_calibration_is_an_energy_error() {
        let expect = [Transaction::write(ADDR, vec![REG_CALIBRATION, 0x10, 0x00])
            .with_error(ErrorKind::Other)];
        let mut mock = Mock::new(&expect);
        let r = Ina219Meter::new(mock.clone(), ADDR, SHUNT, MAX_A, "bus:0x40".into());
        let err = r.expect_err("must fail");
        assert!(matches!(err, EnergyError::Bus { .. }), "{err}");
        assert!(err.to_string().contains("bus:0x40"), "{err}");
        mock.done();
    }

    #[test]
    fn bus_error_mid_run_is_an_energy_error() {
        let mut expect = vec![Transaction::write(ADDR, vec![REG_CALIBRATION, 0x10, 0x00])];
        expect.extend(read_reg(REG_BUS_VOLTAGE, BUS_5V));
        expect.extend(read_reg(REG_POWER, 2500));
        expect.push(Transaction::write(ADDR, vec![REG_BUS_VOLTAGE]));
        expect.push(Transaction::read(ADDR, vec![0, 0]).with_error(ErrorKind::Other));
        let mock = Mock::new(&expect);
        let mut m = Ina219Meter::new(mock, ADDR, SHUNT, MAX_A, "bus:0x40".into()).expect("open");
        let err = m.read().expect_err("bus error");
        assert!(matches!(err, EnergyError::Bus { .. }), "{err}");
        m.release().done();
    }

    #[test]
    fn overflow_flag_is_reported() {
        let mut expect = vec![Transaction::write(ADDR, vec![REG_CALIBRATION, 0x10, 0x00])];
        expect.extend(read_reg(REG_BUS_VOLTAGE, BUS_5V | BUS_OVF));
        let mut mock = Mock::new(&expect);
        let err = Ina219Meter::new(mock.clone(), ADDR, SHUNT, MAX_A, "bus:0x40".into())
            .expect_err("overflow");
        assert!(err.to_string().contains("max_current_a"), "{err}");
        mock.done();
    }

    #[test]
    fn bad_address_is_rejected_without_touching_the_bus() {
        let mut mock = Mock::new(&[]);
        let err = Ina219Meter::new(mock.clone(), 0x20, SHUNT, MAX_A, "bus".into())
            .expect_err("bad address");
        assert!(matches!(err, EnergyError::Config(_)), "{err}");
        mock.done();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn missing_bus_device_is_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err =
            Ina219Meter::open(&tmp.path().join("i2c-9"), ADDR, SHUNT, MAX_A).expect_err("no bus");
        assert!(matches!(err, EnergyError::Gone { .. }), "{err}");
    }
}
