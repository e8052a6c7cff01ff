"""Privileged supervisor for kernel TLS handshake upcalls.

Processes: one root, single-threaded supervisor and one worker per served
network namespace.  The supervisor holds a handshake netlink socket created
inside each namespace and joined to the ``tlshd`` group, ACCEPTs there (the
kernel installs the socket fd in the supervisor), passes the fd to that
namespace's worker over SOCK_SEQPACKET with SCM_RIGHTS, and sends DONE
itself with its own fd number: both ACCEPT and DONE need CAP_NET_ADMIN.
Workers never use netlink.

Threads: one besides the loop's, while a walk over /proc for unnamed
namespaces is under way (tlshd.supervisor.procwalk): it only reads /proc
and hands the loop a list.  Workers are forked by the worker template
(a process exec'd once at start that has already imported the TLS stack,
see tlshd.worker.template), or exec'd one by one when the template is
not available; never a bare fork of the supervisor.  Signals arrive through a
wake-up fd, and each worker is watched through a pidfd, so no waitpid(-1)
can steal an exit status.

Invariant: every ACCEPTed fd gets exactly one DONE, whatever happens: the
worker's answer, the request's deadline (ETIMEDOUT), or the worker's death
(EIO).  The request table (requests.py) is the single place that enforces it.
The file map and one request's path: docs/architecture.md.
"""
