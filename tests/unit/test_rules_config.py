"""Configuration rules: every key from the file to the value the
supervisor and the worker's TLS engine use, each bound at its limit,
and the namespace's own file chosen over the default."""

import os

import pytest

from tlshd.shared import config, configchecks
from tlshd.shared.errors import ConfigError

# (section, key, value in the file, attribute path, expected value)
WIRING = [
    ("debug", "loglevel", "2", "loglevel", 2),
    ("authenticate", "keyrings", "a; b;;c ", "keyrings", ("a", "b", "c")),
    ("authenticate", "handshake_timeout", "30", "handshake_timeout", 30.0),
    ("authenticate", "handshake_timeout", "30", "client_handshake_timeout",
     30.0),
    ("authenticate", "session_reuse", "true", "session_reuse", True),
    ("authenticate", "session_lifetime", "120", "session_lifetime", 120.0),
    ("authenticate", "session_cache_size", "17", "session_cache_size", 17),
    ("netns", "default", "/etc/d", "netns_default", "/etc/d"),
    ("netns", "unnamed", "/etc/u", "netns_unnamed", "/etc/u"),
    ("netns", "unnamed_userns", "true", "netns_unnamed_userns", True),
    ("netns", "max_namespaces", "9", "netns_max", 9),
    ("sandbox", "user", "nobody", "worker_user", "nobody"),
] + [
    ("authenticate." + role, key, value, role + "." + attr, value)
    for role in ("client", "server")
    for key, attr, value in (
        ("x509.truststore", "truststore", "/etc/ca.pem"),
        ("x509.crl", "crl", "/etc/crl.pem"),
        ("x509.certificate", "certificate", "/etc/cert.pem"),
        ("x509.private_key", "private_key", "/etc/key.pem"),
        ("x509.ciphersuites", "ciphersuites", "TLS_AES_128_GCM_SHA256"),
    )
]


def attribute(cfg, dotted):
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


@pytest.mark.parametrize("section,key,value,attr,expected", WIRING,
                         ids=["%s %s -> %s" % (r[0], r[1], r[3])
                              for r in WIRING])
def test_every_key_reaches_its_setting(tmp_path, section, key, value,
                                       attr, expected):
    """Set alone in a file, a key changes its setting and nothing else
    (a key read from the wrong name would leave the default)."""
    path = tmp_path / "config"
    path.write_text("[%s]\n%s = %s\n" % (section, key, value))
    os.chmod(path, 0o644)
    cfg = config.load(str(path), warn=False)
    assert cfg.warnings == ()
    assert attribute(cfg, attr) == expected
    default = config.Config(path=str(path))
    assert attribute(default, attr) != expected
    changed = {a for a in config.Config.fields()
               if a not in ("warnings", "where", "paths")
               and getattr(cfg, a) != getattr(default, a)}
    both = {"handshake_timeout", "client_handshake_timeout"}
    assert changed == (both if key == "handshake_timeout"
                       else {attr.split(".")[0]})


def test_roles_are_kept_apart():
    cfg = config.parse("[authenticate.client]\nx509.crl = /c\n"
                       "[authenticate.server]\nx509.crl = /s\n")
    assert (cfg.client.crl, cfg.server.crl) == ("/c", "/s")
    assert cfg.client.truststore is None and cfg.server.truststore is None


def test_defaults():
    cfg = config.parse("")
    assert cfg.handshake_timeout == 15.0
    assert cfg.client_handshake_timeout == 8.0
    assert cfg.session_cache_size == 256
    assert cfg.session_lifetime == 3600.0
    assert cfg.netns_max == 1024
    assert cfg.worker_user == "tlshd"
    assert cfg.session_reuse is False
    assert cfg.netns_unnamed_userns is False
    assert cfg.client == cfg.server == config.RoleConfig()


# (section, key, lowest, highest, a value below, a value above)
BOUNDS = [
    ("authenticate", "handshake_timeout", "0.1", "600", "0.09", "600.5"),
    ("authenticate", "session_lifetime", "1", "604800", "0.5", "604801"),
    ("authenticate", "session_cache_size", "1", "65536", "0", "65537"),
    ("netns", "max_namespaces", "1", "65536", "0", "65537"),
    ("debug", "loglevel", "0", "2147483647", "-1", "2147483648"),
]


