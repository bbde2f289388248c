"""iflow2api.py needs only the standard library (h11 and certifi optional) and
nothing newer than Python 3.8."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, SOURCE, cli_env, free_port, healthy, http, in_ci, wait_until, write_settings

OPTIONAL = {"h11", "certifi"}
OUR_MODULES = {"iflow2api_gui"}  # `iflow2api gui` imports the desktop app, which ships beside it


def imported_top_level_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_only_stdlib_and_optional_packages():
    stdlib = set(sys.stdlib_module_names)
    foreign = imported_top_level_modules(SOURCE) - stdlib - OPTIONAL - OUR_MODULES - {"__future__"}
    assert not foreign, "non-stdlib imports: %s" % sorted(foreign)


def test_never_imports_gui_toolkits():
    assert not imported_top_level_modules(SOURCE) & {"tkinter", "pystray", "PIL"}


def test_works_without_optional_packages():
    code = ("import sys; sys.modules['h11'] = None; sys.modules['certifi'] = None; "
            "import iflow2api as I; assert I.h11 is None and not I.has_certifi(); "
            "assert I.pick_http_adapter({}) == 'stdlib'; I.make_tls_context(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "ok", out.stderr


def test_minimum_python_is_3_8_per_vermin():
    vermin = shutil.which("vermin")
    if vermin is None:
        if in_ci():
            pytest.fail("vermin must be installed in CI")
        pytest.skip("vermin not installed")
    out = subprocess.run([vermin, "--target=3.8-", "--violations", "--no-tips", "--eval-annotations",
                          "--backport", "typing", SOURCE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _python38():
    for candidate in ("/root/.pyenv/versions/3.8.18/bin/python", shutil.which("python3.8")):
        if candidate and os.path.exists(candidate):
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True)
            if out.stdout.strip() == "(3, 8)":
                return candidate
    return None


def test_serves_a_request_on_python_3_8_when_present(tmp_path):
    """Beyond vermin's static check: the server really runs on 3.8 (stdlib adapter)."""
    py38 = _python38()
    if py38 is None:
        pytest.skip("no Python 3.8 interpreter here (vermin covers the check)")
    import json
    from fakes import FakeUpstream
    fake = FakeUpstream()
    write_settings(str(tmp_path), fake.url)
    port = free_port()
    base = "http://127.0.0.1:%d" % port
    proc = subprocess.Popen([py38, SOURCE, "--port", str(port)], env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: healthy(base), 10)
        status, _h, answer = http(base, "POST", "/v1/chat/completions",
                                  {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"] == "Hello world"
    finally:
        proc.kill()
        proc.wait()
        fake.close()
