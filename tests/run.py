#!/usr/bin/env python3
"""Run the whole test suite on a fresh machine: `python3 tests/run.py [pytest args]`.

Sets up what the tests need, then runs pytest:
- a virtual environment .venv-test with tests/requirements.txt (pip, PyPI only);
- e2e tools when a test group needs them (installed by the groups' own setup
  steps below, cached under .cache/).
Under CI (CI=true) a missing tool fails the tests instead of skipping them.
"""
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-test")
REQUIREMENTS = os.path.join(ROOT, "tests", "requirements.txt")


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


def main(argv) -> int:
    python = ensure_venv()
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(python) + os.pathsep + env.get("PATH", "")
    args = argv or ["tests"]
    return subprocess.call([python, "-m", "pytest", "-p", "no:cacheprovider", "--timeout=300", "-ra"] + args,
                           cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
