"""``python -m kdcore.cli``: the same as ``kd``."""

import sys

from kdcore.cli.main import main

sys.exit(main())
