"""The specification's example policies, word for word, read from ``../shared/seeds``.

The specification shows each example policy as a few code listings with prose between
them. :func:`seed_policy` takes the listings of one example, in order, and adds only the
imports a real file has (the listings use ``time``, ``re`` and ``inspect`` without
showing their import; ``logger`` is provided by the plugin loader). Nothing else is
changed, so a test that runs one runs the policy as the specification wrote it.

The seeds are beside the checkout in CI, not in a user's clone: there the tests that use
them skip with that reason (``tests.requirements.need_seeds``).
"""

from __future__ import annotations

import re

from tests.requirements import need_seeds

IMPORTS = "import inspect\nimport re\nimport time\n\n"
# A line at column 0 that belongs to a listing (everything else there is prose).
_CODE = re.compile(r'^(async def |def |"""|[A-Za-z_][A-Za-z0-9_]* = |\]\)|\)|\})')


def seed_policy(name: str) -> str:
    """The source of example ``policy-<name>.py`` (e.g. ``staticPlacement``)."""
    for path in sorted(need_seeds().glob("*.txt")):
        text = path.read_text()
        start = text.find(f"Example policy-{name}.py")
        if start >= 0:
            break
    else:
        raise LookupError(f"no example policy-{name}.py in the seeds")
    section = text[start:].split("\n", 1)[1]
    end = section.find("Example policy-")
    section = section if end < 0 else section[:end]
    return IMPORTS + "\n".join(_listings(section.splitlines())) + "\n"


def _listings(lines: list[str]) -> list[str]:
    out: list[str] = []
    inside = False
    for line in lines:
        if not line.strip():
            if inside:
                out.append("")
            continue
        if line[0] in " \t":
            if inside:
                out.append(line)
            continue
        inside = bool(_CODE.match(line))
        if inside:
            out.append(line)
    return out
