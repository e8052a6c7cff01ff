"""Configuration parsing, in ktls-utils' format."""

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
