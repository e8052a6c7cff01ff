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


# ---- issue 19: messages an administrator can act on ------------------------


@pytest.mark.parametrize("text, message", [
    ("[debug]\nloglevel=verbose\n",
     "/etc/t:2: [debug] loglevel: 'verbose' is not a whole number"),
    ("[debug]\nloglevel=-1\n",
     "/etc/t:2: [debug] loglevel: -1 is out of range (0 to 2147483647)"),
    ("no section\n",
     "/etc/t:1: 'no section' is not a [section] header, a key=value line "
     "or a # comment"),
    ("# c\nkey=1\n[debug]\n", "/etc/t:2: key= comes before any [section]"),
    ("[debug\n", "/etc/t:1: malformed section header '[debug'"),
    ("[debug]\nloglevel=1\n\nloglevel=2\n",
     "/etc/t:4: [debug] loglevel is set twice (first on line 2)"),
    ("[authenticate]\nsession_lifetime=0\n",
     "/etc/t:2: [authenticate] session_lifetime: 0 is out of range "
     "(1 to 604800)"),
    ("[netns]\nunnamed_userns=yes\n",
     "/etc/t:2: [netns] unnamed_userns: 'yes' is not true or false"),
    ("[authenticate]\n  handshake_timeout = 0.01\n",
     "/etc/t:2: [authenticate] handshake_timeout: 0.01 is out of range "
     "(0.1 to 600)"),
])
def test_errors_name_file_line_section_and_key(text, message):
    with pytest.raises(ConfigError) as e:
        config.parse(text, "/etc/t")
    assert str(e.value) == message


def test_errors_are_one_line():
    # configparser's dumps spanned lines: several syslog records each.
    for text in ("[a]\nx\n", "[a]\n\tcontinued\n", "[debug]\nloglevel=\x01\n",
                 "[a\n]\n"):
        with pytest.raises(ConfigError) as e:
            config.parse(text, "/etc/t")
        assert "\n" not in str(e.value) and str(e.value).startswith(
            "/etc/t:")


def test_unknown_names_warned_once_each_with_line():
    cfg = config.parse("""\
[authentcate]
keyrigns=.nfs
[debug]
foo=1
[authentcate]
[sandbox]
usr=x
""", "/etc/t")
    assert cfg.warnings == (
        "/etc/t:1: unknown section [authentcate] ignored (did you mean "
        "[authenticate]?)",
        "/etc/t:4: unknown key foo in [debug] ignored",
        "/etc/t:7: unknown key usr in [sandbox] ignored (did you mean "
        "user?)",
    )


def test_upstream_samples_have_nothing_to_warn_about():
    assert config.parse(KTLS_UTILS_SAMPLE).warnings == ()
    with open(os.path.join(os.path.dirname(__file__), "..", "..",
                           "packaging", "config")) as f:
        assert config.parse(f.read()).warnings == ()


def test_upstream_settings_without_effect_are_named():
    cfg = config.parse("""\
[debug]
tls=0
nl=1
delay_done=2
[authenticate.client]
x509.pq.certificate=/etc/pq.pem
x509.pq.private_key=
[authenticate.server]
x509.client_auth=1
""", "/etc/t")
    assert cfg.warnings == (
        "/etc/t:3: [debug] nl has no effect in this tlshd: ktls-utils' "
        "libnl debug level",
        "/etc/t:4: [debug] delay_done has no effect in this tlshd: "
        "ktls-utils' testing aid",
        "/etc/t:9: [authenticate.server] x509.client_auth has no effect in "
        "this tlshd: not supported (nor by released ktls-utils)",
    )


def test_key_urls_are_warned_about_without_their_secrets():
    cfg = config.parse("[authenticate.server]\nx509.certificate=/etc/c.pem\n"
                       "x509.private_key=pkcs11:object=k;pin-value=1234\n",
                       "/etc/t")
    assert cfg.server.private_key is None
    assert cfg.warnings == (
        "/etc/t:3: [authenticate.server] x509.private_key: pkcs11: URLs "
        "(PKCS#11 tokens and the like) are not supported by this tlshd; "
        "the setting has no effect",)


@pytest.mark.parametrize("section, key", [
    ("authenticate.client", "x509.truststore"),
    ("authenticate.server", "x509.crl"),
    ("authenticate.server", "x509.certificate"),
    ("authenticate.client", "x509.private_key"),
    ("netns", "default"),
    ("netns", "unnamed"),
])
def test_relative_paths_are_refused(section, key):
    for value in ("cert.pem", "./cert.pem", "../etc/x", "~/x"):
        with pytest.raises(ConfigError) as e:
            config.parse("[%s]\n%s=%s\n" % (section, key, value), "/etc/t")
        assert str(e.value) == (
            "/etc/t:2: [%s] %s: %r is not an absolute path (relative paths "
            "are refused)" % (section, key, value))
    cfg = config.parse("[%s]\n%s=/etc/x\n" % (section, key), "/etc/t")
    assert [(p.section, p.key, p.value, p.line) for p in cfg.paths] == [
        (section, key, "/etc/x", 2)]


def test_repeated_section_header_continues_it():
    # GLib (ktls-utils) merges them: appending a [authenticate.server]
    # to the shipped file, which has an empty one, must work.
    cfg = config.parse("[authenticate.server]\n[debug]\nloglevel=1\n"
                       "[authenticate.server]\nx509.crl=/etc/crl.pem\n")
    assert cfg.server.crl == "/etc/crl.pem" and cfg.loglevel == 1
    assert cfg.warnings == ()


def test_load_logs_warnings_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(config, "_warned", set())
    caplog.set_level(logging.WARNING)
    conf = tmp_path / "config"
    conf.write_text("[debug]\nfoo=1\n")
    conf.chmod(0o644)
    config.load(str(conf), warn=False)  # workers, --check-config
    assert not caplog.records
    for _ in range(3):  # start-up, the initial namespace, reloads
        config.load(str(conf))
    assert [r.getMessage() for r in caplog.records] == [
        "%s:2: unknown key foo in [debug] ignored" % conf]


def test_namespace_file_main_only_settings():
    cfg = config.parse("[netns]\n[debug]\nloglevel=0\n[sandbox]\nuser=x\n",
                       "/etc/n")
    assert config.namespace_warnings(cfg) == [
        "/etc/n:1: [netns] has no effect in a namespace's file (read from "
        "the main file only)",
        "/etc/n:4: [sandbox] has no effect in a namespace's file (read "
        "from the main file only)"]


def test_files_hidden_by_the_service(monkeypatch):
    assert config.hidden_by_service("/etc/tlshd/key.pem") is None
    assert "(ProtectHome=yes)" in config.hidden_by_service("/home/a/k.pem")
    assert "(PrivateTmp=yes)" in config.hidden_by_service("/var/tmp/k")
    assert config.hidden_by_service("/tmpfoo/k") is None
    monkeypatch.setattr(os.path, "realpath", lambda p: "/root/key.pem")
    assert config.hidden_by_service("/etc/tlshd/key.pem") == (
        "/etc/tlshd/key.pem (a link to /root/key.pem) is under /root, which "
        "tlshd.service hides from the daemon (ProtectHome=yes)")
