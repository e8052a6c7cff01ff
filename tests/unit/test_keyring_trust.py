"""Keyrings any local user can plant or name, against the host kernel's
real keyrings (issue 15): forged /proc/keys lines, descriptions that are
not UTF-8, squatted keyring names, and key serials a request from another
namespace names outside its keyrings.

The attacker is a forked child running as uid 65534 (nobody) in a session
keyring of its own, alive until the scenario's interpreter exits, so its
keys live exactly as long as the scenario.  As in test_keys, every
scenario runs in a fresh interpreter in a new session keyring, and
``user`` keys stand in for NVMe ``psk`` keys.
"""

from __future__ import annotations

import os
import textwrap

import pytest
from test_keys import run

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/keys"), reason="kernel without CONFIG_KEYS")

ATTACKER = """
import logging
NOBODY = 65534
# Every record the code under test logs, for the assertions.
LOGGED = []

class _Keep(logging.Handler):
    def emit(self, record):
        LOGGED.append(record.getMessage())

logging.getLogger().addHandler(_Keep())
logging.getLogger().setLevel(logging.INFO)

def attacker(make):
    # make() runs as uid 65534 in its own session keyring; the keys it
    # creates live until this interpreter exits (the child waits for EOF).
    r, w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(hold_w)
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            keys.join_session_keyring(None)
            out = make()
        except BaseException as e:
            out = repr(e)
        os.write(w, json.dumps(out).encode())
        os.close(w)
        os.read(hold_r, 1)
        os._exit(0)
    os.close(w)
    os.close(hold_r)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    return json.loads(data)

def session_members():
    raw = keys.read(S)
    return [int.from_bytes(raw[i:i + 4], sys.byteorder)
            for i in range(0, len(raw), 4)]

ALL = 0x3f3f3f3f  # every right for possessor, user, group and other
# Root's keyrings: user may view, read, search, link, so that the daemon,
# in a session keyring of its own, can link them (as in test_keys).
ROOT_LINKABLE = 0x3f1b0000

def forge(target, name=".nvme"):
    # A /proc/keys line naming ``target`` as keyring ``name``; the kernel
    # ends it with the keyring's summary (": empty").
    return ("x\\n%08x I------     1 perm 1f0b0000     0     0 keyring   "
            "%s" % (target, name))
"""


def scenario(body: str) -> dict[str, object]:
    out = run(ATTACKER + textwrap.dedent(body))
    assert isinstance(out, dict)
    return out


def test_forged_proc_keys_line_is_not_a_keyring() -> None:
    """(a) nobody plants keyring "planted" holding a PSK for an identity
    that has no real key, and a second keyring whose description ends in a
    line naming "planted" as ``.nvme``.  find_keyrings('.nvme') must not
    return it, the daemon must not link it, and no lookup may find the
    planted PSK."""
    out = scenario("""
        def plant():
            planted = keys.add("keyring", "planted", b"", S)
            psk = keys.add("user", "id-planted", b"P" * 32, planted)
            forger = keys.add("keyring", forge(planted), b"", S)
            for k in (planted, psk, forger):
                keys.setperm(k, ALL)
            return {"planted": planted, "forger": forger}
        evil = attacker(plant)
        listing = open("/proc/keys", "rb").read()

        def supervisor():
            from tlshd.supervisor import keymaterial, keyrings
            keyrings.setup_session_keyring([])
            rings = keymaterial.search_keyrings(0)
            return {"members": session_members(), "rings": rings,
                    "found": bool(keymaterial.lookup_psk(
                        rings, b"id-planted", key_type="user"))}

        nvme = keys.find_keyrings(".nvme")
        print(json.dumps({
            "evil": evil,
            "forged_line_shown": (b"%08x I------" % evil["planted"]
                                  + b"     1 perm 1f0b0000") in listing,
            "nvme": nvme,
            "nvme_real": [repr(keys.describe(s)) for s in nvme],
            "sup": child(supervisor)}))
    """)
    evil = out["evil"]
    assert isinstance(evil, dict), evil
    # The attack is real: the forged line is in root's /proc/keys.
    assert out["forged_line_shown"]
    nvme = out["nvme"]
    assert isinstance(nvme, list)
    assert evil["planted"] not in nvme and evil["forger"] not in nvme
    # Whatever is left is the kernel's own .nvme (none on most hosts).
    for real in out["nvme_real"]:  # type: ignore[attr-defined]
        assert "uid=0," in real and "description=b'.nvme'" in real, real
    sup = out["sup"]
    assert isinstance(sup, dict), sup
    assert evil["planted"] not in sup["members"]
    assert evil["planted"] not in sup["rings"]
    assert sup["found"] is False


