"""Podman for the container test (tests/e2e/test_docker.py): install the tools, build a
Debian base image locally (no image registry is reachable), and the podman flags this kind
of machine needs.

- install_container_tools(): apt-get install podman and its helpers when missing (as root,
  e.g. in CI); tests/run.py calls it under CI.
- base_tarball(): `debootstrap --variant=minbase bookworm` with python3, packed as a tar in
  .cache/container/ (made once, ~1-2 minutes; later runs reuse it).
- podman(): the command with the flags that work without systemd and with low rlimits.
"""
import os
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, ".cache", "container")
SUITE = "bookworm"
# python3 for the app, passwd for useradd in the Dockerfile.
BASE_PACKAGES = ("python3", "passwd")
BASE_IMAGE = "localhost/iflow2api-test-base:" + SUITE
APT_PACKAGES = ("podman", "runc", "debootstrap", "uidmap", "slirp4netns", "fuse-overlayfs")
# No systemd cgroups here, and rlimits lower than podman's defaults.
PODMAN_FLAGS = ["--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
RUN_FLAGS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1024:1024"]


def missing_tools() -> list:
    """The commands podman and the base image need that are not on PATH."""
    return [tool for tool in ("podman", "runc", "debootstrap")
            if shutil.which(tool) is None and not os.path.exists("/usr/sbin/" + tool)]


def install_container_tools() -> bool:
    """apt-get install podman, runc, debootstrap and helpers when missing; True when present.
    Only as root with apt-get (CI); elsewhere it just reports."""
    if not missing_tools():
        return True
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("tests/container_setup.py: installing %s" % " ".join(APT_PACKAGES), flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.call(["apt-get", "update", "-qq"], env=env)
        subprocess.call(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + list(APT_PACKAGES),
                        env=env)
    return not missing_tools()


def podman(*args) -> list:
    """The podman command line with this machine's flags, then `args`."""
    return [shutil.which("podman") or "podman"] + PODMAN_FLAGS + list(args)


def base_tarball() -> str:
    """Path of the cached root filesystem tar (minimal Debian + python3), made when missing."""
    name = "%s-%s.tar" % (SUITE, "-".join(BASE_PACKAGES))
    path = os.path.join(CACHE_DIR, name)
    if os.path.exists(path):
        return path
    os.makedirs(CACHE_DIR, exist_ok=True)
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    with tempfile.TemporaryDirectory(prefix="iflow2api-rootfs-", dir=CACHE_DIR) as tmp:
        rootfs = os.path.join(tmp, "rootfs")
        print("tests/container_setup.py: debootstrap %s (once; cached in %s)" % (SUITE, path), flush=True)
        subprocess.run([debootstrap, "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                        SUITE, rootfs], check=True, stdout=subprocess.DEVNULL)
        # Smaller tar, faster import: no package caches, docs or translations.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                    "usr/share/locale", "usr/share/info"):
            target = os.path.join(rootfs, sub)
            if os.path.isdir(target):
                shutil.rmtree(target)
                os.makedirs(target)
        partial = os.path.join(tmp, name)
        subprocess.run(["tar", "--numeric-owner", "-C", rootfs, "-cf", partial, "."], check=True)
        os.replace(partial, path)
    return path


def import_base_image(tarball: str, image: str = BASE_IMAGE) -> str:
    """`podman import` the tarball as `image` (replacing an older one); returns the name."""
    with open(tarball, "rb") as f:
        subprocess.run(podman("import", "-", image), stdin=f, check=True, stdout=subprocess.DEVNULL)
    return image


if __name__ == "__main__":  # set up by hand: python3 tests/container_setup.py
    if not install_container_tools():
        raise SystemExit("missing: %s" % ", ".join(missing_tools()))
    print(base_tarball())
