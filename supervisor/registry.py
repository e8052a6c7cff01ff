"""Network namespaces registered at run time, each with its configuration.

Container runtimes seldom name their namespaces where ``ip netns`` does:
Docker keeps them under /var/run/docker/netns, LXC and systemd-nspawn
leave them unnamed.  A runtime (or its OCI hook) says "serve this
container's namespace with this tenant's configuration" when it starts
the container, and "forget it" when it stops:

- ``tlshdctl netns add --path P --config C`` over the root-only control
  socket (``netns remove --name N|--path P`` to forget it);
- a drop-in file in ``netns.d/*.conf`` beside the main configuration:
  ``[netns] path=`` a glob pattern, ``config=`` the configuration, for
  static setups (every path that matches and is a network namespace).

A registration holds an fd of its namespace, so the namespace cannot be
freed and its inode reused while it is served.  It is dropped when its
path no longer leads to that namespace (the container's process is gone,
the runtime removed its file): ``check`` looks every CHECK_INTERVAL.
Registrations made over the socket are kept in a state file under /run
and checked again when the daemon starts, so a restart serves them as
before; drop-ins are read again instead.  The file keeps each
namespace's inode too: a path that leads to another namespace by then
(the container's process died while the daemon was down and its pid was
reused) is not served with the old registration's configuration.

A namespace owned by a user namespace other than ours (a rootless or
user-namespaced container: its root can send netlink messages to our
socket there) is registered only with ``allow_userns``, the same opt-in
``[netns] unnamed_userns`` is for unnamed ones.

Nothing here serves a namespace: namespaces.Discovery asks ``by_key``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from tlshd.shared import config
from tlshd.shared.errors import ConfigError
from tlshd.supervisor import netns

log = logging.getLogger(__name__)

# ioctl(2) on a namespace fd: its type, a CLONE_NEW* flag (<linux/nsfs.h>,
# _IO(0xb7, 0x3)).
NS_GET_NSTYPE = 0xB703
CLONE_NEWNET = 0x40000000

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}\Z")
MAX_PATH = 1024
MAX_SOURCE = 256
# How often each registration's path is looked at again.
CHECK_INTERVAL = 2.0
# The state file: at most this big, with at most this many entries.
STATE_MAX_BYTES = 4 << 20
STATE_MAX_ENTRIES = 8192
STATE_VERSION = 1
# Beside the control socket, in its root-only directory under /run.
STATE_FILE = "netns-registrations.json"
STATE_KEYS = frozenset({"name", "path", "config", "source", "allow_userns",
                        "netns_dev", "netns_inode"})


def state_path(control_socket: str) -> str:
    return os.path.join(os.path.dirname(control_socket), STATE_FILE)


class RegistrationError(Exception):
    """A registration that cannot be made (the message says why)."""


@dataclass(eq=False)
class Registration:
    """One registered namespace."""

    name: str  # its label in the log and in status
    path: str  # as given; the namespace is gone when this stops leading there
    config_path: str
    source: str  # who registered it: "tlshdctl", "oci ID", "netns.d/F"
    allow_userns: bool
    key: netns.Key
    fd: int  # pins the namespace while it is registered
    dropin: bool = False  # from a drop-in: not written to the state file

    def found(self) -> netns.Found:
        """Where Discovery opens it: our own fd, not the path, which may
        lead elsewhere by now."""
        return netns.Found(self.key, "/proc/self/fd/%d" % self.fd, self.name)

    def state(self) -> dict[str, object]:
        return {"name": self.name, "path": self.path,
                "config": self.config_path, "source": self.source,
                "allow_userns": self.allow_userns,
                "netns_dev": self.key[0], "netns_inode": self.key[1]}


def open_netns(path: str) -> int:
    """An fd (close-on-exec) of the network namespace at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise RegistrationError("cannot open %s: %s"
                                % (path, e.strerror or e)) from None
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        os.close(fd)
        raise RegistrationError("%s is not a namespace" % path) from None
    if nstype != CLONE_NEWNET:
        os.close(fd)
        raise RegistrationError("%s is a namespace, but not a network "
                                "namespace" % path)
    return fd


