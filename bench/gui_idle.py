#!/usr/bin/env python3
"""Idle cost of the desktop window (issue 12): with the window open and nothing
to do, the GUI process should use under 1% of one core, and its window should be
shown within 1 s of the process start.

    python3 bench/gui_idle.py [--seconds 30] [--settle 3]

Starts Xvfb on a free display, then for each case (window open with the server
stopped; window open with the server running, idle) runs `python3
iflow2api_gui.py` with a temporary HOME and IFLOW2API_HOME (update check off),
times process start -> window mapped (polling `xdotool search --onlyvisible`),
waits `--settle` seconds, then reads utime+stime from /proc/<pid>/stat over
`--seconds` seconds. Exits 1 when a case uses 1% of a core or more, or when its
window took WINDOW_FAIL_S or more (between 1 s and that it is reported as over
the target but does not fail). Needs Xvfb (Debian xvfb), xdotool and tkinter.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import REPO, cpu_seconds, free_port, http, log, stop_group

CPU_TARGET_PCT = 1.0
WINDOW_TARGET_S = 1.0
WINDOW_FAIL_S = 1.5
CASES = (("server stopped", False), ("server running, idle", True))


def start_xvfb():
    """Xvfb on a display number it picks itself (-displayfd); returns (process, ':N')."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x800x24",
                             "-nolisten", "tcp"], pass_fds=(write_fd,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()
    if not number:
        sys.exit("Xvfb did not start")
    return proc, ":" + number


def wait_window(proc, env, t0, timeout=30.0):
    """Seconds from t0 until a window named iflow2api is mapped on the display."""
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the GUI exited with code {proc.returncode} before its window was shown")
        found = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", "^iflow2api"],
                               env=env, capture_output=True, text=True)
        if found.stdout.strip():
            return time.perf_counter() - t0
        time.sleep(0.01)
    raise RuntimeError(f"no window within {timeout:.0f} s")


def measure(display, xvfb, run_server, args):
    """One GUI start: {"window_s", "cpu_pct", "xvfb_cpu_pct"}."""
    home = Path(tempfile.mkdtemp(prefix="bench-gui-"))
    port = free_port()
    (home / ".iflow2api").mkdir()
    (home / ".iflow2api" / "config.json").write_text(json.dumps(
        {"host": "127.0.0.1", "port": port, "auto_run_server": run_server, "check_update_on_startup": False}))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HOME=str(home), IFLOW2API_HOME=str(home / ".iflow2api"), DISPLAY=display, NO_PROXY="*")
    log_file = open(home / "gui.log", "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "iflow2api_gui.py")], cwd=home, env=env,
                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        window_s = wait_window(proc, env, t0)
        if run_server:
            while http("GET", f"http://127.0.0.1:{port}/health", timeout=1.0)[0] != 200:
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError("the server did not answer /health within 30 s")
                time.sleep(0.05)
        time.sleep(args.settle)
        cpu0, x0, w0 = cpu_seconds(proc.pid), cpu_seconds(xvfb.pid), time.perf_counter()
        time.sleep(args.seconds)
        if proc.poll() is not None:
            raise RuntimeError(f"the GUI exited with code {proc.returncode} while idle")
        wall = time.perf_counter() - w0
        return {"window_s": window_s, "cpu_pct": 100 * (cpu_seconds(proc.pid) - cpu0) / wall,
                "xvfb_cpu_pct": 100 * (cpu_seconds(xvfb.pid) - x0) / wall}
    except RuntimeError as e:
        log_file.flush()
        tail = (home / "gui.log").read_text(errors="replace").splitlines()[-8:]
        raise RuntimeError(f"{e} (log: {' | '.join(tail)})") from None
    finally:
        stop_group(proc)
        log_file.close()
        shutil.rmtree(home, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0, help="idle sampling time per case (default 30)")
    p.add_argument("--settle", type=float, default=3.0, help="wait after the window is shown (default 3)")
    args = p.parse_args()
    missing = [tool for tool in ("Xvfb", "xdotool") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (Debian packages xvfb, xdotool)")
    xvfb, display = start_xvfb()
    failed = False
    print(f"GUI idle cost, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"1-min load average {os.getloadavg()[0]:.2f}; {args.seconds:g} s per case after {args.settle:g} s\n")
    print("| case | window shown (s) | GUI CPU (% of one core) | Xvfb CPU (%) |")
    print("|---|---|---|---|")
    try:
        for label, run_server in CASES:
            log(f"{label}...")
            r = measure(display, xvfb, run_server, args)
            window = f"{r['window_s']:.2f}" + (" (over 1 s)" if r["window_s"] >= WINDOW_TARGET_S else "")
            cpu = f"{r['cpu_pct']:.2f}" + (" (FAIL)" if r["cpu_pct"] >= CPU_TARGET_PCT else "")
            print(f"| window open, {label} | {window} | {cpu} | {r['xvfb_cpu_pct']:.2f} |", flush=True)
            failed |= r["cpu_pct"] >= CPU_TARGET_PCT or r["window_s"] >= WINDOW_FAIL_S
    finally:
        xvfb.terminate()
        xvfb.wait()
    print(f"\ntargets: GUI CPU < {CPU_TARGET_PCT:g}% of one core, window shown < {WINDOW_TARGET_S:g} s "
          f"(fails from {WINDOW_FAIL_S:g} s): {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
