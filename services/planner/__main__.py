"""``mlsysops-planner`` / ``python -m services.planner``."""

import sys

from mlsysops import runtime
from services.planner.service import Planner


def main() -> None:
    sys.exit(runtime.main("planner", Planner))


if __name__ == "__main__":
    main()
