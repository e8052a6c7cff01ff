"""NVMe/TCP with TLS 1.3 retained PSKs: kernel host and nvmet, loopback.

The nvmet target listens on 127.0.0.1:4420 with ``addr_tsas=tls1.3`` and
``addr_treq=required``; the kernel host connects through /dev/nvme-fabrics
(bookworm's nvme-cli 2.3 has no ``--tls``) with ``tls``. Every queue is its
own TCP connection with a handshake at both ends, all served by one tlshd:
2 x (1 admin + N I/O) upcalls per connect. The PSKs are ``psk`` keys in
``.nvme`` named ``NVMe0R01 <hostnqn> <subnqn>`` (SHA-256, 32 bytes) or
``NVMe0R02 ...`` (SHA-384, 48 bytes).

What the kernel saw is read from the handshake:* tracepoints; the side of
each request from the task that submitted it (the host submits from the
connecting process, nvmet from a kworker). Statuses and timings are
printed (run pytest with -rA to see them).

8 I/O queues need 8 vCPUs, or 4 with read and write queues (the host
caps each queue type at the online CPUs); the x8 cases are marked "wide"
and tools/test runs them in a second boot with 4 vCPUs:
tools/vm-run --smp 4 --kernel 6.12 -- .venv/bin/python -m pytest \
-m "kernel and wide" tests/kernel/test_nvme.py -rA
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from lab.nvme import (
    CONFIG,
    HASHES,
    HOSTID,
    HOSTNQN,
    PORT,
    SUBNQN,
    block_device,
    clear_trace,
    disconnect,
    failed_connect,
    good_connect,
    identity,
    nvme_keyring,
    requests,
    sh,
    show,
    write_read_back,
)
from lab.shell import TRIXIE

from tlshd.shared import keys

pytestmark = pytest.mark.kernel


# ---- tests --------------------------------------------------------------


@pytest.mark.parametrize(
    "queues", [1, pytest.param(8, marks=pytest.mark.wide)])
@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
def test_connect_write_read(target, tlshd, nvme_trace, psk_keys, hash_name,
                            queues):
    hh, size = HASHES[hash_name]
    serial = psk_keys.add(identity(hh), os.urandom(size))
    tlshd.start(CONFIG)
    # The worker reads the PSKs as an unprivileged user: by possession.
    worker = re.search(r"ready: (uid \d+ gid \d+ CapEff \w+)", tlshd.log())
    assert worker and not worker.group(1).startswith("uid 0 "), worker
    print(f"{hash_name} x{queues}: worker {worker.group(1)}")
    good_connect(tlshd, serial, queues, f"{hash_name} x{queues}")
    suite = "SHA256" if hash_name == "sha256" else "SHA384"
    assert f"(PSK-{suite})" in tlshd.log()


def test_wrong_psk_then_good(target, tlshd, nvme_trace, psk_keys):
    """Host and target hold different secrets under the same identity:
    the binder does not verify, both handshakes fail (EACCES), and the
    next good connect works with the same daemon."""
    ident = identity("01")
    good = psk_keys.add(ident, os.urandom(32))
    ring = psk_keys.private_keyring("tlshd-test-host-wrong")
    wrong = psk_keys.add(ident, os.urandom(32), ring)
    tlshd.start(CONFIG)
    reqs = failed_connect(tlshd, "wrong psk",
                          f",keyring={ring},tls_key={wrong}")
    by_side = {r.side: r.status for r in reqs}
    assert by_side == {"host": errno.EACCES, "target": errno.EACCES}, reqs
    good_connect(tlshd, good, 1, "after wrong psk")


def test_unknown_identity_then_good(target, tlshd, nvme_trace, psk_keys):
    """The host offers an identity the target does not have: the target
    alerts unknown_psk_identity (status ENOKEY) and the host's handshake
    ends with EKEYREJECTED, as with ktls-utils."""
    good = psk_keys.add(identity("01"), os.urandom(32))
    ring = psk_keys.private_keyring("tlshd-test-host-unknown")
    other = psk_keys.add(identity("01", HOSTNQN + "-unknown"),
                         os.urandom(32), ring)
    tlshd.start(CONFIG)
    reqs = failed_connect(tlshd, "unknown identity",
                          f",keyring={ring},tls_key={other}")
    by_side = {r.side: r.status for r in reqs}
    assert by_side == {"host": errno.EKEYREJECTED,
                       "target": errno.ENOKEY}, reqs
    good_connect(tlshd, good, 1, "after unknown identity")


# ---- real tooling, module ordering --------------------------------------



def nvme_cli(args: str) -> str:
    """nvme-cli 2.13 from the trixie chroot (bookworm's 2.3 lacks TLS).

    It runs in a session keyring of its own: libnvme links .nvme into the
    caller's session keyring, which would otherwise keep ours holding it.
    """
    for sub in ("proc", "sys", "dev"):
        sh(f"mountpoint -q {TRIXIE}/{sub} || "
           f"mount --rbind /{sub} {TRIXIE}/{sub}")
    r = subprocess.run(["chroot", str(TRIXIE), "nvme", *args.split()],
                       capture_output=True, text=True, check=False,
                       timeout=120,
                       preexec_fn=lambda: keys.join_session_keyring(None))
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


@pytest.mark.parametrize("hmac", [1, 2], ids=["sha256", "sha384"])
def test_nvme_cli_generated_key_and_connect(target, tlshd, nvme_trace,
                                            psk_keys, hmac):
    """A configured PSK in the NVMe interchange format (nvme gen-tls-key),
    turned into the retained PSK and inserted into .nvme by nvme-cli
    (check-tls-key --insert, which also sets its permissions), then
    ``nvme connect --tls``."""
    if not (TRIXIE / "usr/sbin/nvme").exists():
        pytest.fail(f"trixie chroot with nvme-cli missing at {TRIXIE}")
    configured = nvme_cli(f"gen-tls-key --hmac={hmac}").split()[-1]
    out = nvme_cli(f"check-tls-key --hostnqn={HOSTNQN} "
                   f"--subsysnqn={SUBNQN} --keydata={configured} --insert")
    m = re.search(r"Inserted TLS key ([0-9a-f]+)", out)
    assert m, out
    serial = int(m.group(1), 16)
    psk_keys.added.append((serial, nvme_keyring()))
    print(f"nvme-cli hmac {hmac}: {configured[:16]}... -> key {serial:08x} "
          f"{keys.describe(serial)}")
    tlshd.start(CONFIG)
    clear_trace()
    start = time.monotonic()
    out = nvme_cli(f"connect -t tcp -a 127.0.0.1 -s {PORT} -n {SUBNQN} "
                   f"--hostnqn={HOSTNQN} --hostid={HOSTID} --tls "
                   "--nr-io-queues=1 -o json")
    print(f"nvme-cli hmac {hmac}: connect {time.monotonic() - start:.2f} s:"
          f" {out.strip()}")
    instance = int(re.search(r'"device"\s*:\s*"nvme(\d+)"', out).group(1))
    try:
        ctrl = Path(f"/sys/class/nvme/nvme{instance}")
        assert (ctrl / "state").read_text().strip() == "live"
        assert int((ctrl / "tls_key").read_text(), 16) == serial
        write_read_back(block_device(instance))
    finally:
        disconnect(instance)
    reqs = requests()
    show(f"nvme-cli hmac {hmac}", reqs)
    assert len(reqs) == 4 and all(r.status == 0 for r in reqs), reqs


def test_modules_loaded_after_tlshd(target, tlshd, nvme_trace, psk_keys):
    """docs/vm-harness.md pitfall 13: with the nvme modules loaded after the
    daemon, .nvme did not exist to be linked at start-up. The consumers'
    ACCEPT links it into the supervisor's process keyring, which the
    workers possess, so both ends still find their PSK."""
    target.teardown()
    psk_keys.remove()
    # nvme_keyring goes with its last user (nvme_core on 7.x).
    sh("modprobe -r nvme_tcp nvmet_tcp nvmet nvme_fabrics; "
       "modprobe -r nvme_core nvme_auth nvme_keyring; true")
    end = time.monotonic() + 30
    while keys.find_keyrings(".nvme") and time.monotonic() < end:
        time.sleep(0.5)  # the revoked keyring waits for the key GC
    assert not keys.find_keyrings(".nvme"), sh("lsmod; cat /proc/keys")
    tlshd.start(CONFIG)
    assert "Keyring '.nvme' not found" in tlshd.log()
    target.setup()
    serial = psk_keys.add(identity("01"), os.urandom(32))
    good_connect(tlshd, serial, 1, "modules after tlshd")
