"""The real sandbox, applied in child processes (never in pytest's own).

Each test runs this file as a script: the child loads credentials, starts
its threads and opens its sockets the way the worker does, calls
``sandbox.lock_down``, prints ``locked`` and then does one thing.  The
legitimate path (a real TLS 1.3 handshake through the Engine, the kTLS
hand-over, fd passing over a channel, a keyctl read, an exception
traceback, a clean exit) must survive; each forbidden action must kill
the child with SIGSYS.

Identities: ``drop`` is the production path (root calls lock_down with
the uid of ``nobody``); ``user`` becomes ``nobody`` by itself first and
calls lock_down(None, None), as an unprivileged user running the tests
would.  Both need root here to become ``nobody``.
"""

from __future__ import annotations

import sys

from tlshd.worker import sslconf

if not sslconf.openssl_initialised():
    sslconf.use_worker_config()

import ctypes
import errno
import json
import mmap
import os
import pwd
import queue
import signal
import socket
import subprocess
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from tlshd.shared import keys, protocol
from tlshd.shared.channel import Channel, socketpair
from tlshd.shared.config import RoleConfig
from tlshd.worker import ktls, sandbox
from tlshd.worker.tlsengine import Engine

THREADS = 2
MAX_FDS = 64 + 2 * THREADS
NR_ADD_KEY = {"x86_64": 248, "aarch64": 217}
_libc = ctypes.CDLL(None, use_errno=True)


# -- the child side ---------------------------------------------------------


class Pool:
    """Threads started before the lock-down, like the worker's pool."""

    def __init__(self, n: int) -> None:
        self.jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]]
        self.jobs = queue.Queue()
        for _ in range(n):
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, out = self.jobs.get()
            out.put(fn())

    def submit(self, fn: Callable[[], Any]) -> queue.Queue[Any]:
        out: queue.Queue[Any] = queue.Queue()
        self.jobs.put((fn, out))
        return out


def _become_nobody() -> None:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
    os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)


def _lock(identity: str) -> protocol.Hello:
    if identity == "drop":
        nobody = pwd.getpwnam("nobody")
        hello = sandbox.lock_down(nobody.pw_uid, nobody.pw_gid, MAX_FDS)
    else:
        if identity == "user" and os.geteuid() == 0:
            _become_nobody()
        hello = sandbox.lock_down(None, None, MAX_FDS)
    print("locked", json.dumps(hello.__repr__()), flush=True)
    return hello


def _tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    c = socket.create_connection(listener.getsockname())
    s, _ = listener.accept()
    return c, s


def _add_key(payload: bytes) -> int:
    keys.join_session_keyring(None)
    nr = NR_ADD_KEY[os.uname().machine]
    serial = int(_libc.syscall(
        ctypes.c_long(nr), b"user", b"tlshd-sandbox-test", payload,
        ctypes.c_size_t(len(payload)),
        ctypes.c_long(keys.KEY_SPEC_SESSION_KEYRING)))
    assert serial > 0, os.strerror(ctypes.get_errno())
    return serial


def child_survive(identity: str, pki: dict[str, str]) -> None:
    """Everything the request path does, after the lock-down."""
    engine = Engine(
        RoleConfig(truststore=pki["ca"], certificate=pki["client_cert"],
                     private_key=pki["client_key"]),
        RoleConfig(truststore=pki["ca"], certificate=pki["server_cert"],
                     private_key=pki["server_key"]))
    pool = Pool(THREADS)
    listener = socket.create_server(("127.0.0.1", 0))
    tls_c, tls_s = _tcp_pair(listener)
    fd_c, _fd_s = _tcp_pair(listener)  # the peer stays open
    listener.close()
    ours, theirs = socketpair()
    _lock(identity)
    out: dict[str, Any] = {}

    # A real TLS 1.3 handshake, client here and server in a pool thread.
    deadline = time.monotonic() + 10
    done = pool.submit(lambda: engine.server_handshake(
        tls_s, x509=None, deadline=deadline))
    client = engine.client_handshake(tls_c, peername="localhost",
                                     use_certificate=True,
                                     deadline=deadline)
    server = done.get(timeout=15)
    out["handshake"] = [client.status, server.status, client.reason,
                        server.reason, client.remote_auth,
                        server.remote_auth]
    assert client.tx is not None and client.rx is not None
    try:
        ktls.install(tls_c, client.tx, client.rx)
        out["ktls"] = 0
    except OSError as e:
        out["ktls"] = e.errno

    # The channel: a request carrying a socket fd, received with CLOEXEC.
    ch_a, ch_b = Channel(ours), Channel(theirs)
    req = protocol.HandshakeRequest(msg_type=1, auth_mode=1, timeout_ms=1,
                                    peername="x")
    ch_a.send(req, 7, (fd_c.fileno(),))
    msg, req_id, fds = ch_b.recv()
    got = socket.socket(fileno=fds[0])
    out["channel"] = [msg == req, req_id,
                      got.getpeername() == fd_c.getpeername(),
                      os.get_inheritable(fds[0])]
    got.close()

    # Error paths Python takes without asking: tracebacks, warnings.
    try:
        raise ValueError("boom")
    except ValueError:
        out["traceback"] = "ValueError: boom" in traceback.format_exc()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("just a warning", stacklevel=1)
    out["isatty"] = os.isatty(ours.fileno())
    time.sleep(0.01)
    print("result", json.dumps(out), flush=True)
    sys.stdin.readline()  # the parent inspects /proc meanwhile
    tls_c.close()


