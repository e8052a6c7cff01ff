"""Entry point: ``python -m tlshd.worker --channel-fd N --config FILE``."""

import os
import sys

# OpenSSL reads OPENSSL_CONF once, when cryptography first loads it, so this
# must happen before anything imports OpenSSL: it sets NumTickets = 0 (a
# ticket sent before the kTLS hand-over would shift the kernel's record
# sequence numbers) and TLS 1.3 as the minimum.
os.environ["OPENSSL_CONF"] = os.path.join(os.path.dirname(__file__),
                                          "openssl.cnf")

from tlshd.worker.main import main

sys.exit(main())
