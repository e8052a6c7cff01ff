"""The per-namespace handshake worker.

Lifecycle: the daemon starts one worker template (``python -m
tlshd.worker.template``), which imports the TLS stack once and then only
forks: each worker is a fork of it, handed one end of a SOCK_SEQPACKET
channel and its namespace's fd, and re-parented to the supervisor.  If
the template fails, the supervisor execs ``python -m tlshd.worker``
instead; both paths boot the same way (tlshd.worker.main).  The worker
enters its namespace, loads its configuration and credentials, imports
everything the handshake path needs, starts a fixed pool of handshake
threads, locks itself down, reports who it runs as (HELLO), and then
serves: each HANDSHAKE_REQ brings one kernel socket; a pool thread runs
the TLS 1.3 handshake with pyOpenSSL (tlshd.worker.dispatch picks it by
message type and auth mode), installs the session keys with kTLS, closes
its copy of the socket and answers with the status and REMOTE_AUTH ids.
The worker never touches netlink: the supervisor sends DONE.

Log records go to the supervisor over the channel.  If the channel closes,
the worker exits: it has nobody to answer to.
"""
