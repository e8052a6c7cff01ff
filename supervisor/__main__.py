"""``python -m tlshd.supervisor``: the same as the ``tlshd`` command."""

import sys

from tlshd.supervisor.main import main

sys.exit(main())
