"""The command lines, as an administrator runs them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_version():
    r = run("tlshd.supervisor", "--version")
    assert r.returncode == 0 and r.stdout.startswith("tlshd, built from")


def test_check_config_accepts_packaged_sample(tmp_path):
    conf = tmp_path / "config"
    conf.write_text((REPO / "packaging" / "config").read_text()
                    + "\n[sandbox]\nuser=nobody\n")
    r = run("tlshd.supervisor", "--check-config", "-c", str(conf))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 configuration file(s) checked, 0 with problems" in r.stdout


def test_check_config_reports_each_broken_namespace(tmp_path, pki):
    conf = tmp_path / "config"
    conf.write_text("[sandbox]\nuser=nobody\n")
    good = tmp_path / "netns" / "a"
    bad = tmp_path / "netns" / "b"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    (good / "config").write_text(
        "[authenticate.server]\nx509.certificate=%s\nx509.private_key=%s\n"
        % (pki.server.cert, pki.server.key))
    (bad / "config").write_text(
        "[authenticate.server]\nx509.certificate=%s/missing.pem\n"
        "x509.private_key=%s\n" % (tmp_path, pki.server.key))
    r = run("tlshd.supervisor", "--check-config", "-c", str(conf))
    assert r.returncode == 1
    assert "netns/a/config: ok" in r.stdout
    assert "missing.pem" in r.stdout
    assert "3 configuration file(s) checked, 1 with problems" in r.stdout


def test_tlshdctl_without_daemon(tmp_path):
    r = run("tlshd.supervisor.ctl", "-S", str(tmp_path / "nope"), "status")
    assert r.returncode == 69
    assert "cannot reach tlshd" in r.stderr


def test_check_config_refuses_writable_config(tmp_path):
    conf = tmp_path / "config"
    conf.write_text("[sandbox]\nuser=nobody\n")
    conf.chmod(0o664)
    r = run("tlshd.supervisor", "--check-config", "-c", str(conf))
    assert r.returncode != 0
    assert "%s: bad permissions: mode 0664" % conf in r.stdout


def test_check_config_refuses_writable_netns_config(tmp_path, pki):
    conf = tmp_path / "config"
    conf.write_text("[sandbox]\nuser=nobody\n")
    ns = tmp_path / "netns" / "a"
    ns.mkdir(parents=True)
    (ns / "config").write_text("[debug]\nloglevel=0\n")
    (ns / "config").chmod(0o666)
    r = run("tlshd.supervisor", "--check-config", "-c", str(conf))
    assert r.returncode == 1
    assert "netns/a/config: bad permissions: mode 0666" in r.stdout
    assert "2 configuration file(s) checked, 1 with problems" in r.stdout


def test_check_config_warns_about_readable_key(tmp_path, pki):
    key = tmp_path / "key.pem"
    key.write_bytes(pki.server.key.read_bytes())
    key.chmod(0o640)
    conf = tmp_path / "config"
    conf.write_text("[sandbox]\nuser=nobody\n[authenticate.server]\n"
                    "x509.certificate=%s\nx509.private_key=%s\n"
                    % (pki.server.cert, key))
    r = run("tlshd.supervisor", "--check-config", "-c", str(conf))
    assert r.returncode == 0, r.stdout + r.stderr  # a warning only
    assert "warning: private key %s is readable" % key in r.stdout
    readable = [line for line in r.stdout.splitlines()
                if "is readable" in line]
    assert len(readable) == 1 and str(key) not in r.stderr


# ---- issue 19: configuration checking, as an administrator meets it -------


def check(conf, cwd=None):
    r = subprocess.run([sys.executable, "-m", "tlshd.supervisor",
                        "--check-config", "-c", str(conf)],
                       capture_output=True, text=True, timeout=120,
                       check=False, cwd=cwd)
    assert_summary_agrees(r.stdout)
    return r


def assert_summary_agrees(out):
    """The last line counts exactly the files, errors and warnings
    printed above it."""
    lines = out.splitlines()
    files = [x for x in lines if x.endswith(": ok") or x.endswith(
        " error(s)")]
    failed = [x for x in files if x.endswith(" error(s)")]
    warnings = [x for x in lines if ": warning: " in x]
    summary = ("%d configuration file(s) checked, %d with problems"
               % (len(files), len(failed)))
    if warnings:
        summary += ", %d warning(s)" % len(warnings)
    assert lines[-1] == summary, out


def write(path, text):
    path.write_text(text)
    path.chmod(0o644)
    return path


FAKE_SYSLOG = """\
import sys
from tlshd.shared import log
log.SYSLOG_PATH = sys.argv[1]
from tlshd.supervisor import main
sys.exit(main.main(sys.argv[2:]))
"""


def test_check_config_reports_on_terminal_with_working_syslog(tmp_path):
    # Before: exit 78, and with syslog working a configparser dump.
    import socket

    conf = write(tmp_path / "config",
                 "[sandbox]\nuser=nobody\nthis is not a key\n")
    wrapper = tmp_path / "fake_syslog.py"
    wrapper.write_text(FAKE_SYSLOG)
    log_path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(log_path)
        syslog.settimeout(0.5)
        r = subprocess.run([sys.executable, str(wrapper), log_path,
                            "--check-config", "-c", str(conf)],
                           capture_output=True, text=True, timeout=120,
                           check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert_summary_agrees(r.stdout)
        assert r.stdout.splitlines()[0] == (
            "%s:3: 'this is not a key' is not a [section] header, a "
            "key=value line or a # comment" % conf)
        # The daemon itself: one record in syslog, one line.
        r = subprocess.run([sys.executable, str(wrapper), log_path,
                            "-c", str(conf)], capture_output=True,
                           text=True, timeout=120, check=False)
        assert r.returncode == 78
        records = []
        try:
            while True:
                records.append(syslog.recv(65536).decode())
        except TimeoutError:
            pass
    assert len(records) == 1, records
    assert "%s:3: 'this is not a key'" % conf in records[0]
    assert "\n" not in records[0]


def test_check_config_warns_once_about_each_unknown_name(tmp_path):
    # Before: only [netns] defalt was reported (twice); exit 0.
    conf = write(tmp_path / "config", """\
