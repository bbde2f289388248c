"""build.py makes one reproducible file that runs isolated (-I -S), under any name, on 3.8+,
and serves a real request through the vendored h11 (or the stdlib parser without it)."""
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from fakes import FakeUpstream
from helpers import ROOT, free_port, healthy, http, in_ci, stop_process, wait_until, write_settings

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


def health(base):
    return json.loads(http(base, "GET", "/health")[2])


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
        up = wait_until(lambda: proc.poll() is not None or healthy(base), 8)
        if proc.poll() is not None:
            pytest.fail("server exited with %s:\n%s" % (proc.returncode, log_path.read_text()))
        if not up:
            pytest.fail("no /health after 8 s:\n%s" % log_path.read_text())
        yield base, fake
    finally:
        stop_process(proc)
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


def _run_blocked(output, *args, blocked=("h11", "certifi"), **env):
    """build.py with `blocked` packages made unimportable in this Python."""
    code = ("import runpy, sys; sys.modules.update(dict.fromkeys(%r)); "
            "sys.argv = ['build.py', '--output', sys.argv[1]] + sys.argv[2:]; "
            "runpy.run_path(%r, run_name='__main__')" % (list(blocked), BUILD))
    return subprocess.run([sys.executable, "-c", code, str(output)] + list(args), env=_clean_env(**env),
                          capture_output=True, text=True, timeout=60)


def test_missing_optional_package_builds_without_it_and_says_how_to_add_it(tmp_path):
    run = _run_blocked(tmp_path / "x.pyz", blocked=("h11",))
    assert run.returncode == 0, run.stdout + run.stderr
    notice = [line for line in run.stderr.splitlines() if "not found" in line]
    assert len(notice) == 1 and "h11 not found" in notice[0]
    assert "--vendor" in notice[0] and "pip install h11==%s" % build_module().PINS["h11"] in notice[0]
    names = zipfile.ZipFile(str(tmp_path / "x.pyz")).namelist()
    assert "certifi/cacert.pem" in names and not any(n.startswith("h11/") for n in names)


def _fake_wheels(directory):
    """Wheels of the installed h11 and certifi (their files and dist-info, as pip installed
    them), so that --vendor can "download" them from a local folder, offline."""
    import importlib.metadata
    os.makedirs(str(directory), exist_ok=True)
    for name in ("h11", "certifi"):
        dist = importlib.metadata.distribution(name)
        wheel = os.path.join(str(directory), "%s-%s-py3-none-any.whl" % (name, dist.version))
        with zipfile.ZipFile(wheel, "w") as archive:
            for record in dist.files:
                path = str(record)
                if "__pycache__" not in path and not path.startswith(".."):
                    archive.writestr(path, record.read_binary())


def test_vendor_option_downloads_the_pinned_wheels_when_not_installed(pyz, tmp_path):
    _fake_wheels(tmp_path / "wheels")
    run = _run_blocked(tmp_path / "dl.pyz", "--vendor", PIP_NO_INDEX="1",
                       PIP_FIND_LINKS=str(tmp_path / "wheels"), PIP_CONFIG_FILE=os.devnull)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "downloading h11==" in run.stdout and "not found" not in run.stderr
    # the same bytes as a build from the installed packages
    assert sha256(tmp_path / "dl.pyz") == sha256(pyz)


