"""The per-namespace handshake worker.

Lifecycle: the supervisor execs ``python -m tlshd.worker`` with one end of
a SOCK_SEQPACKET channel.  The worker loads its namespace's configuration
and credentials, imports everything the handshake path needs, starts a
fixed pool of handshake threads, locks itself down, reports who it runs as
(HELLO), and then serves: each HANDSHAKE_REQ brings one kernel socket; a
pool thread runs the TLS 1.3 handshake with pyOpenSSL, installs the session
keys with kTLS, closes its copy of the socket and answers with the status
and REMOTE_AUTH ids.  The worker never touches netlink: the supervisor
sends DONE.

Log records go to the supervisor over the channel.  If the channel closes,
the worker exits: it has nobody to answer to.
"""