[authentcate]
keyrigns=.nfs
[authenticate]
keyrigns=.nfs
handshake_timout=5
[sandbox]
usr=nobody
user=nobody
[debug]
foo=1
[netns]
defalt=/x
""")
    r = check(conf)
    assert r.returncode == 0, r.stdout + r.stderr
    c = str(conf)
    expected = [
        c + ":1: warning: unknown section [authentcate] ignored (did you "
        "mean [authenticate]?)",
        c + ":4: warning: unknown key keyrigns in [authenticate] ignored "
        "(did you mean keyrings?)",
        c + ":5: warning: unknown key handshake_timout in [authenticate] "
        "ignored (did you mean handshake_timeout?)",
        c + ":7: warning: unknown key usr in [sandbox] ignored (did you "
        "mean user?)",
        c + ":10: warning: unknown key foo in [debug] ignored",
        c + ":12: warning: unknown key defalt in [netns] ignored (did you "
        "mean default?)",
    ]
    ours = [x for x in r.stdout.splitlines() if "unknown" in x]
    assert ours == expected
    assert "unknown" not in r.stderr
    assert r.stdout.splitlines()[-1].endswith(", 0 with problems, "
                                              "6 warning(s)")


def test_check_config_names_upstream_settings_without_effect(tmp_path, pki):
    # Before: silently accepted (pq keys, session tags), or "cannot read
    # private key file pkcs11:...: No such file" (with the PIN shown).
    (tmp_path / "tags.d").mkdir()
    (tmp_path / "tags.d" / "nfs.yaml").write_text("tags: {}\n")
    conf = write(tmp_path / "config", """\
