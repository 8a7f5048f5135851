"""``python -m sparsek_remote`` is the same as the ``sparsek-remote`` command."""

from sparsek_remote.cli import main

main()
