"""Fixtures for tests against the real kernel (inside the VM only).

Everything here drives real kernel consumers: the kernel NFS client and
nfsd, the NVMe/TCP host and nvmet, in the same guest over loopback, with
our tlshd serving both ends of every handshake.  The machinery lives in
the lab package (tests/lab/, importable as ``lab`` through pytest's
``pythonpath``); this file only turns it into fixtures, with their scope
and their clean-up.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lab import nfs as nfsmod
from lab.daemon import Tlshd
from lab.netns_lab import NetnsLab
from lab.nfs import Nfs
from lab.nvme import PskKeys, Target, enable_trace
from lab.peers import RpcTlsPeer
from lab.pki import Pki
from lab.shell import ensure_worker_user
from lab.trace import HandshakeTrace


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tlshd(tmp_path: Path) -> Iterator[Tlshd]:
    daemon = Tlshd(tmp_path)
    yield daemon
    daemon.stop()


@pytest.fixture
def trace() -> HandshakeTrace:
    return HandshakeTrace()


@pytest.fixture(scope="session")
def nfs_server() -> str:
    """nfsd with a tls and an mtls-only export (lab.nfs.start_server);
    returns the export root."""
    try:
        return nfsmod.start_server()
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture
def nfs(nfs_server: str) -> Iterator[Nfs]:
    client = Nfs(nfs_server)
    yield client
    client.umount()


@pytest.fixture
def rpc_tls_peer() -> Iterator[Callable[[int, str], RpcTlsPeer]]:
    """Make RpcTlsPeer(port, mode)s in this namespace; all closed after
    the test (closing one earlier is fine)."""
    made: list[RpcTlsPeer] = []

    def make(port: int, mode: str) -> RpcTlsPeer:
        made.append(RpcTlsPeer(port, mode))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


@pytest.fixture(scope="module")
def netns_lab(request: pytest.FixtureRequest,
              nfs_server: str) -> Iterator[NetnsLab]:
    """Namespaces a and b with their nfsd, then tlshd serving all three
    (NetnsLab.open).  A test module's WORKER_IDLE_TIMEOUT, if it has one,
    is the [netns] worker_idle_timeout (default "0": workers from the
    start)."""
    ensure_worker_user()
    workdir = Path(tempfile.mkdtemp(prefix="tlshd-netns-"))
    workdir.chmod(0o755)
    lab = NetnsLab(workdir)
    lab.idle_timeout = getattr(request.module, "WORKER_IDLE_TIMEOUT", "0")
    try:
        lab.open(nfs_server)
        yield lab
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    """The NVMe target, set up once per module; the modules are loaded
    before any tlshd starts (ktls-utils links .nvme only at start-up)."""
    t = Target()
    t.setup()
    yield t
    t.teardown()


@pytest.fixture
def psk_keys() -> Iterator[PskKeys]:
    k = PskKeys()
    yield k
    k.remove()


@pytest.fixture
def nvme_trace() -> None:
    """The handshake:* events on, the trace buffer empty."""
    enable_trace()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the namespace suite last, the fault matrix (namespaces deleted
    with handshakes in flight, workers killed) just before it: whatever a
    suite that kills and deletes leaves behind should show up there, not
    as a failure of an unrelated suite.

    Such a leak there was: NetnsSite.stop_nfs ran "rpc.nfsd 0" in the
    namespaces of a tlshd worker, which stopped the initial nfsd, and every
    later NFS mount hung.  Fixed; the order stays as a guard.
    """
    items.sort(key=lambda item: ("test_netns.py" in item.nodeid,
                                 "test_fault_matrix.py" in item.nodeid))
