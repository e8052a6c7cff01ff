"""Entry point: ``python -m tlshd.worker --channel-fd N --config FILE``."""

import sys

from tlshd.worker import sslconf

# OpenSSL reads OPENSSL_CONF once, when cryptography first loads it, so this
# must happen before anything imports OpenSSL: it sets NumTickets = 0 (a
# ticket sent before the kTLS hand-over would shift the kernel's record
# sequence numbers) and TLS 1.3 as the minimum.
sslconf.use_worker_config()

from tlshd.worker.main import main  # noqa: E402

sys.exit(main())
