"""``tlshd``: command line, start-up ladder, then the supervisor loop."""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import subprocess
import sys
from importlib import metadata

import setproctitle

from tlshd.shared import config, linux, tlsstat
from tlshd.shared import log as tlshd_log
from tlshd.shared.errors import ConfigError
from tlshd.supervisor import control, genl, keyrings, ktlswarm, sdnotify
from tlshd.supervisor.loop import Supervisor

log = logging.getLogger("tlshd")


def _version() -> str:
    try:
        return metadata.version("tlshd")
    except metadata.PackageNotFoundError:
        return "unknown"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tlshd",
        description="Kernel TLS handshake agent: one supervisor, sandboxed "
                    "per-namespace workers.")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="configuration file (default %s)"
                        % config.DEFAULT_PATH)
    p.add_argument("-s", "--stderr", action="store_true",
                   help="log to stderr instead of syslog (ktls-utils "
                        "logs to both), each line with its severity: "
                        "a word such as \"error:\", or the journal's "
                        "<N> prefix when stderr is the journal")
    p.add_argument("--check-config", action="store_true",
                   help="load every namespace's configuration and "
                        "credentials, report problems, and exit")
    p.add_argument("--control-socket", metavar="PATH",
                   default=control.DEFAULT_PATH,
                   help="tlshdctl's socket (default %(default)s)")
    p.add_argument("-v", "--version", action="version",
                   version="tlshd, built from tlshd (Python) %s" % _version())
    return p.parse_args(argv)


def preload_modules() -> None:
    """Load kTLS before any request: a worker cannot load modules.

    TCP_ULP autoloads tls.ko only for a caller with CAP_NET_ADMIN, and the
    sandboxed worker has none.
    """
    if os.path.isdir("/sys/module/tls"):
        return
    result = subprocess.run(["modprobe", "-q", "tls"], check=False,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        log.warning("modprobe tls failed; kTLS may be unavailable")


def worker_ids(user: str) -> tuple[int, int] | None:
    """The uid and gid workers drop to; None when not started as root."""
    if os.geteuid() != 0:
        log.warning("Not running as root: workers keep uid %d",
                    os.geteuid())
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            "Worker user %r does not exist; create it (see "
            "packaging/sysusers.d/tlshd.conf)" % user) from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise ConfigError("Worker user %r must not be root" % user)
    return pw.pw_uid, pw.pw_gid


def check_config(cfg: config.Config) -> int:
    """Check every configuration file the daemon could use.

    Credentials are loaded by a worker process in check mode, exactly as a
    serving worker would load them; this process never opens a private key.
    """
    paths = [cfg.path]
    netns_dir = os.path.join(os.path.dirname(cfg.path), "netns")
    if os.path.isdir(netns_dir):
        for name in sorted(os.listdir(netns_dir)):
            candidate = os.path.join(netns_dir, name, "config")
            if os.path.exists(candidate):
                paths.append(candidate)
    paths += [p for p in (cfg.netns_default, cfg.netns_unnamed) if p]
    failures = 0
    # The worker user may own private keys: tell the checking worker.
    uid: list[str] = []
    try:
        ids = worker_ids(cfg.worker_user)
        if ids is not None:
            uid = ["--uid", str(ids[0])]
    except ConfigError as e:
        print(e)
        failures += 1
    for path in paths:
        result = subprocess.run(
            [sys.executable, "-m", "tlshd.worker", "--check", "--config",
             path, *uid], check=False, stdin=subprocess.DEVNULL)
        failures += result.returncode != 0
    print("%d configuration file(s) checked, %d with problems"
          % (len(paths), failures))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Root, holding every namespace's key material on its way to the
    # workers: no core dump of it, and no ptrace or /proc/PID/mem reading
    # by a process of another (or the workers') uid.  Before the title,
    # which tests wait for.
    linux.set_dumpable(False)
    setproctitle.setproctitle("tlshd: supervisor")
    tlshd_log.setup(args.stderr, debug=False)
    # Before anything forks (no worker inherits systemd's notify socket),
    # after logging is set up (a bad address is warned about there).
    notify_address = sdnotify.take_address()
    path = config.find_config(args.config)
    try:
        cfg = config.load(path)
    except ConfigError as e:
        log.error("%s", e)
        if args.check_config:  # the log may be syslog: say it here too
            print(e)
        return os.EX_CONFIG
    if args.check_config:
        return check_config(cfg)
    tlshd_log.setup(args.stderr, debug=cfg.loglevel > 0)
    log.info("Built from tlshd (Python) %s", _version())
    preload_modules()
    ktlswarm.warm_aeads()
    keyrings.setup_session_keyring(cfg.keyrings)
    try:
        family = genl.probe_family()
    except ConfigError as e:
        log.error("%s", e)
        return os.EX_UNAVAILABLE
    log.info("Kernel handshake family: %s", family.describe())
    log.info("Kernel capabilities: %s", family.capabilities())
    log.info("%s", family.rekey_status(tlsstat.rekey_supported()))
    try:
        ids = worker_ids(cfg.worker_user)
    except ConfigError as e:
        log.error("%s", e)
        return os.EX_CONFIG
    supervisor = Supervisor(cfg, family, debug=cfg.loglevel > 0,
                            worker_ids=ids)
    supervisor.use_template()
    supervisor.serve_control(args.control_socket)
    supervisor.serve_namespaces()
    # Listening in the initial namespace now: consumers ordered after
    # tlshd.service may start (their requests wait for the worker).
    supervisor.notify_address = notify_address
    sdnotify.notify(notify_address, "READY=1")
    return supervisor.run()