[sandbox]
user=nobody
[debug]
tls=0
nl=3
[authenticate.server]
x509.certificate=%s
x509.private_key=%s
[authenticate.client]
x509.private_key=pkcs11:token=t;object=k;pin-value=1234
""" % (pki.server.cert, pki.server.key))
    r = check(conf)
    c = str(conf)
    out = r.stdout
    assert "1234" not in out + r.stderr
    assert (c + ":5: warning: [debug] nl has no effect in this tlshd: "
            "ktls-utils' libnl debug level") in out
    assert ":4: " not in out  # tls=0: nothing either way
    assert (c + ":10: warning: [authenticate.client] x509.private_key: "
            "pkcs11: URLs (PKCS#11 tokens and the like) are not supported "
            "by this tlshd; the setting has no effect") in out
    assert ("%s: warning: %s: session tags (tls-session-tags(7)) are not "
            "supported by this tlshd" % (c, tmp_path / "tags.d" / "nfs.yaml")
            ) in out
    assert r.returncode == 0, out + r.stderr


@pytest.mark.parametrize("line, message", [
    ("[debug]\nloglevel=verbose",
     ":4: [debug] loglevel: 'verbose' is not a whole number"),
    ("[debug]\nloglevel=-1",
     ":4: [debug] loglevel: -1 is out of range (0 to 2147483647)"),
    ("[authenticate]\nhandshake_timeout=forever",
     ":4: [authenticate] handshake_timeout: 'forever' is not a number"),
    ("[netns]\nmax_namespaces=0",
     ":4: [netns] max_namespaces: 0 is out of range (1 to 65536)"),
])
def test_check_config_value_errors_name_file_line_and_key(tmp_path, line,
                                                          message):
    # Before: "[debug] loglevel: 'verbose' is not a number" (no file, no
    # line); loglevel=-1 was "ok"; exit 78.
    conf = write(tmp_path / "config", "[sandbox]\nuser=nobody\n%s\n" % line)
    r = check(conf)
    assert r.returncode == 1
    assert r.stdout.splitlines()[0] == str(conf) + message


def test_check_config_refuses_relative_paths_wherever_run(tmp_path, pki):
    # Before: "ok" from the config's directory, "cannot read" from /.
    (tmp_path / "cert.pem").write_bytes(pki.server.cert.read_bytes())
    conf = write(tmp_path / "config", "[sandbox]\nuser=nobody\n"
                 "[authenticate.server]\nx509.certificate=cert.pem\n"
                 "x509.private_key=%s\n" % pki.server.key)
    for cwd in (tmp_path, "/"):
        r = check(conf, cwd=cwd)
        assert r.returncode == 1
        assert r.stdout.splitlines()[0] == (
            "%s:4: [authenticate.server] x509.certificate: 'cert.pem' is "
            "not an absolute path (relative paths are refused)" % conf)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_check_config_reads_keys_as_the_service_would(tmp_path, pki):
    # Before: "ok" (root's CAP_DAC_OVERRIDE read it; the service has none).
    key = tmp_path / "key.pem"
    key.write_bytes(pki.server.key.read_bytes())
    key.chmod(0o600)
    os.chown(key, 65534, 65534)
    conf = write(tmp_path / "config", "[sandbox]\nuser=nobody\n"
                 "[authenticate.server]\nx509.certificate=%s\n"
                 "x509.private_key=%s\n" % (pki.server.cert, key))
    r = check(conf)
    assert r.returncode == 1, r.stdout + r.stderr
    assert ("%s: cannot read private key file %s: Permission denied "
            "(tlshd.service runs without CAP_DAC_OVERRIDE" % (conf, key)
            ) in r.stdout
    # Readable through the group bits, as the service reads it: fine.
    os.chown(key, 65534, 0)
    key.chmod(0o640)
    r = check(conf)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_config_warns_about_files_the_service_cannot_see(tmp_path,
                                                               pki):
    # Before: "ok" (PrivateTmp=yes and ProtectHome=yes hide them).
    conf = write(tmp_path / "config", "[sandbox]\nuser=nobody\n"
                 "[authenticate.client]\nx509.truststore=/root/ca.pem\n"
                 "[authenticate.server]\nx509.truststore=%s\n"
                 % pki.ca)
    r = check(conf)
    assert ("%s:4: warning: [authenticate.client] x509.truststore: "
            "/root/ca.pem is under /root, which tlshd.service hides from "
            "the daemon (ProtectHome=yes)" % conf) in r.stdout
    assert ("%s:6: warning: [authenticate.server] x509.truststore: %s is "
            "under /tmp" % (conf, pki.ca)) in r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="looks the user up as root")
def test_check_config_counts_a_missing_worker_user_against_its_file(
        tmp_path):
    # Before: the error was printed, then "config: ok", yet "1 with
    # problems".
    conf = write(tmp_path / "config", "[debug]\n[sandbox]\n"
                 "user=no-such-user\n")
    r = check(conf)
    assert r.returncode == 1
    assert r.stdout.splitlines()[:2] == [
        "%s:3: [sandbox] user: Worker user 'no-such-user' does not exist; "
        "create it (see packaging/sysusers.d/tlshd.conf)" % conf,
        "%s: 1 error(s)" % conf]


def test_check_config_namespace_file_main_only_sections(tmp_path):
    conf = write(tmp_path / "config", "[sandbox]\nuser=nobody\n")
    ns = tmp_path / "netns" / "a"
    ns.mkdir(parents=True)
    write(ns / "config", "[sandbox]\nuser=root\n[debug]\nloglevel=1\n")
    r = check(conf)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("%s:1: warning: [sandbox] has no effect in a namespace's file"
            % (ns / "config")) in r.stdout
    assert ("%s:4: warning: [debug] loglevel has no effect in a "
            "namespace's file" % (ns / "config")) in r.stdout
