"""Network peers the agent's own stack cannot play: misbehaving NFS
servers for the fault tests, and a TLS 1.3 client that sends the RFC 8449
record_size_limit extension (OpenSSL has no support for it)."""

from __future__ import annotations

from typing import Any

EXT_RECORD_SIZE_LIMIT = 28


class RecordLimitClient:
    """Client contexts that send record_size_limit with a chosen body.

    OpenSSL's legacy custom-extension API (the one cryptography's bindings
    export) is meant for TLS 1.2, yet it still puts the extension in a
    TLS 1.3 ClientHello: the version is not chosen yet.  A server that
    answered it in EncryptedExtensions would fail the handshake ("bad
    extension"); tlshd never answers, so this is a fine test peer.  The
    body is normally the 2-byte limit; any bytes may be sent.  Keep this
    object alive as long as the contexts it made.
    """

    def __init__(self) -> None:
        from OpenSSL._util import ffi, lib

        self._ffi, self._lib = ffi, lib
        self._bodies: dict[int, tuple[Any, int]] = {}

        def add(ssl: Any, ext_type: int, out: Any, outlen: Any, al: Any,
                arg: Any) -> int:
            buf, size = self._bodies[int(ffi.cast("uintptr_t", arg))]
            out[0] = buf
            outlen[0] = size
            return 1

        def free(ssl: Any, ext_type: int, out: Any, arg: Any) -> None:
            return None

        self._add = ffi.callback(
            "int(SSL *, unsigned int, unsigned char **, size_t *, int *,"
            " void *)", add, error=-1)
        self._free = ffi.callback(
            "void(SSL *, unsigned int, unsigned char *, void *)", free)

    def context(self, body: bytes) -> Any:
        """A TLS 1.3-only client context (no verification) sending
        ``body`` as the extension."""
        from OpenSSL import SSL

        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_verify(SSL.VERIFY_NONE)
        buf = self._ffi.new("unsigned char[]", max(len(body), 1))
        self._ffi.memmove(buf, body, len(body))
        key = len(self._bodies) + 1
        self._bodies[key] = (buf, len(body))
        ok = self._lib.SSL_CTX_add_client_custom_ext(
            ctx._context, EXT_RECORD_SIZE_LIMIT, self._add, self._free,
            self._ffi.cast("void *", key), self._ffi.NULL,
            self._ffi.NULL)
        assert ok == 1
        return ctx

    @staticmethod
    def limit(value: int) -> bytes:
        return value.to_bytes(2, "big")


class RpcTlsPeer:
    """An NFS "server" that answers RPC with STARTTLS (RFC 9289), reads
    the ClientHello and then misbehaves, by ``mode``: "hold" never
    answers (a handshake that hangs), "close" closes the connection,
    "reset" resets it (SO_LINGER 0).  ``hellos`` counts ClientHellos."""

    MODES = ("hold", "close", "reset")

    def __init__(self, port: int, mode: str = "hold") -> None:
        import socket
        import threading

        assert mode in self.MODES, mode
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", port),
                                         reuse_port=True)
        self.sock.settimeout(0.2)
        self.hellos = 0
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._talk, args=(conn,),
                             daemon=True).start()

    def _talk(self, conn: Any) -> None:
        import socket
        import struct

        conn.settimeout(60)
        try:
            while True:
                head = conn.recv(4, socket.MSG_PEEK)
                if not head:
                    return
                if head[0] == 0x16:  # TLS handshake record
                    conn.recv(16384)
                    self.hellos += 1
                    if self.mode == "hold":
                        self.held.append(conn)
                        return
                    if self.mode == "reset":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    conn.close()
                    return
                (marker,) = struct.unpack("!I", conn.recv(4))
                size = marker & 0x7FFFFFFF
                call = b""
                while len(call) < size:
                    chunk = conn.recv(size - len(call))
                    if not chunk:
                        return
                    call += chunk
                # REPLY, MSG_ACCEPTED, verifier AUTH_NONE "STARTTLS",
                # SUCCESS.
                body = (call[:4] + struct.pack("!III", 1, 0, 0)
                        + struct.pack("!I", 8) + b"STARTTLS"
                        + struct.pack("!I", 0))
                conn.sendall(struct.pack("!I", 0x80000000 | len(body))
                             + body)
        except OSError:
            conn.close()

    def close(self) -> None:
        """Stop listening and drop the held connections; idempotent."""
        self.stop.set()
        self.thread.join()
        self.sock.close()
        for c in self.held:
            c.close()
        self.held.clear()


