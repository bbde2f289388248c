"""pip / pipx installs: `pip install .` and `pipx install .` from the source folder, and
`python -m build` making the sdist and, from it, the wheel; the wheel
installed into a fresh virtual environment gives `iflow2api` (serving /admin, /docs, /redoc
and /health from the installed static/ files) and `iflow2api-gui`. Offline: the build uses
the test environment's setuptools (--no-isolation) and the install uses --no-index."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from fakes import FakeUpstream
from helpers import ROOT, free_port, healthy, http, in_ci, stop_process, wait_until, write_settings

SOURCES = ("iflow2api.py", "iflow2api_gui.py", "pyproject.toml", "README.md", "static")


def _bin(venv, name):
    return os.path.join(str(venv), "Scripts" if os.name == "nt" else "bin", name)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IFLOW2API_", "PIP_"))}
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    env["PIP_CONFIG_FILE"] = os.devnull  # no machine-wide index settings
    env.update(extra)
    return env


def _needs(*modules):
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            if in_ci():
                pytest.fail("%s must be installed in CI (tests/requirements.txt)" % module)
            pytest.skip("%s not installed" % module)


def _copy_of_the_checkout(tmp):
    """The files a source install takes, copied (so no build/ or egg-info lands in the checkout)."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, str(src / name), ignore=shutil.ignore_patterns("__pycache__", ".*"))
        else:
            shutil.copy(path, str(src / name))
    return src


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel) built from a copy of the checkout."""
    _needs("build", "setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_of_the_checkout(tmp)
    # cwd is not the checkout: there `python -m build` would find our build.py instead
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"),
                          str(src)], cwd=str(tmp), env=_env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    built = sorted(os.listdir(str(tmp / "dist")))
    sdist = [n for n in built if n.endswith(".tar.gz")]
    wheel = [n for n in built if n.endswith(".whl")]
    assert len(sdist) == 1 and len(wheel) == 1, built
    return str(tmp / "dist" / sdist[0]), str(tmp / "dist" / wheel[0])


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory):
    """A fresh virtual environment with only the wheel installed."""
    path = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    run = subprocess.run([_bin(path, "python"), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                          "--disable-pip-version-check", dists[1]], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return path


def _static_files():
    return sorted(os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
                  for d, _, files in os.walk(os.path.join(ROOT, "static")) for f in files
                  if not f.startswith("."))


def test_sdist_and_wheel_carry_the_modules_and_every_static_file(dists):
    sdist, wheel = dists
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        in_sdist = {n[len(top) + 1:] for n in archive.getnames()}
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    for members in (in_sdist, in_wheel):
        assert {"iflow2api.py", "iflow2api_gui.py"} <= members
        assert set(_static_files()) <= members
    metadata = zipfile.ZipFile(wheel).read(os.path.basename(wheel).split("-py3")[0] + ".dist-info/METADATA")
    metadata = metadata.decode("utf-8")
    assert "Provides-Extra: fast" in metadata and "Provides-Extra: tray" in metadata
    assert "Requires-Dist: h11~=" in metadata and "Requires-Dist: pystray~=" in metadata
    entry_points = zipfile.ZipFile(wheel).read(os.path.basename(wheel).split("-py3")[0]
                                               + ".dist-info/entry_points.txt").decode("utf-8")
    assert "iflow2api = iflow2api:main" in entry_points and "iflow2api-gui = iflow2api_gui:main" in entry_points


@contextlib.contextmanager
def _server(venv, tmp_path, binary=None):
    fake = FakeUpstream()
    home = tmp_path / "home"
    write_settings(str(home), fake.url)
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(str(log_path), "wb") as log:
        proc = subprocess.Popen([binary or _bin(venv, "iflow2api"), "--port", str(port), "--host", "127.0.0.1"],
                                cwd=str(tmp_path), env=_env(HOME=str(home), IFLOW2API_HOME=str(home / ".i2a")),
                                stdout=log, stderr=subprocess.STDOUT)
    base = "http://127.0.0.1:%d" % port
    try:
        assert wait_until(lambda: proc.poll() is not None or healthy(base), 10), log_path.read_text()
        assert proc.poll() is None, log_path.read_text()
        yield base
    finally:
        stop_process(proc)
        fake.close()


def test_installed_iflow2api_serves_admin_docs_redoc_and_health(venv, tmp_path):
    with _server(venv, tmp_path) as base:
        for path in ("/admin", "/docs", "/redoc"):
            status, headers, body = http(base, "GET", path, timeout=5)
            assert status == 200, (path, body[:200])
            assert headers.get("content-type", "").startswith("text/html") and b"<html" in body.lower(), path
        status, headers, body = http(base, "GET", "/health", timeout=5)
        assert status == 200 and headers.get("content-type", "").startswith("application/json")
        assert json.loads(body)["status"] == "ok"
        status, _, body = http(base, "GET", "/static/favicon.svg", timeout=5)
        assert status == 200 and b"<svg" in body
        status, _, body = http(base, "POST", "/v1/chat/completions",
                               {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello world"


def test_installed_iflow2api_prints_its_version(venv, tmp_path):
    run = subprocess.run([_bin(venv, "iflow2api"), "--version"], env=_env(HOME=str(tmp_path)),
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.startswith("iflow2api "), run.stderr


def test_installed_gui_without_a_display_says_so_in_one_line(venv, tmp_path):
    run = subprocess.run([_bin(venv, "iflow2api-gui")], env=_env(HOME=str(tmp_path)), cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iflow2api:"), run.stdout + run.stderr


@pytest.mark.parametrize("installer", ["pip", "pipx"])
def test_pip_and_pipx_install_from_the_source_folder(installer, tmp_path):
    """What the README says: `pip install .` and `pipx install .` (build isolation: setuptools
    comes from the package index, as it does for users)."""
    _needs("pipx")
    src = _copy_of_the_checkout(tmp_path)
    if installer == "pip":
        venv = tmp_path / "v"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        command = [_bin(venv, "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(src)]
        bin_dir = os.path.dirname(_bin(venv, "iflow2api"))
        env = _env()
    else:
        bin_dir = str(tmp_path / "pipx-bin")
        env = _env(PIPX_HOME=str(tmp_path / "pipx-home"), PIPX_BIN_DIR=bin_dir, PIPX_MAN_DIR=str(tmp_path / "man"))
        command = [sys.executable, "-m", "pipx", "install", str(src)]
    run = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    with _server(None, tmp_path, binary=os.path.join(bin_dir, "iflow2api")) as base:
        for path in ("/admin", "/docs"):
            assert http(base, "GET", path, timeout=5)[0] == 200, path
