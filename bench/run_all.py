"""Run every benchmark, write their JSON together, and refresh the table in bench/README.md.

Each benchmark runs as its own process, one after the other (they would compete for the CPUs).
The table goes between the RESULTS markers of the README; the rest of the README is kept.

    python bench/run_all.py [--smoke] [--accuracy] [--only NAME...] [--results FILE] [--readme FILE]

--smoke runs each benchmark at a tiny size (what tests/test_bench.py does); --accuracy adds the
accuracy runs (bench/accuracy.py: the seed CNN, the residual recipe, and an ensemble of three
runs of it; ~95 minutes of training on the real photos); --only reruns the named ones and keeps
the other results of --results.
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
# (name, script, full-size arguments, smoke arguments)
BENCHMARKS: list[tuple[str, str, list[str], list[str] | None]] = [
    (
        "label_throughput",
        "label_throughput",
        ["--repeat", "2"],
        ["--images", "40", "--large-images", "0", "--seed-images", "4"],
    ),
    ("label_memory", "label_memory", [], ["--images", "40", "80"]),
    ("train_memory", "train_memory", [], ["--smoke"]),
    ("startup", "startup", [], ["--images", "40", "--runs", "1"]),
    ("label_sizing", "label_sizing", [], ["--images", "64", "--large-images", "2"]),
    ("label_plan", "label_plan", [], ["--smoke"]),
    ("label_report", "label_report", [], ["--smoke"]),
    (
        "train_overhead",
        "train_overhead",
        [],
        ["--epochs", "1", "--workers", "1", "--rounds", "1", "--limit", "16"],
    ),
]
# The seed CNN as the notebook trained it, and the strongest recipe we have (~21 minutes here):
# at 160 px, six runs gave 0.949 to 0.961; at 128 px two gave 0.961 and 0.949.
RESIDUAL_RECIPE = ["--architecture", "residual", "--augment", "--lr-schedule", "cosine"]
RESIDUAL_RECIPE += ["--image-size", "160", "--epochs", "60", "--patience", "20"]
SMOKE_RESIDUAL = [*RESIDUAL_RECIPE, "--epochs", "1", "--limit", "16", "--image-size", "64"]
# Three runs of the recipe (seeds 0, 1, 2), their `dogbread ensemble` (0.973 on 2026-11-26,
# where triples of six runs averaged 0.969: bench/README.md), and a student of the recipe
# distilled from it (seed 3): ~90 minutes here.
ENSEMBLE = [*RESIDUAL_RECIPE, "--members", "3", "--distill"]
# The smoke runs only the residual recipe (its later flags win): the seed's training is tested
# in tests/test_train.py.
ACCURACY: list[tuple[str, str, list[str], list[str] | None]] = [
    ("accuracy_seed", "accuracy", [], None),
    ("accuracy_residual", "accuracy", RESIDUAL_RECIPE, SMOKE_RESIDUAL),
    ("accuracy_ensemble", "accuracy", ENSEMBLE, [*SMOKE_RESIDUAL, "--members", "2", "--distill"]),
]


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
            d = r.get("d_label_split")  # the split plan: the 256 px set only
            d_what = d_rates = d_ratio = ""
            if d:
                d_what = " / (d) `--plan split`"
                d_rates = (
                    f" · (d) {d['images_per_second_wall']} end to end, "
                    f"{d['images_per_second_steady']} steady"
                )
                d_ratio = (
                    f" · d/c (split/fused) {r['split_over_fused_wall']} end to end, "
                    f"{r['split_over_fused_steady']} steady"
                )
            rows.append(
                f"| {what}: (a) seed loop / (b) no-Ray pipeline / (c) `dogbread label`{d_what}, "
                f"img/s | (a) {a['images_per_second']} ({a['images']} images) · "
                f"(b) {b['images_per_second_wall']} end to end, {b['images_per_second_labeling']}"
                f" steady · (c) {c['images_per_second_wall']} end to end, "
                f"{c['images_per_second_steady']} steady, {c['images_per_second_summary']} by its "
                f"summary{d_rates} | | {loads} |"
            )
            target = "c/a ≥ 20, c/b ≥ 0.9" if key == "small" else ""
            rows.append(
                f"| ↳ ratios | c/a {r['c_over_a']} · c/b {r['c_over_b_wall']} end to end, "
                f"{r['c_over_b_steady']} steady{d_ratio} | {target} | {loads} |"
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
    train_memory = results.get("train_memory")
    if train_memory:
        rows.append(_train_memory_row(train_memory))
    plan = results.get("label_plan")
    if plan:
        rows.append(_plan_row(plan))
    report = results.get("label_report")
    if report:
        runs = " · ".join(
            f"{int(n):,} rows ({r['files']} files): {r['seconds']} s, {r['peak_rss_mib']:,.0f} MiB"
            for n, r in report["runs"].items()
        )
        rows.append(
            f"| `dogbread report` of a label output (its counts, a sample of rows) | {runs} · "
            f"growth {report['seconds_growth']}x time, {report['rss_growth']}x RSS | seconds "
            f"| {report['machine']['load_average'][0]:.1f} |"
        )
    train = results.get("train_overhead")
    if train:
        for workers in train["rounds"][0]["dogbread_train"]:
            target = "≤ 1.10x" if workers == "1" else "(for the record)"
            pairs = [
                f"{r['dogbread_train'][workers]['steady_epoch_seconds']} s vs "
                f"{r['plain_keras']['steady_epoch_seconds']} s"
                for r in train["rounds"]
                if workers in r["dogbread_train"] and "error" not in r["dogbread_train"][workers]
            ]
            measured = (
                f"**{train['overhead'][workers]}x** (median of rounds "
                f"{', '.join(map(str, train['overhead_by_round'][workers]))}: "
                f"{'; '.join(pairs)})"
                if workers in train["overhead"]
                else "failed (its stderr is in results.json)"
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
        predict = startup["predict"]
        rows.append(
            "| start-up: `dogbread predict` of one image, command start to exit, LiteRT "
            f"(run dir with model.tflite) vs Keras | {predict['one_image_seconds_litert']} s vs "
            f"{predict['one_image_seconds_keras']} s ({predict['keras_over_litert']}x) "
            f"| <= 1.5 s | {startup['machine']['load_average'][0]:.1f} |"
        )
    sizing = results.get("label_sizing")
    if sizing:
        rows.append(_sizing_row(sizing))
    for name, *_ in ACCURACY:
        accuracy = results.get(name)
        if not accuracy:
            continue
        config = ", ".join(f"{k} {v}" for k, v in accuracy["config"].items())
        runs = accuracy.get("members", [accuracy])
        stops = ", ".join(f"{r['best_epoch']} of {r['epochs_run']}" for r in runs)
        what = f"{config}; best epoch {stops}"
        if len(runs) > 1:
            what += "; the members alone: " + ", ".join(str(r["accuracy"]) for r in runs)
        rows.append(
            f"| accuracy on the real photos' val split ({what}) "
            f"| accuracy {accuracy['accuracy']}, precision {accuracy['precision']}, "
            f"recall {accuracy['recall']} (seed notebook: 0.967, 0.984, 0.936) | ≥ 0.97 | |"
        )
        student = accuracy.get("student")
        if student:
            rows.append(
                f"| a student of the recipe distilled from that ensemble (temperature "
                f"{student['distill_temperature']}, weight {student['distill_weight']}; best "
                f"epoch {student['best_epoch']} of {student['epochs_run']}) | accuracy "
                f"{student['accuracy']}, precision {student['precision']}, recall "
                f"{student['recall']}; {_speeds(student)}, the ensemble "
                f"{_speeds(accuracy)} | ≥ 0.97, within 0.005 of the ensemble | |"
            )
    return "\n".join(rows)


def _speeds(accuracy: dict) -> str:
    """ "464 img/s (int8 1,100)": a model's own labeling speed, float and int8 when it serves."""
    speeds = accuracy["images_per_second"]
    int8 = f" (int8 {speeds['int8']})" if "int8" in speeds else ""
    return f"{speeds['float']} img/s{int8}"


