"""``python -m bench.svc analyzer [--telemetry-shim]``: the analyzer, patched for a benchmark.

``--telemetry-shim`` is used only when the reaction benchmark's probe finds the analyzer
ignoring telemetry, as analyzers before commit ad7e799 did (that commit made a
telemetry-triggered evaluation skip the interval check): they skipped an evaluation when
the pair's context record said it was evaluated less than 0.9 x ``analyze_interval``
ago, whatever triggered it, so a policy with ``analyze_on_telemetry`` and a long interval
never looked at a sample that should make it say yes. The shim lets a
telemetry-triggered evaluation through when a snapshot arrived after the pair's last
evaluation; ownership, compare-and-set, in-flight marking and publishing stay the
framework's own code.

``BENCH_WHATIF=name[,name]`` applies what-if patches that size a proposed framework fix
(see :data:`WHATIF`); the harness then runs every analyzer through this module and
writes no table unless ``--out`` is given.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import msgspec

from mlsysops import runtime, wire


def install() -> None:
    from services.analyzer.service import Analyzer

    on_telemetry = Analyzer._on_telemetry
    evaluate = Analyzer.evaluate

    def _on_telemetry(self: Any, snap: wire.Telemetry) -> None:
        self._bench_snapshot_at = wire.now()
        on_telemetry(self, snap)

    async def _evaluate(self: Any, policy: Any, app: str, *args: Any, **kwargs: Any) -> None:
        if policy.settings.on_telemetry:
            key = wire.context_key(policy.name, app)
            item = self.contexts.get(key)
            snapshot_at = getattr(self, "_bench_snapshot_at", 0.0)
            if item is not None and 0 < item[1].last_eval < snapshot_at:
                # the cached copy only: the stored record and its revision are untouched
                self.contexts._items[key] = (item[0],
                                             msgspec.structs.replace(item[1], last_eval=0.0))
        await evaluate(self, policy, app, *args, **kwargs)

    Analyzer._on_telemetry = _on_telemetry  # type: ignore[method-assign]
    Analyzer.evaluate = _evaluate  # type: ignore[method-assign]


def whatif_sysdesc() -> None:
    """What-if (``BENCH_WHATIF=sysdesc``), to size a proposed fix: the system description
    is built once per change of a cluster or node description instead of on every call
    (``StateView.system_description`` scans every description, applications included)."""
    from mlsysops import state

    on_desc = state.StateView._on_desc
    build = state.StateView.system_description

    def _on_desc(self: Any, key: str, value: Any) -> None:
        if not key.startswith("app."):
            self.__dict__.pop("_bench_system", None)
        on_desc(self, key, value)

    def system_description(self: Any) -> dict[str, Any]:
        cached = self.__dict__.get("_bench_system")
        if cached is None:
            cached = self._bench_system = build(self)
        return state._copy(cached)  # type: ignore[no-any-return]

    state.StateView._on_desc = _on_desc  # type: ignore[method-assign]
    state.StateView.system_description = system_description  # type: ignore[method-assign]


WHATIF = {"sysdesc": whatif_sysdesc}


def main() -> None:
    service = sys.argv[1] if len(sys.argv) > 1 else "analyzer"
    if service != "analyzer":
        raise SystemExit("only the analyzer is wrapped")
    if "--telemetry-shim" in sys.argv[2:]:
        install()
    for name in filter(None, os.environ.get("BENCH_WHATIF", "").split(",")):
        WHATIF[name]()
    from services.analyzer.service import Analyzer

    sys.exit(runtime.main("analyzer", Analyzer, []))


if __name__ == "__main__":
    main()
