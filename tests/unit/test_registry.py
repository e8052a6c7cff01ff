"""Namespaces registered at run time and by drop-in files (issue 18).

Real network namespaces made with unshare(1) on the host, a real
Supervisor's scan() and control answers; the kernel side (a container's
mount through a registered namespace) is in tests/kernel.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from supervisorfakes import release

from tlshd.shared import config
from tlshd.supervisor import control, ctl, netlink_family, netns, ocihook
from tlshd.supervisor.arbiter import Supervisor
from tlshd.supervisor.dropins import DropIns, read
from tlshd.supervisor.registry import (
    RegistrationError,
    Registry,
    read_state,
)

FAMILY = netlink_family.FamilyInfo(0x3F00, 5)


class Holder:
    """A process in a new network namespace (``unshare ARGS``)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(["unshare", *args, "sleep", "120"])
        ours = netns.key_of("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while netns.key_of(self.path) == ours:
            assert time.monotonic() < deadline, "unshare made no namespace"
            time.sleep(0.01)
        self.key = netns.key_of(self.path)

    @property
    def path(self) -> str:
        return "/proc/%d/ns/net" % self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for h in made:
        h.kill()


def holder(holders: list[Holder], *args: str) -> Holder:
    h = Holder(*args)
    holders.append(h)
    return h


@pytest.fixture
def tenant(tmp_path: Path) -> str:
    path = tmp_path / "tenant.conf"
    path.write_text("[authenticate.client]\n")
    return str(path)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    r = Registry(str(tmp_path / "state.json"),
                 netns.key_of("/proc/self/ns/net"), lambda fd: False)
    yield r
    r.close()


def test_register_and_remove(registry, holders, tenant, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tlshd")
    h = holder(holders, "-n")
    reg = registry.add("acme", h.path, tenant, "tlshdctl")
    assert reg.key == h.key and registry.by_key[h.key] is reg
    # The registry's own fd leads to the namespace, whatever the path does.
    assert netns.key_of(reg.found().path) == h.key
    assert os.get_inheritable(reg.fd) is False
    # The same again is a no-op; another configuration or name clashes.
    assert registry.add("acme", h.path, tenant, "tlshdctl") is reg
    other = tmp_path / "other.conf"
    other.write_text("")
    with pytest.raises(RegistrationError, match="remove it first"):
        registry.add("acme", h.path, str(other), "tlshdctl")
    with pytest.raises(RegistrationError, match="registered as acme"):
        registry.add("beta", h.path, tenant, "tlshdctl")
    assert "netns acme registered" in caplog.text
    assert registry.remove(path=h.path) is reg
    assert not registry.entries and not registry.by_key
    with pytest.raises(OSError):
        os.fstat(reg.fd)  # let go of the namespace
    with pytest.raises(RegistrationError, match="no namespace is registered"):
        registry.remove(name="acme")


@pytest.mark.parametrize("path, why", [
    ("/proc/self/ns/uts", "not a network namespace"),
    ("/etc/hostname", "is not a namespace"),
    ("/nonexistent/ns", "cannot open"),
    ("relative/ns", "absolute path"),
    ("/proc/self/ns/net\n", "absolute path"),
])
def test_what_is_not_a_network_namespace_is_refused(registry, tenant, path,
                                                    why):
    with pytest.raises(RegistrationError, match=why):
        registry.add("x", path, tenant, "tlshdctl")
    assert not registry.entries


def test_bad_names_and_configs_are_refused(registry, holders, tmp_path):
    h = holder(holders, "-n")
    bad = tmp_path / "bad.conf"
    bad.write_text("[authenticate.client\n")
    with pytest.raises(RegistrationError, match=r"configuration .*bad\.conf"):
        registry.add("x", h.path, str(bad), "tlshdctl")
    good = tmp_path / "good.conf"
    good.write_text("")
    os.chmod(good, 0o666)
    with pytest.raises(RegistrationError, match="writable"):
        registry.add("x", h.path, str(good), "tlshdctl")
    os.chmod(good, 0o644)
    for name in ("-x", "a b", "x" * 129, "ü"):
        with pytest.raises(RegistrationError, match="bad name"):
            registry.add(name, h.path, str(good), "tlshdctl")
    assert not registry.entries


def test_own_namespace_is_refused(registry, tenant):
    with pytest.raises(RegistrationError, match="tlshd's own"):
        registry.add("self", "/proc/self/ns/net", tenant, "tlshdctl")


def test_userns_owned_needs_allow_userns(tmp_path, holders, tenant):
    h = holder(holders, "-Urn")
    ours = netns.initial_userns()
    r = Registry(None, netns.key_of("/proc/self/ns/net"),
                 lambda fd: netns.owner_userns(fd) != ours)
    try:
        with pytest.raises(RegistrationError, match="--allow-userns"):
            r.add("rootless", h.path, tenant, "tlshdctl")
        assert r.add("rootless", h.path, tenant, "tlshdctl",
                     allow_userns=True).key == h.key
    finally:
        r.close()


def test_dead_namespace_is_dropped(registry, holders, tenant, caplog):
    caplog.set_level(logging.INFO, logger="tlshd")
    h = holder(holders, "-n")
    registry.add("acme", h.path, tenant, "oci 1234")
    assert registry.check(time.monotonic()) is False
    h.kill()
    assert registry.check(time.monotonic()) is False  # CHECK_INTERVAL
    assert registry.check(time.monotonic() + 10) is True
    assert not registry.entries
    assert "no longer leads to its namespace" in caplog.text


def test_state_survives_a_restart(registry, holders, tenant, tmp_path,
                                  caplog):
    a, b = holder(holders, "-n"), holder(holders, "-n")
    registry.add("a", a.path, tenant, "oci aaaa")
    registry.add("b", b.path, tenant, "tlshdctl")
    state = tmp_path / "state.json"
    assert os.stat(state).st_mode & 0o777 == 0o600
    assert [e["name"] for e in read_state(str(state))] == ["a", "b"]
    registry.close()
    b.kill()  # gone while the daemon was down
    again = Registry(str(state), registry.home_key, lambda fd: False)
    try:
        again.restore()
        assert list(again.entries) == ["a"]
        assert again.entries["a"].source == "oci aaaa"
        assert "netns b is no longer registered" in caplog.text
        assert [e["name"] for e in read_state(str(state))] == ["a"]
    finally:
        again.close()


def test_restore_refuses_a_path_that_leads_elsewhere(
        registry, holders, tenant, tmp_path, caplog):
    """The container died while the daemon was down and its pid was
    reused: the saved path leads to another namespace, which must not be
    served with the old registration's configuration."""
    a, other = holder(holders, "-n"), holder(holders, "-n")
    registry.add("a", a.path, tenant, "oci aaaa")
    registry.close()
    state = tmp_path / "state.json"
    data = json.loads(state.read_text())
    assert (data["registrations"][0]["netns_dev"],
            data["registrations"][0]["netns_inode"]) == a.key
    data["registrations"][0]["path"] = other.path
    state.write_text(json.dumps(data))
    again = Registry(str(state), registry.home_key, lambda fd: False)
    try:
        again.restore()
        assert not again.entries
        assert "leads to another namespace than the one registered" \
            in caplog.text
        assert read_state(str(state)) == []
    finally:
        again.close()


ENTRY = ('"name": "a", "path": "/p", "config": "/c", "source": "s", '
         '"allow_userns": false, ')


@pytest.mark.parametrize("text", [
    "not json",
    "[]",
    '{"version": 2, "registrations": []}',
    '{"version": 1, "registrations": [{"name": "a"}]}',
    '{"version": 1, "registrations": [], "more": 1}',
    '{"version": 1, "registrations": [{"name": "a", "path": "/p", '
    '"config": "/c", "source": "s", "allow_userns": "yes", '
    '"netns_dev": 4, "netns_inode": 5}]}',
    # Without the namespace's inode, or with a bad one.
    '{"version": 1, "registrations": [{%s"netns_dev": 4}]}' % ENTRY,
    '{"version": 1, "registrations": [{%s"netns_dev": 4, '
    '"netns_inode": "5"}]}' % ENTRY,
    '{"version": 1, "registrations": [{%s"netns_dev": 4, '
    '"netns_inode": true}]}' % ENTRY,
    '{"version": 1, "registrations": [{%s"netns_dev": -1, '
    '"netns_inode": 5}]}' % ENTRY,
])
def test_bad_state_file_is_ignored(tmp_path, text, caplog):
    state = tmp_path / "state.json"
    state.write_text(text)
    r = Registry(str(state), netns.key_of("/proc/self/ns/net"),
                 lambda fd: False)
    r.restore()
    assert not r.entries
    assert "Ignoring the registrations" in caplog.text


def test_state_file_writable_by_others_is_ignored(tmp_path, caplog):
    state = tmp_path / "state.json"
    state.write_text('{"version": 1, "registrations": []}')
    os.chmod(state, 0o622)
    with pytest.raises(config.ConfigError, match="writable"):
        read_state(str(state))


def test_dropins_register_matches(registry, holders, tenant, tmp_path,
                                  caplog):
    caplog.set_level(logging.INFO, logger="tlshd")
    h = holder(holders, "-n")
    d = tmp_path / "netns.d"
    d.mkdir()
    (d / "acme.conf").write_text(
        "[netns]\npath = /proc/%d/ns/ne[t]\nconfig = %s\n"
        % (h.proc.pid, tenant))
    (d / "broken.conf").write_text("[netns]\npath = /x/*\n")
    (d / "ignored.txt").write_text("not read")
    drop = DropIns(registry)
    drop.load(str(tmp_path / "tlshd.conf"))
    assert [x.file for x in drop.dropins] == ["netns.d/acme.conf"]
    assert "Ignoring drop-in broken.conf" in caplog.text
    assert drop.apply() is True
    (reg,) = registry.entries.values()
    assert reg.key == h.key and reg.dropin
    assert reg.name == "netns-%d" % h.key[1]  # a /proc path names nothing
    assert drop.apply() is False  # nothing new
    # Not written to the state file: the drop-in says it again.
    assert read_state(registry.state_path) == []
    # The drop-in goes: so does its registration, at the next load.
    (d / "acme.conf").unlink()
    drop.load(str(tmp_path / "tlshd.conf"))
    assert not registry.entries


def test_dropin_must_be_root_owned_and_private(tmp_path, tenant):
    f = tmp_path / "x.conf"
    f.write_text("[netns]\npath=/run/netns/*\nconfig=%s\n" % tenant)
    assert read(str(f)).pattern == "/run/netns/*"
    os.chmod(f, 0o646)
    with pytest.raises(config.ConfigError, match="writable"):
        read(str(f))


# ---- through the supervisor and its control socket ---------------------

@pytest.fixture
def sup(monkeypatch, tmp_path) -> Iterator[Supervisor]:
    monkeypatch.setattr(netns, "RUN_NETNS", str(tmp_path / "netns"))
    conf = tmp_path / "tlshd.conf"
    conf.write_text("")
    s = Supervisor(config.load(str(conf)), FAMILY)
    s.registry.state_path = str(tmp_path / "state.json")
    s.serve_namespaces()
    yield s
    for ns in list(s.namespaces):
        s.remove_namespace(ns)
    s.registry.close()
    if s.discovery.watcher is not None:
        s.discovery.watcher.close()
    release(s)


def ask(s: Supervisor, argv: list[str]) -> str:
    return control.answer(s, ctl.netns_command("tlshdctl", argv))


def test_registered_namespace_is_served_with_its_config(sup, holders, tenant):
    h = holder(holders, "-n")
    out = ask(sup, ["add", "--path", h.path, "--config", tenant,
                    "--name", "acme", "--source", "oci 0123abcd"])
    assert out.startswith("netns acme (%s, inode %d): registered with %s, "
                          "served" % (h.path, h.key[1], tenant)), out
    (ns,) = [ns for ns in sup.namespaces if ns.key == h.key]
    assert ns.registered and ns.config_path == tenant
    assert ns.label == "acme"
    row = control.namespace_status(ns, 0)
    assert row["source"] == "registered by oci 0123abcd: %s" % h.path
    assert "source:    registered by oci 0123abcd" in control.status_of(
        sup, "acme")
    out = ask(sup, ["remove", "--name", "acme"])
    assert out == "netns acme (%s): registration removed\n" % h.path
    assert h.key not in {ns.key for ns in sup.namespaces}


def test_registration_errors_are_answered(sup, holders, tenant, tmp_path):
    served = list(sup.namespaces)
    out = ask(sup, ["add", "--path", "/etc/hostname", "--config", tenant])
    assert out == "error: /etc/hostname is not a namespace\n"
    h = holder(holders, "-n")
    out = ask(sup, ["add", "--path", h.path, "--config",
                    str(tmp_path / "missing.conf")])
    assert out.startswith("error: configuration ")
    assert ask(sup, ["remove", "--name", "nope"]).startswith("error: ")
    assert sup.namespaces == served  # nothing else disturbed


@pytest.mark.parametrize("arg, why", [
    ("[]", "not a JSON object"),
    ('{"path": 1}', "path must be a str"),
    ('{"allow_userns": "true"}', "allow_userns must be a bool"),
    ('{"evil": "x"}', "unknown field"),
    ("{", "error: "),
])
def test_control_requests_are_decoded_strictly(sup, arg, why):
    out = control.answer(sup, "netns-add " + arg)
    assert out.startswith("error: ") and why in out, out


def test_dead_registered_namespace_stops_being_served(sup, holders, tenant):
    h = holder(holders, "-n")
    ask(sup, ["add", "--path", h.path, "--config", tenant, "--name", "a"])
    assert h.key in {ns.key for ns in sup.namespaces}
    h.kill()
    assert sup.discovery.scan_due(time.monotonic() + 10)
    sup.scan()
    assert h.key not in {ns.key for ns in sup.namespaces}
    assert not sup.registry.entries


def test_ctl_builds_the_requests():
    add = ctl.netns_command("tlshdctl", [
        "add", "--path", "/proc/1/ns/net", "--config", "/c", "--name", "n",
        "--allow-userns"])
    verb, _, arg = add.partition(" ")
    assert verb == "netns-add"
    assert json.loads(arg) == {"path": "/proc/1/ns/net", "config": "/c",
                               "source": "tlshdctl", "allow_userns": True,
                               "name": "n"}
    assert ctl.netns_command("tlshdctl", ["remove", "--path", "/p"]) == (
        'netns-remove {"path": "/p"}')
    with pytest.raises(SystemExit):
        ctl.netns_command("tlshdctl", ["remove"])
    with pytest.raises(SystemExit):
        ctl.netns_command("tlshdctl", ["add", "--path", "/p"])


# ---- the OCI hook ---------------------------------------------------------

def state(**kw: object) -> str:
    s: dict[str, object] = {"ociVersion": "1.0.2", "id": "0123abcd",
                            "status": "creating", "pid": 4242,
                            "bundle": "/b", "annotations": {
                                ocihook.CONFIG: "/etc/tlshd/acme"}}
    s.update(kw)
    return json.dumps(s)


def test_oci_hook_requests():
    verb, _, arg = ocihook.request("add", state()).partition(" ")
    assert verb == "netns-add"
    assert json.loads(arg) == {
        "name": "0123abcd", "path": "/proc/4242/ns/net",
        "config": "/etc/tlshd/acme", "source": "oci 0123abcd",
        "allow_userns": False}
    rootless = state(annotations={ocihook.CONFIG: "/c",
                                  ocihook.ALLOW_USERNS: "true"})
    assert json.loads(ocihook.request("add", rootless).partition(" ")[2])[
        "allow_userns"] is True
    # Not annotated: not ours to register.
    assert ocihook.request("add", state(annotations={})) is None
    assert ocihook.request("remove", state(pid=0)) == (
        'netns-remove {"name": "0123abcd"}')


@pytest.mark.parametrize("text, why", [
    ("[]", "not a JSON object"),
    (state(id=""), "no id"),
    (state(pid="1"), "bad pid"),
    (state(pid=0), "no process yet"),
    (state(annotations={ocihook.CONFIG: 1}), "bad annotations"),
    (state(annotations={ocihook.CONFIG: "/c", ocihook.ALLOW_USERNS: "yes"}),
     "true or false"),
])
def test_oci_hook_refuses_bad_state(text, why):
    with pytest.raises(ValueError, match=why):
        ocihook.request("add", text)


def test_oci_hook_fails_add_but_never_remove(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "control.sock")
    monkeypatch.setattr("sys.stdin", io.StringIO(state()))
    assert ocihook.main(["add", missing]) == 1
    assert "tlshd-oci-hook add:" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(state()))
    assert ocihook.main(["remove", missing]) == 0
    assert ocihook.main(["bogus"]) == 2
