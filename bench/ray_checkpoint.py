"""Evaluate ``ray.data.checkpoint.CheckpointConfig`` (beta, Ray 2.60) for resumable labeling.

Pipeline: read_parquet(paths) -> map_batches(fake label) -> write_parquet, with
CheckpointConfig(id_column="path"). What it measures, and why (our guarantees at tens of
millions of inputs):

1. Resume cost (--ids): after a complete first run that kept its checkpoint, time and peak
   memory of starting the same pipeline again. Ray restores by loading every checkpointed id
   into one sorted array, copied into every CheckpointFilter actor, so we record the driver's
   peak RSS (VmHWM), per Ray process title the peak RSS / RssAnon / process count, and Ray's
   "Checkpoint loaded ... SizeBytes" log line (the base of the filter actors' memory request).
2. Exactly one row per path after failures: SIGKILL the driver once output files exist, rerun,
   count rows vs unique paths (plain and partition_cols=["label"]). The 2-phase-commit windows
   too short to hit by timing are staged on disk: a committed checkpoint turned back into a
   pending one (kill between data write and commit) or copied (kill inside an S3 "rename").
   Also: one Write worker SIGKILLed mid-run, and a rerun of a job that already finished.
3. Model versions: every rerun labels as model "v2"; we count versions in the output.

Each pipeline run is a fresh subprocess: its own Ray, a private RAY_TMPDIR, fractional CPUs.
Prints one JSON object. --smoke runs tiny sizes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq


def make_input(root: Path, n: int, per_file: int) -> None:
    """Write n synthetic photo paths as Parquet files of per_file rows."""
    root.mkdir(parents=True)
    for start in range(0, n, per_file):
        ids = range(start, min(n, start + per_file))
        paths = [f"s3://bucket/photos/IMG_{i:09d}.jpg" for i in ids]
        pq.write_table(pa.table({"path": paths}), root / f"part-{start:010d}.parquet")


def label(batch: pa.Table, version: str, sleep: float) -> pa.Table:
    """Fake model: dog if crc32(path) is odd, else bread (crc32: stable across processes)."""
    labels = ["dog" if zlib.crc32(p.encode()) & 1 else "bread" for p in batch["path"].to_pylist()]
    time.sleep(sleep)
    batch = batch.append_column("label", pa.array(labels))
    return batch.append_column("model_version", pa.array([version] * len(labels)))


def proc_mb(pid: int | str, keys: tuple[str, ...] = ("VmRSS", "RssAnon")) -> list[float]:
    """Fields of /proc/<pid>/status in MiB (VmHWM = peak RSS of this process image; unlike
    ru_maxrss it does not carry over the parent's peak across fork+exec)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    return [int(fields.get(k, "0 kB").split()[0]) / 1024 for k in keys]


def ray_procs(tag: bytes) -> dict[int, str]:
    """pid -> process title of the processes whose environment holds our RAY_TMPDIR."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and tag in (d / "environ").read_bytes().split(b"\0"):
                found[int(d.name)] = (d / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
    return found


def sample_peaks(tag: bytes, peaks: dict[str, list], stop: threading.Event) -> None:
    """Per process title: peak VmRSS, peak RssAnon (MiB), pids seen; every 0.2 s until stop."""
    while not stop.wait(0.2):
        for pid, title in ray_procs(tag).items():
            try:
                rss, anon = proc_mb(pid) if pid != os.getpid() else (0, 0)
            except OSError:
                continue
            old = peaks.setdefault(title[:60], [0.0, 0.0, set()])
            old[0], old[1] = max(old[0], rss), max(old[1], anon)
            old[2].add(pid)


def kill_one_writer(tag: bytes, out: Path, killed: list[str]) -> None:
    """Once an output file exists, SIGKILL one worker that is running a Write task."""
    while not killed:
        time.sleep(0.02)
        writers = [(p, t) for p, t in ray_procs(tag).items() if "Write" in t]
        if writers and any(out.rglob("*.parquet")):
            os.kill(writers[0][0], signal.SIGKILL)
            killed.append(writers[0][1])


def child(a: argparse.Namespace) -> None:
    """One pipeline run (read -> label -> write_parquet) with checkpointing; prints RESULT."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    tag = f"RAY_TMPDIR={os.environ['RAY_TMPDIR']}".encode()
    if a.bin_kib:  # read-task bin size (default 128 MiB packs all our small files in 1 task)
        os.environ["RAY_DATA_PARQUET_BIN_PACKING_BYTES"] = str(int(a.bin_kib) * 1024)
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2)
    rss_after_init = proc_mb("self")[0]
    logs: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: logs.append(rec.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ray.data.checkpoint").addHandler(handler)
    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(
        id_column="path", checkpoint_path=a.ckpt, delete_checkpoint_on_success=not a.keep_ckpt
    )
    peaks: dict[str, list] = {}
    stop, killed = threading.Event(), []
    threading.Thread(target=sample_peaks, args=(tag, peaks, stop), daemon=True).start()
    if a.kill_worker:
        args = (tag, Path(a.out), killed)
        threading.Thread(target=kill_one_writer, args=args, daemon=True).start()
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(a.inp, num_cpus=0.25)
    kw = {"version": a.version, "sleep": float(a.sleep)}
    ds = ds.map_batches(label, batch_format="pyarrow", batch_size=1024, num_cpus=0.25, fn_kwargs=kw)
    ds.write_parquet(
        a.out, partition_cols=["label"] if a.partition else None, ray_remote_args={"num_cpus": 0.25}
    )
    elapsed = time.perf_counter() - t0
    stop.set()
    top = sorted(peaks.items(), key=lambda kv: -kv[1][1])[:6]
    result = {
        "seconds": round(elapsed, 2),
        "driver_rss_after_ray_init_mb": round(rss_after_init),
        "driver_peak_rss_mb_vmhwm": round(proc_mb("self", ("VmHWM",))[0]),
        "workers_peak_mb_rss_anon_nprocs": {
            t: [round(v[0]), round(v[1]), len(v[2])] for t, v in top
        },
        "checkpoint_log": [m[:120] for m in logs if "loaded" in m or "Cleaned" in m],
        "killed_worker": killed[0] if killed else None,
    }
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()


def spawn(work: Path, log: str, **kw: object) -> subprocess.Popen:
    """Start one child run in its own session, with a private RAY_TMPDIR."""
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="ckpt-", dir="/tmp"))
    cmd = [sys.executable, __file__, "--child", "--inp", str(work / "in")]
    cmd += ["--out", str(work / "out"), "--ckpt", str(work / "ckpt")]
    for k, v in kw.items():
        if v is not False:
            cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    err = open(work / log, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                            start_new_session=True)  # fmt: skip
    proc.ray_tmp = env["RAY_TMPDIR"]  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, work: Path, log: str) -> dict:
    """Wait for a child, SIGKILL what is left of its own session, return its RESULT."""
    out = proc.communicate(timeout=900)[0]
    time.sleep(2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # only our child's session (its Ray, if left)
    except ProcessLookupError:
        pass
    shutil.rmtree(proc.ray_tmp, ignore_errors=True)  # type: ignore[attr-defined]
    lines = [ln[7:] for ln in out.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return {"rc": proc.returncode, **json.loads(lines[-1])}
    return {"rc": proc.returncode, "stderr_tail": (work / log).read_text()[-1500:]}


def files(work: Path) -> dict:
    """Counts of output data files and of pending / committed checkpoint files."""
    ck = list((work / "ckpt").glob("*.parquet"))
    pend = [p for p in ck if p.name.endswith(".pending.parquet")]
    return {"data_files": len(list((work / "out").rglob("*.parquet"))),
            "pending_ckpts": len(pend), "committed_ckpts": len(ck) - len(pend),
            "ckpt_bytes": sum(p.stat().st_size for p in ck)}  # fmt: skip


def count(work: Path, n: int, hive: bool) -> dict:
    """Output rows vs unique paths, and rows per model_version."""
    ds = pads.dataset(work / "out", format="parquet", partitioning="hive" if hive else None)
    t = ds.to_table(columns=["path", "model_version"])
    uniq = pc.count_distinct(t["path"]).as_py()
    versions = {v["values"]: v["counts"] for v in pc.value_counts(t["model_version"]).to_pylist()}
    return {"rows": t.num_rows, "unique_paths": uniq, "duplicates": t.num_rows - uniq,
            "missing": n - uniq, "model_versions": versions}  # fmt: skip


def resume_bench(base: Path, n: int) -> dict:
    """Full first run keeping its checkpoint, then the same pipeline again (the resume)."""
    work = base / f"resume_{n}"
    make_input(work / "in", n, per_file=100_000)
    first = finish(spawn(work, "first.log", keep_ckpt=True), work, "first.log")
    after_first = files(work)
    resume = finish(spawn(work, "resume.log", keep_ckpt=True), work, "resume.log")
    res = {"ids": n, "first_run": first, "after_first_run": after_first, "resume": resume,
           "output_after_resume": count(work, n, False)}  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return res


def crash_test(base: Path, n: int, mode: str) -> dict:
    """plain / hive: SIGKILL the driver once 3 output files exist, turn one committed checkpoint
    back into a pending one (as if the kill fell between data write and commit), rerun as model
    v2. s3_move: the same but the committed file stays too. lost_worker: SIGKILL one Write
    worker mid-run. after_success: rerun a job that finished."""
    work, hive = base / f"crash_{mode}", mode == "hive"
    make_input(work / "in", n, per_file=max(n // 40, 1))
    kw: dict = {"sleep": 0.05, "bin_kib": 256, "partition": hive}  # 256 KiB bins: ~40 tasks
    res: dict = {"mode": mode, "ids": n, "partition_cols": ["label"] if hive else None}
    if mode == "lost_worker":
        res["run"] = finish(spawn(work, "lost.log", kill_worker=True, **kw), work, "lost.log")
    else:
        proc = spawn(work, "first.log", **kw)
        while mode != "after_success" and proc.poll() is None:
            if len(list((work / "out").rglob("*.parquet"))) >= 3:
                break
            time.sleep(0.02)
        res["killed_before_exit"] = proc.poll() is None and mode != "after_success"
        if res["killed_before_exit"]:
            proc.send_signal(signal.SIGKILL)
        res["first_rc"] = finish(proc, work, "first.log")["rc"]
        res["after_first"] = files(work)
        res["after_first"]["rows_on_disk"] = count(work, n, hive)["rows"]
        done = sorted(p for p in (work / "ckpt").glob("*.parquet") if ".pending." not in p.name)
        if done and mode != "after_success":
            forced = done[0].with_name(done[0].name.replace(".parquet", ".pending.parquet"))
            # s3_move: pending AND committed both present = a kill between the CopyObject and
            # DeleteObject of pyarrow's S3 Move (commit_checkpoint's "rename" on S3)
            if mode == "s3_move":
                shutil.copy(done[0], forced)
            else:
                done[0].rename(forced)
            res["forced_pending_rows"] = pq.read_metadata(forced).num_rows
        res["rerun"] = finish(spawn(work, "rerun.log", version="v2", **kw), work, "rerun.log")
    res.update(after_rerun=files(work), output=count(work, n, hive))
    shutil.rmtree(work, ignore_errors=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ids", type=int, nargs="+", default=[1_000_000, 5_000_000])
    p.add_argument("--crash-ids", type=int, default=200_000)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (20k ids)")
    for flag in ("--child", "--keep-ckpt", "--partition", "--kill-worker"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag, default in (("--inp", None), ("--out", None), ("--ckpt", None),
                          ("--version", "v1"), ("--sleep", 0.0), ("--bin-kib", None)):  # fmt: skip
        p.add_argument(flag, default=default, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    if a.smoke:
        a.ids, a.crash_ids = [20_000], 20_000
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir="/tmp"))
    modes = ("plain", "hive", "s3_move", "lost_worker", "after_success")
    report = {"ray": importlib.metadata.version("ray"),
              "resume": [resume_bench(base, n) for n in a.ids],
              "crash": [crash_test(base, a.crash_ids, m) for m in modes]}  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
