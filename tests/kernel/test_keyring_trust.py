"""Keyrings an unprivileged user plants, against a real ``.nvme`` keyring
and nvmet (issue 15).

As uid 65534 (nobody), with keyctl, in a session keyring of its own kept
alive for the test, the attacker creates and makes visible to everyone:

- ``planted``: a keyring holding a ``psk`` key for an identity that has no
  real key (the host NQN ``...-planted``);
- a keyring whose description ends in a forged /proc/keys line naming
  ``planted`` as ``.nvme`` (once read by tlshd as the real one: linked into
  its session keyring and searched by every server PSK lookup);
- a keyring whose description is not UTF-8 (once a UnicodeDecodeError that
  killed tlshd at start-up);
- ``tlshd-test-squat``: a keyring with a name an administrator could list
  in ``keyrings=`` (no leading dot, so any user can take it), holding a
  PSK for another identity without a real key.

The host connects with the planted identity and secret (from a keyring of
its own, as an attacker's NVMe host on the network would hold them): the
target must not find the planted key (target ENOKEY, host EKEYREJECTED),
while the real key in ``.nvme`` still works with the same daemon.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import string
import subprocess
from pathlib import Path

import pytest
from lab import nvme

from tlshd.shared import keys

pytestmark = pytest.mark.kernel

NOBODY = 65534
SQUAT_NAME = "tlshd-test-squat"



PLANTED_ID = nvme.identity("01", nvme.HOSTNQN + "-planted")
SQUAT_ID = nvme.identity("01", nvme.HOSTNQN + "-squat")
# The description that forges a /proc/keys line: a printf format for the
# planted keyring's serial.  The kernel ends the line with ": empty".
FORGED = "x\\n%08x I------     1 perm 1f0b0000     0     0 keyring   .nvme"
# The planted secrets go through keyctl's command line: no NUL bytes.
SECRET = "".join(secrets.choice(string.ascii_letters) for _ in range(32))

PLANT = r"""
set -e
all=0x3f3f3f3f   # every right for possessor, user, group and other
planted=$(keyctl newring planted @s)
psk=$(keyctl add psk "$PLANTED_ID" "$SECRET" "$planted")
forger=$(keyctl newring "$(printf "$FORGED" "$planted")" @s)
bad=0
if [ -n "$NON_UTF8" ]; then
    bad=$(keyctl newring $'bad-\xff\xfe-\n\xc3(' @s)
    keyctl setperm "$bad" $all
fi
squat=$(keyctl newring "$SQUAT_NAME" @s)
squat_psk=$(keyctl add psk "$SQUAT_ID" "$SECRET" "$squat")
for k in $planted $psk $forger $squat $squat_psk; do
    keyctl setperm "$k" $all
