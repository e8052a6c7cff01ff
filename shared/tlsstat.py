"""Kernel TLS counters (``/proc/net/tls_stat``) and what they reveal.

The file is per network namespace and exists once ``tls.ko`` is loaded.
Its ``Tls*Rekey*`` counters arrived with TLS 1.3 re-keying (Linux 6.14),
so their presence is the support test: setting ``TLS_TX`` a second time
would be a real re-key on a kernel that has the feature.
"""

from __future__ import annotations

TLS_STAT = "/proc/net/tls_stat"
REKEY_COUNTERS = ("TlsTxRekeyOk", "TlsRxRekeyOk")


def read(path: str = TLS_STAT) -> dict[str, int]:
    """The counters by name; OSError if kTLS is not loaded."""
    out = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) == 2 and fields[1].isdigit():
                out[fields[0]] = int(fields[1])
    return out


def rekey_supported(path: str = TLS_STAT) -> bool:
    """True if the running kernel's kTLS can re-key (Linux 6.14+)."""
    try:
        counters = read(path)
    except OSError:
        return False
    return all(name in counters for name in REKEY_COUNTERS)
