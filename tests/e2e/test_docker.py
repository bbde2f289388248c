"""The Dockerfile, built and run for real with podman: the HEALTHCHECK passes, a chat request
goes through the container to a fake upstream on the host, the server runs as non-root, and
what it writes in /data survives a new container on the same volume.

The base image is a local debootstrap of Debian bookworm with python3 (no image registry is
reachable; tests/container_setup.py caches the root filesystem in .cache/container/), passed
as --build-arg BASE. With --network host the server inside listens on 0.0.0.0:<free port>
and is reached at 127.0.0.1:<port>; the fake upstream on the host is 127.0.0.1 too.
Needs root (debootstrap, rootful podman); under CI a missing tool fails instead of skipping.
"""
import json
import os
import re
import subprocess
import time
import uuid

import pytest

import container_setup
from fakes import FakeUpstream
from helpers import ROOT, free_port, http, in_ci

UPSTREAM_KEY = "sk-fake-upstream-0123456789abcdef"
GENERATED_KEY = re.compile(r"^\s+(sk-i2a-[A-Za-z0-9_-]+)\s*$", re.M)


def _missing_reason():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (debootstrap and rootful podman)"
    missing = container_setup.missing_tools()
    if missing:
        return "%s not installed (tests/container_setup.py installs them)" % ", ".join(missing)
    return ""


def podman(*args, check=True, timeout=300, **kwargs):
    """Run podman with this machine's flags; the CompletedProcess (text)."""
    run = subprocess.run(container_setup.podman(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, timeout=timeout, **kwargs)
    if check and run.returncode != 0:
        raise AssertionError("podman %s failed (%d):\n%s%s" % (" ".join(args), run.returncode,
                                                              run.stdout, run.stderr))
    return run


@pytest.fixture(scope="module")
def image():
    """The image built from the repo's Dockerfile on the local Debian base; removed afterwards."""
    reason = _missing_reason()
    if reason:
        if in_ci():
            pytest.fail("container test cannot run in CI: " + reason)
        pytest.skip(reason)
    suffix = uuid.uuid4().hex[:8]
    base = container_setup.import_base_image(container_setup.base_tarball(),
                                             "localhost/iflow2api-test-base-%s:bookworm" % suffix)
    name = "localhost/iflow2api-test-%s:latest" % suffix
    try:
        # --layers=false: one commit per stage (vfs copies the whole tree for each layer);
        # --format docker keeps the HEALTHCHECK (the OCI format has none); WITH_EXTRAS=0: the
        # local base has no pip, so the image is standard-library only.
        podman("build", "--layers=false", "--force-rm", "--format", "docker", "--network", "host",
               *container_setup.RUN_FLAGS, "--build-arg", "BASE=" + base, "--build-arg", "WITH_EXTRAS=0",
               "-t", name, ROOT)
        yield name
    finally:
        podman("rmi", "-f", name, base, check=False)


@pytest.fixture
def volume():
    name = "iflow2api-test-%s" % uuid.uuid4().hex[:8]
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "-f", name, check=False)


@pytest.fixture
def containers():
    """Names of containers a test starts; all removed at the end."""
    names = []
    yield names
    for name in names:
        podman("rm", "-f", "-t", "2", name, check=False)


def cli(image, volume, *args):
    """`iflow2api <args>` in a throwaway container on the volume; its output."""
    return podman("run", "--rm", "--network", "host", *container_setup.RUN_FLAGS, "-v", volume + ":/data",
                  image, *args).stdout


def start(image, volume, port, containers):
    """A detached server container on the volume, listening on 0.0.0.0:port (host network)."""
    name = "iflow2api-test-%s" % uuid.uuid4().hex[:8]
    containers.append(name)
    podman("run", "-d", "--name", name, "--network", "host", *container_setup.RUN_FLAGS,
           "-e", "IFLOW2API_PORT=%d" % port, "-v", volume + ":/data", image)
    return name


def wait_healthy(name, timeout_s=30):
    """Run the image's HEALTHCHECK until it passes (podman runs it on demand: no systemd timers here)."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = podman("healthcheck", "run", name, check=False, timeout=30)
        if run.returncode == 0:
            return
        if time.monotonic() > deadline:
            logs = podman("logs", name, check=False)
            raise AssertionError("HEALTHCHECK did not pass in %d s: %s%s\nlogs:\n%s%s"
                                 % (timeout_s, run.stdout, run.stderr, logs.stdout, logs.stderr))
        time.sleep(0.5)


def chat(port, key):
    status, _h, body = http("http://127.0.0.1:%d" % port, "POST", "/v1/chat/completions",
                            {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]},
                            {"authorization": "Bearer " + key})
    return status, json.loads(body or b"{}")


def test_image_serves_through_the_healthcheck_as_non_root_and_keeps_its_config(image, volume, containers):
    fake = FakeUpstream()
    try:
        # Config written inside, by the CLI in throwaway containers: the upstream and its key.
        assert "saved to /data/.iflow2api/config.json" in cli(image, volume, "config", "base_url", fake.url)
        cli(image, volume, "config", "api_key", UPSTREAM_KEY)
        # no look for a newer release from inside the test container (it has no CI variable)
        cli(image, volume, "config", "check_update_on_startup", "false")

        port = free_port()
        first = start(image, volume, port, containers)
        wait_healthy(first)
        assert podman("inspect", "--format", "{{.State.Health.Status}}", first).stdout.strip() == "healthy"
        assert podman("exec", first, "id", "-u").stdout.strip() not in ("", "0")
        assert podman("inspect", "--format", "{{.Config.User}}", first).stdout.strip() == "iflow"

        # 0.0.0.0 needs a client key: the first start generates one and prints it in the log.
        logs = podman("logs", first).stdout
        keys = GENERATED_KEY.findall(logs)
        assert len(keys) == 1, logs
        status, answer = chat(port, keys[0])
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"] == "Hello world"
        assert fake.chat_requests()[-1].headers.get("authorization") == "Bearer " + UPSTREAM_KEY
        assert chat(port, "sk-i2a-wrong")[0] == 401

        # A new container on the same volume: same config, same client key, no new one.
        podman("stop", "-t", "10", first)
        podman("rm", first)
        second = start(image, volume, port, containers)
        wait_healthy(second)
        assert not GENERATED_KEY.findall(podman("logs", second).stdout)
        status, answer = chat(port, keys[0])
        assert status == 200, answer
        assert len(fake.chat_requests()) == 2
    finally:
        fake.close()