def check_fields(name: str, path: str, config_path: str,
                 source: str) -> None:
    """Refuse what no registration may hold (before opening anything)."""
    if not NAME.match(name):
        raise RegistrationError(
            "bad name %r: 1 to 128 of A-Z a-z 0-9 _ . : @ + -, starting "
            "with a letter or digit" % name[:MAX_SOURCE])
    for what, value in (("path", path), ("config", config_path)):
        if (not value.startswith("/") or len(value) > MAX_PATH
                or not value.isprintable()):
            raise RegistrationError("bad %s %r: an absolute path of at most "
                                    "%d printable characters"
                                    % (what, value[:MAX_SOURCE], MAX_PATH))
    if len(source) > MAX_SOURCE or not source.isprintable():
        raise RegistrationError("bad source: at most %d printable "
                                "characters" % MAX_SOURCE)


def default_name(path: str, key: netns.Key) -> str:
    """A label for a registration that was given none: the file's name
    (a Docker or CNI namespace id), else the namespace's inode."""
    base = os.path.basename(path)
    if NAME.match(base) and base not in ("net", "netns"):
        return base
    return "netns-%d" % key[1]


class Registry:
    """The registered namespaces, by name.

    ``home_key`` is our own namespace (served by the main configuration,
    never registered); ``foreign_userns(fd)`` says whether a namespace is
    owned by a user namespace other than ours.
    """

    def __init__(self, state_path: str | None, home_key: netns.Key,
                 foreign_userns: Callable[[int], bool]) -> None:
        self.state_path = state_path
        self.home_key = home_key
        self.foreign_userns = foreign_userns
        self.entries: dict[str, Registration] = {}
        self.by_key: dict[netns.Key, Registration] = {}
        self.next_check = 0.0

    def add(self, name: str, path: str, config_path: str, source: str,
            allow_userns: bool = False, dropin: bool = False,
            expect: netns.Key | None = None) -> Registration:
        """Register (or, with the same path and configuration, confirm) a
        namespace; RegistrationError says why not.  ``expect``: the
        namespace the path must lead to (a registration restored)."""
        check_fields(name or "x", path, config_path, source)
        fd = open_netns(path)
        try:
            try:
                config.load(config_path)
            except ConfigError as e:
                raise RegistrationError("configuration %s: %s"
                                        % (config_path, e)) from None
            key = netns.key_of("/proc/self/fd/%d" % fd)
            if expect is not None and key != expect:
                raise RegistrationError(
                    "%s leads to another namespace than the one registered "
                    "(its process gone, the pid reused?)" % path)
            name = name or default_name(path, key)
            check_fields(name, path, config_path, source)
            old = self._conflict(name, key, config_path)
            if old is not None:
                os.close(fd)
                return old
            if key == self.home_key:
                raise RegistrationError(
                    "%s is tlshd's own network namespace, served by the "
                    "main configuration" % path)
            if not allow_userns and self.foreign_userns(fd):
                raise RegistrationError(
                    "%s is owned by a user namespace other than tlshd's: "
                    "its root can send netlink messages to tlshd there; "
                    "register it with --allow-userns to serve it anyway"
                    % path)
        except BaseException:
            os.close(fd)
            raise
        reg = Registration(name, path, config_path, source, allow_userns,
                           key, fd, dropin)
        self.entries[name] = self.by_key[key] = reg
        log.info("netns %s registered (%s, by %s) with configuration %s",
                 name, path, source, config_path)
        self.save()
        return reg

    def _conflict(self, name: str, key: netns.Key,
                  config_path: str) -> Registration | None:
        """The same registration again (returned), or a clash (raised)."""
        same_name = self.entries.get(name)
        same_key = self.by_key.get(key)
        if same_name is not None and same_name is same_key:
            if same_name.config_path == config_path:
                return same_name
            raise RegistrationError(
                "netns %s is registered with configuration %s; remove it "
                "first" % (name, same_name.config_path))
        if same_name is not None:
            raise RegistrationError("the name %s is taken by another "
                                    "namespace (%s)" % (name, same_name.path))
        if same_key is not None:
            raise RegistrationError("that namespace is registered as %s"
                                    % same_key.name)
        return None

    def remove(self, name: str = "", path: str = "",
               why: str = "removed") -> Registration:
        """Forget a registration, by name or by path."""
        reg = self.entries.get(name) if name else self._by_path(path)
        if reg is None:
            raise RegistrationError("no namespace is registered as %s"
                                    % (name or path)[:MAX_PATH])
        del self.entries[reg.name]
        del self.by_key[reg.key]
        os.close(reg.fd)
        log.info("netns %s (%s): registration %s", reg.name, reg.path, why)
        self.save()
        return reg

    def _by_path(self, path: str) -> Registration | None:
        for reg in self.entries.values():
            if reg.path == path:
                return reg
        try:
            key = netns.key_of(path)
        except OSError:
            return None
        return self.by_key.get(key)

    def check(self, now: float) -> bool:
        """Drop the registrations whose path no longer leads to their
        namespace; True if any was dropped.  At most every
        CHECK_INTERVAL: a stat(2) per registration."""
        if now < self.next_check:
            return False
        self.next_check = now + CHECK_INTERVAL
        dropped = False
        for reg in list(self.entries.values()):
            try:
                alive = netns.key_of(reg.path) == reg.key
            except OSError:
                alive = False
            if not alive:
                self.remove(reg.name, why="dropped: %s no longer leads to "
                            "its namespace" % reg.path)
                dropped = True
        return dropped

    def close(self) -> None:
        """Let go of every namespace (the daemon stops; the state file
        stays for the next start)."""
        for reg in self.entries.values():
            os.close(reg.fd)
        self.entries.clear()
        self.by_key.clear()

    # ---- the state file ---------------------------------------------------

    def save(self) -> None:
        """Write the registrations made at run time, atomically."""
        if self.state_path is None:
            return
        state = {"version": STATE_VERSION,
                 "registrations": [r.state() for r in self.entries.values()
                                   if not r.dropin]}
        tmp = self.state_path + ".new"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                         | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=1)
            os.replace(tmp, self.state_path)
        except OSError as e:
            log.error("Cannot keep the registrations in %s: %s; a restart "
                      "will not serve them", self.state_path, e)

    def restore(self) -> None:
        """Register again what the state file holds, each checked as if
        it were new; what fails is logged and left out."""
        if self.state_path is None:
            return
        try:
            entries = read_state(self.state_path)
        except FileNotFoundError:
            return
        except (OSError, ValueError, ConfigError) as e:
            log.error("Ignoring the registrations in %s: %s",
                      self.state_path, e)
            return
        for entry in entries:
            try:
                self.add(str(entry["name"]), str(entry["path"]),
                         str(entry["config"]), str(entry["source"]),
                         bool(entry["allow_userns"]),
                         expect=(int(str(entry["netns_dev"])),
                                 int(str(entry["netns_inode"]))))
            except RegistrationError as why:
                log.warning("netns %s is no longer registered: %s",
                            entry["name"], why)
        self.save()