def test_descriptions_that_are_not_utf8() -> None:
    """(b) Descriptions are bytes chosen by their owner: invalid UTF-8 in
    a keyring visible to root (in /proc/keys), in a keyring the daemon is
    asked to find, and in a PSK's identity must not raise."""
    out = scenario("""
        from tlshd.supervisor import keymaterial, keyrings
        name = "tlshd-test-utf8-%d" % os.getpid()

        def plant():
            bad = keys.add("keyring", b"bad-\\xff\\xfe-" + name.encode()
                           + b"\\n\\xc3(", b"", S)
            keys.setperm(bad, ALL)
            return bad
        bad = attacker(plant)
        psk_ring = keys.add("keyring", name, b"", S)
        keys.setperm(psk_ring, ROOT_LINKABLE)
        psk = keys.add("user", b"NVMe0R01 \\xff\\xfe", b"K" * 32, psk_ring)
        nvme = keys.find_keyrings(".nvme")
        named = keys.find_keyrings(name)

        def supervisor():
            keyrings.setup_session_keyring([name])
            return {"members": session_members(),
                    "ns_rings": keymaterial.namespace_keyrings(0, (name,)),
                    "ns_lookup": bool(keymaterial.find_psk(
                        b"NVMe0R01 \\xff\\xfe", 0, False, (name,), "user"))}

        sup = child(supervisor)
        psks, skipped = keymaterial.client_psks(
            (psk,), keymaterial.Scope(0, initial=True))
        print(json.dumps({
            "bad": bad, "ring": psk_ring, "nvme": nvme, "named": named,
            "describe_bad": keys.describe(bad).description.hex(),
            "psks": [(p.serial, p.identity.hex()) for p in psks],
            "skipped": skipped, "psk": psk, "sup": sup}))
    """)
    assert isinstance(out["bad"], int), out["bad"]
    assert out["named"] == [out["ring"]]
    assert bytes.fromhex(str(out["describe_bad"])).startswith(b"bad-\xff\xfe-")
    assert out["psks"] == [[out["psk"], b"NVMe0R01 \xff\xfe".hex()]]
    assert out["skipped"] == []
    sup = out["sup"]
    assert isinstance(sup, dict), sup
    assert out["ring"] in sup["members"]
    assert sup["ns_rings"] == [out["ring"]]
    assert sup["ns_lookup"] is True


def test_squatted_keyring_name_is_refused() -> None:
    """(c) A configured keyring name without a leading dot can be taken by
    any user.  nobody's keyring of that name (holding a PSK) is refused,
    with a log line naming it, its serial and its owner; root's keyring of
    the same name is linked."""
    out = scenario("""
        from tlshd.supervisor import keymaterial, keyrings
        name = "tlshd-test-squat-%d" % os.getpid()

        def squat():
            ring = keys.add("keyring", name, b"", S)
            psk = keys.add("user", "id-squatted", b"Q" * 32, ring)
            keys.setperm(ring, ALL)
            keys.setperm(psk, ALL)
            return ring
        squatter = attacker(squat)

        def supervisor(create_root_ring):
            root_ring = None
            if create_root_ring:
                root_ring = keys.add("keyring", name, b"", S)
                keys.setperm(root_ring, ROOT_LINKABLE)
            del LOGGED[:]
            keyrings.setup_session_keyring([name])
            rings = keymaterial.namespace_keyrings(0, (name,))
            return {"members": session_members(), "ns_rings": rings,
                    "root_ring": root_ring,
                    "found": bool(keymaterial.find_psk(
                        b"id-squatted", 0, False, (name,), "user")),
                    "logged": LOGGED}

        print(json.dumps({
            "squatter": squatter,
            "alone": child(lambda: supervisor(False)),
            "with_root": child(lambda: supervisor(True))}))
    """)
    squatter = out["squatter"]
    assert isinstance(squatter, int), squatter
    for case in ("alone", "with_root"):
        sup = out[case]
        assert isinstance(sup, dict), sup
        assert squatter not in sup["members"], case
        assert squatter not in sup["ns_rings"], case
        assert sup["found"] is False, case
        refused = [m for m in sup["logged"] if "Refusing keyring" in m]
        assert refused, sup["logged"]
        assert ("(serial %08x): owned by uid 65534" % squatter
                in refused[0]), refused
    with_root = out["with_root"]
    assert isinstance(with_root, dict)
    assert with_root["root_ring"] in with_root["members"]
    assert with_root["ns_rings"] == [with_root["root_ring"]]


