"""The Debian package, built on the host from this tree.

The session fixture runs ``packaging/build-deb``, which builds only when an
input file changed since the last build (about half a minute, most of it
pip fetching the pinned wheels) and keeps the result in .cache/deb.  The
kernel test ``tests/kernel/test_packaging.py`` installs that .deb in the
VM; ``tools/test`` runs these host tests first.

Also here, because they need no package: the man pages format without
warnings, and the pinned libraries satisfy pyproject.toml.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
OUT = Path(os.environ.get("TLSHD_CACHE") or REPO / ".cache") / "deb"
MAN_PAGES = ("tlshd.8", "tlshd.conf.5", "tlshdctl.8")


def run(*cmd: str | Path) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert r.returncode == 0, "%s failed (%d):\n%s%s" % (
        cmd, r.returncode, r.stdout, r.stderr)
    return r.stdout


@pytest.fixture(scope="session")
def deb() -> Path:
    r = subprocess.run([str(PACKAGING / "build-deb"), str(OUT)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, "build-deb failed:\n%s%s" % (r.stdout, r.stderr)
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def members(deb: Path) -> dict[str, tarfile.TarInfo]:
    """The data archive's members by path ("/usr/sbin/tlshd")."""
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(listing)) as tar:
        return {m.name.removeprefix("."): m for m in tar.getmembers()}


def pyproject() -> dict[str, object]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_version_matches_pyproject() -> None:
    version = run("dpkg-parsechangelog", "-l",
                  PACKAGING / "debian" / "changelog", "-S", "Version")
    project = pyproject()["project"]
    assert isinstance(project, dict)
    assert version.strip() == project["version"]


def test_pinned_libraries_satisfy_pyproject() -> None:
    pins = {}
    for line in (PACKAGING / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, "not pinned with ==: %r" % line
            pins[name.lower().replace("_", "-")] = version
    project = pyproject()["project"]
    assert isinstance(project, dict)
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, "%s is not pinned" % req.name
        assert req.specifier.contains(pins[name]), (
            "pinned %s==%s does not satisfy %s" % (name, pins[name], spec))


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_formats_without_warnings(page: str) -> None:
    source = PACKAGING / "man" / page
    r = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(source)],
        capture_output=True, text=True,
        env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_deb_contents(members: dict[str, tarfile.TarInfo]) -> None:
    for path in ("/usr/sbin/tlshd", "/usr/sbin/tlshdctl"):
        assert members[path].mode & 0o111, path
    for path in ("/etc/tlshd/config",
                 "/lib/systemd/system/tlshd.service",
                 "/usr/lib/sysusers.d/tlshd.conf",
                 "/usr/lib/tmpfiles.d/tlshd.conf",
                 "/usr/share/man/man8/tlshd.8.gz",
                 "/usr/share/man/man5/tlshd.conf.5.gz",
                 "/usr/share/man/man8/tlshdctl.8.gz",
                 "/usr/share/doc/tlshd/copyright",
                 "/usr/lib/tlshd/venv/pyvenv.cfg"):
        assert path in members, path
    site = "/usr/lib/tlshd/venv/lib/python3.11/site-packages/"
    for module in ("tlshd/supervisor/main", "tlshd/worker/main",
                   "tlshd/shared/config"):
        assert site + module + ".py" in members
        cached = "%s%s.cpython-311.pyc" % (
            site, module.replace("/main", "/__pycache__/main")
            .replace("/config", "/__pycache__/config"))
        assert cached in members, cached
    assert site + "tlshd/worker/openssl.cnf" in members
    # Nothing under bin/ but the interpreter links: pip's scripts and the
    # activate scripts would name the build directory.
    bins = [m for p, m in members.items()
            if p.startswith("/usr/lib/tlshd/venv/bin/") and not m.isdir()]
    assert bins and all(m.issym() for m in bins)
    # Every file belongs to root.
    assert {(m.uid, m.gid) for m in members.values()} == {(0, 0)}


def test_deb_names_no_build_directory(deb: Path, tmp_path: Path) -> None:
    """Byte code and metadata carry installed paths, not the build tree's."""
    run("dpkg-deb", "-x", deb, tmp_path)
    r = subprocess.run(["grep", "-rlI", "--binary-files=text",
                        "/tmp/tlshd-deb.", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.stdout == "", "build paths in:\n" + r.stdout


def test_deb_control(deb: Path) -> None:
    fields = run("dpkg-deb", "-f", deb, "Package", "Depends", "Conflicts",
                 "Architecture")
    assert re.search(r"^Package: tlshd$", fields, re.M)
    assert re.search(r"^Conflicts: ktls-utils$", fields, re.M)
    depends = re.search(r"^Depends: (.*)$", fields, re.M)
    assert depends is not None
    for dep in ("python3.11", "kmod", "systemd | systemd-standalone-sysusers"):
        assert dep in depends.group(1)


def test_deb_maintainer_scripts(deb: Path, tmp_path: Path) -> None:
    run("dpkg-deb", "-e", deb, tmp_path)
    assert (tmp_path / "conffiles").read_text().split() == [
        "/etc/tlshd/config"]
    postinst = (tmp_path / "postinst").read_text()
    # The worker user exists before the service is (re)started.
    assert (postinst.index("systemd-sysusers")
            < postinst.index("deb-systemd-invoke"))
    assert "systemd-tmpfiles" in postinst
    assert "deb-systemd-helper enable 'tlshd.service'" in postinst


def test_unit_allows_no_core_dumps() -> None:
    """The daemon and its workers hold private keys and session secrets:
    no core file of them, even before they make themselves
    non-dumpable."""
    unit = (PACKAGING / "tlshd.service").read_text().splitlines()
    assert "LimitCORE=0" in unit
