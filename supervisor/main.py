"""``tlshd``: command line, start-up ladder, then the supervisor loop."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import pwd
import sys

import setproctitle

from tlshd.shared import config, linux
from tlshd.shared import log as tlshd_log
from tlshd.shared.errors import ConfigError
from tlshd.supervisor import netlink_family, netlink_socket, sdnotify
from tlshd.supervisor.paths import CONTROL_SOCKET as DEFAULT_CONTROL_SOCKET

# Only what it takes to listen is imported before READY=1: the rest of the
# supervisor (the loop, workers, control socket) costs seconds under
# emulation (docs/benchmarks.md, Start-up) and is imported by serve(), and
# what only --check-config or the work after READY=1 needs (subprocess,
# netns, tlsstat) where it is used.
# typing.TYPE_CHECKING without importing typing before the daemon listens
# (docs/benchmarks.md, Start-up); mypy treats any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from tlshd.supervisor.arbiter import Supervisor

log = logging.getLogger("tlshd")



def _version() -> str:
    # Imported here: importlib.metadata costs about a second under
    # emulation, and the daemon logs its version only once listening.
    from importlib import metadata

    try:
        return metadata.version("tlshd")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Version(argparse.Action):
    """--version, looked up only when asked for (see _version)."""

    def __init__(self, option_strings: list[str], dest: str,
                 **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0,
                         default=argparse.SUPPRESS,
                         help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser,
                 namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print("tlshd, built from tlshd (Python) %s" % _version())
        parser.exit()


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
                   default=DEFAULT_CONTROL_SOCKET,
                   help="tlshdctl's socket (default %(default)s)")
    p.add_argument("-v", "--version", action=_Version)
    return p.parse_args(argv)


def preload_modules() -> None:
    """Load kTLS before any request: a worker cannot load modules.

    TCP_ULP autoloads tls.ko only for a caller with CAP_NET_ADMIN, and the
    sandboxed worker has none.
    """
    if os.path.isdir("/sys/module/tls"):
        return
    import subprocess

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


# The capabilities packaging/tlshd.service leaves the daemon
# (CapabilityBoundingSet=): KILL, SETGID, SETUID, NET_ADMIN, SYS_ADMIN.
# Not CAP_DAC_OVERRIDE nor CAP_DAC_READ_SEARCH: root reads a file only
# through its owner, group or other bits, like any user.
SERVICE_CAPABILITIES = (5, 6, 7, 12, 21)
_PR_CAPBSET_DROP = 24
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32),
                ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def service_privileges() -> None:
    """Keep only tlshd.service's capabilities (in a child, before exec).

    Dropped from the bounding set too: root regains its permitted set
    from it at exec.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in SERVICE_CAPABILITIES and libc.prctl(
                _PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
    mask = sum(1 << cap for cap in SERVICE_CAPABILITIES)
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(mask, mask, 0), _CapData(0, 0, 0))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _split(warning: str, path: str) -> tuple[str, str]:
    """``path:line: text`` (or ``path: text``) -> location, text."""
    rest = warning[len(path):] if warning.startswith(path) else ""
    colon = rest.find(": ")
    if colon < 0:
        return path, warning
    return path + rest[:colon], rest[colon + 2:]


