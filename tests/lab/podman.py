"""Real containers: Debian's podman, with tlshd's OCI hook, in the guest.

No image and no registry: every container runs on one local root
directory (``--rootfs``) that holds only mount points, with the host's
/usr bound read-only into it (bookworm's /bin, /sbin and /lib are links
into /usr), so the host's mount.nfs, ip and sleep run inside.  What
podman needs in a bare guest comes from a containers.conf and a
storage.conf of the lab's own (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF,
which podman also passes to the conmon and cleanup processes it starts):
cgroupfs, the file events backend, the vfs storage driver under the
lab's directory, crun, and the hooks directory with tlshd's two hook
files.  Those are the packaged ones (packaging/oci-hooks) with "path"
pointing at the project's venv instead of /usr/libexec.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from lab.shell import REPO, VENV_BIN, sh

HOOKS = REPO / "packaging" / "oci-hooks"
ROOT_DIRS = ("usr", "etc", "proc", "sys", "dev", "tmp", "mnt", "run",
             "var")
ROOT_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib",
              "lib64": "usr/lib64"}


class Podman:
    """podman with its state under ``home``, and tlshd's hooks."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.rootfs = home / "rootfs"
        hooks = home / "hooks.d"
        for d in (hooks, home / "storage", home / "run", home / "tmp"):
            d.mkdir(parents=True)
        self.rootfs.mkdir()
        for d in ROOT_DIRS:
            (self.rootfs / d).mkdir()
        for name, target in ROOT_LINKS.items():
            (self.rootfs / name).symlink_to(target)
        for hook in sorted(HOOKS.glob("*.json")):
            spec = json.loads(hook.read_text())
            action = spec["hook"]["args"][-1]
            python = str(VENV_BIN / "python")
            spec["hook"]["path"] = python
            spec["hook"]["args"] = [python, "-m", "tlshd.supervisor.ocihook",
                                    action]
            (hooks / hook.name).write_text(json.dumps(spec))
        (home / "containers.conf").write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\nruntime = "crun"\n'
            'hooks_dir = ["%s"]\ntmp_dir = "%s"\n' % (hooks, home / "tmp"))
        (home / "storage.conf").write_text(
            '[storage]\ndriver = "vfs"\ngraphroot = "%s"\nrunroot = "%s"\n'
            % (home / "storage", home / "run"))
        self.env = dict(os.environ,
                        CONTAINERS_CONF=str(home / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(home / "storage.conf"))
        # crun mounts a cgroup file system into each container from the
        # host's /sys/fs/cgroup, which the guest's stage 2 leaves empty.
        sh("mountpoint -q /sys/fs/cgroup || "
           "mount -t cgroup2 cgroup2 /sys/fs/cgroup")

    def podman(self, *args: str, timeout: float = 300
               ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *args], env=self.env,
                              capture_output=True, text=True,
                              timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)

    def run(self, name: str, annotations: dict[str, str]
            ) -> subprocess.CompletedProcess[str]:
        """Start container ``name`` (``sleep`` as its process), with no
        network but its own namespace's loopback (``--network none``: the
        test gives it a veth) and privileged, so that it may mount NFS."""
        args = ["run", "-d", "--name", name, "--network", "none",
                "--privileged", "--cgroups", "disabled",
                "-v", "/usr:/usr:ro",
                "-v", "/etc/netconfig:/etc/netconfig:ro"]
        for key, value in annotations.items():
            args += ["--annotation", "%s=%s" % (key, value)]
        return self.podman(*args, "--rootfs", str(self.rootfs),
                           "/usr/bin/sleep", "100000")

    def container_id(self, name: str) -> str:
        return self.inspect(name, "{{.Id}}")

    def pid(self, name: str) -> int:
        return int(self.inspect(name, "{{.State.Pid}}"))

    def inspect(self, name: str, fmt: str) -> str:
        r = self.podman("inspect", "-f", fmt, name)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def stop(self, name: str) -> subprocess.CompletedProcess[str]:
        """Stop at once (``sleep`` as PID 1 ignores SIGTERM)."""
        return self.podman("stop", "-t", "0", name)

    def remove_all(self) -> None:
        self.podman("rm", "-f", "-a", "-t", "0")


def wait_gone(pid: int, timeout: float) -> float:
    """Wait until process ``pid`` has exited; the seconds it took."""
    start = time.monotonic()
    while Path("/proc/%d" % pid).exists():
        if time.monotonic() - start > timeout:
            raise AssertionError("process %d still there after %s s"
                                 % (pid, timeout))
        time.sleep(0.1)
    return time.monotonic() - start
