"""Certificate expiry in the log and in ``tlshdctl status`` (30 days)."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tlshd.shared import config
from tlshd.supervisor import control

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
        held=False, worker=None, restarts=0, pending=[], succeeded=3,
        failed=1, last_failure="EACCES: certificate verify failed",
        cfg=configured(tmp_path))
    row = control.namespace_status(ns)
    warnings = {c["role"]: c["warning"] for c in row["certificates"]}
    assert warnings["server"] == "expires soon"
    assert warnings["client-truststore"] == "expired"
    assert warnings["client"] == ""
    assert "No such file" in warnings["server-truststore"]
    days = {c["role"]: c["days_left"] for c in row["certificates"]}
    assert 9 < days["server"] <= 10 and days["client"] > 399
    text = control.render_status([row])
    assert "server:            CN=soon" in text
    assert "** expires soon **" in text and "** expired **" in text
    assert "last failure: EACCES: certificate verify failed" in text
    # The same dates in the metrics, as Unix times.
    metrics = control.render_metrics([row])
    soon = [line for line in metrics.splitlines()
            if 'role="server",subject="CN=soon"' in line]
    assert len(soon) == 1
    left = float(soon[0].split()[-1]) - datetime.datetime.now(
        datetime.UTC).timestamp()
    assert 9 * 86400 < left <= 10 * 86400
