"""The peer's record_size_limit (RFC 8449) caps nfsd's kTLS records.

A user-space NFS client (lab.peers.RpcTlsReader) sends record_size_limit
512 in its ClientHello; nfsd's upcall reaches our tlshd as the server,
which reads the limit and, on a kernel with TLS_TX_MAX_PAYLOAD_LEN
(Linux 6.19 and later: the 7.x kernel), caps nfsd's records at 511 bytes
of data.  The client then lists a directory whose listing spans many
records, checks every name, and counts the record lengths on the wire.
On 6.12 the same handshake succeeds, tlshd warns that it cannot cap,
and the records are larger.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
from pathlib import Path

import pytest
from lab.peers import RpcTlsReader

pytestmark = pytest.mark.kernel

LIMIT = 512
TAG = 16
# A capped record: 511 bytes of data, the content type byte, the tag.
CAPPED = LIMIT + TAG
SOL_TLS = 282
TLS_TX_MAX_PAYLOAD_LEN = 5


def kernel_can_cap() -> bool:
    """Ask a loopback kTLS socket for TLS_TX_MAX_PAYLOAD_LEN."""
    with socket.create_server(("127.0.0.1", 0)) as ls, \
            socket.create_connection(ls.getsockname()) as c:
        c.setsockopt(socket.IPPROTO_TCP, 31, b"tls")
        try:
            c.getsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, 2)
        except OSError as e:
            assert e.errno == errno.ENOPROTOOPT, e
            return False
        return True


def test_nfsd_records_respect_the_clients_limit(pki, tlshd, nfs_server):
    tlshd.start(pki.config())
    folder = Path(nfs_server, "rsl")
    folder.mkdir()
    names = sorted(b"%03d-" % i + os.urandom(30).hex().encode()
                   for i in range(80))
    for name in names:
        (folder / name.decode()).touch()
    mark = tlshd.mark()
    reader = RpcTlsReader(LIMIT)
    try:
        assert sorted(reader.list_dir(b"rsl")) == names
    finally:
        shutil.rmtree(folder)
    log = tlshd.since(mark)
    assert "record_size_limit=%d" % LIMIT in log, log
    lengths = reader.record_lengths
    print("kernel %s: %d records after the handshake, lengths %s"
          % (os.uname().release, len(lengths), sorted(set(lengths))))
    if kernel_can_cap():
        assert max(lengths) <= CAPPED, lengths
        # 80 entries of over 80 bytes each: a dozen full records.
        assert lengths.count(CAPPED) >= 80 * 80 // (LIMIT - 1) - 1
        assert "cannot cap kTLS records" not in log
    else:
        assert max(lengths) > CAPPED, lengths
        assert "cannot cap kTLS records" in log, log


@pytest.mark.not_applicable
def test_kernel_takes_the_smallest_cap_only_after_tx():
    """The smallest legal limit, 64, is 63 bytes of data: the kernel
    takes it once TLS_TX has set TLS 1.3 (tlshd's order), not before."""
    if not kernel_can_cap():
        pytest.skip("no TLS_TX_MAX_PAYLOAD_LEN before Linux 6.19")
    info = struct.pack("=HH8s16s4s8s", 0x0304, 51, bytes(8), bytes(16),
                       bytes(4), bytes(8))
    with socket.create_server(("127.0.0.1", 0)) as ls, \
            socket.create_connection(ls.getsockname()) as c:
        c.setsockopt(socket.IPPROTO_TCP, 31, b"tls")
        with pytest.raises(OSError) as before:
            c.setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN,
                         struct.pack("=H", 63))
        assert before.value.errno == errno.EINVAL
        c.setsockopt(SOL_TLS, 1, info)
        c.setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, struct.pack("=H", 63))
        assert c.getsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, 2) == \
            struct.pack("=H", 63)
