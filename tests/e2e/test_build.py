"""build.py makes one reproducible file that runs isolated (-I -S), under any name, on 3.8+,
and serves a real request through the vendored h11 (or the stdlib parser without it)."""
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile

import pytest

from conftest import ROOT, in_ci, write_settings
from fakes import FakeUpstream

BUILD = os.path.join(ROOT, "build.py")
API_KEY = "sk-test-123456789"


def _version():
    for line in open(os.path.join(ROOT, "iflow2api.py"), encoding="utf-8"):
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise AssertionError("no __version__ in iflow2api.py")


def _clean_env(**extra):
    """The environment minus anything that would change the build or the server."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("IFLOW2API_") and k != "SOURCE_DATE_EPOCH"}
    env.update(extra)
    return env


def run_build(output, *args, **env):
    run = subprocess.run([sys.executable, BUILD, "--output", str(output)] + list(args),
                         env=_clean_env(**env), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return output


def sha256(path):
    with open(str(path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _interpreter(path, version):
    """`path` when it exists and really is Python `version`, else None."""
    if path and os.path.exists(path):
        out = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
        if out.stdout.strip() == version:
            return path
    return None


def python38():
    return (_interpreter("/root/.pyenv/versions/3.8.18/bin/python", "3.8")
            or _interpreter(shutil.which("python3.8"), "3.8"))


@pytest.fixture(scope="module")
def vendor_available():
    missing = [n for n in ("h11", "certifi") if importlib.util.find_spec(n) is None]
    if missing:
        if in_ci():
            pytest.fail("%s must be installed in CI to build the vendored file" % ", ".join(missing))
        pytest.skip("%s not installed: cannot vendor" % ", ".join(missing))


@pytest.fixture(scope="module")
def pyz(tmp_path_factory, vendor_available):
    """One vendored build shared by the tests that only read it."""
    return run_build(tmp_path_factory.mktemp("build") / "iflow2api.pyz")


@pytest.fixture(scope="module")
def pyz_no_vendor(tmp_path_factory):
    return run_build(tmp_path_factory.mktemp("build-nv") / "iflow2api.pyz", "--no-vendor")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None, timeout=5):
    """GET or POST JSON with urllib, ignoring any proxy settings of the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data, {"content-type": "application/json"})
    with opener.open(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


@contextlib.contextmanager
def serve(python, pyz_path, tmp_path):
    """Run the built file under -I -S with a temp HOME whose iFlow settings point at a
    fake upstream; yields (base_url, fake) once /health answers."""
    fake = FakeUpstream()
    home = tmp_path / "home"
    write_settings(str(home), fake.url, api_key=API_KEY)
    port = free_port()
    log_path = tmp_path / "server.log"
    env = _clean_env(HOME=str(home), IFLOW2API_HOME=str(tmp_path / ".iflow2api"))
    with open(str(log_path), "wb") as log:
        proc = subprocess.Popen([python, "-I", "-S", str(pyz_path), "--port", str(port), "--host", "127.0.0.1"],
                                cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT)
    base = "http://127.0.0.1:%d" % port
    try:
        deadline = time.monotonic() + 8
        while True:
            if proc.poll() is not None:
                pytest.fail("server exited with %s:\n%s" % (proc.returncode, log_path.read_text()))
            try:
                if http(base + "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("no /health after 8 s:\n%s" % log_path.read_text())
                time.sleep(0.05)
        yield base, fake
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        fake.close()


# -- contents ---------------------------------------------------------------------

def test_members_are_sorted_and_include_app_and_vendored_packages(pyz):
    names = zipfile.ZipFile(str(pyz)).namelist()
    assert names == sorted(names)
    for member in ("__main__.py", "iflow2api.py", "h11/__init__.py", "certifi/cacert.pem",
                   "certifi/core.py", "BUILD_INFO.json"):
        assert member in names
    assert not any("__pycache__" in n for n in names)
    # the only .pyc files are the build's own, one per module, for the building Python
    pycs = [n for n in names if n.endswith(".pyc")]
    assert "iflow2api.pyc" in pycs and "h11/__init__.pyc" in pycs
    assert all(n[:-1] in names for n in pycs)
    data = zipfile.ZipFile(str(pyz)).read("iflow2api.pyc")
    assert data[:4] == importlib.util.MAGIC_NUMBER and data[4:8] == (1).to_bytes(4, "little")


def test_contains_no_compiled_extensions(pyz):
    assert not [n for n in zipfile.ZipFile(str(pyz)).namelist() if n.endswith((".so", ".pyd", ".dll", ".dylib"))]


def test_file_starts_with_shebang_and_members_have_fixed_date_and_mode(pyz):
    assert open(str(pyz), "rb").read(23) == b"#!/usr/bin/env python3\n"
    for info in zipfile.ZipFile(str(pyz)).infolist():
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.external_attr >> 16 == 0o100644
        assert info.compress_type == zipfile.ZIP_DEFLATED


def test_build_info_has_version_vendored_pins_and_member_hashes(pyz):
    import importlib.metadata
    archive = zipfile.ZipFile(str(pyz))
    info = json.loads(archive.read("BUILD_INFO.json"))
    assert info["version"] == _version()
    assert info["build_date"] == "1980-01-01T00:00:00Z"
    assert info["git_commit"]
    assert info["vendored"] == {n: importlib.metadata.version(n) for n in ("h11", "certifi")}
    members = set(archive.namelist()) - {"BUILD_INFO.json"}
    assert set(info["sha256"]) == members
    for name in members:
        assert info["sha256"][name] == hashlib.sha256(archive.read(name)).hexdigest()


def test_main_py_checks_the_python_version_before_importing(pyz):
    main = zipfile.ZipFile(str(pyz)).read("__main__.py").decode("utf-8")
    assert main.index("sys.version_info < (3, 8)") < main.index("import iflow2api")
    assert "raise SystemExit(iflow2api.main())" in main


# -- reproducibility ----------------------------------------------------------------

def test_two_builds_from_the_same_inputs_are_identical(pyz, tmp_path):
    again = run_build(tmp_path / "again.pyz")
    assert sha256(again) == sha256(pyz)


def test_check_option_builds_twice_and_compares(vendor_available):
    run = subprocess.run([sys.executable, BUILD, "--check"], env=_clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "reproducible" in run.stdout


def test_source_date_epoch_sets_the_member_dates_and_build_date(tmp_path):
    out = run_build(tmp_path / "dated.pyz", "--no-vendor", SOURCE_DATE_EPOCH="1700000000")
    archive = zipfile.ZipFile(str(out))
    assert {i.date_time for i in archive.infolist()} == {(2023, 11, 14, 22, 13, 20)}
    assert json.loads(archive.read("BUILD_INFO.json"))["build_date"] == "2023-11-14T22:13:20Z"


def test_missing_vendored_package_tells_how_to_install_it(tmp_path):
    code = ("import runpy, sys; sys.modules['h11'] = None; "
            "sys.argv = ['build.py', '--output', sys.argv[1]]; "
            "runpy.run_path(%r, run_name='__main__')" % BUILD)
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.pyz")], env=_clean_env(),
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert "pip install h11 certifi" in run.stderr
    assert not (tmp_path / "x.pyz").exists()


# -- running it -----------------------------------------------------------------------

def test_runs_isolated_and_prints_the_version(pyz, tmp_path):
    run = subprocess.run([sys.executable, "-I", "-S", str(pyz), "--version"], cwd=str(tmp_path),
                         env=_clean_env(HOME=str(tmp_path)), capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "iflow2api " + _version()


@pytest.mark.parametrize("flags", [[], ["-I", "-S"]], ids=["plain", "isolated"])
def test_renamed_to_iflow2api_py_runs_outside_the_repo(pyz, tmp_path, flags):
    # Away from the checkout, so `import iflow2api` can only find the module inside the zip.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(str(pyz), str(elsewhere / "iflow2api.py"))
    run = subprocess.run([sys.executable] + flags + ["iflow2api.py", "version", "--verbose"],
                         cwd=str(elsewhere), env=_clean_env(HOME=str(tmp_path)),
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "iflow2api " + _version()
    assert "h11: 0." in run.stdout


def test_old_python_gets_one_sentence_instead_of_a_traceback(pyz):
    py37 = _interpreter("/root/.pyenv/versions/3.7.16/bin/python", "3.7") or \
        _interpreter(shutil.which("python3.7"), "3.7")
    if py37 is None:
        pytest.skip("no Python 3.7 interpreter here")
    run = subprocess.run([py37, "-I", "-S", str(pyz), "--version"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert run.stderr.strip() == "iflow2api needs Python 3.8 or newer; this is Python 3.7."


def test_vendored_certifi_loads_its_ca_bundle_from_inside_the_zip(pyz, tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import iflow2api; "
            "n = iflow2api.make_tls_context().cert_store_stats()['x509_ca']; import certifi; "
            "assert certifi.__file__.startswith(sys.argv[1]), certifi.__file__; print(n)")
    run = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(pyz)], cwd=str(tmp_path),
                         env=_clean_env(HOME=str(tmp_path)), capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) > 50  # counts only the roots passed as cadata, i.e. certifi's (~120)


@pytest.mark.parametrize("python_name", ["current", "3.8"])
def test_built_file_serves_a_chat_completion_isolated(pyz, tmp_path, python_name):
    python = sys.executable if python_name == "current" else python38()
    if python is None:
        pytest.skip("no Python 3.8 interpreter here")
    with serve(python, pyz, tmp_path) as (base, fake):
        status, answer = http(base + "/v1/chat/completions",
                              {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200
        assert answer["choices"][0]["message"]["content"] == "Hello world"
        seen = fake.chat_requests()
        assert seen and seen[-1].headers.get("user-agent") == "iFlow-Cli"
        assert seen[-1].headers.get("authorization") == "Bearer " + API_KEY


def test_health_reports_h11_when_vendored(pyz, tmp_path):
    with serve(sys.executable, pyz, tmp_path) as (base, _):
        assert http(base + "/health")[1]["http_adapter"] == "h11"


def test_health_reports_stdlib_when_built_without_vendoring(pyz_no_vendor, tmp_path):
    assert "h11/__init__.py" not in zipfile.ZipFile(str(pyz_no_vendor)).namelist()
    with serve(sys.executable, pyz_no_vendor, tmp_path) as (base, _):
        assert http(base + "/health")[1]["http_adapter"] == "stdlib"
