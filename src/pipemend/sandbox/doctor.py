"""``pipemend doctor``: which sandboxes work here, and for each that does not, why and how to fix it."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import SandboxUnavailable
from . import bwrap
from . import docker as d


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None


def check_docker() -> list[Check]:
    if not shutil.which("docker") and not os.path.exists("/var/run/docker.sock"):
        return [Check("docker engine", False, "docker is not installed",
                      "apt-get install docker.io (or run sandboxes/ci-setup.sh start)")]
    try:
        client = d.docker_client()
    except SandboxUnavailable as e:
        return [Check("docker engine", False, str(e).split(";")[0],
                      "start it: `systemctl start docker`, or `sandboxes/ci-setup.sh start`")]
    checks = [Check("docker engine", True, f"Docker {client.version().get('Version', '?')} answers")]
    try:
        tag = d.image_tag()
    except SandboxUnavailable as e:
        return checks + [Check("docker image", False, str(e), "run from a pipemend checkout with sandboxes/")]
    try:
        client.images.get(tag)
        checks.append(Check("docker image", True, f"{tag} is built"))
    except Exception:
        checks.append(Check("docker image", False, f"{tag} is not built (it is built on first use, a few minutes)",
                            "sandboxes/build  (needs debootstrap and the Debian mirror once)"))
    return checks


def check_bwrap() -> Check:
    if not shutil.which("bwrap"):
        return Check("bwrap", False, "bubblewrap is not installed", "apt-get install bubblewrap")
    try:
        bwrap.probe()
    except SandboxUnavailable as e:
        return Check("bwrap", False, str(e), "enable unprivileged user namespaces (see detail)")
    except subprocess.TimeoutExpired:
        return Check("bwrap", False, "a trivial sandbox did not start within 30s", None)
    return Check("bwrap", True, "bubblewrap creates an isolated sandbox (uid 65534, no network, no capabilities)")


def check_process() -> Check:
    hides = ("as root it runs the pipeline as uid 65534 (or without capabilities, run directories covered) so "
             "the run directory is out of its reach" if os.geteuid() == 0
             else "not root here: the pipeline runs as you and CAN read the run's labels")
    return Check("process", True, f"does NOT isolate the pipeline (limits only); an unsafe opt-in "
                 f"(--sandbox process), never chosen by auto; {hides}", "prefer docker or bwrap")


def check_all() -> list[Check]:
    """Every sandbox check: the two ``auto`` tries (docker, bwrap), then the unsafe ``process``."""
    return [*check_docker(), check_bwrap(), check_process()]
