"""Summaries of ``py-spy record --format raw`` output (collapsed stacks).

``python -m bench --profile DIR`` attaches py-spy to the services while they are measured
(the figures of such a run are distorted by the sampling, so it never writes the
benchmark table); this module turns each file into the functions that use the most CPU:
"self" (where the samples were taken) and "inclusive" (present anywhere in the stack).
py-spy only samples threads that are running, so shares are shares of busy time.

``python -m bench.profile FILE...`` prints the summary of existing files.
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^(.*) (\d+)$")
# Leaf frames where a thread waits rather than works (py-spy still samples some of them).
IDLE = ("select (selectors.py)", "EpollSelector.select (selectors.py)",
        "wait (threading.py)", "Condition.wait (threading.py)", "sleep (time)")
_FRAME = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    func, path = m.group(1), m.group(2)
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{func} ({path})"


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        count = int(m.group(2))
        frames = m.group(1).split(";")
        # py-spy puts the process and thread first, then outermost to innermost frames
        thread = next((f for f in frames[:2] if f.startswith("thread")), "")
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        names = [_name(f) for f in frames]
        if names[-1] in IDLE:
            idle += count
            continue
        total += count
        threads[thread.split(" (")[0].strip('"') if thread else "?"] += count
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return {"file": path.name, "samples": total, "idle_samples": idle,
            "self": [(n, c / total) for n, c in own.most_common(top)] if total else [],
            "inclusive": [(n, c / total) for n, c in inclusive.most_common(top * 3)]
            if total else [],
            "threads": [(n, c / total) for n, c in threads.most_common(5)] if total else []}


def render(summary: dict[str, Any], top: int = 15) -> str:
    lines = [f"### {summary['file']} ({summary['samples']} busy samples, "
             f"{summary['idle_samples']} idle ones left out; shares of busy time)", "", "self:"]
    lines += [f"  {share:6.1%}  {name}" for name, share in summary["self"][:top]]
    lines += ["inclusive:"]
    lines += [f"  {share:6.1%}  {name}" for name, share in summary["inclusive"][:top * 2]]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    print("\n\n".join(render(summarize(Path(arg))) for arg in argv))


if __name__ == "__main__":
    main(sys.argv[1:])
