"""Configuration parsing, in ktls-utils' format."""

import logging
import os

import pytest

from tlshd.shared import config
from tlshd.shared.errors import ConfigError

# ktls-utils' own etc/tlshd/config, its section/key layout unchanged.
KTLS_UTILS_SAMPLE = """\
#
# See tlshd.conf(5) for details.
#

[debug]
loglevel=0
tls=0
nl=0

[authenticate]
#keyrings= <keyring>;<keyring>;<keyring>

[authenticate.client]
#x509.truststore= <pathname>
#x509.crl= <pathname>
#x509.certificate= <pathname>
#x509.private_key= <pathname>
#x509.pq.certificate= <pathname>
#x509.pq.private_key= <pathname>

[authenticate.server]
#x509.truststore= <pathname>
#x509.crl= <pathname>
#x509.certificate= <pathname>
#x509.private_key= <pathname>
#x509.client_auth= <0|1>
#x509.client_allowed_sans= <client1.example.com;client2.example.com>
#x509.pq.certificate= <pathname>
#x509.pq.private_key= <pathname>
"""


def test_ktls_utils_sample_accepted_unchanged():
    cfg = config.parse(KTLS_UTILS_SAMPLE)
    assert cfg.loglevel == 0
    assert cfg.client == config.RoleConfig()
    assert cfg.server == config.RoleConfig()
    assert cfg.handshake_timeout == config.DEFAULT_HANDSHAKE_TIMEOUT
    # Under the NFS client's own 10 s wait.
    assert cfg.client_handshake_timeout == 8.0
    assert cfg.session_reuse is False  # off unless switched on


def test_session_reuse_switch():
    cfg = config.parse("[authenticate]\nsession_reuse=true\n"
                       "session_lifetime=600\nsession_cache_size=32\n")
    assert cfg.session_reuse is True
    assert cfg.session_lifetime == 600
    assert cfg.session_cache_size == 32
    assert config.parse("[authenticate]\nsession_reuse=1\n").session_reuse
    off = config.parse("[authenticate]\nsession_reuse=false\n")
    assert off.session_reuse is False
    assert off.session_lifetime == config.DEFAULT_SESSION_LIFETIME
    assert off.session_cache_size == config.DEFAULT_SESSION_CACHE_SIZE


def test_values_and_lists():
    cfg = config.parse("""\
[debug]
loglevel=1
[authenticate]
keyrings= .nvme;.nfs; mykeys
handshake_timeout=3.5
[authenticate.client]
x509.truststore= /etc/ca.pem
x509.ciphersuites=TLS_AES_128_GCM_SHA256
[authenticate.server]
x509.certificate=/etc/s.pem
x509.private_key=/etc/s.key
x509.client_auth=1
""")
    assert cfg.loglevel == 1
    assert cfg.keyrings == (".nvme", ".nfs", "mykeys")
    assert cfg.handshake_timeout == 3.5
    assert cfg.client_handshake_timeout == 3.5
    assert cfg.client.truststore == "/etc/ca.pem"
    assert cfg.client.ciphersuites == "TLS_AES_128_GCM_SHA256"
    assert cfg.server.certificate == "/etc/s.pem"
    assert cfg.server.private_key == "/etc/s.key"


@pytest.mark.parametrize("text", [
    "[debug]\nloglevel=abc\n",
    "no section\n",
    "[authenticate]\nhandshake_timeout=0\n",
    "[authenticate]\nhandshake_timeout=x\n",
    "[debug]\nloglevel=1\nloglevel=2\n",
    "[authenticate]\nsession_reuse=yes please\n",
    "[authenticate]\nsession_reuse=True\n",  # GLib: lower case only
    "[authenticate]\nsession_lifetime=0\n",
    "[authenticate]\nsession_lifetime=604801\n",
    "[authenticate]\nsession_cache_size=0\n",
])
def test_malformed_rejected(text):
    with pytest.raises(ConfigError):
        config.parse(text)


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="Failed to read"):
        config.load(str(tmp_path / "nope"))


def test_find_config_explicit_wins():
    assert config.find_config("/x/y") == "/x/y"


# ---- file permissions (issue 15 part 4) -----------------------------------
# A configuration file names the keys and CAs root trusts: one another
# user could write is refused, as OpenSSH refuses such files.


def test_root_owned_0644_is_loaded(tmp_path):
    conf = tmp_path / "config"
    conf.write_text("[debug]\nloglevel=1\n")
    conf.chmod(0o644)
    assert config.load(str(conf)).loglevel == 1


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620])
def test_group_or_world_writable_config_is_refused(tmp_path, mode):
    conf = tmp_path / "config"
    conf.write_text("[debug]\nloglevel=1\n")
    conf.chmod(mode)
    with pytest.raises(ConfigError) as e:
        config.load(str(conf))
    assert str(conf) in str(e.value)
    assert "mode %04o" % mode in str(e.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_config_owned_by_another_user_is_refused(tmp_path):
    conf = tmp_path / "config"
    conf.write_text("[debug]\nloglevel=1\n")
    conf.chmod(0o644)
    os.chown(conf, 65534, 65534)
    with pytest.raises(ConfigError) as e:
        config.load(str(conf))
    assert str(conf) in str(e.value) and "uid 65534" in str(e.value)


def own_key(tmp_path, pki, mode):
    """A copy of the shared test key (a session fixture: left alone)."""
    key = tmp_path / "key.pem"
    key.write_bytes(pki.server.key.read_bytes())
    key.chmod(mode)
    return key


def test_readable_private_key_is_warned_about_once(tmp_path, pki, caplog,
                                                   monkeypatch):
    from tlshd.worker import main as worker_main

    monkeypatch.setattr(config, "_warned_keys", set(), raising=False)
    caplog.set_level(logging.WARNING)
    key = own_key(tmp_path, pki, 0o644)
    conf = tmp_path / "config"
    conf.write_text("[authenticate.server]\nx509.certificate=%s\n"
                    "x509.private_key=%s\n" % (pki.server.cert, key))
    for _ in range(3):  # e.g. three namespaces' workers, or reloads
        worker_main.load_engine(str(conf))
    warned = [r.getMessage() for r in caplog.records
              if str(key) in r.getMessage()]
    assert len(warned) == 1, warned
    assert "mode 0644" in warned[0]
    # Private to its owner: no warning.
    monkeypatch.setattr(config, "_warned_keys", set())
    caplog.clear()
    key.chmod(0o600)
    worker_main.load_engine(str(conf))
    assert not caplog.records


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_private_key_of_another_user_is_warned_about(tmp_path, pki, caplog,
                                                     monkeypatch):
    from tlshd.worker import main as worker_main

    monkeypatch.setattr(config, "_warned_keys", set(), raising=False)
    caplog.set_level(logging.WARNING)
    key = own_key(tmp_path, pki, 0o600)
    os.chown(key, 65534, 65534)
    conf = tmp_path / "config"
    conf.write_text("[authenticate.server]\nx509.certificate=%s\n"
                    "x509.private_key=%s\n" % (pki.server.cert, key))
    worker_main.load_engine(str(conf))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "owned by uid 65534" in warned[0], warned
    # The worker user may own it.
    monkeypatch.setattr(config, "_warned_keys", set())
    caplog.clear()
    worker_main.load_engine(str(conf), uid=65534)
    assert not caplog.records