@pytest.mark.parametrize("section,key,low,high,below,above", BOUNDS,
                         ids=[r[1] for r in BOUNDS])
def test_numbers_have_both_bounds(section, key, low, high, below, above):
    for ok in (low, high):
        config.parse("[%s]\n%s = %s\n" % (section, key, ok))
    for bad in (below, above):
        with pytest.raises(ConfigError, match="out of range"):
            config.parse("[%s]\n%s = %s\n" % (section, key, bad))


@pytest.mark.parametrize("key", ["session_cache_size", "max_namespaces",
                                 "loglevel"])
def test_counts_are_whole_numbers(key):
    section = {"max_namespaces": "netns", "loglevel": "debug"}.get(
        key, "authenticate")
    with pytest.raises(ConfigError, match="whole"):
        config.parse("[%s]\n%s = 2.5\n" % (section, key))


@pytest.mark.parametrize("value,expected", [
    ("true", True), ("1", True), ("false", False), ("0", False),
    ("", False)])
def test_booleans(value, expected):
    cfg = config.parse("[authenticate]\nsession_reuse = %s\n" % value)
    assert cfg.session_reuse is expected


@pytest.mark.parametrize("value", ["yes", "True", "2", "on"])
def test_not_a_boolean(value):
    with pytest.raises(ConfigError, match="not true or false"):
        config.parse("[netns]\nunnamed_userns = %s\n" % value)


def test_a_namespace_uses_its_own_file(tmp_path):
    main = tmp_path / "config"
    main.write_text("[netns]\ndefault = %s\n" % (tmp_path / "default"))
    cfg = config.parse(main.read_text(), str(main))
    own = tmp_path / "netns" / "blue" / "config"
    own.parent.mkdir(parents=True)
    own.write_text("")
    assert cfg.netns_config("blue") == str(own)
    assert cfg.netns_config("red") == str(tmp_path / "default")


def test_a_namespace_without_a_file_or_default_is_not_served(tmp_path):
    cfg = config.parse("", str(tmp_path / "config"))
    assert cfg.netns_config("red") is None


def test_settings_read_from_a_key_file_with_comments_and_spaces():
    cfg = config.parse("# c\n\n[authenticate.server]\n"
                       "  x509.crl   =   /etc/crl.pem  \n")
    assert cfg.server.crl == "/etc/crl.pem"
    assert cfg.line("authenticate.server", "x509.crl") == 4
    assert cfg.line("authenticate.server") == 3
    assert [p.key for p in cfg.paths] == ["x509.crl"]


def test_oversized_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="larger"):
        config.parse_bytes(b"#" * (config.MAX_CONFIG_BYTES + 1), "f")
    config.parse_bytes(b"#" * config.MAX_CONFIG_BYTES, "f")


def test_empty_value_means_the_default():
    cfg = config.parse("[authenticate]\nhandshake_timeout =\n"
                       "session_cache_size =\n")
    assert cfg.handshake_timeout == config.DEFAULT_HANDSHAKE_TIMEOUT
    assert cfg.session_cache_size == config.DEFAULT_SESSION_CACHE_SIZE


def test_only_path_keys_are_listed_as_paths():
    cfg = config.parse("[authenticate.client]\nx509.ciphersuites = /x\n"
                       "x509.truststore = /ca.pem\n[sandbox]\nuser = /u\n")
    assert [(p.section, p.key) for p in cfg.paths] == [
        ("authenticate.client", "x509.truststore")]


def test_load_refuses_a_file_over_the_limit(tmp_path):
    path = tmp_path / "config"
    path.write_bytes(b"#" * (config.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger"):
        config.load(str(path), warn=False)
    path.write_bytes(b"#" * (config.MAX_CONFIG_BYTES - 20)
                     + b"\n[debug]\nloglevel=1\n")
    assert config.load(str(path), warn=False).loglevel == 1


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o755, 0o700])
def test_modes_without_group_or_other_write_are_accepted(tmp_path, mode):
    path = tmp_path / "config"
    path.write_text("[debug]\nloglevel = 1\n")
    os.chmod(path, mode)
    assert config.load(str(path), warn=False).loglevel == 1