class _Check:
    """tlshd --check-config: every problem on stdout, one line each.

    Errors are ``FILE[:LINE]: text``, warnings ``FILE[:LINE]: warning:
    text``; each configuration file ends with ``FILE: ok`` or ``FILE: N
    error(s)``, and the last line counts exactly those.
    """

    def __init__(self) -> None:
        self.files = 0
        self.failed = 0
        self.warnings = 0
        self.as_service = os.geteuid() == 0
        # The worker user may own private keys: tell the checking worker.
        self.uid: list[str] = []

    def warn(self, location: str, text: str) -> None:
        self.warnings += 1
        print("%s: warning: %s" % (location, text))

    def file(self, path: str, main: bool) -> config.Config | None:
        self.files += 1
        try:
            cfg = config.load(path, warn=False)
        except ConfigError as e:
            print(e)
            self.verdict(path, 1)
            return None
        warnings = list(cfg.warnings)
        if not main:
            warnings += config.namespace_warnings(cfg)
        warnings += config.service_warnings(cfg)
        for warning in warnings:
            self.warn(*_split(warning, path))
        errors = 0
        if main:
            for tags in config.tags_files(cfg):
                self.warn(path, "%s: session tags (tls-session-tags(7)) "
                          "are not supported by this tlshd; the file has "
                          "no effect" % tags)
            line = cfg.line("sandbox", "user")
            try:
                ids = (worker_ids(cfg.worker_user) if self.as_service
                       else None)
                if ids is not None:
                    self.uid = ["--uid", str(ids[0])]
            except ConfigError as e:
                errors += 1
                print("%s: [sandbox] user: %s" % (
                    path if line is None else "%s:%d" % (path, line), e))
        for problem in config.pq_problems(cfg):
            errors += 1
            print(problem)
        errors += self.credentials(path, self.uid)
        self.verdict(path, errors)
        return cfg

    def credentials(self, path: str, uid: list[str]) -> int:
        """Load the file's credentials in a worker process, with the
        service's privileges; print what it reports, count errors."""
        import subprocess

        argv = [sys.executable, "-m", "tlshd.worker", "--check", "--config",
                path, *uid]
        sys.stdout.flush()
        try:
            result = subprocess.run(
                argv, check=False, stdin=subprocess.DEVNULL,
                capture_output=True, text=True,
                preexec_fn=service_privileges if self.as_service else None)
        except subprocess.SubprocessError as e:
            print("note: cannot drop to tlshd.service's capabilities (%s): "
                  "files are read with all of root's" % e)
            self.as_service = False
            result = subprocess.run(argv, check=False,
                                    stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True)
        errors = 0
        for line in result.stdout.splitlines():
            if ": warning: " in line:
                self.warnings += 1
            else:
                errors += 1
            print(line)
        if result.stderr:
            sys.stderr.write(result.stderr)
            sys.stderr.flush()
        if result.returncode != 0 and not errors:
            print("%s: the checking worker failed (exit status %d)"
                  % (path, result.returncode))
            errors = 1
        return errors

    def verdict(self, path: str, errors: int) -> None:
        if errors:
            self.failed += 1
            print("%s: %d error(s)" % (path, errors))
        else:
            print("%s: ok" % path)


def check_config(path: str) -> int:
    """Check every configuration file the daemon could use.

    Credentials are loaded by a worker process in check mode, as a
    serving worker would load them, with the capabilities tlshd.service
    leaves the daemon (when run as root); this process never opens a
    private key.  Exit status 0, or 1 if any file has errors; warnings
    alone do not count.
    """
    check = _Check()
    if not check.as_service:
        print("note: not running as root: files are read with uid %d's "
              "permissions, not tlshd.service's" % os.geteuid())
    cfg = check.file(path, main=True)
    paths = []
    netns_dir = os.path.join(os.path.dirname(path), "netns")
    if os.path.isdir(netns_dir):
        for name in sorted(os.listdir(netns_dir)):
            candidate = os.path.join(netns_dir, name, "config")
            if os.path.exists(candidate):
                paths.append(candidate)
    if cfg is not None:
        paths += [p for p in (cfg.netns_default, cfg.netns_unnamed) if p]
    for other in dict.fromkeys(paths):
        if other != path:
            check.file(other, main=False)
    summary = ("%d configuration file(s) checked, %d with problems"
               % (check.files, check.failed))
    if check.warnings:
        summary += ", %d warning(s)" % check.warnings
    print(summary)
    return 1 if check.failed else 0


