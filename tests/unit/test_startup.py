"""Start-up cost: what the supervisor imports before it listens, and the
work a worker forked from the template no longer repeats."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tlshd.shared.config import RoleConfig
from tlshd.worker import tlsengine
from tlshd.worker.tlsengine import Engine

# Seconds each under emulation (docs/benchmarks.md, Start-up): imported
# only once READY=1 is out, or only when a feature needs them.
DEFERRED = ("pyroute2", "cryptography", "OpenSSL", "psutil",
            "importlib.metadata", "tlshd.supervisor.arbiter",
            "tlshd.supervisor.control", "tlshd.shared.protocol",
            "subprocess", "tlshd.supervisor.netns", "tlshd.shared.tlsstat")


def test_supervisor_listens_without_the_heavy_imports():
    code = ("import sys, tlshd.supervisor.main; "
            "print(' '.join(m for m in %r if m in sys.modules))"
            % (DEFERRED,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, check=True)
    assert r.stdout.split() == []


def test_engine_checks_openssl_once_per_process(monkeypatch):
    """The template's throwaway engine runs the check; its forked workers
    inherit the result instead of running the handshake again."""
    Engine(RoleConfig(), RoleConfig())
    assert tlsengine._tickets_checked

    def again(self):
        pytest.fail("ticket check ran twice in one process")

    monkeypatch.setattr(Engine, "_check_no_tickets", again)
    Engine(RoleConfig(), RoleConfig())


def test_control_socket_default_matches_control():
    from tlshd.supervisor import control, main

    assert main.DEFAULT_CONTROL_SOCKET == control.DEFAULT_PATH
