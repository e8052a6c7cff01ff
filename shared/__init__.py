"""Code shared by the tlshd supervisor and its workers.

Nothing here holds privileges or parses TLS: the kernel uAPI constants, the
supervisor-worker message protocol and its SOCK_SEQPACKET channel, the few
Linux syscalls Python lacks, and logging setup.
"""
