"""``mlsysops-scheduler`` / ``python -m services.scheduler``."""

import sys

from mlsysops import runtime
from services.scheduler.service import Scheduler


def main() -> None:
    sys.exit(runtime.main("scheduler", Scheduler))


if __name__ == "__main__":
    main()
