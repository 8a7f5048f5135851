"""``python -m sparsek.runner``: see sparsek.runner.cli."""

import sys

from sparsek.runner.cli import main

sys.exit(main())