def child_forbidden(identity: str, action: str) -> None:
    sock = socket.socket()
    serial = _add_key(b"kernel key payload")
    _lock(identity)
    actions: dict[str, Callable[[], object]] = {
        "open": lambda: open("/etc/passwd"),
        "socket": socket.socket,
        "fork": os.fork,
        "thread": lambda: threading.Thread(target=print).start(),
        "exec": lambda: os.execv("/bin/true", ["true"]),
        "setuid": lambda: os.setuid(0),
        "ptrace": lambda: _libc.ptrace(0, 0, 0, 0),  # PTRACE_TRACEME
        "kill": lambda: os.kill(1, 0),
        "unshare": lambda: _libc.unshare(0x40000000),  # CLONE_NEWNET
        "setsockopt": lambda: sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1),
        "mmap_exec": lambda: mmap.mmap(
            -1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC),
        # Workers read no kernel keys, not even one their session keyring
        # holds: the supervisor passes the material.
        "keyctl": lambda: keys.read(serial),
        "add_key": lambda: keys.add("user", "x", b"y",
                                    keys.KEY_SPEC_SESSION_KEYRING),
    }
    print("result", repr(actions[action]()), flush=True)


def child_layers() -> None:
    """In LOG mode nothing is killed: the layers under seccomp must hold."""
    pool = Pool(1)
    del pool
    _lock("drop")
    out: dict[str, Any] = {}
    with open("/etc/passwd") as f:  # allowed, only logged
        out["open"] = bool(f.read(1))
    try:
        threading.Thread(target=print).start()
        out["thread"] = "started"
    except RuntimeError as e:
        out["thread"] = str(e)  # RLIMIT_NPROC 0
    try:
        os.setuid(0)
        out["setuid"] = "root again"
    except PermissionError:
        out["setuid"] = "EPERM"
    fd = os.open("/tmp", os.O_TMPFILE | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"x")
        out["write"] = "written"
    except OSError as e:
        out["write"] = errno.errorcode[e.errno or 0]  # RLIMIT_FSIZE 0
    os.close(fd)
    print("result", json.dumps(out), flush=True)


# -- the pytest side --------------------------------------------------------


def _nobody() -> tuple[int, int]:
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="becoming nobody needs root")


