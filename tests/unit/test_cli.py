"""The command lines, as an administrator runs them."""

import subprocess
import sys
from pathlib import Path

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
    assert r.stdout.count(str(key)) == 1 and str(key) not in r.stderr
