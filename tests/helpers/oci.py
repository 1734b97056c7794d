"""Rootless OCI containers for the seccomp agent tests: a busybox-static root file
system, a ``config.json`` whose seccomp profile names the agent's socket, and crun or
runc (Debian's) run by an unprivileged user inside the test's "host" namespace.

The bundle: ``rootfs`` holds /bin/busybox (Debian's busybox-static: no libraries
needed) and links for the applets the tests call, a read-only root, a file for httpd
to serve, and tmpfs on /tmp.  ``config.json`` is ``runc spec --rootless``'s layout
written out here (so both runtimes get the same file): new pid, ipc, uts, mount, user
and *network* namespaces, the user's uid and gid mapped to 0 (one id each: no
newuidmap needed), CAP_NET_ADMIN inside (to add an address to its own ``lo``), no
cgroups (``cgroupsPath`` absent; crun also gets ``--cgroup-manager=disabled``: cgroups
are not delegated to users here; see :func:`enter` for the cgroup file system the
runtimes are shown).  Both runtimes bring the new namespace's ``lo`` up; nothing else
is in it, so whatever the container reaches beyond it went through a switched socket.

``/dev/net/tun`` plays no part here (nothing makes a device).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from helpers.environment import REPO
from helpers.rootlesskit import RootlessUser
from helpers.unprivileged import copy_distributions, system_python

RUNTIMES = ["crun", "runc"]
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "nc", "wget", "echo", "cat", "sleep", "httpd", "true", "ip", "nslookup")
PAGE = "served from the container's own loopback\n"


def enter(netns: str) -> list[str]:
    """The words that run a command in network namespace ``netns`` with the cgroup file
    system of a stock machine (see the module docstring).

    ``nsenter``, not ``ip netns exec``: that mounts a sysfs of its own on /sys, hiding
    /sys/fs/cgroup, where crun looks for the cgroup version even when it uses none
    ("invalid file system type on '/sys/fs/cgroup'").  This machine has the hybrid
    layout (cgroup v1 controllers, cgroup2 at /sys/fs/cgroup/unified), which crun 1.8
    refuses outright ("cgroups in hybrid mode not supported"); a stock Debian 12 has
    cgroup2 alone at /sys/fs/cgroup.  So the runtime runs in a mount namespace of its
    own (private: nothing leaks back) where /sys/fs/cgroup is a cgroup2 mount, as there.
    """
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"', "sh",
            "nsenter", f"--net=/run/netns/{netns}"]


def runtime_argv(runtime: str, state_dir: Path) -> list[str]:
    """The runtime's global options: its state under ``state_dir``, no cgroups."""
    if runtime == "crun":
        return ["crun", f"--root={state_dir}", "--cgroup-manager=disabled"]
    return ["runc", f"--root={state_dir}"]


def make_bundle(top: Path, user: RootlessUser, args: list[str], seccomp: dict,
                programs: tuple[Path, ...] = ()) -> Path:
    """A bundle directory under ``top`` (owned by ``user``) running ``args``, with
    ``programs`` (static executables) copied to its /bin."""
    bundle = top / "bundle"
    rootfs = bundle / "rootfs"
    for directory in ("bin", "proc", "dev", "sys", "tmp", "etc", "www"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    for program in programs:
        shutil.copy2(program, rootfs / "bin" / program.name)
    (rootfs / "www" / "index.html").write_text(PAGE)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    config = {
        "ociVersion": "1.0.2-dev",
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "nsbagent",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "cwd": "/",
            "env": ["PATH=/bin"], "noNewPrivileges": True,
            "capabilities": {kind: ["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"] for kind in
                             ("bounding", "effective", "permitted", "ambient")},
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=16m"]},
        ],
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": user.uid, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": user.gid, "size": 1}],
            "namespaces": [{"type": kind} for kind in
                           ("pid", "ipc", "uts", "mount", "user", "network")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
            "seccomp": seccomp,
        },
    }
    (bundle / "config.json").write_text(json.dumps(config, indent=1))
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(top)], check=True)
    return bundle


def run_container(user: RootlessUser, host: str, runtime: str, bundle: Path, name: str,
                  timeout: float = 60) -> subprocess.CompletedProcess:
    """``RUNTIME run`` as ``user`` in namespace ``host``, waited for."""
    state = bundle.parent / "state"
    state.mkdir(exist_ok=True)
    os.chown(state, user.uid, user.gid)
    argv = [*enter(host), *user.argv(
        *runtime_argv(runtime, state), "run", "--bundle", str(bundle), name)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def runtime_as(user: RootlessUser, host: str, runtime: str, bundle: Path,
               *args: str) -> list[str]:
    """The words that run ``RUNTIME ARGS`` as ``user`` in ``host`` for ``bundle``."""
    state = bundle.parent / "state"
    state.mkdir(exist_ok=True)
    os.chown(state, user.uid, user.gid)
    return [*enter(host), *user.argv(*runtime_argv(runtime, state), *args)]


def delete_container(user: RootlessUser, host: str, runtime: str, bundle: Path,
                     name: str) -> None:
    """Remove what the runtime kept of ``name`` (a run that failed halfway)."""
    state = bundle.parent / "state"
    subprocess.run([*enter(host), *user.argv(
        *runtime_argv(runtime, state), "delete", "--force", name)], capture_output=True)


def build_static(source: Path, out: Path) -> Path:
    """``source`` (C) compiled static to ``out``: the container has no C library."""
    subprocess.run(["gcc", "-static", "-O1", "-Wall", "-o", str(out), str(source)],
                   check=True, capture_output=True)
    return out


def nsbridge_command(user: RootlessUser) -> Path:
    """A script in the user's home running the checkout's ``nsbridge`` with the system's
    Python and copies of its dependencies (root's interpreter may sit where the user
    cannot read)."""
    script = user.home / "nsbridge"
    if script.exists():
        return script
    site = user.home / "site-packages"
    copy_distributions(site, ("pyroute2",))
    code = ("import sys; sys.argv[0] = 'nsbridge'; "
            "from nsbridge.cli.main import main; sys.exit(main())")
    script.write_text(f'#!/bin/sh\nPYTHONPATH={REPO}:{site} exec {system_python()} '
                      f'-c "{code}" "$@"\n')
    script.chmod(0o755)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(site), str(script)],
                   check=True)
    return script
