"""The soak command's short run (bench/soak.py, issue 10): 20 s of mixed load with upstream
faults, client disconnects and admin saves; it exits 0 when nothing leaked or was wrong."""
import os
import subprocess
import sys

from helpers import ROOT


def test_short_soak_passes():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--duration", "20",
                             "--seed", "10"], capture_output=True, text=True, timeout=40)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
