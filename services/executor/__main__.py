"""``mlsysops-executor`` / ``python -m services.executor``."""

import sys

from mlsysops import runtime
from services.executor.service import Executor


def main() -> None:
    sys.exit(runtime.main("executor", Executor))


if __name__ == "__main__":
    main()
