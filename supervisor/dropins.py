"""Static registrations: ``netns.d/*.conf`` beside the main configuration.

Each file says which namespaces to serve with which configuration::

    [netns]
    path = /var/run/docker/netns/*
    config = /etc/tlshd/tenants/acme/config
    # allow_userns = false

``path`` is a glob pattern over files that are network namespaces (a
runtime's bind mounts, ``/run/netns/cni-*``); every match is registered
as if ``tlshdctl netns add`` had been run for it, named after its file,
and dropped when its file goes.  The files follow the main
configuration's ownership rules (root-owned, not writable by group or
others) and are read at start and at each reload.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import logging
import os
from dataclasses import dataclass

from tlshd.shared import config, keyfile
from tlshd.shared.errors import ConfigError
from tlshd.supervisor.registry import RegistrationError, Registry

log = logging.getLogger(__name__)

DIRECTORY = "netns.d"
SUFFIX = ".conf"
MAX_FILES = 256
MAX_FILE_BYTES = 65536
# Matches of one pattern registered at most (a pattern like "/*/*/*"
# must not cost the loop a walk of the whole file system).
MAX_MATCHES = 4096
KNOWN = {"netns": frozenset({"path", "config", "allow_userns"})}


@dataclass(frozen=True)
class DropIn:
    file: str  # "netns.d/acme.conf": the registrations' source
    pattern: str
    config_path: str
    allow_userns: bool


def directory(main_config: str) -> str:
    return os.path.join(os.path.dirname(main_config), DIRECTORY)


def read(path: str) -> DropIn:
    """One drop-in file, checked like the main configuration."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        config.check_owner(path, os.fstat(f.fileno()))
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError("%s: larger than %d bytes" % (path, MAX_FILE_BYTES))
    try:
        kf = keyfile.KeyFile(data.decode(), path)
    except UnicodeDecodeError:
        raise ConfigError("%s: not UTF-8 text" % path) from None
    kf.check_names(KNOWN, {})
    for warning in kf.warnings:
        log.warning("%s", warning)
    pattern = kf.path_value("netns", "path")
    config_path = kf.path_value("netns", "config")
    if pattern is None or config_path is None:
        raise ConfigError("%s: [netns] path= and config= are both needed"
                          % path)
    return DropIn(os.path.join(DIRECTORY, os.path.basename(path)), pattern,
                  config_path, kf.boolean("netns", "allow_userns", False))


def read_all(main_config: str) -> list[DropIn]:
    """Every valid drop-in file, in name order; bad ones are logged."""
    where = directory(main_config)
    try:
        names = sorted(n for n in os.listdir(where) if n.endswith(SUFFIX))
    except FileNotFoundError:
        return []
    except OSError as e:
        log.error("Cannot read %s: %s", where, e)
        return []
    if len(names) > MAX_FILES:
        log.error("%s: %d files, only the first %d are read", where,
                  len(names), MAX_FILES)
        names = names[:MAX_FILES]
    out = []
    for name in names:
        try:
            out.append(read(os.path.join(where, name)))
        except (OSError, ConfigError) as e:
            log.error("Ignoring drop-in %s: %s", name, e)
    return out


class DropIns:
    """Keeps the registry in line with the drop-in files."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.dropins: list[DropIn] = []
        # Paths that matched but could not be registered: tried again at
        # each apply (a runtime creates the file, then mounts the
        # namespace on it), logged once.
        self._refused: set[str] = set()

    def load(self, main_config: str) -> None:
        """(Re)read the files; registrations of a file that is gone or
        changed are dropped, and made again by ``apply``."""
        self.dropins = read_all(main_config)
        self._refused.clear()
        current = {d.file: d for d in self.dropins}
        for reg in list(self.registry.entries.values()):
            d = current.get(reg.source)
            if reg.dropin and (d is None or d.config_path != reg.config_path
                               or not fnmatch.fnmatchcase(reg.path,
                                                          d.pattern)):
                self.registry.remove(reg.name, why="dropped: %s changed"
                                     % reg.source)

    def apply(self) -> bool:
        """Register every new match; True if any was registered."""
        added = False
        taken = {reg.path for reg in self.registry.entries.values()}
        seen: set[str] = set()
        for d in self.dropins:
            matches = itertools.islice(glob.iglob(d.pattern), MAX_MATCHES)
            for path in sorted(matches):
                seen.add(path)
                if path in taken:
                    continue
                try:
                    self.registry.add("", path, d.config_path, d.file,
                                      d.allow_userns, dropin=True)
                    taken.add(path)
                    self._refused.discard(path)
                    added = True
                except RegistrationError as e:
                    if path not in self._refused:
                        log.info("%s: not serving %s: %s", d.file, path, e)
                    self._refused.add(path)
        self._refused &= seen
        return added


class Registered:
    """What namespaces.Discovery asks about registered namespaces: those
    registered at run time (``registry``) and by drop-in files."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.dropins = DropIns(registry)

    def start(self, main_config: str) -> None:
        """Serve again what was registered before a restart; read the
        drop-in files."""
        self.registry.restore()
        self.dropins.load(main_config)

    def reloaded(self, main_config: str) -> None:
        self.dropins.load(main_config)
        self.registry.next_check = 0.0

    def wake_at(self) -> float | None:
        """When ``due`` has work (None: nothing is registered)."""
        if not self.registry.entries and not self.dropins.dropins:
            return None
        return self.registry.next_check

    def due(self, now: float) -> bool:
        """Drop what is gone, register new drop-in matches; True if the
        registered set changed."""
        when = self.wake_at()
        if when is None or now < when:
            return False
        changed = self.registry.check(now)
        return self.dropins.apply() or changed
