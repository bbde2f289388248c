"""The Codex CLI (npm @openai/codex, pinned) for the end-to-end tests, installed into
.cache/codex like Claude Code is into .cache/claude-code (tests/run.py calls install_codex()).

Codex speaks only the OpenAI Responses API since 0.154 (POST /v1/responses, streaming).
The npm package is a small node launcher (bin/codex.js) plus a platform package with the
native binary (@openai/codex-linux-x64 and friends, an optional dependency)."""
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODEX_VERSION = "0.171.0"
CODEX_DIR = os.path.join(ROOT, ".cache", "codex")
CODEX_BIN = os.path.join(CODEX_DIR, "node_modules", ".bin", "codex")


def codex_version(path):
    """`codex --version` of the binary at path ("codex-cli 0.171.0"), or None if it does not run
    (for example when npm skipped the platform package)."""
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def install_codex():
    """The pinned Codex CLI in .cache/codex; its path, or None when npm is missing or the
    install failed. Under CI, npm itself is installed from Debian when it is missing."""
    if os.path.exists(CODEX_BIN) and codex_version(CODEX_BIN) == "codex-cli " + CODEX_VERSION:
        return CODEX_BIN
    from run import apt_install, in_ci  # here, not at the top: run.py imports this module
    if shutil.which("npm") is None and in_ci():
        apt_install("nodejs", "npm")
    npm = shutil.which("npm")
    if npm is None:
        return None
    print("tests: installing @openai/codex@%s" % CODEX_VERSION, flush=True)
    try:
        subprocess.call([npm, "install", "--prefix", CODEX_DIR, "--no-audit", "--no-fund", "--silent",
                         "@openai/codex@" + CODEX_VERSION], timeout=600, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None
    return CODEX_BIN if codex_version(CODEX_BIN) else None