def test_not_utf8_is_refused():
    with pytest.raises(ConfigError, match="UTF-8"):
        config.parse_bytes(b"[debug]\nloglevel = \xff\n", "f")


def test_config_is_immutable():
    cfg = config.parse("")
    with pytest.raises(AttributeError):
        cfg.handshake_timeout = 1.0


def test_tags_files_looks_in_both_directories(tmp_path, monkeypatch):
    system = tmp_path / "system-tags"
    system.mkdir()
    (system / "a.yml").write_text("")
    (system / "b.txt").write_text("")
    monkeypatch.setattr(configchecks, "TAGS_DIR", str(system))
    cfg = config.parse("", str(tmp_path / "etc" / "config"))
    assert config.tags_files(cfg) == [str(system / "a.yml")]


def test_file_hidden_by_the_service_is_warned_about():
    cfg = config.parse("[authenticate.client]\n"
                       "x509.crl = /home/u/crl.pem\n", "/etc/tlshd/config")
    warnings = config.service_warnings(cfg)
    assert len(warnings) == 1
    assert "/etc/tlshd/config:2:" in warnings[0]
    assert "ProtectHome" in warnings[0]


def test_a_namespace_file_setting_loglevel_is_warned_about():
    """Only the main file's loglevel counts; a namespace's file setting a
    level is told so (one left at 0 is harmless and not mentioned)."""
    cfg = config.parse("# n\n[debug]\nloglevel = 2\n", "/etc/n")
    assert config.namespace_warnings(cfg) == [
        "/etc/n:3: [debug] loglevel has no effect in a namespace's file "
        "(read from the main file only)"]
    assert config.namespace_warnings(
        config.parse("[debug]\nloglevel = 0\n", "/etc/n")) == []


def test_the_legacy_file_is_used_only_if_it_exists(tmp_path, monkeypatch,
                                                   caplog):
    """ktls-utils' order: an explicit file, else /etc/tlshd.conf if it
    exists (with a warning to move it), else /etc/tlshd/config."""
    legacy = tmp_path / "tlshd.conf"
    monkeypatch.setattr(config, "LEGACY_PATH", str(legacy))
    assert config.find_config(None) == config.DEFAULT_PATH
    assert not caplog.records
    legacy.write_text("")
    assert config.find_config(None) == str(legacy)
    assert "Please relocate" in caplog.text
    assert config.find_config("/x") == "/x"


def test_path_settings_and_roles_are_immutable():
    """A Config is shared by every namespace using the file: none of its
    parts can be changed under them."""
    cfg = config.parse("[authenticate.client]\nx509.crl = /c\n")
    with pytest.raises(AttributeError):
        cfg.paths[0].value = "/other"
    with pytest.raises(AttributeError):
        cfg.client.crl = "/other"


def stat_of(uid, mode=0o100600):
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


def test_only_root_or_our_own_user_may_own_the_file(monkeypatch):
    """The supervisor runs as root: a file owned by any other user (uid
    1, daemon, included) is refused.  Run as another user (tests), that
    user's own files are accepted too, and root's."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    config.check_owner("f", stat_of(0))
    for uid in (1, 1000, 2 ** 32 - 1):
        with pytest.raises(ConfigError, match="bad owner: uid %d" % uid):
            config.check_owner("f", stat_of(uid))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    config.check_owner("f", stat_of(0))
    config.check_owner("f", stat_of(1000))
    with pytest.raises(ConfigError, match="bad owner"):
        config.check_owner("f", stat_of(1))


@pytest.mark.parametrize("mode", [0o647, 0o4621, 0o661])
def test_a_writable_file_is_refused_naming_its_mode(mode):
    with pytest.raises(ConfigError) as err:
        config.check_owner("f", stat_of(0, 0o100000 | mode))
    assert "bad permissions: mode %04o is group- or world-writable" % mode \
        in str(err.value)


def test_the_size_limit_is_one_mib():
    """A file of 1 MiB is read; one byte more is refused (tlshd.conf(5)
    files are a few hundred bytes: the limit only stops a runaway
    file)."""
    config.parse_bytes(b"#" * (1 << 20), "f")
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        config.parse_bytes(b"#" * ((1 << 20) + 1), "f")