def _bare_venv(path):
    """A virtual environment without pip and without any package (like a bare CPython)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    python = os.path.join(str(path), "Scripts" if os.name == "nt" else "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    return python, site


def test_bare_python_builds_a_stdlib_only_file_that_serves(tmp_path):
    python, _ = _bare_venv(tmp_path / "bare")
    out = tmp_path / "bare.pyz"
    run = subprocess.run([python, BUILD, "--output", str(out)], env=_clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    notice = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(notice) == 1 and "h11 and certifi not found" in notice[0] and "--vendor" in notice[0]
    names = zipfile.ZipFile(str(out)).namelist()
    assert not any(n.startswith(("h11/", "certifi/")) for n in names)
    assert json.loads(zipfile.ZipFile(str(out)).read("BUILD_INFO.json"))["vendored"] == {}
    assert (tmp_path / "bare.pyzw").exists()
    with serve(python, out, tmp_path) as (base, _):
        assert health(base)["http_adapter"] == "stdlib"


def test_installed_version_other_than_the_pin_stops_the_build(tmp_path):
    python, site = _bare_venv(tmp_path / "old")
    os.makedirs(os.path.join(site, "h11"))
    open(os.path.join(site, "h11", "__init__.py"), "w").close()
    os.makedirs(os.path.join(site, "h11-0.14.0.dist-info"))
    with open(os.path.join(site, "h11-0.14.0.dist-info", "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: h11\nVersion: 0.14.0\n")
    run = subprocess.run([python, BUILD, "--output", str(tmp_path / "x.pyz")], env=_clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "h11 0.14.0 is installed, but build.py pins h11==%s" % build_module().PINS["h11"] in run.stderr
    assert "--vendor" in run.stderr and not (tmp_path / "x.pyz").exists()


def test_edited_installed_package_stops_the_build(tmp_path):
    # e.g. a certifi whose cacert.pem had a local CA appended: not the pinned release
    import importlib.metadata
    python, site = _bare_venv(tmp_path / "edited")
    dist = importlib.metadata.distribution("h11")
    for record in dist.files:
        target = os.path.join(site, str(record))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(record.read_binary())
    with open(os.path.join(site, "h11", "_util.py"), "a") as f:
        f.write("\n# edited\n")
    run = subprocess.run([python, BUILD, "--output", str(tmp_path / "x.pyz")], env=_clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "differs from the released files (h11/_util.py" in run.stderr


# -- pins -------------------------------------------------------------------------------

def build_module():
    """build.py loaded under another name (`build` is also the PyPI package of `python -m build`)."""
    spec = importlib.util.spec_from_file_location("iflow2api_build_script", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirement_pins():
    pins = {}
    for line in open(os.path.join(ROOT, "tests", "requirements.txt"), encoding="utf-8"):
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version
    return pins


def test_vendored_pins_agree_with_requirements_and_pyproject_extras():
    pins = build_module().PINS
    required = _requirement_pins()
    assert pins == {name: required[name] for name in pins}
    pyproject = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    specs = re.findall(r'"(h11|certifi|pystray|pillow)\s*(~=|==|>=)\s*([0-9][^";,\s]*)', pyproject)
    assert {name for name, _, _ in specs} == {"h11", "certifi", "pystray", "pillow"}
    for name, _, version in specs:  # the lowest version each extra allows is the tested pin
        assert version == required[name], (name, version, required[name])


# -- the .pyzw twin ---------------------------------------------------------------------

def test_pyzw_has_the_same_bytes_and_opens_the_window(pyz, tmp_path):
    pyzw = str(pyz)[:-len(".pyz")] + ".pyzw"
    assert open(pyzw, "rb").read() == open(str(pyz), "rb").read()
    main = zipfile.ZipFile(pyzw).read("__main__.py").decode("utf-8")
    assert 'sys.argv[0].lower().endswith(".pyzw")' in main and '["gui"] + args' in main
    env = _clean_env(HOME=str(tmp_path))
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    as_pyzw = subprocess.run([sys.executable, "-I", "-S", pyzw, "--help"], env=env, capture_output=True,
                             text=True, timeout=30)
    assert as_pyzw.returncode == 0 and as_pyzw.stdout.startswith("usage: iflow2api gui"), as_pyzw.stderr
    # the command the window registers for login: `pythonw iflow2api.pyzw gui --autostart`
    autostart = subprocess.run([sys.executable, "-I", "-S", pyzw, "gui", "--autostart", "--help"], env=env,
                               capture_output=True, text=True, timeout=30)
    assert autostart.returncode == 0 and autostart.stdout.startswith("usage: iflow2api gui"), autostart.stderr
    no_display = subprocess.run([sys.executable, "-I", "-S", pyzw], env=env, cwd=str(tmp_path),
                                capture_output=True, text=True, timeout=30)
    assert no_display.returncode == 2
    assert len(no_display.stderr.strip().splitlines()) == 1, no_display.stderr
    # the .pyz keeps running the CLI, whose `gui` subcommand opens the same window
    as_pyz = subprocess.run([sys.executable, "-I", "-S", str(pyz), "--help"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert as_pyz.returncode == 0 and not as_pyz.stdout.startswith("usage: iflow2api gui")
    gui = subprocess.run([sys.executable, "-I", "-S", str(pyz), "gui", "--help"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert gui.stdout.startswith("usage: iflow2api gui")


def test_file_stays_under_one_and_a_half_megabytes(pyz):
    assert os.path.getsize(str(pyz)) < 1.5 * 1024 * 1024


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
    details = dict(line.split(":", 1) for line in run.stdout.splitlines()[1:])
    assert details["h11"].strip().startswith("0.") and details["http adapter"].strip() == "h11"
    assert "sha256" in details["file"] and "commit" in details["build"]  # the built file says what it is


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
        status, _h, answer = http(base, "POST", "/v1/chat/completions",
                                  {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200
        assert json.loads(answer)["choices"][0]["message"]["content"] == "Hello world"
        seen = fake.chat_requests()
        assert seen and seen[-1].headers.get("user-agent") == "iFlow-Cli"
        assert seen[-1].headers.get("authorization") == "Bearer " + API_KEY


def test_health_reports_h11_when_vendored(pyz, tmp_path):
    with serve(sys.executable, pyz, tmp_path) as (base, _):
        assert health(base)["http_adapter"] == "h11"


def test_health_reports_stdlib_when_built_without_vendoring(pyz_no_vendor, tmp_path):
    assert "h11/__init__.py" not in zipfile.ZipFile(str(pyz_no_vendor)).namelist()
    with serve(sys.executable, pyz_no_vendor, tmp_path) as (base, _):
        assert health(base)["http_adapter"] == "stdlib"
