//! systemd integration of the real edge-agent binary: the notify protocol over a unix datagram
//! socket set as `NOTIFY_SOCKET` (READY only once the port is bound, STATUS lines, WATCHDOG pings
//! at half of `WATCHDOG_USEC`, STOPPING and exit 0 on SIGTERM), and the kernel's W^X policy that
//! the unit's `MemoryDenyWriteExecute=yes` relies on.

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tierd_e2e::{daemon_command, edge_manifest, free_port, AgentOptions, Proc};

/// Reads datagrams until `want` returns true for one, or the deadline passes.
fn wait_for(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = want(&msg);
            seen.push(msg);
            if hit {
                return true;
            }
        }
    }
    false
}

#[test]
fn notify_ready_status_watchdog_and_clean_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    // No broker on purpose: the agent must be READY (the edge serves) without one.
    let http_port = free_port();
    let options = AgentOptions::new("sd-notify", free_port()).without_broker();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, options.toml(http_port)).expect("write config");
    let mut cmd = daemon_command("edge-agent");
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID");
    let mut agent = Proc::spawn("edge-agent sd-notify", cmd, &dir.path().join("agent.log"));

    let mut seen = Vec::new();
    let ready = wait_for(&sock, &mut seen, Duration::from_secs(30), |m| {
        m.lines().any(|l| l == "READY=1")
    });
    assert!(
        ready,
        "no READY=1; got {seen:?}\nlog:\n{}",
        agent.log_tail(30)
    );
    // READY means the port is already bound.
    TcpStream::connect(("127.0.0.1", http_port))
        .unwrap_or_else(|e| panic!("READY=1 sent but port {http_port} refuses: {e}"));
    let ready_msg = seen.last().cloned().unwrap_or_default();
    assert!(
        ready_msg.contains(&format!("STATUS=serving on http://127.0.0.1:{http_port}")),
        "{ready_msg:?}"
    );

    // WATCHDOG_USEC = 400 ms: a ping every ~200 ms, each after a passing self-check.
    let mut pings = 0;
    let start = Instant::now();
    while pings < 3 && start.elapsed() < Duration::from_secs(10) {
        if wait_for(&sock, &mut seen, Duration::from_secs(2), |m| {
            m.lines().any(|l| l == "WATCHDOG=1")
        }) {
            pings += 1;
        }
    }
    assert_eq!(
        pings,
        3,
        "watchdog pings; got {seen:?}\nlog:\n{}",
        agent.log_tail(30)
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill");
    let stopping = wait_for(&sock, &mut seen, Duration::from_secs(10), |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    assert!(stopping, "no STOPPING=1; got {seen:?}");
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status:?}\nlog:\n{}",
        agent.log_tail(30)
    );
}

/// `MemoryDenyWriteExecute=yes` forbids memory that is writable and executable. On kernels
/// with PR_SET_MDWE (6.3+) the same policy can be set on a child directly: the agent must still
/// load, verify and run its model under it.
#[test]
fn model_runs_under_memory_deny_write_execute() {
    const PR_SET_MDWE: libc::c_int = 65;
    const PR_MDWE_REFUSE_EXEC_GAIN: libc::c_ulong = 1;
    let mut cmd = daemon_command("edge-agent");
    cmd.arg("check-model")
        .arg(edge_manifest())
        .arg("--runs")
        .arg("20")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("SKIPPED: this kernel has no PR_SET_MDWE (needs Linux 6.3+): {e}");
            return;
        }
        Err(e) => panic!("cannot start edge-agent under MDWE: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("vectors match"),
        "edge-agent under W^X: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The units as shipped in `cross/systemd/` (what the .deb installs too, with ExecStart in
/// /usr/bin): the package's static system user rather than `DynamicUser=`, no
/// `SupplementaryGroups=` (a group missing on the board fails the start: 216/GROUP), and the
/// example config's `state_dir`, once uncommented, is the unit's `StateDirectory=` (the one
/// writable path under `ProtectSystem=strict`).
#[test]
fn units_and_example_configs_agree_on_user_and_state_dir() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read =
        |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("read {p}: {e}"));
    for (bin, unit, example, user) in [
        (
            "edge-agent",
            "cross/systemd/tierd-edge-agent.service",
            "cross/agent.example.toml",
            "tierd",
        ),
        (
            "cloud-relay",
            "cross/systemd/tierd-cloud-relay.service",
            "cross/relay.example.toml",
            "tierd-relay",
        ),
    ] {
        let text = read(unit);
        let values = |key: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(values("User"), [user], "{unit}: User=");
        assert_eq!(values("Group"), [user], "{unit}: Group=");
        assert!(values("DynamicUser").is_empty(), "{unit}: DynamicUser=");
        assert!(
            values("SupplementaryGroups").is_empty(),
            "{unit}: SupplementaryGroups= fails where the group does not exist"
        );
        let state = values("StateDirectory");
        assert_eq!(state.len(), 1, "{unit}: one StateDirectory=");
        let state_path = format!("/var/lib/{}", state[0]);
        assert_eq!(
            values("WorkingDirectory"),
            std::slice::from_ref(&state_path),
            "{unit}"
        );
        // scripts/build-packages rewrites this prefix to /usr/bin for the package.
        let exec = values("ExecStart");
        assert!(
            exec.len() == 1 && exec[0].starts_with(&format!("/usr/local/bin/{bin} ")),
            "{unit}: ExecStart= {exec:?}"
        );
        let example_text = read(example);
        let state_line = example_text
            .lines()
            .find(|l| l.trim_start_matches(['#', ' ']).starts_with("state_dir"))
            .unwrap_or_else(|| panic!("{example}: no state_dir line"));
        assert_eq!(
            state_line,
            format!("# state_dir = \"{state_path}\""),
            "{example}: uncommented, state_dir must be {unit}'s StateDirectory"
        );
    }
}
