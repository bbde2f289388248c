"""bench/instructions.py counts the instructions of a request under valgrind: the figure must
come from requests that worked, and more work per request must show in it."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, in_ci

SCRIPT = os.path.join(ROOT, "bench", "instructions.py")


def test_more_work_per_request_shows_in_the_count(fake_upstream, tmp_path):
    if shutil.which("valgrind") is None:
        if in_ci():
            pytest.fail("valgrind must be installed in CI")
        pytest.skip("valgrind not installed")
    heavier = tmp_path / "heavier" / "iflow2api.py"
    heavier.parent.mkdir()
    source = open(os.path.join(ROOT, "iflow2api.py"), encoding="utf-8").read()
    marker = "    def chat_completions(self, req: Request) -> Response:\n"
    assert marker in source
    # about 2 million instructions of added work on every chat completion
    heavier.write_text(source.replace(marker, marker + "        sum(range(20000))\n"), encoding="utf-8")

    upstream = fake_upstream.url[:-len("/v1")]  # the script adds /v1, as the iFlow CLI settings have it
    out = subprocess.run([sys.executable, SCRIPT, "--upstream", upstream, "--route", "chat",
                          "--requests", "10", "--json", "--ours", os.path.join(ROOT, "iflow2api.py"),
                          "--ours", str(heavier)], capture_output=True, text=True, timeout=600,
                         cwd=os.path.join(ROOT, "bench"))
    assert out.returncode == 0, out.stderr[-2000:]
    counts = json.loads(out.stdout)["chat"]
    ours, more = counts[os.path.join(ROOT, "iflow2api.py")], counts[str(heavier)]
    assert 100e3 < ours < 10e6  # a request's work, not a start-up's (hundreds of millions)
    assert more - ours > 1e6
    # 20 to warm up and 10 counted for each of the two, every one answered by the fake upstream
    assert len(fake_upstream.chat_requests()) == 60