class RpcTlsReader:
    """An NFS client in user space that lists a directory through nfsd
    over RPC-with-TLS (RFC 9289) while sending record_size_limit
    ``limit``.

    It probes with an AUTH_TLS NULL call, runs TLS 1.3 (OpenSSL, with
    :class:`RecordLimitClient`'s extension), then sends one NFSv4.0
    COMPOUND (PUTROOTFH, LOOKUP ``name``, READDIR).  ``record_lengths``
    holds the length field of every TLS record nfsd's kTLS sent after
    the handshake: ciphertext, so the plaintext's length plus its
    content type byte plus a 16-byte tag.
    """

    def __init__(self, limit: int, port: int = 2049) -> None:
        from OpenSSL._util import ffi, lib

        self.port = port
        self._client = RecordLimitClient()
        self.ctx = self._client.context(RecordLimitClient.limit(limit))
        self.record_lengths: list[int] = []

        def on_message(write_p: int, version: int, content_type: int,
                       buf: Any, length: int, ssl: Any, arg: Any) -> None:
            if content_type == 256 and not write_p and length == 5:
                header = bytes(ffi.buffer(buf, 5))
                self.record_lengths.append(int.from_bytes(header[3:], "big"))

        self._on_message = ffi.callback(
            "void(int, int, int, const void *, size_t, SSL *, void *)",
            on_message)
        lib.SSL_CTX_set_msg_callback(self.ctx._context, self._on_message)

    def list_dir(self, name: bytes) -> list[bytes]:
        import socket
        import struct

        from OpenSSL import SSL

        with socket.create_connection(("127.0.0.1", self.port),
                                      timeout=30) as sock:
            _send_rpc(sock.sendall, _rpc_call(1, 0, struct.pack(
                "!IIII", 7, 0, 0, 0)))  # cred AUTH_TLS, verf AUTH_NONE
            reply = _recv_rpc(sock.recv)
            assert b"STARTTLS" in reply, reply
            sock.settimeout(None)  # pyOpenSSL wants a blocking socket
            conn = SSL.Connection(self.ctx, sock)
            conn.set_connect_state()
            conn.do_handshake()
            self.record_lengths.clear()
            _send_rpc(conn.sendall, _rpc_call(2, 1, _auth_sys()
                                              + _readdir_compound(name)))
            return _readdir_names(_recv_rpc(conn.recv))


def _rpc_call(xid: int, proc: int, cred_verf_args: bytes) -> bytes:
    import struct

    # CALL, RPC version 2, NFS (100003) version 4.
    return struct.pack("!IIIIII", xid, 0, 2, 100003, 4, proc) + cred_verf_args


def _xdr_opaque(data: bytes) -> bytes:
    import struct

    return struct.pack("!I", len(data)) + data + b"\0" * (-len(data) % 4)


def _auth_sys() -> bytes:
    import struct

    body = (struct.pack("!I", 0) + _xdr_opaque(b"rsl-test")
            + struct.pack("!III", 0, 0, 0))  # uid 0, gid 0, no gids
    return struct.pack("!I", 1) + _xdr_opaque(body) + struct.pack("!II", 0, 0)


def _readdir_compound(name: bytes) -> bytes:
    import struct

    # tag "", minor version 0, 3 ops: PUTROOTFH (24), LOOKUP (15) the
    # directory, READDIR (26) from cookie 0 asking for no attributes.
    # (READ would wait out nfsd's grace period: NFS4ERR_GRACE.)
    return (_xdr_opaque(b"") + struct.pack("!III", 0, 3, 24)
            + struct.pack("!I", 15) + _xdr_opaque(name)
            + struct.pack("!IQ", 26, 0) + b"\0" * 8
            + struct.pack("!III", 1 << 16, 1 << 16, 0))


def _send_rpc(send: Any, msg: bytes) -> None:
    import struct

    send(struct.pack("!I", 0x80000000 | len(msg)) + msg)


def _recv_rpc(recv: Any) -> bytes:
    """One RPC message: record-marking fragments up to the last one."""
    import struct

    buf, msg = b"", b""
    while True:
        while len(buf) < 4:
            buf += recv(65536)
        (mark,) = struct.unpack("!I", buf[:4])
        size = mark & 0x7FFFFFFF
        while len(buf) < 4 + size:
            chunk = recv(65536)
            if not chunk:
                raise EOFError("RPC reply cut short")
            buf += chunk
        msg, buf = msg + buf[4 : 4 + size], buf[4 + size :]
        if mark & 0x80000000:
            return msg


def _readdir_names(reply: bytes) -> list[bytes]:
    """The names of a PUTROOTFH, LOOKUP, READDIR reply; every status 0
    and the listing complete (eof)."""
    import struct

    _xid, mtype, stat = struct.unpack_from("!III", reply)
    assert (mtype, stat) == (1, 0), (mtype, stat)
    verf_len = struct.unpack_from("!I", reply, 16)[0]
    pos = 20 + verf_len + (-verf_len % 4)
    accept, status, tag_len = struct.unpack_from("!III", reply, pos)
    assert (accept, status) == (0, 0), (accept, status)
    pos += 12 + tag_len + (-tag_len % 4)
    for op in (None, 24, 15, 26):  # the result count, then the ops
        if op is None:
            assert struct.unpack_from("!I", reply, pos) == (3,)
            pos += 4
            continue
        assert struct.unpack_from("!II", reply, pos) == (op, 0), op
        pos += 8
    pos += 8  # cookieverf
    names = []
    while struct.unpack_from("!I", reply, pos)[0]:  # value_follows
        (size,) = struct.unpack_from("!I", reply, pos + 12)  # after cookie
        names.append(reply[pos + 16 : pos + 16 + size])
        pos += 16 + size + (-size % 4)
        (words,) = struct.unpack_from("!I", reply, pos)  # attr bitmap
        pos += 4 + 4 * words
        (attr_len,) = struct.unpack_from("!I", reply, pos)
        pos += 4 + attr_len + (-attr_len % 4)
    assert struct.unpack_from("!II", reply, pos) == (0, 1), "not at eof"
    return names
