"""Certificate expiry in the log and in ``tlshdctl status`` (30 days)."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tlshd.shared import config
from tlshd.supervisor import control, statustext

from .conftest import DAY, PKI


def configured(tmp_path: Path) -> config.Config:
    pki = PKI(tmp_path)
    soon = pki.leaf("soon", not_after=10 * DAY)
    later = pki.leaf("later", not_after=400 * DAY, client=True)
    gone = pki.leaf("gone", not_before=-20 * DAY, not_after=-DAY)
    return config.parse(
        "[authenticate.client]\n"
        f"x509.certificate={later.cert}\nx509.private_key={later.key}\n"
        f"x509.truststore={gone.cert}\n"
        "[authenticate.server]\n"
        f"x509.certificate={soon.cert}\nx509.private_key={soon.key}\n"
        f"x509.truststore={tmp_path / 'missing.pem'}\n")


def test_expiring_certificates_are_warned_in_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = configured(tmp_path)
    with caplog.at_level(logging.WARNING):
        control.warn_expiring("a", cfg)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert any(line.startswith("netns a: server certificate ")
               and "(CN=soon)" in line
               and line.endswith(("expires in 10 days", "expires in 9 days"))
               for line in lines), lines
    assert any("client-truststore certificate" in line
               and line.endswith("has expired") for line in lines), lines
    assert not any("CN=later" in line for line in lines), lines


def test_expiring_certificates_are_marked_in_status(tmp_path: Path) -> None:
    ns: Any = SimpleNamespace(
        label="a", key=(1, 4026532242),
        config_path="/etc/tlshd/netns/a/config",
        held=False, source="ip netns", worker=None, restarts=0, succeeded=3,
        by_certificate={"ml-dsa": 2, "classical": 1},
        failed=1, last_failure="EACCES: certificate verify failed",
        cfg=configured(tmp_path))
    row = control.namespace_status(ns, 2)
    assert row["in_flight"] == 2
    warnings = {c["role"]: c["warning"] for c in row["certificates"]}
    assert warnings["server"] == "expires soon"
    assert warnings["client-truststore"] == "expired"
    assert warnings["client"] == ""
    assert "No such file" in warnings["server-truststore"]
    days = {c["role"]: c["days_left"] for c in row["certificates"]}
    assert 9 < days["server"] <= 10 and days["client"] > 399
    text = statustext.render_status([row])
    assert "server:            CN=soon" in text
    assert "** expires soon **" in text and "** expired **" in text
    assert "last failure: EACCES: certificate verify failed" in text
    assert "server certificates: classical 1, ml-dsa 2" in text
    # The same dates in the metrics, as Unix times.
    metrics = statustext.render_metrics([row])
    assert ('tlshd_handshakes_by_certificate_total{netns="a",'
            'kind="ml-dsa"} 2') in metrics.splitlines()
    soon = [line for line in metrics.splitlines()
            if 'role="server",subject="CN=soon"' in line]
    assert len(soon) == 1
    left = float(soon[0].split()[-1]) - datetime.datetime.now(
        datetime.UTC).timestamp()
    assert 9 * 86400 < left <= 10 * 86400


# ---- over the socket, with a real supervisor: reload, why held ----------

def _controlled(s: Any, tmp_path: Path) -> str:
    # A reload rescans the namespaces, and would serve the host's own
    # beside the fake "init" (which has no key): not here.
    s.scan = lambda: None
    path = str(tmp_path / "ctl" / "control.sock")
    s.serve_control(path)
    return path


def _in_thread(s: Any, fn: Any, timeout: float = 180) -> Any:
    """``fn()`` in a thread while the supervisor's loop runs here."""
    import threading

    from supervisorfakes import run_until

    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    run_until(s, lambda: "r" in out, timeout=timeout)
    t.join()
    return out["r"]


def _second_namespace(s: Any, tmp_path: Path, text: str) -> Any:
    from supervisorfakes import FakeNl

    conf = tmp_path / "a.conf"
    conf.write_text(text)
    conf.chmod(0o600)
    return s.add_namespace("a", str(conf), nlsock=FakeNl())


GOOD = "[authenticate.client]\n[authenticate.server]\n"


