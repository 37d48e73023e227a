"""``mlsysops-monitor`` / ``python -m services.monitor``."""

import sys

from mlsysops import runtime
from services.monitor.service import Monitor


def main() -> None:
    sys.exit(runtime.main("monitor", Monitor))


if __name__ == "__main__":
    main()