def _sizing_row(sizing: dict[str, Any]) -> str:
    """The row of bench/label_sizing.py: stage rates per core, and the cores that feed a GPU."""
    block, litert = sizing["decode_block_per_core"], sizing["litert_images_per_second"]
    gpus = sizing["sizing"]
    rates = "/".join(str(s["gpu_images_per_second"]) for s in gpus)
    cores = {k: "/".join(str(s[f"cores_per_gpu_{k}"]) for s in gpus) for k in ("256", "12mp")}
    threads = " / ".join(f"{rate} ({t} thr.)" for t, rate in litert.items())
    return (
        "| sizing a cluster: the decoding task per core, 256 px / 12 MP JPEGs; LiteRT; cores "
        f"per GPU | decoding {block['small_256']} / {block['large_12mp']} img/s · LiteRT "
        f"{threads} img/s · {sizing['bytes_per_image_256']:,.0f} bytes an image in the object "
        f"store · cores per GPU at {rates} img/s: {cores['256']} (256 px), {cores['12mp']} "
        f"(12 MP) | | {sizing['machine']['load_average'][0]:.1f} |"
    )


def _train_memory_row(memory: dict) -> str:
    runs = memory["runs"]  # two sizes; one in --smoke, whose growths are None

    def growth(key: str) -> str:
        return "n/a" if memory[key] is None else f"{memory[key]}x"

    store = " → ".join(f"{r['object_store_peak_mib']} MiB" for r in runs.values())
    driver = " → ".join(f"{r['driver_peak_rss_mib']:,.0f}" for r in runs.values())
    return (
        f"| peak memory of `dogbread train` ({memory['command'].removeprefix('dogbread train ')})"
        f", {' vs '.join(f'{int(n):,}' for n in runs)} images | object store {store} "
        f"(**{growth('object_store_growth')}**) · driver RSS {driver} MiB "
        f"({growth('driver_rss_growth')}) · all processes' PSS {growth('tree_pss_growth')} "
        f"| ≤ 1.25x | {memory['machine']['load_average'][0]:.1f} |"
    )