def test_tlshdctl_reload_waits_for_the_new_workers(sup: Any,
                                                   tmp_path: Path) -> None:
    from supervisorfakes import ready, run_until

    from tlshd.supervisor import ctl

    s, _, ns = sup
    a = _second_namespace(s, tmp_path, GOOD)
    run_until(s, lambda: ready(ns) and ready(a))
    old = (ns.worker.pid, a.worker.pid)
    path = _controlled(s, tmp_path)
    out = _in_thread(s, lambda: ctl.reload(path, 120))
    assert out.startswith("reload finished in "), out
    assert "2 of 2 namespace(s) on the new configuration" in out
    assert "netns init: new configuration in use (worker %d)" % (
        ns.worker.pid) in out
    assert "netns a: new configuration in use (worker %d)" % (
        a.worker.pid) in out
    assert (ns.worker.pid, a.worker.pid) != old
    assert ns.worker.pid not in old and a.worker.pid not in old


def test_tlshdctl_reload_names_a_namespace_configuration_error(
        sup: Any, tmp_path: Path) -> None:
    from supervisorfakes import ready, run_until

    from tlshd.supervisor import ctl

    s, _, ns = sup
    a = _second_namespace(s, tmp_path, GOOD)
    run_until(s, lambda: ready(ns) and ready(a))
    path = _controlled(s, tmp_path)
    (tmp_path / "a.conf").write_text("[authenticate]\nhandshake_timeout=x\n")
    out = _in_thread(s, lambda: ctl.reload(path, 120))
    assert out.startswith("error: reload finished in "), out
    assert "1 of 2 namespace(s) on the new configuration, 1 with problems" \
        in out
    assert ("netns a: HELD: %s:2: [authenticate] handshake_timeout: 'x' is "
            "not a number" % (tmp_path / "a.conf")) in out
    status = _in_thread(s, lambda: ctl.query(path, "status"))
    assert "netns a (inode None)  HELD until a reload" in status
    assert ("  held:      %s:2: [authenticate] handshake_timeout: 'x' is "
            "not a number" % (tmp_path / "a.conf")) in status
    # Fixed and reloaded: served again.
    (tmp_path / "a.conf").write_text(GOOD)
    out = _in_thread(s, lambda: ctl.reload(path, 120))
    assert "2 of 2 namespace(s) on the new configuration" in out, out
    assert not a.held


def test_tlshdctl_reload_of_a_broken_main_configuration(
        sup: Any, tmp_path: Path) -> None:
    from supervisorfakes import ready, run_until

    from tlshd.supervisor import ctl

    s, _, ns = sup
    run_until(s, lambda: ready(ns))
    pid = ns.worker.pid
    path = _controlled(s, tmp_path)
    (tmp_path / "tlshd.conf").write_text("[authenticate]\nhandshake_timeout="
                                         "soon\n")
    code = _in_thread(s, lambda: ctl.main(["-S", path, "reload"]))
    assert code == 1
    assert ns.worker.pid == pid and not ns.held  # the old one serves on


def test_status_shows_the_credential_error_that_holds_a_namespace(
        sup: Any, tmp_path: Path) -> None:
    """A configuration that parses but whose certificate its worker
    cannot load: the worker's own error is why the namespace is held."""
    from supervisorfakes import ready, run_until

    from tlshd.supervisor import ctl

    s, _, ns = sup
    path = _controlled(s, tmp_path)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    a = _second_namespace(s, tmp_path, "[authenticate.server]\n"
                          f"x509.certificate={bad}\nx509.private_key={bad}\n")
    run_until(s, lambda: ready(ns) and a.held, timeout=120)
    status = _in_thread(s, lambda: ctl.query(path, "status"))
    held = [line for line in status.splitlines()
            if line.startswith("  held:")]
    assert len(held) == 1, status
    assert held[0].startswith(
        "  held:      its worker could not load the configuration: "), held
    assert str(bad) in held[0] or "certificate" in held[0].lower(), held
    rows = _in_thread(s, lambda: ctl.query(path, "status-json"))
    assert '"held_reason": "its worker could not load' in rows


def test_tlshdctl_version() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "tlshd.supervisor.ctl",
                        "--version"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tlshdctl, built from tlshd (Python) ")
