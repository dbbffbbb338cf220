#!/usr/bin/env python3
"""Driver of scripts/steady-rate (stdlib only): posts the records of an evaluation stream
(TIERDEV1: magic, u32 LE count, 66-byte records: label u8, severity u8, 64 u8 pixels) to a
running edge-agent as OIP v2 JSON at a steady rate, one request at a time on an absolute
schedule, and prints one row per window of requests: the tiers the agent answered with, the
thresholds it decided under, its audits (cloud calls = escalations + audits), and the relay's
view of the device at the window's end (calibration.in_force, calibration.certificate).

Escalated = tier cloud + tier edge_fallback (both were sent to the cloud; the second came back
too late). The relay is polled every --poll requests too, so the summary can say at which
request its first online certificate (insufficient_evidence false) appeared.
"""

import argparse
import json
import re
import struct
import sys
import time
import urllib.error
import urllib.request

MAGIC = b"TIERDEV1"
RECORD = 66


def load_stream(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != MAGIC:
        sys.exit(f"steady_rate.py: {path}: not a TIERDEV1 stream")
    (count,) = struct.unpack_from("<I", data, 8)
    if len(data) != 12 + count * RECORD or count == 0:
        sys.exit(f"steady_rate.py: {path}: {count} records announced, {len(data)} bytes")
    return [data[12 + i * RECORD + 2:12 + (i + 1) * RECORD] for i in range(count)]


def get(url, token=None, timeout=5.0):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def dig(obj, *keys):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj or obj[k] is None:
            return None
        obj = obj[k]
    return obj


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


AUDIT_LINE = re.compile(r"^(\w*audit\w*)(\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.IGNORECASE)


def agent_audits(agent):
    """Sum of the agent's audit counter samples in /metrics, or None if it has none."""
    try:
        text = get(f"{agent}/metrics")
    except (urllib.error.URLError, OSError):
        return None, None
    total, name = None, None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = AUDIT_LINE.match(line)
        # A counter (…_total, or the bare counter name); not _created/_bucket series.
        if m and not m.group(1).endswith(("_created", "_bucket", "_sum", "_count")):
            total = (total or 0) + float(m.group(3))
            name = m.group(1)
    return (int(total) if total is not None else None), name


class Relay:
    def __init__(self, url, token, device):
        self.url, self.token, self.device = url, token, device
        self.error = None

    def device_view(self):
        try:
            body = get(f"{self.url}/api/devices/{self.device}", self.token)
            self.error = None
            return json.loads(body)
        except urllib.error.HTTPError as e:
            self.error = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            self.error = str(e)
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--relay", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--model", default="digits-edge")
    ap.add_argument("--device", default="edge-01")
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--poll", type=int, default=100)
    a = ap.parse_args()
    if a.rate <= 0 or a.requests <= 0 or a.window <= 0 or a.poll <= 0:
        sys.exit("steady_rate.py: --rate, --requests, --window and --poll must be positive")

    records = load_stream(a.stream)
    with open(a.token_file) as f:
        token = f.read().strip()
    relay = Relay(a.relay, token, a.device)
    url = f"{a.agent}/v2/models/{a.model}/infer"
    print(f"stream: {a.stream} ({len(records)} records, cycled), {a.requests} requests at "
          f"{a.rate:g}/s, rows per {a.window} requests")
    print("escalated = tier cloud + tier edge_fallback; audits = the audit count's increase "
          "over the window (source below); cloud calls = escalated + audits; relay columns "
          "polled at the window's end")

    # Audits: the agent's counter if its /metrics has one; else the relay's copy of the
    # agent's totals (latest.totals.audits, from its last telemetry report: it lags by up to
    # the telemetry interval, 30 s). A fresh agent starts at 0 either way.
    audits0, audit_name = agent_audits(a.agent)
    use_agent = audit_name is not None
    audit_src = (f"agent /metrics {audit_name}" if use_agent else
                 "relay latest.totals.audits (the agent's /metrics has no audit counter; "
                 "from its last telemetry report, so it lags up to 30 s)")
    if not use_agent:
        audits0 = 0
    print(f"audit source: {audit_src}")
    cols = ("window", "requests", "cloud%", "fallback%", "escalated%", "audits",
            "cloud calls%", "thresholds seen", "in_force thr", "basis", "cert thr",
            "insufficient")
    rows = []
    tot = {"n": 0, "cloud": 0, "edge_fallback": 0, "edge": 0}
    win = None
    first_cert = None  # (request index, certificate threshold)
    in_force_changes = []  # (request index, threshold, basis)
    last_in_force = None
    after_cert = {"n": 0, "esc": 0}
    audits_prev = audits0

    def audits_at(view):
        if use_agent:
            return agent_audits(a.agent)[0]
        return dig(view, "latest", "totals", "audits")

    def poll(i):
        nonlocal first_cert, last_in_force
        view = relay.device_view()
        cal = dig(view, "calibration")
        cert = dig(cal, "certificate")
        if first_cert is None and cert is not None and dig(cert, "insufficient_evidence") is False:
            first_cert = (i, dig(cert, "threshold"))
        inf = (dig(cal, "in_force", "threshold"), dig(cal, "in_force", "basis"))
        if inf != last_in_force and inf != (None, None):
            in_force_changes.append((i,) + inf)
            last_in_force = inf
        return view

    def new_window(k):
        return {"k": k, "start": k * a.window + 1, "n": 0, "cloud": 0, "edge_fallback": 0,
                "edge": 0, "thr": []}

    start = time.monotonic()
    errors = 0
    for i in range(a.requests):
        if win is None:
            win = new_window(i // a.window)
        due = start + i / a.rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        px = list(records[i % len(records)])
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64],
                                       "datatype": "UINT8", "data": px}]}).encode()
        req = urllib.request.Request(url, data=body,
                                     headers={"content-type": "application/json"})
        ans = None
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                ans = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors += 1
            print(f"steady_rate.py: request {i + 1}: {e}", file=sys.stderr)
            if errors >= 10:
                sys.exit("steady_rate.py: 10 requests failed")
        if ans is not None:
            tier = dig(ans, "parameters", "tier")
            thr = dig(ans, "parameters", "threshold")
            if tier not in ("edge", "cloud", "edge_fallback"):
                sys.exit(f"steady_rate.py: request {i + 1}: answer without a known tier: {ans}")
            for d in (win, tot):
                d["n"] += 1
                d[tier] += 1
            if first_cert is not None:
                after_cert["n"] += 1
                after_cert["esc"] += tier != "edge"
            if thr is not None and thr not in win["thr"]:
                win["thr"].append(thr)
        done = i + 1
        at_window_end = done % a.window == 0 or done == a.requests
        if done % a.poll == 0 and not at_window_end:
            poll(done)
        if at_window_end:
            view = poll(done)
            audits_now = audits_at(view)
            if audits_now is not None and audits_prev is not None:
                w_audits = audits_now - audits_prev
            else:
                w_audits = None
            audits_prev = audits_now
            n = win["n"] or 1
            esc = win["cloud"] + win["edge_fallback"]
            cal = dig(view, "calibration")
            row = (
                str(win["k"] + 1),
                f"{win['start']}-{done}",
                f"{100 * win['cloud'] / n:.1f}",
                f"{100 * win['edge_fallback'] / n:.1f}",
                f"{100 * esc / n:.1f}",
                fmt(w_audits),
                "-" if w_audits is None else f"{100 * (esc + w_audits) / n:.1f}",
                " ".join(fmt(t) for t in win["thr"]) or "-",
                fmt(dig(cal, "in_force", "threshold")),
                fmt(dig(cal, "in_force", "basis")),
                fmt(dig(cal, "certificate", "threshold")),
                fmt(dig(cal, "certificate", "insufficient_evidence")),
            )
            rows.append(row)
            if view is None:
                print(f"  (relay at request {done}: {relay.error})", file=sys.stderr)
            win = None
    elapsed = time.monotonic() - start

    view = relay.device_view()
    if not use_agent:
        # Wait (up to 45 s) for the telemetry report that covers every request, so the
        # relay's audit total is the run's.
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            t = dig(view, "latest", "totals") or {}
            if sum(t.get(k, 0) for k in ("edge", "cloud", "edge_fallback")) >= tot["n"]:
                break
            time.sleep(1)
            view = relay.device_view()
        else:
            audit_src += "; NOT the whole run: no report covering every request came in 45 s"
    audits_end = audits_at(view)
    audits_total = None if audits_end is None or audits0 is None else audits_end - audits0

    widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print()
    print(line(cols))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()

    n = tot["n"] or 1
    esc = tot["cloud"] + tot["edge_fallback"]
    cal = dig(view, "calibration")
    calls = "-" if audits_total is None else f"{100 * (esc + audits_total) / n:.1f}%"
    print(f"requests: {tot['n']} answered in {elapsed:.1f} s ({tot['n'] / elapsed:.2f}/s), "
          f"{errors} failed; tiers: edge {tot['edge']}, cloud {tot['cloud']}, "
          f"edge_fallback {tot['edge_fallback']}")
    print(f"audits: {fmt(audits_total)} (source: {audit_src})")
    if first_cert is not None:
        ac = after_cert["n"]
        ac_pct = f"{100 * after_cert['esc'] / ac:.1f}%" if ac else "-"
        print(f"first online certificate (insufficient_evidence false) seen at request "
              f"{first_cert[0]} (polled every {a.poll}), threshold {fmt(first_cert[1])}; "
              f"escalated after it: {ac_pct} of {ac}")
    else:
        print("first online certificate: none seen during the run")
    print("in_force over the run: " + (", ".join(
        f"{fmt(t)} {fmt(b)} from request {i}" for i, t, b in in_force_changes) or "-"))
    print(f"SUMMARY: escalated {100 * esc / n:.1f}% (cloud {100 * tot['cloud'] / n:.1f}% + "
          f"edge_fallback {100 * tot['edge_fallback'] / n:.1f}%), cloud calls {calls}; "
          f"in force at the end: threshold {fmt(dig(cal, 'in_force', 'threshold'))} "
          f"basis {fmt(dig(cal, 'in_force', 'basis'))} "
          f"(why: {fmt(dig(cal, 'in_force', 'why'))}); online certificate "
          f"{fmt(dig(cal, 'certificate', 'threshold'))} insufficient_evidence "
          f"{fmt(dig(cal, 'certificate', 'insufficient_evidence'))}")
    if errors:
        sys.exit(f"steady_rate.py: {errors} requests failed")


if __name__ == "__main__":
    main()
