"""Run every benchmark, write their JSON together, and refresh the table in bench/README.md.

Each benchmark runs as its own process, one after the other (they would compete for the CPUs).
The table goes between the RESULTS markers of the README; the rest of the README is kept.

    python bench/run_all.py [--smoke] [--accuracy] [--results FILE] [--readme FILE]

--smoke runs each benchmark at a tiny size (what tests/test_bench.py does); --accuracy adds
bench/accuracy.py (minutes of training on the real photos).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

BENCH = Path(__file__).resolve().parent
START, END = "<!-- RESULTS:START -->", "<!-- RESULTS:END -->"
# (script, full-size arguments, smoke arguments)
BENCHMARKS: list[tuple[str, list[str], list[str]]] = [
    (
        "label_throughput",
        ["--repeat", "2"],
        ["--images", "40", "--large-images", "0", "--seed-images", "4"],
    ),
    ("label_memory", [], ["--images", "40", "80"]),
    ("startup", [], ["--images", "40", "--runs", "1"]),
    ("train_overhead", [], ["--epochs", "1", "--workers", "1", "--limit", "16"]),
]
ACCURACY = ("accuracy", [], ["--epochs", "1", "--limit", "16"])


def run(script: str, args: list[str]) -> dict[str, Any]:
    print(f"running bench/{script}.py {' '.join(args)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), *args],
        env=common.ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench/{script}.py exited {done.returncode}")
    result = json.loads(done.stdout[done.stdout.index("{") :])
    result["bench_seconds"] = round(time.monotonic() - started, 1)
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    """The README's table of the latest results."""
    rows = ["| what | measured | target | load avg (1 min) |", "|---|---|---|---|"]
    throughput = results.get("label_throughput")
    if throughput:
        for key in ("small", "large"):
            if key not in throughput:
                continue
            r = throughput[key]
            a, b, c = r["a_seed_loop"], r["b_local_pipeline"], r["c_dogbread_label"]
            loads = "/".join(f"{x:.1f}" for x in r["load_average_before_after"])
            what = f"labeling {r['images']:,} JPEGs of {r['image_size']}"
            rows.append(
                f"| {what}: (a) seed loop / (b) no-Ray pipeline / (c) `dogbread label`, img/s "
                f"| (a) {a['images_per_second']} ({a['images']} images) · "
                f"(b) {b['images_per_second_wall']} end to end, {b['images_per_second_labeling']}"
                f" steady · (c) {c['images_per_second_wall']} end to end, "
                f"{c['images_per_second_steady']} steady, {c['images_per_second_summary']} by its "
                f"summary | | {loads} |"
            )
            target = "c/a ≥ 20, c/b ≥ 0.9" if key == "small" else ""
            rows.append(
                f"| ↳ ratios | c/a {r['c_over_a']} · c/b {r['c_over_b_wall']} end to end, "
                f"{r['c_over_b_steady']} steady | {target} | {loads} |"
            )
    memory = results.get("label_memory")
    if memory:
        runs = memory["runs"]
        peaks = " · ".join(
            f"{int(n):,}: {r['peak_rss_mib']:,.0f} MiB RSS ({r['peak_pss_mib']:,.0f} PSS)"
            for n, r in runs.items()
        )
        rows.append(
            f"| peak memory of all `dogbread label` processes, {memory['image_size']} images "
            f"| {peaks} · growth {memory['rss_growth']}x RSS, {memory['pss_growth']}x PSS "
            f"| ≤ 1.25x | {memory['machine']['load_average'][0]:.1f} |"
        )
    train = results.get("train_overhead")
    if train:
        plain = train["plain_keras"]["steady_epoch_seconds"]
        for workers, run_ in train["dogbread_train"].items():
            target = "≤ 1.10x" if workers == "1" else "(for the record)"
            measured = (
                f"failed ({run_['error']}; its stderr is in results.json)"
                if "error" in run_
                else f"{run_['steady_epoch_seconds']} s vs {plain} s: {train['overhead'][workers]}x"
            )
            rows.append(
                f"| steady epoch, `dogbread train --workers {workers}` vs plain Keras fit "
                f"({train['data'].split(':')[0]}) | {measured} | {target} "
                f"| {train['machine']['load_average'][0]:.1f} |"
            )
    startup = results.get("startup")
    if startup:
        rows.append(
            f"| start-up: command start to first labeled batch ({startup['images']} images) "
            f"| {startup['first_batch_seconds']} s (runs: {startup['first_batch_seconds_runs']}) "
            f"| | {startup['machine']['load_average'][0]:.1f} |"
        )
    accuracy = results.get("accuracy")
    if accuracy:
        rows.append(
            f"| accuracy on the real photos' val split, {accuracy['config']} "
            f"| accuracy {accuracy['accuracy']}, precision {accuracy['precision']}, "
            f"recall {accuracy['recall']} | ≥ 0.97 | |"
        )
    return "\n".join(rows)


def refresh_readme(readme: Path, results: dict[str, dict[str, Any]], when: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} lacks the {START} and {END} markers")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    body = f"\nMeasured {when} by `python bench/run_all.py`.\n\n{table(results)}\n"
    readme.write_text(f"{head}{START}{body}{END}{tail}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check, not a measure")
    parser.add_argument("--accuracy", action="store_true", help="also run bench/accuracy.py")
    parser.add_argument("--results", type=Path, default=BENCH / "results.json")
    parser.add_argument("--readme", type=Path, default=BENCH / "README.md")
    args = parser.parse_args(argv)

    chosen = BENCHMARKS + ([ACCURACY] if args.accuracy else [])
    results = {name: run(name, smoke if args.smoke else full) for name, full, smoke in chosen}
    when = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    combined = {"generated": when, "smoke": args.smoke, "results": results}
    args.results.write_text(json.dumps(combined, indent=2) + "\n")
    refresh_readme(args.readme, results, when)
    common.emit(combined)
    return combined


if __name__ == "__main__":
    main()