def read_state(path: str) -> list[dict[str, object]]:
    """The state file's entries, checked strictly: a root-owned file, not
    writable by others, of bounded size, exactly the keys we write."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        config.check_owner(path, os.fstat(f.fileno()))
        data = f.read(STATE_MAX_BYTES + 1)
    if len(data) > STATE_MAX_BYTES:
        raise ValueError("larger than %d bytes" % STATE_MAX_BYTES)
    state = json.loads(data)
    if (not isinstance(state, dict) or state.get("version") != STATE_VERSION
            or set(state) != {"version", "registrations"}
            or not isinstance(state["registrations"], list)
            or len(state["registrations"]) > STATE_MAX_ENTRIES):
        raise ValueError("not a version %d registrations file"
                         % STATE_VERSION)
    entries: list[dict[str, object]] = state["registrations"]
    for e in entries:
        if (not isinstance(e, dict) or set(e) != STATE_KEYS
                or not all(isinstance(e[k], str)
                           for k in ("name", "path", "config", "source"))
                or not isinstance(e["allow_userns"], bool)
                or not all(_count(e[k]) for k in ("netns_dev",
                                                  "netns_inode"))):
            raise ValueError("malformed entry %.100r" % (e,))
    return entries


def _count(value: object) -> bool:
    """A JSON integer >= 0 (not a bool, which Python takes for one)."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and value >= 0)
