"""``tlshd-oci-hook``: register a container's network namespace with tlshd.

An OCI runtime hook (podman and CRI-O read the hook files in
/usr/share/containers/oci/hooks.d; see packaging/oci-hooks).  The runtime
passes the container's state as JSON on stdin: its id, the pid of its
first process and its annotations.

- ``tlshd-oci-hook add`` (stage createRuntime, when the container has the
  annotation ``org.tlshd.config``): registers /proc/PID/ns/net with that
  configuration, named after the container id; ``org.tlshd.allow-userns:
  "true"`` registers a namespace a user namespace owns.
- ``tlshd-oci-hook remove`` (stage poststop): removes the registration.
  A container whose namespace is gone is dropped by tlshd itself, so
  "not registered" is no error here.

A hook that fails stops the container from starting: ``add`` fails when
tlshd refuses the registration (the container would otherwise run without
its TLS credentials); ``remove`` never fails a container's teardown.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tlshd.supervisor.ctl import query
from tlshd.supervisor.paths import CONTROL_SOCKET as DEFAULT_PATH

CONFIG = "org.tlshd.config"
ALLOW_USERNS = "org.tlshd.allow-userns"
MAX_STATE = 1 << 20  # a container's state, with its annotations


def container_state(text: str) -> tuple[str, int, dict[str, str]]:
    """(id, pid, annotations) from the runtime's state, or ValueError."""
    state: Any = json.loads(text)
    if not isinstance(state, dict):
        raise ValueError("the container state is not a JSON object")
    cid, pid = state.get("id"), state.get("pid", 0)
    annotations = state.get("annotations") or {}
    if not isinstance(cid, str) or not cid:
        raise ValueError("the container state has no id")
    if type(pid) is not int or pid < 0:
        raise ValueError("the container state has a bad pid")
    if not isinstance(annotations, dict) or not all(
            isinstance(v, str) for v in annotations.values()):
        raise ValueError("the container state has bad annotations")
    return cid, pid, annotations


def request(action: str, text: str) -> str | None:
    """The control command for this hook call (None: nothing to do)."""
    cid, pid, annotations = container_state(text)
    if action == "remove":
        return "netns-remove " + json.dumps({"name": cid})
    config = annotations.get(CONFIG)
    if config is None:
        return None
    if pid <= 0:
        raise ValueError("container %s has no process yet (run this hook "
                         "at createRuntime)" % cid)
    allow = annotations.get(ALLOW_USERNS, "false")
    if allow not in ("true", "false"):
        raise ValueError("%s must be true or false" % ALLOW_USERNS)
    return "netns-add " + json.dumps({
        "name": cid, "path": "/proc/%d/ns/net" % pid, "config": config,
        "source": "oci %s" % cid, "allow_userns": allow == "true"})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or args[0] not in ("add", "remove"):
        print("usage: tlshd-oci-hook add|remove [CONTROL-SOCKET] "
              "(the container state on stdin)", file=sys.stderr)
        return 2
    action = args[0]
    path = args[1] if len(args) == 2 else DEFAULT_PATH
    try:
        command = request(action, sys.stdin.read(MAX_STATE))
        if command is None:
            return 0
        out = query(path, command)
    except (ValueError, OSError) as e:
        print("tlshd-oci-hook %s: %s" % (action, e), file=sys.stderr)
        return 1 if action == "add" else 0
    if out.startswith("error:"):
        print("tlshd-oci-hook %s: %s" % (action, out.strip()),
              file=sys.stderr)
        return 1 if action == "add" else 0
    print(out.strip(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
