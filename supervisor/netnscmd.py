"""The control socket's registration commands (``tlshdctl netns ...``).

``netns-add {json}`` and ``netns-remove {json}``: one JSON object with
exactly the fields below, checked strictly here before the registry sees
them.  The socket is root's only, but a runtime's hook passes values it
got from a container's annotations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tlshd.supervisor.namespace import Namespace
from tlshd.supervisor.registry import Registration, RegistrationError, Registry

ADD_FIELDS = {"name": str, "path": str, "config": str, "source": str,
              "allow_userns": bool}
REMOVE_FIELDS = {"name": str, "path": str}
MAX_REQUEST = 8192


def decode(arg: str, fields: Mapping[str, type]) -> dict[str, Any]:
    """The request's fields (each optional, of its type), or ValueError."""
    if len(arg) > MAX_REQUEST:
        raise ValueError("request too long")
    req = json.loads(arg)
    if not isinstance(req, dict):
        raise ValueError("not a JSON object")
    for key, value in req.items():
        kind = fields.get(key)
        if kind is None:
            raise ValueError("unknown field %.40r" % key)
        if type(value) is not kind:
            raise ValueError("%s must be a %s" % (key, kind.__name__))
    return req


def served_as(reg: Registration, served: Sequence[Namespace]) -> str:
    for ns in served:
        if ns.key == reg.key and ns.registered:
            return "served"
    return "not served yet (see the log: max_namespaces?)"


def add(registry: Registry, scan: Callable[[], None],
        served: Callable[[], Sequence[Namespace]], arg: str) -> str:
    """Register, then serve at once (a container's first mount may come
    right after its hook returns)."""
    try:
        req = decode(arg, ADD_FIELDS)
        reg = registry.add(req.get("name", ""), req.get("path", ""),
                           req.get("config", ""),
                           req.get("source", "tlshdctl"),
                           req.get("allow_userns", False))
    except (ValueError, RegistrationError) as e:
        return "error: %s\n" % e
    scan()
    return ("netns %s (%s, inode %d): registered with %s, %s\n"
            % (reg.name, reg.path, reg.key[1], reg.config_path,
               served_as(reg, served())))


def remove(registry: Registry, scan: Callable[[], None], arg: str) -> str:
    try:
        req = decode(arg, REMOVE_FIELDS)
        if ("name" in req) == ("path" in req):
            raise ValueError("give the name or the path")
        reg = registry.remove(req.get("name", ""), req.get("path", ""))
    except (ValueError, RegistrationError) as e:
        return "error: %s\n" % e
    scan()
    return "netns %s (%s): registration removed\n" % (reg.name, reg.path)
