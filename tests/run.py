#!/usr/bin/env python3
"""Run the whole test suite on a fresh machine: `python3 tests/run.py [pytest args]`.

Sets up what the tests need, then runs pytest:
- a virtual environment .venv-test with tests/requirements.txt (pip, PyPI only);
- the Claude Code and Codex CLIs from npm (pinned, in .cache/claude-code and .cache/codex) and, under CI,
  Debian's chromium for the browser tests and xvfb, xdotool, fonts-wqy-microhei and
  desktop-file-utils for the desktop app tests, podman, runc and debootstrap for the
  container test.
Under CI (CI=true) a missing tool fails the tests instead of skipping them.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import venv

from codex_setup import install_codex
from container_setup import install_container_tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-test")
REQUIREMENTS = os.path.join(ROOT, "tests", "requirements.txt")
CLAUDE_CODE_VERSION = "2.1.197"
CLAUDE_CODE_DIR = os.path.join(ROOT, ".cache", "claude-code")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def apt_install(*packages) -> None:
    """Debian packages for e2e tests, only where we may (CI runs as root)."""
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.call(["apt-get", "update", "-qq"])
        subprocess.call(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + list(packages))


def install_claude_code():
    """The Claude Code CLI (pinned) in .cache/claude-code; its path, or None."""
    claude = os.path.join(CLAUDE_CODE_DIR, "node_modules", ".bin", "claude")
    if os.path.exists(claude):
        return claude
    if shutil.which("npm") is None and in_ci():
        apt_install("nodejs", "npm")
    npm = shutil.which("npm")
    if npm is None:
        return None
    print("tests/run.py: installing @anthropic-ai/claude-code@%s" % CLAUDE_CODE_VERSION, flush=True)
    subprocess.call([npm, "install", "--prefix", CLAUDE_CODE_DIR, "--no-audit", "--no-fund", "--silent",
                     "@anthropic-ai/claude-code@" + CLAUDE_CODE_VERSION])
    return claude if os.path.exists(claude) else None


def venv_python() -> str:
    return os.path.join(VENV, "Scripts" if os.name == "nt" else "bin", "python")


def ensure_venv() -> str:
    """Create .venv-test and install the pinned requirements when they changed."""
    python = venv_python()
    if not os.path.exists(python):
        print("tests/run.py: creating %s" % VENV, flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    stamp = os.path.join(VENV, ".requirements")
    wanted = open(REQUIREMENTS, encoding="utf-8").read()
    if not os.path.exists(stamp) or open(stamp, encoding="utf-8").read() != wanted:
        print("tests/run.py: installing tests/requirements.txt", flush=True)
        subprocess.check_call([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "-r", REQUIREMENTS])
        with open(stamp, "w", encoding="utf-8") as f:
            f.write(wanted)
    return python


def ensure_chromium():
    """Debian's chromium for the browser tests (Playwright drives it; its own download
    is not reachable from CI)."""
    if not os.path.exists("/usr/bin/chromium") and in_ci():
        print("tests/run.py: installing chromium", flush=True)
        apt_install("chromium")
    return os.path.exists("/usr/bin/chromium")


# The API docs viewers pinned in static/docs-fallback.js, for the browser test that
# checks their integrity hashes (the CDN is not reachable; npm is).
DOCS_VIEWERS = ("swagger-ui-dist@5.35.0", "redoc@2.5.4")
DOCS_VIEWERS_DIR = os.path.join(ROOT, ".cache", "docs-viewers")


def fetch_docs_viewers() -> None:
    """Unpack the pinned viewer packages from npm into .cache/docs-viewers/<name>-<version>."""
    npm = shutil.which("npm")
    if npm is None:
        return
    os.makedirs(DOCS_VIEWERS_DIR, exist_ok=True)
    for spec in DOCS_VIEWERS:
        target = os.path.join(DOCS_VIEWERS_DIR, spec.replace("@", "-"))
        if os.path.isdir(target):
            continue
        print("tests/run.py: fetching %s" % spec, flush=True)
        tarball = subprocess.run([npm, "pack", spec, "--silent"], cwd=DOCS_VIEWERS_DIR, capture_output=True,
                                 text=True).stdout.strip().splitlines()
        if not tarball:
            continue
        path = os.path.join(DOCS_VIEWERS_DIR, tarball[-1])
        with tarfile.open(path) as archive:
            archive.extractall(DOCS_VIEWERS_DIR)
        os.rename(os.path.join(DOCS_VIEWERS_DIR, "package"), target)
        os.unlink(path)


def ensure_container_tools() -> None:
    """podman, runc and debootstrap for tests/e2e/test_docker.py (installed under CI only)."""
    if in_ci():
        install_container_tools()


def ensure_gui_tools() -> None:
    """Debian's Xvfb, xdotool, a CJK font and desktop-file-validate for the desktop app tests."""
    wanted = {"xvfb": shutil.which("Xvfb"), "xdotool": shutil.which("xdotool"),
              "desktop-file-utils": shutil.which("desktop-file-validate"),
              "fonts-wqy-microhei": os.path.exists("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")}
    missing = [package for package, present in wanted.items() if not present]
    if missing and in_ci():
        print("tests/run.py: installing %s" % " ".join(missing), flush=True)
        apt_install(*missing)


def ensure_valgrind() -> None:
    """valgrind for bench/instructions.py's test (installed under CI only)."""
    if shutil.which("valgrind") is None and in_ci():
        print("tests/run.py: installing valgrind", flush=True)
        apt_install("valgrind")


def main(argv) -> int:
    python = ensure_venv()
    install_claude_code()
    install_codex()
    ensure_chromium()
    ensure_gui_tools()
    ensure_valgrind()
    ensure_container_tools()
    fetch_docs_viewers()
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(python) + os.pathsep + env.get("PATH", "")
    args = argv or ["tests"]
    return subprocess.call([python, "-m", "pytest", "-p", "no:cacheprovider", "--timeout=300", "-ra"] + args,
                           cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
