"""The control socket's default path, in a module that imports nothing.

``tlshd``, ``tlshdctl`` and ``tlshd-oci-hook`` all need it; the last two
run at every status query and every container start, and should not pay
for importing the control server (its namespaces, workers and registry).
"""

CONTROL_SOCKET = "/run/tlshd/control.sock"
