//! MC146818 CMOS RTC at ports 0x70 (index) and 0x71 (data): the wall-clock time in BCD (UTC,
//! as Linux assumes) and the memory-size bytes BIOSes leave there.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::devices::bus::BusDevice;

pub const BASE: u16 = 0x70;
pub const LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// 32.768 kHz time base, 1024 Hz rate; update-in-progress never set.
const STATUS_A: u8 = 0x26;
/// 24-hour mode, BCD.
const STATUS_B: u8 = 0x02;
/// The battery is good.
const STATUS_D: u8 = 0x80;

pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: fn() -> u64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Cmos {
    /// `mem_below_4g` and `mem_above_4g` fill the BIOS memory-size registers.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_clock(mem_below_4g, mem_above_4g, unix_now)
    }

    fn with_clock(mem_below_4g: u64, mem_above_4g: u64, now: fn() -> u64) -> Self {
        let mut nvram = [0u8; 128];
        let mut put16 = |reg: usize, value: u64| {
            let v = value.min(0xffff) as u16;
            nvram[reg..reg + 2].copy_from_slice(&v.to_le_bytes());
        };
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        put16(0x15, 640); // base memory in KiB
        let extended_kib = mem_below_4g.saturating_sub(MIB) / KIB;
        put16(0x17, extended_kib);
        put16(0x30, extended_kib);
        put16(0x34, mem_below_4g.saturating_sub(16 * MIB) / (64 * KIB));
        let high = mem_above_4g / (64 * KIB);
        nvram[0x5b..0x5e].copy_from_slice(&high.to_le_bytes()[..3]);
        Cmos { index: 0, nvram, now }
    }

    fn register(&self, reg: u8) -> u8 {
        let t = (self.now)();
        let (year, month, day) = civil_from_days((t / 86400) as i64);
        let bcd = |v: u64| (((v / 10) << 4) | (v % 10)) as u8;
        match reg {
            REG_SECONDS => bcd(t % 60),
            REG_MINUTES => bcd(t / 60 % 60),
            REG_HOURS => bcd(t / 3600 % 24),
            // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
            REG_WEEKDAY => bcd((t / 86400 + 4) % 7 + 1),
            REG_DAY => bcd(day),
            REG_MONTH => bcd(month),
            REG_YEAR => bcd(year % 100),
            REG_CENTURY => bcd(year / 100),
            REG_STATUS_A => STATUS_A,
            REG_STATUS_B => STATUS_B,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D,
            _ => self.nvram[usize::from(reg)],
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CmosState {
    index: u8,
    nvram: Vec<u8>,
}

impl crate::devices::state::Versioned for CmosState {
    const KIND: &'static str = "CMOS";
    const VERSION: u16 = 1;
}

impl crate::devices::Persist for Cmos {
    fn save(&mut self) -> Vec<u8> {
        crate::devices::state::encode(&CmosState { index: self.index, nvram: self.nvram.to_vec() })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), crate::devices::state::StateError> {
        let state: CmosState = crate::devices::state::decode(state)?;
        self.nvram = state.nvram.try_into().map_err(|_| "CMOS NVRAM of the wrong size")?;
        self.index = state.index & 0x7f;
        Ok(())
    }
}

/// (year, month, day) of a day count since 1970-01-01, proleptic Gregorian.
fn civil_from_days(days: i64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year as u64, month as u64, day as u64)
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = if offset == 1 { self.register(self.index) } else { self.index };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = data[0] & 0x7f;
        } else if !matches!(self.index, REG_SECONDS..=REG_STATUS_D | REG_CENTURY) {
            self.nvram[usize::from(self.index)] = data[0];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_reg(cmos: &mut Cmos, reg: u8) -> u8 {
        cmos.write(0, &[reg | 0x80]);
        let mut b = [0];
        cmos.read(1, &mut b);
        b[0]
    }

    #[test]
    fn time_is_bcd_utc() {
        // 2026-11-25 06:14:18 UTC, a Wednesday.
        let mut cmos = Cmos::with_clock(0, 0, || 1_795_587_258);
        let regs: Vec<u8> = [0, 2, 4, 6, 7, 8, 9, 0x32].iter().map(|r| read_reg(&mut cmos, *r)).collect();
        assert_eq!(regs, vec![0x18, 0x14, 0x06, 0x04, 0x25, 0x11, 0x26, 0x20]);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_B), STATUS_B);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_D), STATUS_D);
    }

    #[test]
    fn leap_day_and_epoch() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn memory_size_registers() {
        let mut cmos = Cmos::new(32 << 20, 1 << 30);
        let word = |c: &mut Cmos, r| u16::from(read_reg(c, r)) | (u16::from(read_reg(c, r + 1)) << 8);
        assert_eq!(word(&mut cmos, 0x15), 640);
        assert_eq!(word(&mut cmos, 0x30), 31 * 1024);
        assert_eq!(word(&mut cmos, 0x34), 256); // 16 MiB above 16 MiB, in 64 KiB units
        let mut big = Cmos::new(3 << 30, 0);
        assert_eq!(word(&mut big, 0x17), 0xffff, "saturates rather than wraps");
        assert_eq!(read_reg(&mut cmos, 0x5c), 0x40); // 16384 x 64 KiB
    }

    #[test]
    fn nvram_is_writable_but_the_clock_is_not() {
        let mut cmos = Cmos::with_clock(0, 0, || 0);
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0xab]);
        assert_eq!(read_reg(&mut cmos, 0x40), 0xab);
        cmos.write(0, &[REG_SECONDS]);
        cmos.write(1, &[0x59]);
        assert_eq!(read_reg(&mut cmos, REG_SECONDS), 0);
    }
}
