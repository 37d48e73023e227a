"""``mlsysops-analyzer`` / ``python -m services.analyzer``."""

import sys

from mlsysops import runtime
from services.analyzer.service import Analyzer


def main() -> None:
    sys.exit(runtime.main("analyzer", Analyzer))


if __name__ == "__main__":
    main()
