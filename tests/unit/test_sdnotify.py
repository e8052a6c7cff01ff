"""Readiness notification to systemd (tlshd.service is Type=notify)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tlshd.supervisor import sdnotify


def receiver(address: str | bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5)
    return s


def test_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with receiver(path) as r:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        address = sdnotify.take_address()
        # Taken out of the environment: nothing forked later inherits it.
        assert "NOTIFY_SOCKET" not in os.environ
        assert sdnotify.notify(address, "READY=1")
        assert r.recv(64) == b"READY=1"
        assert sdnotify.notify(address, "STOPPING=1")
        assert r.recv(64) == b"STOPPING=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "tlshd-test-notify-%d" % os.getpid()
    with receiver(b"\0" + name.encode()) as r:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify(sdnotify.take_address(), "READY=1")
        assert r.recv(64) == b"READY=1"


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.take_address() is None
    assert not sdnotify.notify(None, "READY=1")


@pytest.mark.parametrize("value", ["vsock:2:1234", "@", "relative"])
def test_unusable_address_ignored(value: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.take_address() is None
    assert "NOTIFY_SOCKET" not in os.environ


def test_gone_socket_is_not_fatal(tmp_path: Path) -> None:
    assert not sdnotify.notify(str(tmp_path / "nobody"), "READY=1")
