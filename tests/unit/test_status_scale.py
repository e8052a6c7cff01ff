"""``tlshdctl status`` with a thousand namespaces (issue 17): a summary
line, the namespaces that need a look, ``--netns NAME`` for one in full;
``status-json`` complete; certificate files read once, not once per
namespace."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tlshd.shared import config
from tlshd.supervisor import control, ctl, statustext

from .conftest import DAY, PKI


def namespace(label: str, inode: int, cfg: config.Config, **kw: Any) -> Any:
    fields: dict[str, Any] = dict(
        label=label, key=(1, inode), config_path="/etc/tlshd/%s" % label,
        held=False, worker=None, restarts=0, succeeded=0, failed=0,
        by_certificate={}, last_failure="", cfg=cfg, source="ip netns")
    fields.update(kw)
    return SimpleNamespace(**fields)


class Served:
    """What control.py asks of the supervisor, for hand-made namespaces."""

    def __init__(self, namespaces: list[Any], in_flight: dict[str, int],
                 spawning: set[str]) -> None:
        self.namespaces = namespaces
        self._in_flight = in_flight
        self._spawning = spawning

    def in_flight(self, ns: Any) -> int:
        return self._in_flight.get(ns.label, 0)

    def spawning(self, ns: Any) -> bool:
        return ns.label in self._spawning

    def reload(self) -> list[str]:
        return []


def worker(pid: int, ready: bool) -> Any:
    return SimpleNamespace(pid=pid, ready=ready, started=0.0)


def host(count: int, cfg: config.Config) -> Served:
    """``count`` namespaces: n0001 held, n0002 with a worker starting,
    n0003 spawning, n0004 with a ready worker; 3 requests in flight."""
    nss = [namespace("n%04d" % i, 4026530000 + i, cfg, succeeded=2,
                     failed=1) for i in range(count)]
    nss[1].held = True
    nss[2].worker = worker(102, False)
    nss[4].worker = worker(104, True)
    return Served(nss, {"n0004": 2, "n0002": 1}, {"n0003"})


def test_the_summary_line_counts_every_namespace():
    rows = control.status(host(1000, config.Config(path="")))
    line = statustext.render_summary(rows)
    assert line == ("1000 namespace(s) served (1 held); workers: 1 running, "
                    "2 starting; 3 request(s) in flight; handshakes: 2000 "
                    "succeeded, 1000 failed")


def test_many_namespaces_show_only_those_that_need_a_look():
    text = control.answer(host(1000, config.Config(path="")), "status")
    lines = text.splitlines()
    assert lines[0].startswith("1000 namespace(s) served")
    assert lines[1].startswith("netns n0001: HELD: ")
    assert lines[2:4] == ["netns n0002: worker starting",
                          "netns n0003: worker starting"]
    assert lines[-1] == "One namespace in full: tlshdctl status --netns NAME"
    assert len(lines) == 5
    assert "netns n0004" not in text


def test_a_long_list_of_problems_is_cut_short():
    sup = host(1000, config.Config(path=""))
    for ns in sup.namespaces[10:60]:
        ns.held = True
    lines = control.answer(sup, "status").splitlines()
    flagged = [line for line in lines if line.startswith("netns ")]
    assert len(flagged) == statustext.ATTENTION_LINES
    assert ("... and %d more that need a look (tlshdctl status-json)"
            % (53 - statustext.ATTENTION_LINES)) in lines


def test_a_few_namespaces_are_all_shown_in_full():
    sup = host(statustext.DETAIL_MAX, config.Config(path=""))
    text = control.answer(sup, "status")
    assert text.count("\nnetns n") == statustext.DETAIL_MAX
    assert "worker:    pid 104, ready" in text
    assert "worker:    starting (0 restart(s))" in text  # spawning
    assert "worker:    none (0 restart(s))" in text
    assert "tlshdctl status --netns" not in text


def test_one_namespace_by_name_or_inode():
    sup = host(1000, config.Config(path=""))
    text = control.answer(sup, "status-netns n0004")
    assert text.splitlines()[0] == "netns n0004 (inode 4026530004)"
    assert "handshakes: 2 succeeded, 1 failed, 2 in flight" in text
    assert control.answer(sup, "status-netns 4026530004") == text
    assert control.answer(sup, "status-netns nope").startswith(
        "error: no namespace 'nope' is served")


def test_status_json_stays_complete():
    rows = json.loads(control.answer(host(1000, config.Config(path="")),
                                     "status-json"))
    assert len(rows) == 1000
    assert rows[3]["worker_starting"] and not rows[3]["worker_pid"]
    assert rows[4]["worker_ready"] and rows[4]["in_flight"] == 2


def test_certificate_files_are_read_once(tmp_path: Path, monkeypatch):
    pki = PKI(tmp_path)
    leaf = pki.leaf("shared", not_after=100 * DAY)
    cfg = config.parse("[authenticate.server]\nx509.certificate=%s\n"
                       "x509.private_key=%s\n" % (leaf.cert, leaf.key))
    from cryptography import x509

    reads = []
    real = x509.load_pem_x509_certificates
    monkeypatch.setattr(x509, "load_pem_x509_certificates",
                        lambda data: reads.append(1) or real(data))
    control._cert_cache.clear()
    rows = control.status(Served(
        [namespace("n%d" % i, i, cfg) for i in range(50)], {}, set()))
    assert len(reads) == 1
    assert {r["certificates"][0]["subject"] for r in rows} == {"CN=shared"}
    # A changed file is read again.
    other = pki.leaf("other", not_after=100 * DAY)
    Path(leaf.cert).write_bytes(Path(other.cert).read_bytes())
    assert control.certificates(cfg)[0].subject == "CN=other"
    assert len(reads) == 2


def test_tlshdctl_netns_goes_with_status_only(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        ctl.main(["-S", str(tmp_path / "nope"), "--netns", "a", "metrics"])
    assert e.value.code == 2
    assert ctl.main(["-S", str(tmp_path / "nope"), "--netns", "a",
                     "status"]) == 69
