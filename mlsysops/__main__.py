"""``python -m mlsysops`` is the ``mlsysops`` command."""

from mlsysops.cli import main

main()