# Open fds per served namespace (its fd and the handshake socket's two)
# and its worker (pidfd, channel), and what the rest of us takes.
FDS_PER_NAMESPACE = 5
FDS_BASE = 256


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Root, holding every namespace's key material on its way to the
    # workers: no core dump of it, and no ptrace or /proc/PID/mem reading
    # by a process of another (or the workers') uid.  Before the title,
    # which tests wait for.
    linux.set_dumpable(False)
    setproctitle.setproctitle("tlshd: supervisor")
    # --check-config reports on the terminal, whatever the log setup.
    tlshd_log.setup(args.stderr or args.check_config, debug=False)
    # Before anything forks (no worker inherits systemd's notify socket),
    # after logging is set up (a bad address is warned about there).
    notify_address = sdnotify.take_address()
    path = config.find_config(args.config)
    if args.check_config:
        return check_config(path)
    try:
        cfg = config.load(path)
    except ConfigError as e:
        log.error("%s", e)
        return os.EX_CONFIG
    tlshd_log.setup(args.stderr, debug=cfg.loglevel > 0)
    need = cfg.netns_max * FDS_PER_NAMESPACE + FDS_BASE
    limit = linux.raise_fd_limit(need)
    if limit < need:
        log.warning("The open file limit (%d) allows about %d served "
                    "namespaces; [netns] max_namespaces is %d: raise "
                    "LimitNOFILE", limit,
                    (limit - FDS_BASE) // FDS_PER_NAMESPACE, cfg.netns_max)
    try:
        family = netlink_family.probe_family()
    except ConfigError as e:
        log.error("%s", e)
        return os.EX_UNAVAILABLE
    try:
        ids = worker_ids(cfg.worker_user)
    except ConfigError as e:
        log.error("%s", e)
        return os.EX_CONFIG
    # Joined to the tlshd group in the initial namespace: consumers
    # ordered after tlshd.service may start.  Their requests wait in this
    # socket until the loop below adopts it, then for the worker.
    nlsock = netlink_socket.HandshakeSocket(family, "init")
    sdnotify.notify(notify_address, "READY=1")
    return serve(args, cfg, family, ids, nlsock, notify_address)


def serve(args: argparse.Namespace, cfg: config.Config,
          family: netlink_family.FamilyInfo, ids: tuple[int, int] | None,
          nlsock: netlink_socket.HandshakeSocket,
          notify_address: str | bytes | None) -> int:
    """Import and start the rest of the supervisor, then run its loop."""
    from tlshd.supervisor import keyrings, netns
    from tlshd.supervisor.arbiter import Supervisor

    preload_modules()
    keyrings.setup_session_keyring(cfg.keyrings)
    supervisor = Supervisor(cfg, family, debug=cfg.loglevel > 0,
                            worker_ids=ids)
    supervisor.notify_address = notify_address
    supervisor.add_namespace(
        "init", cfg.path, nlsock, netns.initial().key,
        os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
    supervisor.pool.use_template()
    supervisor.serve_control(args.control_socket)
    supervisor.serve_namespaces()
    # One turn of the loop first: it asks the template for the initial
    # namespace's worker, which then starts while we finish here.
    supervisor.step(max_wait=0)
    after_ready(supervisor, family)
    return supervisor.run()


def after_ready(supervisor: Supervisor,
                family: netlink_family.FamilyInfo) -> None:
    """Start-up work no listener needs, done while the worker template
    imports and forks the first worker.  Requests that arrive meanwhile
    wait in the kernel: they could not be served before that worker's
    HELLO anyway, and the AEAD warm-up must come before its first
    handshake."""
    log.info("Built from tlshd (Python) %s", _version())
    log.info("Kernel handshake family: %s", family.describe())
    log.info("Kernel capabilities: %s", family.capabilities())
    from tlshd.shared import tlsstat
    from tlshd.supervisor import control, ktlswarm

    log.info("%s", family.rekey_status(tlsstat.rekey_supported()))
    for ns in supervisor.namespaces:
        control.warn_expiring(ns.label, ns.cfg)
    supervisor.warn_certificates = True
    # Before the first handshake, which would otherwise pay for the
    # kernel's AEAD module loads.
    ktlswarm.warm_aeads()
