"""``python -m bench [--quick]``: every figure, each with its raw nats-py baseline.

Full sizes take about 6-7 minutes on a 2-core machine and write the tables into
``docs/benchmarks.md``; ``--quick`` (small sizes, under a minute, what CI runs through
``tests/test_bench_quick.py``) writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import codec, reaction, report, scaleout, scheduler, state, storage
from bench.common import ROOT, machine, versions
from mlsysops import logs

FIGURES = ("reaction", "scheduler", "scaleout", "codec", "state", "storage")


class Sizes:
    def __init__(self, quick: bool) -> None:
        if quick:
            self.reaction = [(5, 6, 15.0), (20, 6, 15.0)]  # apps, samples, time budget (s)
            self.hops = 50
            self.plans = 300
            self.scale_apps, self.scale_window = 20, 2.0
            self.codec_loops = 2_000
            self.state_apps, self.state_loops = [100, 1_000], 200
            self.storage_apps, self.storage_plans = 5, 100
        else:
            self.reaction = [(10, 200, 60.0), (100, 200, 80.0), (1000, 100, 180.0)]
            self.hops = 300
            self.plans = 3_000
            self.scale_apps, self.scale_window = 1000, 8.0
            self.codec_loops = 20_000
            self.state_apps, self.state_loops = [1_000, 10_000], 2_000
            self.storage_apps, self.storage_plans = 50, 2_000


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = Sizes(args.quick)
    only = set(args.only.split(",")) if args.only else set(FIGURES)
    profile_dir = Path(args.profile).resolve() if args.profile else None
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "command": "python -m bench" + (" --quick" if args.quick else ""),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "versions": versions(),
        "load_before": list(os.getloadavg()),
        "whatif": os.environ.get("BENCH_WHATIF", ""),
    }
    progress(f"machine: {results['machine']}")
    progress(f"versions: {results['versions']}")
    progress(f"load average before: {results['load_before']}")

    if "reaction" in only:
        progress("1. reaction latency (and 4. footprint)")
        rows, shim = [], None
        runs = []
        for n_apps, samples, budget in sizes.reaction:
            r = await reaction.measure(n_apps, samples=samples, budget=budget,
                                       hop_count=sizes.hops, shim=shim, keep=args.keep,
                                       profile_dir=profile_dir, progress=progress)
            shim = r.shim  # probed on the first run, then kept
            runs.append(r)
            row = r.row()
            rows.append(row)
            progress(f"  reaction N={n_apps}: p50 {row['p50_ms']:.1f} ms, p99 "
                     f"{row['p99_ms']:.1f} ms ({row['samples']} samples, {row['missed']} "
                     f"lost); raw hop p50 {row['hop_p50_ms']:.2f} ms "
                     f"[{r.duration_s:.0f} s]")
        note = ("The analyzer was run unmodified: a telemetry sample reached `analyze()`."
                if not shim else
                "**The unmodified analyzer never reacted to the sample** (probe: no `apply` "
                "within 8 s): `Analyzer.evaluate` skips a pair evaluated less than 0.9 x "
                "`analyze_interval` ago whatever triggered the evaluation, so a policy "
                "with `analyze_on_telemetry` and a long interval (here 1 h) is evaluated on "
                "telemetry once per interval at most. The figures above were measured with "
                "`python -m bench.svc analyzer`, which lets a telemetry-triggered "
                "evaluation through when a snapshot arrived after the pair's last "
                "evaluation (see *Findings*); everything else is the framework's code.")
        results["reaction"] = {"rows": rows, "shim": bool(shim), "note": note,
                               "latencies_ms": {str(r.apps): [x * 1000 for x in r.latencies]
                                                for r in runs},
                               "stage_samples": {str(r.apps): r.stage_samples for r in runs}}
        biggest = runs[-1]
        results["footprint"] = {"apps": biggest.apps, "services": {
            name: {"idle_rss": biggest.idle_rss[name][0], "idle_peak": biggest.idle_rss[name][1],
                   "loaded_rss": biggest.loaded_rss[name][0],
                   "loaded_peak": biggest.loaded_rss[name][1]}
            for name in biggest.idle_rss}}
        results["codec_hop_us"] = rows[-1]["hop_p50_ms"] * 1000

    if "scheduler" in only:
        progress("2. scheduler throughput")
        results["scheduler"] = [
            await scheduler.measure(sizes.plans, mix, keep=args.keep, profile_dir=profile_dir,
                                    progress=progress)
            for mix in ("distinct", "conflict")]

    if "scaleout" in only:
        progress("3. analyzer scale-out")
        results["scaleout"] = await scaleout.measure(
            sizes.scale_apps, window=sizes.scale_window, keep=args.keep,
            profile_dir=profile_dir, progress=progress, quick=args.quick)

    if "codec" in only:
        progress("5. codec")
        results["codec"] = codec.measure(loops=sizes.codec_loops)
        if "codec_hop_us" not in results:
            hops = await _hop_only(sizes.hops)
            results["codec_hop_us"] = hops * 1000

    if "state" in only:
        progress("6. policy arguments at fleet size")
        results["state"] = state.measure(sizes.state_apps, sizes.state_loops)
        for r in results["state"]:
            progress(f"  {r['apps']:,} apps: {r['new_ms'] * 1000:.1f} us per call "
                     f"(copying: {r['old_ms']:.1f} ms); largest message "
                     f"{r['largest_piece']:,} B (whole: {r['whole_bytes']:,} B)")

    if "storage" in only:
        progress("7. JetStream storage per 1,000 plans")
        results["storage"] = await storage.measure(sizes.storage_apps, sizes.storage_plans,
                                                   keep=args.keep, progress=progress)

    results["duration_s"] = time.monotonic() - started
    results["load_after"] = list(os.getloadavg())
    results["targets"] = report.targets(results)
    return results


async def _hop_only(count: int) -> float:
    from bench.common import NatsServer, Workdir, summary_ms

    with Workdir("hop") as work:
        server = NatsServer(work)
        server.start()
        try:
            return summary_ms(await reaction.raw_hop(server.url, count))["p50_ms"]
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--out", help="markdown file to update (default: "
                        "docs/benchmarks.md for a full run, none for --quick)")
    parser.add_argument("--json", help="also write every result as JSON to this file")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--profile", metavar="DIR",
                        help="attach py-spy to the services and write profiles to DIR "
                             "(distorts the figures: no table is written)")
    args = parser.parse_args(argv)
    logs.configure("console", "warning")
    results = asyncio.run(run(args))
    for t in results["targets"]:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        progress(f"target {t['figure']}: {t['target']}: {t['value']} -> {met}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    default = None if args.quick or results["whatif"] else str(ROOT / "docs" / "benchmarks.md")
    out = args.out or default
    if args.profile:
        from bench import profile

        for path in sorted(Path(args.profile).glob("*.txt")):
            summary = profile.summarize(path)
            (path.with_suffix(".summary")).write_text(profile.render(summary) + "\n")
        progress(f"profiles in {args.profile} (*.txt raw stacks, *.summary top functions)")
    elif out:
        report.write(Path(out), results)
        progress(f"wrote {out}")
    progress(f"done in {results['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
