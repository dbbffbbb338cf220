//! What a process costs, from `/proc` (Linux), and what a store takes on disk.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Clock ticks per second in `/proc/PID/stat`: `USER_HZ`, which the kernel fixes at 100 for
/// user space on every architecture tierd runs on (x86_64, aarch64).
pub const TICKS_PER_S: f64 = 100.0;

/// `utime + stime` of `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat_ticks(&text).with_context(|| format!("parsing {path}"))
}

/// `utime + stime` from a `/proc/PID/stat` line. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_ticks(stat: &str) -> anyhow::Result<u64> {
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("no command name")?;
    // After the name: field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) else {
        bail!("too few fields");
    };
    Ok(u.parse::<u64>()? + s.parse::<u64>()?)
}

/// `VmRSS` and `VmHWM` (peak) of `pid`, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_rss(&text).with_context(|| format!("parsing {path}"))
}

pub fn parse_status_rss(status: &str) -> anyhow::Result<(u64, u64)> {
    let kb = |key: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key}"))?;
        let n = line
            .split_whitespace()
            .nth(1)
            .with_context(|| format!("{key} has no value"))?;
        Ok(n.parse::<u64>()? * 1024)
    };
    Ok((kb("VmRSS:")?, kb("VmHWM:")?))
}

/// Bytes on disk of a store: every file under a directory (recursively), or a file with its
/// SQLite `-wal`, `-shm` and `-journal` siblings. A missing path is 0 (nothing written yet).
pub fn store_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        return dir_bytes(path);
    }
    let mut total = meta.len();
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(m) = std::fs::metadata(PathBuf::from(p)) {
            total += m.len();
        }
    }
    total
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ticks_past_a_strange_command_name() {
        let stat = "4242 (cloud (relay) x) S 1 4242 4242 0 -1 4194560 3000 0 0 0 \
                    250 75 0 0 20 0 9 0 12345 123456789 2500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat).unwrap(), 325);
        assert!(parse_stat_ticks("1 (x) S 1").is_err());
    }

    #[test]
    fn reads_rss_and_peak() {
        let status = "Name:\tcloud-relay\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_rss(status).unwrap(), (10 << 20, 20 << 20));
        assert!(parse_status_rss("Name: x\n").is_err());
    }

    #[test]
    fn sums_a_store_with_its_sqlite_siblings_or_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("fleet.db");
        std::fs::write(&db, [0u8; 100]).unwrap();
        std::fs::write(dir.path().join("fleet.db-wal"), [0u8; 20]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/x"), [0u8; 3]).unwrap();
        assert_eq!(store_bytes(&db), 120);
        assert_eq!(store_bytes(dir.path()), 123);
        assert_eq!(store_bytes(&dir.path().join("missing")), 0);
    }

    #[test]
    fn measures_this_process() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_ok());
        assert!(rss(pid).unwrap().0 > 0);
    }
}