def spawn(*args: str, log_mode: bool = False) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items()
           if k != sandbox.SECCOMP_LOG_ENV}
    if log_mode:
        env[sandbox.SECCOMP_LOG_ENV] = "1"
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args], env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _expect_line(proc: subprocess.Popen[str], tag: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(tag + " "):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError("wanted %r, got %r; rc %s; stderr:\n%s"
                             % (tag, line, proc.returncode, err))
    return line[len(tag) + 1:]


def _proc_fields(path: str) -> dict[str, str]:
    with open(path) as f:
        return dict((k, v.strip()) for k, _, v in
                    (line.partition(":") for line in f))


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    with open("/proc/%d/limits" % pid) as f:
        for line in f.readlines()[1:]:
            name = line[:26].strip()
            soft, hard = line[26:].split()[:2]
            out[name] = (soft, hard)
    return out


@pytest.fixture(scope="module")
def pki_paths(pki: Any) -> str:
    return json.dumps({
        "ca": str(pki.ca), "server_cert": str(pki.server.cert),
        "server_key": str(pki.server.key),
        "client_cert": str(pki.client.cert),
        "client_key": str(pki.client.key)})


def _check_proc(pid: int) -> None:
    """Look at the sandboxed child from outside, every thread of it."""
    uid, gid = _nobody()
    tasks = os.listdir("/proc/%d/task" % pid)
    assert len(tasks) == 1 + THREADS
    for tid in tasks:
        st = _proc_fields("/proc/%d/task/%s/status" % (pid, tid))
        assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", tid
        assert st["Uid"].split() == [str(uid)] * 4
        assert st["Gid"].split() == [str(gid)] * 4
        for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(st[cap], 16) == 0, (tid, cap)
    limits = _limits(pid)
    assert limits["Max processes"] == ("0", "0")
    assert limits["Max file size"] == ("0", "0")
    assert limits["Max core file size"] == ("0", "0")
    assert limits["Max open files"] == (str(MAX_FDS), str(MAX_FDS))
    assert limits["Max address space"][0] != "unlimited"
    # Not dumpable: the kernel hands /proc/<pid> to root.
    assert os.stat("/proc/%d/fd" % pid).st_uid == 0


@needs_root
@pytest.mark.parametrize("identity", ["drop", "user"])
def test_request_path_survives(identity: str, pki_paths: str) -> None:
    proc = spawn("survive", identity, pki_paths)
    hello = _expect_line(proc, "locked")
    uid, gid = _nobody()
    assert ("uid=%d, gid=%d, cap_eff=0, no_new_privs=1, seccomp=2"
            % (uid, gid)) in hello
    out = json.loads(_expect_line(proc, "result"))
    _check_proc(proc.pid)
    _, err = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0, err
    assert out["handshake"][:2] == [0, 0], out["handshake"]
    # The client presented a certificate the server verified.
    assert out["handshake"][5] != []
    # This host has no kTLS: TCP_ULP "tls" is ENOENT, not a kill.
    assert out["ktls"] in (0, errno.ENOENT)
    assert out["channel"] == [True, 7, True, False]
    assert out["traceback"] is True
    assert out["isatty"] is False
    assert "just a warning" in err


@needs_root
@pytest.mark.parametrize("identity", ["drop", "user"])
@pytest.mark.parametrize("action", [
    "open", "socket", "fork", "thread", "exec", "setuid", "ptrace", "kill",
    "unshare", "setsockopt", "mmap_exec", "keyctl", "add_key",
])
def test_forbidden_action_is_killed(identity: str, action: str) -> None:
    proc = spawn("forbidden", identity, action)
    _expect_line(proc, "locked")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGSYS, (out, err)
    assert out == "" and "Traceback" not in err


@needs_root
def test_log_mode_only_logs_and_the_other_layers_hold() -> None:
    proc = spawn("layers", log_mode=True)
    _expect_line(proc, "locked")
    out = json.loads(_expect_line(proc, "result"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "seccomp in LOG mode" in err  # the warning, on stderr here
    assert out == {"open": True, "thread": "can't start new thread",
                   "setuid": "EPERM", "write": "EFBIG"}


@needs_root
@pytest.mark.parametrize("uid,gid,message", [
    (0, 0, "refusing to 'drop' to uid 0"),
    (65534, None, "a uid needs a gid"),
])
def test_bad_identities_abort(uid: int, gid: int | None,
                              message: str) -> None:
    code = ("from tlshd.worker import sandbox; "
            "sandbox.lock_down(%r, %r, 64)" % (uid, gid))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert message in proc.stderr


def test_unknown_arch_aborts_before_any_change() -> None:
    code = ("import platform; platform.machine = lambda: 'riscv64'; "
            "from tlshd.worker import sandbox; "
            "sandbox.lock_down(None, None, 64)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "no seccomp syscall table for riscv64" in proc.stderr


if __name__ == "__main__":
    if sys.argv[1] == "survive":
        child_survive(sys.argv[2], json.loads(sys.argv[3]))
    elif sys.argv[1] == "forbidden":
        child_forbidden(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "layers":
        child_layers()
