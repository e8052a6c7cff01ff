"""The lab: the guest-side machinery the kernel tests and bench/ share.

Runs as root inside the VM (tools/vm-run), never on the host.  One module
per concern:

- ``shell``: the guest's paths (repo, venv, trixie chroot), ``sh``;
- ``pki``: throwaway CAs, certificates and tlshd configurations;
- ``daemon``: our tlshd started as the admin would, and its log;
- ``trace``: the handshake:* tracepoints, per event and per request;
- ``procs``: /proc readings (status, fds, RSS, netlink group listeners);
- ``nfs``: nfsd with xprtsec= exports and the kernel NFS client;
- ``nvme``: nvmet with a TLS port, retained PSKs, the kernel host;
- ``netns``: named namespaces, each with its own nfsd;
- ``netns_lab``: one tlshd serving the initial namespace, a and b;
- ``peers``: misbehaving network peers for the fault tests;
- ``worker_probe``, ``netlink_attacker``: scripts the tests run as
  separate processes (by path: they are not imported).

How it is imported: as the top-level package ``lab``, with ``tests/`` on
sys.path.  pytest puts it there (``pythonpath`` in pyproject.toml); each
bench script that uses it (guest.py, netns_memory.py) adds it with one
commented line, so that the scripts still run by path, as bench/run and
the docs start them (``python -m`` would need bench/ and tests/ to be
packages under the repo root, and the root on sys.path).  Only ``tests/``
is added, never the repo root, where a bare ``supervisor`` would shadow
supervisord's package; the product is imported as ``tlshd.*`` from the
venv.
"""