def test_serials_named_by_another_namespace_are_scoped() -> None:
    """(d) A request from a namespace other than the initial one may name
    only keys linked in the keyrings that namespace may use (its request's
    keyring, the keyrings its configuration names).  Anything else the
    supervisor possesses (here: a keyring in its session keyring, as
    ``.nvme`` is, and another consumer's keyring in its process keyring)
    is refused with EACCES: x.509 keys fail the request (DONE ENOKEY, as
    for any unreadable certificate), client PSKs are skipped.  The initial
    namespace reads whatever the supervisor can, as before."""
    out = scenario("""
        from types import SimpleNamespace as NS
        from tlshd.shared import uapi
        from tlshd.supervisor import requests
        pid = os.getpid()
        proc = keys.keyring_id(keys.KEY_SPEC_PROCESS_KEYRING, create=True)
        keys.link(proc, S)
        request = keys.add("keyring", "tlshd-test-req-%d" % pid, b"", proc)
        other = keys.add("keyring", "tlshd-test-other-%d" % pid, b"", proc)
        shared_name = "tlshd-test-shared-%d" % pid
        shared = keys.add("keyring", shared_name, b"", S)
        k = {}
        for ring, tag in ((request, "in"), (shared, "shared"),
                          (other, "other")):
            k["psk_" + tag] = keys.add("user", "id-" + tag, b"S" * 32, ring)
            k["cert_" + tag] = keys.add("user", "cert-" + tag, b"C", ring)
            k["key_" + tag] = keys.add("user", "key-" + tag, b"K", ring)
        nested = keys.add("keyring", "tlshd-test-nested-%d" % pid, b"",
                          request)
        k["psk_nested"] = keys.add("user", "id-nested", b"N" * 32, nested)

        def material(initial, named, tag=None, psks=()):
            done = []
            fake = NS(complete=lambda req, status, auth, reason="":
                      done.append([errno.errorcode[status], reason]))
            certs = ((k["cert_" + tag], k["key_" + tag]),) if tag else ()
            req = NS(req_id=1, request=NS(
                keyring=request, certs=certs,
                peerids=tuple(k["psk_" + p] for p in psks),
                auth_mode=uapi.AuthMode.PSK,
                msg_type=uapi.MsgType.CLIENTHELLO),
                ns=NS(initial=initial, label="b",
                      cfg=NS(keyrings=named)))
            got = requests.Requests._key_material(fake, req)
            if got is None:
                return {"done": done}
            cert, key, psks = got
            return {"cert": cert.decode(), "key": key.decode(),
                    "psks": sorted(p.identity.decode() for p in psks),
                    "done": done}

        every = ("in", "shared", "other", "nested")
        print(json.dumps({
            "ns_cert_in": material(False, (), "in"),
            "ns_cert_shared": material(False, (), "shared"),
            "ns_cert_other": material(False, (), "other"),
            "ns_psks": material(False, (), psks=every),
            "ns_named_psks": material(False, (shared_name,), psks=every),
            "ns_named_cert": material(False, (shared_name,), "shared"),
            "init_cert_other": material(True, (), "other"),
            "init_psks": material(True, (), psks=every)}))
    """)
    refused = {"done": [["ENOKEY", "certificate keys unreadable"]]}
    assert out["ns_cert_in"] == {"cert": "C", "key": "K", "psks": [],
                                 "done": []}
    assert out["ns_cert_shared"] == refused
    assert out["ns_cert_other"] == refused
    assert out["ns_psks"] == {"cert": "", "key": "", "psks": ["id-in"],
                              "done": []}
    assert out["ns_named_psks"] == {"cert": "", "key": "",
                                    "psks": ["id-in", "id-shared"],
                                    "done": []}
    assert out["ns_named_cert"] == {"cert": "C", "key": "K", "psks": [],
                                    "done": []}
    # The initial namespace: unchanged.
    assert out["init_cert_other"] == {"cert": "C", "key": "K", "psks": [],
                                      "done": []}
    assert out["init_psks"] == {"cert": "", "key": "",
                                "psks": ["id-in", "id-nested", "id-other",
                                         "id-shared"], "done": []}
