"""Kernel keys from Python: tlshd.shared.keys, the daemon's session keyring
(tlshd.supervisor.keyrings) and the supervisor's reading of PSKs for its
workers (tlshd.supervisor.keymaterial), against the host kernel's real
keyrings.

Each scenario runs in a fresh interpreter that first joins a new session
keyring, so nothing here touches the test runner's keyrings. ``user`` keys
stand in for NVMe ``psk`` keys (that type needs the nvme-keyring module;
the kernel tests use the real thing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from tlshd.shared import keys

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/keys"), reason="kernel without CONFIG_KEYS")

PRELUDE = """
import errno, json, os, sys
from tlshd.shared import keys
keys.join_session_keyring(None)
S = keys.KEY_SPEC_SESSION_KEYRING

def err(f, *a):
    try:
        f(*a)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]

def child(fn):
    # fn runs in a forked child; its JSON result comes back on a pipe.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn()
        except BaseException as e:
            out = repr(e)
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.waitpid(pid, 0)
    return json.loads(data)
"""


def run(body: str) -> Any:
    code = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_basic_operations() -> None:
    out = run("""
        ring = keys.add("keyring", "tlshd-test", b"", S)
        k = keys.add("user", "NVMe0R01 h;with;semicolons s", b"\\x01" * 32,
                     ring)
        print(json.dumps({
            "describe": repr(keys.describe(k)),
            "read": keys.read(k).hex(),
            "search": keys.search(S, "user", "NVMe0R01 h;with;semicolons s")
                      == k,
            "search_bytes": keys.search(ring, "user",
                                        b"NVMe0R01 h;with;semicolons s") == k,
            "missing": err(keys.search, S, "user", "nope"),
            "session": keys.keyring_id(S) > 0,
            "nul": err(keys.search, S, "user", "a\\0b"),
            "members": keys.read(ring) == k.to_bytes(4, sys.byteorder),
        }))
    """)
    assert out["describe"] == repr(keys.KeyInfo(
        key_type="user", uid=0, gid=0, perm=0x3F010000,
        description=b"NVMe0R01 h;with;semicolons s"))
    assert out["read"] == "01" * 32
    assert out["search"] and out["search_bytes"] and out["members"]
    assert out["missing"] == "ENOKEY"
    assert out["session"]
    assert out["nul"] == "EINVAL"


def test_root_needs_possession() -> None:
    """A root process in another session keyring can see (user VIEW) but
    not read a key; linking the owner's process keyring into the session
    keyring, as the supervisor does, gives possession to every child that
    keeps that session keyring, even after it drops to an unprivileged
    uid: hence a worker joins an empty session keyring of its own."""
    out = run("""
        proc = keys.keyring_id(keys.KEY_SPEC_PROCESS_KEYRING, create=True)
        k = keys.add("user", "psk-in-process-keyring", b"secret", proc)

        def other_session():
            keys.join_session_keyring(None)
            return [err(keys.describe, k), err(keys.read, k)]

        def as_worker():
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            return [err(keys.read, k),
                    err(keys.search, proc, "user",
                        "psk-in-process-keyring")]

        before = child(as_worker)
        keys.link(proc, S)
        print(json.dumps({"other": child(other_session), "before": before,
                          "after": child(as_worker)}))
    """)
    assert out["other"] == ["ok", "EACCES"]
    assert out["before"] == ["EACCES", "EACCES"]
    assert out["after"] == ["ok", "ok"]


def test_proc_keys_candidates() -> None:
    """Lines that begin with a serial and mention the name, whatever they
    say about type and description: describe() decides."""
    text = (
        b"2487cc1f I------     1 perm 1f1f0000     0     0 keyring   "
        b".nvme: empty\n"
        b"12345678 I--Q---     1 perm 3f010000     0     0 psk       "
        b"NVMe0R01 nqn.a:b nqn.c:d: 32\n"
        b"0000abcd I------     1 perm 1f1f0000     0     0 keyring   "
        b".nvme-other: 1\n"
        b"fffffffd I------     1 perm 1f1f0000     0     0 keyring   "
        b".nvme: empty\n"  # our session keyring's KEY_SPEC id: never
        b"x\xff\xfe .nvme\n"
        b"garbage\n"
    )
    assert keys.proc_keys_candidates(text, b".nvme") == [0x2487CC1F, 0xABCD]
    assert keys.proc_keys_candidates(
        text, b"NVMe0R01 nqn.a:b nqn.c:d") == [0x12345678]
    assert keys.proc_keys_candidates(text, b".nfs") == []


def test_supervisor_session_keyring() -> None:
    """setup_session_keyring links the process keyring and every named
    keyring it finds in /proc/keys into a new session keyring; a missing
    name is only logged."""
    out = run("""
        import logging
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        name = "tlshd-test-%d" % os.getpid()
        ring = keys.add("keyring", name, b"", S)
        keys.setperm(ring, 0x3f1b0000)  # user: view, read, search, link
        outer = keys.keyring_id(S)

        def supervisor():
            from tlshd.supervisor import keyrings
            keyrings.setup_session_keyring([name, "tlshd-no-such-ring"])
            session = keys.keyring_id(S)
            raw = keys.read(S)
            members = [int.from_bytes(raw[i:i + 4], sys.byteorder)
                       for i in range(0, len(raw), 4)]
            return {
                "new_session": session != outer,
                "has_ring": ring in members,
                "has_process": keys.keyring_id(
                    keys.KEY_SPEC_PROCESS_KEYRING) in members,
            }

        print(json.dumps(child(supervisor)))
    """)
    assert out == {"new_session": True, "has_ring": True,
                   "has_process": True}


def test_supervisor_psk_material_and_lookup() -> None:
    """keymaterial: client PSKs by serial (unreadable ones skipped); the
    server lookup searches the request's keyring and the session's
    keyrings, but not the supervisor's process keyring."""
    out = run("""
        from tlshd.supervisor import keymaterial
        proc = keys.keyring_id(keys.KEY_SPEC_PROCESS_KEYRING, create=True)
        keys.link(proc, S)
        linked = keys.add("keyring", "tlshd-test-linked", b"", S)
        request = keys.add("keyring", "tlshd-test-request", b"", proc)
        host = keys.add("keyring", "tlshd-test-host", b"", proc)
        k_linked = keys.add("user", "id-linked", b"L" * 32, linked)
        k_req = keys.add("user", "id-request", b"R" * 48, request)
        keys.add("user", "id-host-only", b"H" * 32, host)
        hidden = keys.add("user", "id-hidden", b"x", S)
        keys.setperm(hidden, 0x01010000)  # view only: unreadable, by root too
        big = keys.add("user", "id-big", b"B" * 65, request)  # no PSK

        psks, skipped = keymaterial.client_psks(
            (k_req, hidden, 0x7fff0000, big),
            keymaterial.Scope(request, initial=True))
        rings = keymaterial.search_keyrings(request)
        found = {i: (p.serial if (p := keymaterial.lookup_psk(
                         rings, i.encode(), key_type="user")) else None)
                 for i in ("id-request", "id-linked", "id-host-only",
                           "id-big", "unknown")}
        print(json.dumps({
            "psks": [(p.serial, p.identity.decode(), len(p.secret))
                     for p in psks],
            "skipped": skipped,
            "rings": rings,
            "no_request_rings": keymaterial.search_keyrings(0),
            "found": found, "k_req": k_req, "k_linked": k_linked,
            "request": request, "linked": linked}))
    """)
    assert out["psks"] == [[out["k_req"], "id-request", 48]]
    assert len(out["skipped"]) == 3, out["skipped"]
    assert "Permission denied" in out["skipped"][0]
    assert "no PSK" in out["skipped"][2]
    assert out["rings"] == [out["request"], out["linked"]]
    assert out["no_request_rings"] == [out["linked"]]
    assert out["found"] == {"id-request": out["k_req"],
                            "id-linked": out["k_linked"],
                            "id-host-only": None, "id-big": None,
                            "unknown": None}


