"""Misbehaving network peers for the fault tests."""

from __future__ import annotations

from typing import Any


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