done
echo "$planted $psk $forger $bad $squat $squat_psk"
read -r _ || true   # until the test closes our stdin
"""


class Attacker:
    """The keys nobody planted, alive until close(); the keyring that is
    not UTF-8 only if ``non_utf8`` (else ``bad`` is 0)."""

    def __init__(self, non_utf8: bool) -> None:
        def drop() -> None:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            keys.join_session_keyring(None)

        env = dict(os.environ, PLANTED_ID=PLANTED_ID, SQUAT_ID=SQUAT_ID,
                   SQUAT_NAME=SQUAT_NAME, SECRET=SECRET, FORGED=FORGED,
                   NON_UTF8="1" if non_utf8 else "")
        self.proc = subprocess.Popen(
            ["bash", "-c", PLANT], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            preexec_fn=drop, cwd="/")
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.strip():
            _out, err = self.proc.communicate(timeout=10)
            raise AssertionError("planting failed: %s" % err.decode())
        (self.planted, self.psk, self.forger, self.bad, self.squat,
         self.squat_psk) = (int(s) for s in line.split())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def proc_keys_line(serial: int, description: bytes) -> bytes:
    """The /proc/keys line of key ``serial`` described ``description``
    (b"" if none): not a line forged to begin with the same serial."""
    listing = Path("/proc/keys").read_bytes()
    for line in listing.split(b"\n"):
        fields = line.split(None, 8)
        if (len(fields) == 9 and fields[0] == b"%08x" % serial
                and fields[8].startswith(description + b": ")):
            return line
    return b""


def usage(serial: int, description: bytes) -> int:
    """The key's reference count, /proc/keys' third field: one per
    keyring it is linked in (here, only the attacker's session keyring)."""
    line = proc_keys_line(serial, description)
    assert line, "key %08x not in /proc/keys" % serial
    return int(line.split()[2])


def planted_connect(tlshd, psk_keys, identity: str, label: str) -> None:
    """The host offers ``identity`` with the planted secret: the target
    must not know it (ENOKEY), so the host's handshake is rejected."""
    ring = psk_keys.private_keyring("tlshd-test-host-" + label)
    host_key = psk_keys.add(identity, SECRET.encode(), ring)
    reqs = nvme.failed_connect(tlshd, label,
                               f",keyring={ring},tls_key={host_key}")
    by_side = {r.side: r.status for r in reqs}
    assert by_side == {"host": errno.EKEYREJECTED,
                       "target": errno.ENOKEY}, reqs


def test_forged_nvme_line_is_never_linked(target, tlshd, nvme_trace,
                                          psk_keys):
    real = nvme.nvme_keyring()  # before anything is planted
    good = psk_keys.add(nvme.identity("01"), os.urandom(32))
    attacker = Attacker(non_utf8=False)
    try:
        check_forged_nvme_line(tlshd, psk_keys, attacker, real, good)
    finally:
        attacker.close()


def check_forged_nvme_line(tlshd, psk_keys, attacker: Attacker, real: int,
                           good: int) -> None:
    # The forgery is real: root's /proc/keys has a line naming the
    # attacker's keyring .nvme.
    forged = (b"\n%08x I------     1 perm 1f0b0000     0     0 keyring   "
              b".nvme" % attacker.planted)
    assert forged in Path("/proc/keys").read_bytes()
    assert keys.find_keyrings(".nvme") == [real]

    tlshd.start(nvme.CONFIG)
    log = tlshd.log()
    linked = re.findall(r"Keyring '\.nvme' \((\w+)\) linked", log)
    assert linked == ["%08x" % real], log[-3000:]
    assert "%08x" % attacker.planted not in log
    # Linked in the daemon's session keyring it would hold one more
    # reference than the attacker's own link.
    print("planted keyring:",
          proc_keys_line(attacker.planted, b"planted").decode())
    assert usage(attacker.planted, b"planted") == 1

    mark = tlshd.mark()
    planted_connect(tlshd, psk_keys, PLANTED_ID, "planted")
    # The keyrings the target's lookups searched (debug log): the
    # request's (.nvme) and the daemon's session keyring's.
    searched = re.findall(r"PSK lookup in keyrings (.*)", tlshd.since(mark))
    print("searched:", searched)
    assert searched
    assert all("%08x" % attacker.planted not in s for s in searched)
    nvme.good_connect(tlshd, good, 1, "real key after planted")


def test_non_utf8_and_squatted_keyrings(target, tlshd, nvme_trace,
                                        psk_keys):
    """tlshd starts and serves beside a keyring whose description is not
    UTF-8, and refuses a configured keyring name that nobody squatted."""
    good = psk_keys.add(nvme.identity("01"), os.urandom(32))
    attacker = Attacker(non_utf8=True)
    try:
        check_non_utf8_and_squatted(tlshd, psk_keys, attacker, good)
    finally:
        attacker.close()


def check_non_utf8_and_squatted(tlshd, psk_keys, attacker: Attacker,
                                good: int) -> None:
    # What crashed the text parse: invalid UTF-8 in root's /proc/keys.
    listing = Path("/proc/keys").read_bytes()
    assert re.search(rb"^%08x .* keyring +bad-\xff\xfe-\n\xc3\(: empty$"
                     % attacker.bad, listing, re.MULTILINE), listing
    config = nvme.CONFIG.replace(
        "[authenticate]\n", "[authenticate]\nkeyrings=%s\n" % SQUAT_NAME)
    assert SQUAT_NAME in config
    tlshd.start(config)
    log = tlshd.log()
    refusal = ("Refusing keyring '%s' (serial %08x): owned by uid %d"
               % (SQUAT_NAME, attacker.squat, NOBODY))
    assert refusal in log, log[-3000:]
    assert "%08x" % attacker.squat not in re.findall(
        r"Keyring '.*' \((\w+)\) linked", log)
    assert usage(attacker.squat, SQUAT_NAME.encode()) == 1
    planted_connect(tlshd, psk_keys, SQUAT_ID, "squat")
    nvme.good_connect(tlshd, good, 1, "real key beside the attacker's")