def test_other_namespaces_search_only_their_own_keyrings() -> None:
    """keymaterial.search_keyrings for a namespace other than the initial
    one: the request's keyring and the keyrings its configuration names,
    not what the daemon linked for the initial namespace."""
    out = run("""
        from tlshd.supervisor import keymaterial
        proc = keys.keyring_id(keys.KEY_SPEC_PROCESS_KEYRING, create=True)
        keys.link(proc, S)
        request = keys.add("keyring", "tlshd-test-ns-request", b"", proc)
        global_ = keys.add("keyring", "tlshd-test-ns-global", b"", S)
        listed = keys.add("keyring", "tlshd-test-ns-listed", b"", proc)
        keys.add("user", "id-global", b"G" * 32, global_)
        keys.add("user", "id-listed", b"L" * 32, listed)
        named = ("tlshd-test-ns-listed", "tlshd-test-no-such")
        ns = keymaterial.namespace_keyrings(request, named)
        found = {i: bool(keymaterial.find_psk(i.encode(), request, False,
                                              named, "user"))
                 for i in ("id-global", "id-listed")}
        init = keymaterial.search_keyrings(request)
        print(json.dumps({"ns": ns, "init": init, "found": found,
                          "request": request, "global": global_,
                          "listed": listed}))
    """)
    assert out["ns"] == [out["request"], out["listed"]]
    # The namespace's lookups left no trace among the initial one's.
    assert out["init"] == [out["request"], out["global"]]
    assert out["found"] == {"id-global": False, "id-listed": True}