def _plan_row(plan: dict[str, Any]) -> str:
    """The row of bench/label_plan.py: `dogbread label --dry-run` of an S3 Inventory."""
    sizes = []
    for keys, r in plan["runs"].items():
        if "checks" not in r:
            sizes.append(f"{int(keys):,} keys: failed (exit {r['exit_code']}; results.json)")
            continue
        failed = [name for name, ok in r["checks"].items() if not ok]
        sizes.append(
            f"{int(keys):,} keys ({r['files']} files): {r['seconds']} s "
            f"({r['cpu_seconds']} s of CPU), driver "
            f"{r['driver_peak_rss_mib']:,.0f} MiB RSS (all processes "
            f"{r['total_peak_rss_mib']:,.0f})"
            + (f", checks failed: {', '.join(failed)}" if failed else "")
        )
    ratios = plan["ratios_largest_over_smallest"]
    if ratios:
        sizes.append(
            f"{ratios['keys']}x the keys: {ratios['seconds']}x the time, "
            f"{ratios['driver_peak_rss']}x the driver's RSS"
        )
    missed = [name for name, ok in plan["targets"].items() if not ok]
    verdict = "**met**" if not missed else f"**missed**: {', '.join(missed)}"
    loads = "/".join(f"{r['load_average_before_after'][0]:.1f}" for r in plan["runs"].values())
    return (
        "| planning an S3 Inventory (Parquet manifest.json), `dogbread label --dry-run` "
        f"| {' · '.join(sizes)} | no error, driver ≤ 2 GiB, ≤ 120 s at the largest: {verdict} "
        f"| {loads} |"
    )


def refresh_readme(readme: Path, results: dict[str, dict[str, Any]], when: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} lacks the {START} and {END} markers")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    body = f"\nLast refreshed {when} by `python bench/run_all.py` (when each result was measured\n"
    body += f"is in bench/results.json).\n\n{table(results)}\n"
    readme.write_text(f"{head}{START}{body}{END}{tail}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check, not a measure")
    parser.add_argument("--accuracy", action="store_true", help="also the accuracy runs")
    names = [name for name, *_ in BENCHMARKS + ACCURACY]
    parser.add_argument(
        "--only", nargs="+", choices=names, help="run these; keep the others' last results"
    )
    parser.add_argument("--results", type=Path, default=BENCH / "results.json")
    parser.add_argument("--readme", type=Path, default=BENCH / "README.md")
    args = parser.parse_args(argv)

    chosen = BENCHMARKS + (ACCURACY if args.accuracy or args.only else [])
    if args.only:
        chosen = [entry for entry in chosen if entry[0] in args.only]
    results = {}
    if args.only and args.results.exists():
        results = json.loads(args.results.read_text())["results"]
    when = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    for name, script, full, smoke in chosen:
        if not (args.smoke and smoke is None):
            results[name] = run(script, smoke if args.smoke else full) | {"measured": when}
    combined = {"generated": when, "smoke": args.smoke, "results": results}
    args.results.write_text(json.dumps(combined, indent=2) + "\n")
    refresh_readme(args.readme, results, when)
    common.emit(combined)
    return combined


if __name__ == "__main__":
    main()
