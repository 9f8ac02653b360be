"""`dogbread report`: one self-contained report.html for a label output or a training run dir.

The page loads nothing from anywhere: CSS is inline, charts are inline SVG or base64 PNGs and the
thumbnails are base64 JPEGs, so it can be attached to a ticket or opened offline. Every string from
data (paths, labels, error texts, config values) is escaped: paths may hold <, & and quotes.

Scale: a label output may hold millions of rows in thousands of parts. Only the label, score and
error columns are scanned; counts, histograms and samples are pyarrow compute; the path
column is read only from the parts that hold a sampled row; at most GRID thumbnails per grid are
fetched, in threads. Thumbnails go through decode_image, so they show what the model saw.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml
from PIL import Image

from dogbread import output, storage
from dogbread.config import CONFIG_FILENAME
from dogbread.errors import DataError, first_line
from dogbread.images import ImageDecodeError, decode_image
from dogbread.labeler import read_file

log = logging.getLogger(__name__)

REPORT_FILENAME = "report.html"  # a training run's; a label output's starts with "_"
SAMPLE_FILES, SAMPLE_ROWS = 16, 200_000  # a label output's histograms and grids read no more
# Reading the first rows of a file: without this, pyarrow reads ahead through its row groups
# (16 files' path columns: 1 GB at 50M rows, where the rows asked for need 40 MB).
ONE_AT_A_TIME = {"batch_readahead": 0, "fragment_readahead": 0}
CARD_FILENAME, METRICS_FILENAME = "model_card.json", "metrics.json"  # as dogbread.model writes
THUMB = 96  # pixels, square
GRID = 12  # thumbnails per grid
BINS = 20  # score histogram bins over [0, 1]
AXIS = ((10, "0"), (146, "0.5"), (284, "1"))  # x positions of the histograms' tick labels
MAX_PREDICT = 200  # test images the training report predicts to find misclassified ones
THREADS = 16  # reads wait on the disk or the network far more than on the CPU
CSS = """
body { font: 14px/1.4 system-ui, sans-serif; color: #222;
  margin: 24px auto; padding: 0 24px; max-width: 1250px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 6px 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
.tile { width: 96px; margin: 0; font-size: 11px; overflow-wrap: anywhere; }
.tile img, .tile .ph { width: 96px; height: 96px; display: block; }
.tile .ph { background: #fbe9e7; color: #b71c1c; overflow: hidden; box-sizing: border-box;
  padding: 4px; border: 1px dashed #e57373; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; } .note { color: #777; }
"""


def write_report(target: str, s3_endpoint: str | None = None) -> str:
    """Write report.html into `target`, a label output or a training run dir; return its URI."""
    names = (CARD_FILENAME, METRICS_FILENAME)
    is_label = not all(storage.exists(storage.join(target, n), s3_endpoint) for n in names)
    page = _label_page(target, s3_endpoint) if is_label else _training_page(target, s3_endpoint)
    uri = storage.join(target, output.REPORT if is_label else REPORT_FILENAME)
    storage.write_text(uri, page, s3_endpoint)
    return uri


def try_write_report(target: str, s3_endpoint: str | None = None) -> None:
    """write_report at the end of a job, whose results are already written: a report that
    fails is logged rather than failing the job."""
    try:
        log.info("report written to %s", write_report(target, s3_endpoint))
    except Exception as exc:  # any bug here must not turn a finished job into a failed one
        log.warning("no report for %s: %s", target, first_line(exc))


# --- label outputs -----------------------------------------------------------------------------


def _label_page(uri: str, endpoint: str | None) -> str:
    out = output.Output.at(uri, endpoint)
    parts = output.data_files(out)
    if not parts:
        card = _read(storage.join(uri, CARD_FILENAME), endpoint) or {}
        if card.get("members"):  # `dogbread ensemble` writes a model dir without training curves
            raise DataError(
                f"{uri} is an ensemble of {len(card['members'])} runs, with no curves of its "
                "own: report its members' run dirs; `dogbread evaluate` gives its metrics"
            )
        raise DataError(f"{uri} holds neither label parts nor a training run")
    table, origins, starts = _sample_rows(parts, out)
    summary = out.read_json(output.SUMMARY)
    # Counted by the run (or, unfinished, by its committed shards), else in the rows read.
    markers = {} if summary else output.read_markers(out)
    if summary:
        labels, errors = summary.get("labels", {}), summary.get("errors", {})
    elif markers:
        markers = markers.values()
        labels = dict(sum((Counter(m["labels"]) for m in markers), Counter()))
        errors = dict(sum((Counter(m["errors"]) for m in markers), Counter()))
    else:
        counts = output.count_rows(table)
        labels, errors = output.by_kind(counts, "label"), output.by_kind(counts, "error")
    config = _read(storage.join(uri, output.CONFIG), endpoint, yaml.safe_load) or {}
    output_name = uri

    rng = np.random.default_rng(0)  # the same sample every time the report is written
    least = pc.select_k_unstable(table, GRID, [("score", "ascending")]).to_numpy()
    least = least[table["score"].take(least).is_valid().to_numpy()]  # nulls: the failed files
    failed = pc.indices_nonzero(table["error"].is_valid()).to_numpy()
    grids = [
        *((f"Sample: {n}", _sample(rng, _rows_where(table["label"], n))) for n in labels),
        ("Least confident", least[np.argsort(table["score"].take(least).to_numpy())]),
        (f"Failed files ({len(failed)})", _sample(rng, failed)),
    ]
    rows = np.unique(np.concatenate([g for _, g in grids]).astype(np.int64))  # uint64 mixed in
    picked = table.take(rows).to_pylist()  # label, score and error of each sampled row only
    for row, path in zip(picked, _take_paths(origins, starts, rows), strict=True):
        row["path"] = path
    good = [row["path"] for row in picked if row["error"] is None]
    # Failed rows show their error; a file gone since it was labeled shows its read error.
    thumbnails, tiles = iter(_decode_all(good, THUMB, endpoint)), {}
    for i, row in zip(rows.tolist(), picked, strict=True):
        caption = "" if row["score"] is None else f"{row['label']} {row['score']:.3f}"
        tiles[i] = _tile(row["path"], row["error"] or next(thumbnails), caption)

    run = _note("no _summary.json: the run has not finished") + _kv(config)
    if summary:  # its counts are in the tables above
        run = _kv({k: v for k, v in summary.items() if k not in ("labels", "errors")})
    total = sum(labels.values()) + sum(errors.values())
    shares = [(name, n, f"{n / total:.1%}") for name, n in labels.items()]
    sampled = "" if len(table) == total else f" (scores and images: a sample of {len(table)} rows)"
    sections = [
        _section(
            "Counts",
            f"<p>{total} images in {len(parts)} Parquet files{sampled}</p>"
            + _table(["label", "images", "share"], shares, "label-counts")
            + _table(["error reason", "files"], errors.items(), "error-counts"),
        ),
        _section("Scores per label", _histograms(table)),
        *(_section(title, _grid([tiles[i] for i in grid])) for title, grid in grids),
        _section("Model card", _model_card(config.get("model"), endpoint)),
        _section("Run", run),
    ]
    return _page(f"dogbread labels: {output_name}", sections)


def _sample_rows(parts: list[str], out: output.Output) -> tuple[pa.Table, list, np.ndarray]:
    """(label, score and error of up to SAMPLE_ROWS rows from up to SAMPLE_FILES files spread over
    the output, each batch's (fragment, first row in it), each batch's first row in the table).

    A shard holds the paths of one hash bucket, so a few shards are a fair sample of them all."""
    step = max(1, len(parts) // SAMPLE_FILES)
    picked = parts[::step][:SAMPLE_FILES]
    per_file = SAMPLE_ROWS // len(picked)
    dataset, columns = output.data_dataset(out, picked), ["label", "score", "error"]
    batches, origins = [], []
    for fragment in dataset.get_fragments():  # the first rows of each: its first row groups only
        scanner = pads.Scanner.from_fragment(
            fragment, schema=dataset.schema, columns=columns, **ONE_AT_A_TIME
        )
        offset = 0
        for batch in scanner.head(per_file).to_batches():
            origins.append((fragment, offset))  # the file, and the batch's first row in it
            offset += batch.num_rows
            batches.append(batch)
    schema = pa.schema([dataset.schema.field(name) for name in columns])
    table = pa.Table.from_batches(batches, schema)
    return table, origins, np.cumsum([0] + [b.num_rows for b in batches])


def _sample(rng: np.random.Generator, rows: np.ndarray) -> np.ndarray:
    return np.sort(rng.choice(rows, GRID, replace=False)) if len(rows) > GRID else rows


def _rows_where(column: pa.ChunkedArray, value: str) -> np.ndarray:
    return pc.indices_nonzero(pc.equal(column, value).fill_null(False)).to_numpy()


def _take_paths(origins: list, starts: np.ndarray, rows: np.ndarray) -> list[str]:
    """The path of each (sorted) table row, reading the path column of only the parts hit, and
    of those only the first rows up to the last one hit (Fragment.take read the whole column:
    1 GB for 16 files of a million rows)."""
    batch_of = np.searchsorted(starts, rows, side="right") - 1
    jobs = [
        (origins[b][0], rows[batch_of == b] - starts[b] + origins[b][1])
        for b in np.unique(batch_of)
    ]

    def take(fragment: Any, index: np.ndarray) -> pa.Array:
        head = pads.Scanner.from_fragment(fragment, columns=["path"], **ONE_AT_A_TIME)
        head = head.head(int(index.max()) + 1)
        return head["path"].take(pa.array(index))

    with ThreadPoolExecutor(THREADS) as pool:
        taken = pool.map(lambda job: take(*job), jobs)
        return [path for t in taken for path in t.to_pylist()]


def _histograms(table: pa.Table) -> str:
    """One inline SVG bar chart of scores per label, binned with pyarrow compute."""
    scored = table.filter(table["score"].is_valid())
    bins = pc.min_element_wise(
        pc.floor(pc.multiply(scored["score"], BINS)).cast(pa.int32()), BINS - 1
    )
    grouped = pa.table({"label": scored["label"], "bin": bins}).group_by(["label", "bin"])
    heights: dict[str, np.ndarray] = {}
    for row in grouped.aggregate([("bin", "count")]).to_pylist():
        heights.setdefault(row["label"], np.zeros(BINS, np.int64))[row["bin"]] = row["bin_count"]
    charts = []
    for name, counts in sorted(heights.items()):
        top, bar = int(counts.max()), 280 / BINS
        rects = "".join(
            f'<rect x="{10 + b * bar:.1f}" y="{90 - 80 * n / top:.1f}" width="{bar - 1:.1f}" '
            f'height="{80 * n / top:.1f}" fill="#4a7fb5"><title>{b / BINS:.2f}-{(b + 1) / BINS:.2f}'
            f": {n}</title></rect>"
            for b, n in enumerate(counts.tolist())
        )
        axis = "".join(f'<text x="{x}" y="106">{t}</text>' for x, t in AXIS)
        charts.append(
            f'<figure class="hist"><svg width="300" height="112" font-size="10" role="img">{rects}'
            f'{axis}<text x="14" y="12">max {top}</text></svg>'
            f"<figcaption>{_e(name)}: {int(counts.sum())} scores</figcaption></figure>"
        )
    return f'<div class="charts">{"".join(charts)}</div>' if charts else _note("no scores")


def _model_card(model: str | None, endpoint: str | None) -> str:
    if not model:
        return _note("no model in config.yaml")
    # A bare model file has its card beside it.
    directory = posixpath.dirname(model) if model.endswith(".keras") else model
    card = _read(storage.join(directory, CARD_FILENAME), endpoint)
    if card is None:
        return _note(f"no model card at {directory}")
    return _kv({"model": model, **card})


# --- training run dirs -------------------------------------------------------------------------


def _training_page(run_dir: str, endpoint: str | None) -> str:
    card = _read(storage.join(run_dir, CARD_FILENAME), endpoint) or {}
    metrics = _read(storage.join(run_dir, METRICS_FILENAME), endpoint) or {}
    names = metrics.get("class_names", [])
    per_class = [
        (name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", m["support"])
        for name, m in metrics.get("per_class", {}).items()
    ]
    matrix = [
        (f"true {name}", *row)
        for name, row in zip(names, metrics.get("confusion_matrix", []), strict=True)
    ]
    headline = {k: metrics.get(k) for k in ("accuracy", "precision", "recall", "images")}
    headline |= {k: metrics.get(k) for k in ("best_epoch", "epochs_run", "skipped_unreadable")}
    images = "".join(
        _png(run_dir, name, endpoint) for name in ("curves.png", "confusion_matrix.png")
    )
    config = storage.read_text(storage.join(run_dir, CONFIG_FILENAME), endpoint)
    sections = [
        _section("Test metrics", _kv(headline)),
        _section(
            "Per class",
            _table(["class", "precision", "recall", "support"], per_class, "per-class")
            + _table(["", *(f"predicted {n}" for n in names)], matrix, "confusion"),
        ),
        _section("Curves and confusion matrix", images or _note("no plots")),
        _section("Misclassified test images", _misclassified(run_dir, card, endpoint)),
        _section("Model card", _kv(card)),
        _section("Config", f"<pre>{_e(config)}</pre>"),
    ]
    return _page(f"dogbread training run: {run_dir}", sections)


def _misclassified(run_dir: str, card: dict[str, Any], endpoint: str | None) -> str:
    """Predict a bounded sample of the test split in-process and show the images it gets wrong."""
    from dogbread.model import load_litert, load_model, predict_probabilities

    uri = storage.join(run_dir, "manifest.parquet")
    if not storage.exists(uri, endpoint):
        return _note(f"no manifest.parquet in {run_dir}")
    fs, path = storage.resolve(uri, endpoint)
    manifest = pq.read_table(path, filesystem=fs, columns=["path", "label", "split"])
    test = manifest.filter(pc.equal(manifest["split"], "test"))
    if len(test) > MAX_PREDICT:
        rows = np.random.default_rng(0).choice(len(test), MAX_PREDICT, replace=False)
        test = test.take(np.sort(rows))
    pixels = _decode_all(test["path"].to_pylist(), card["image_size"], endpoint)
    ok = [i for i, p in enumerate(pixels) if not isinstance(p, str)]
    if not ok:
        return _note(f"none of {len(test)} test images could be read")
    # The run's saved LiteRT model when it has one: no TensorFlow, no conversion (seconds).
    model, _ = load_litert(run_dir, endpoint) or load_model(run_dir, endpoint)
    images = np.stack([pixels[i] for i in ok])
    probabilities = np.concatenate(
        [predict_probabilities(model, images[j : j + 32]) for j in range(0, len(ok), 32)]
    )  # in batches: 200 images at once would take a GB of activations at 256 pixels
    wrong = []
    for i, probs in zip(ok, probabilities, strict=True):
        predicted, true = card["class_names"][int(np.argmax(probs))], test["label"][i].as_py()
        if predicted != true:
            caption = f"{true} → {predicted} {probs.max():.3f}"
            wrong.append(_tile(test["path"][i].as_py(), pixels[i], caption))
    note = f"<p>{len(wrong)} of {len(ok)} sampled test images misclassified</p>"
    return note + _grid(wrong[:GRID])


def _png(run_dir: str, name: str, endpoint: str | None) -> str:
    fs, path = storage.resolve(storage.join(run_dir, name), endpoint)
    try:
        data = storage.read_bytes(fs, path)
    except OSError:
        return ""
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return f'<img class="plot" src="{uri}" alt="{_e(name)}" style="max-width: 100%">'


# --- shared pieces -----------------------------------------------------------------------------


def _decode_all(paths: list[str], size: int, endpoint: str | None) -> list[np.ndarray | str]:
    """Each file's pixels at size x size, or its error ("<reason>: <detail>"); read in threads."""
    s3 = storage.s3_filesystem(endpoint) if any(map(storage.is_s3, paths)) else None
    local = pafs.LocalFileSystem()

    def one(uri: str) -> np.ndarray | str:
        content = read_file(s3 if storage.is_s3(uri) else local, uri)  # as labeling does
        try:
            return content if isinstance(content, str) else decode_image(content, size)
        except ImageDecodeError as exc:
            return str(exc)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, paths))


def _tile(path: str, pixels: np.ndarray | str | None, caption: str) -> str:
    """A thumbnail with a caption, or for a file that cannot be shown its error in its place."""
    name = _e(path.rsplit("/", 1)[-1])
    if isinstance(pixels, np.ndarray):
        buffer = io.BytesIO()
        image = Image.fromarray(pixels).resize((THUMB, THUMB), Image.Resampling.BILINEAR)
        image.save(buffer, "JPEG", quality=80)
        uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        shown, css = f'<img class="thumb" src="{uri}" alt="{name}">', "tile"
    else:
        shown, css = f'<div class="ph">{_e(pixels or "no image")}</div>', "tile failed"
    label = f"{_e(caption)}<br>{name}" if caption else name
    return (
        f'<figure class="{css}" title="{_e(path)}">{shown}<figcaption>{label}</figcaption></figure>'
    )


def _grid(tiles: list[str]) -> str:
    return f'<div class="grid">{"".join(tiles)}</div>' if tiles else _note("none")


def _kv(values: dict[str, Any]) -> str:
    return _table([], values.items(), "kv")


def _table(headers: list[str], rows: Any, css: str) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>" if headers else ""
    body = (
        "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
        or f'<tr><td colspan="{len(headers)}" class="note">none</td></tr>'
    )
    return f'<table class="{css}">{head}{body}</table>'


def _cell(value: Any) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return f'<td class="{"n" if numeric else ""}">{_e(_text(value))}</td>'


def _text(value: Any) -> str:
    """Short text: floats to 4 digits, lists and dicts (classes, metrics) on one line."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(_text, value))
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items())
    return str(value)


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{body}</section>"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _page(title: str, sections: list[str]) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>{''.join(sections)}</body></html>\n"
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _read(uri: str, endpoint: str | None, parse: Any = json.loads) -> Any:
    """A small JSON (or YAML) file parsed, None when it does not exist."""
    return parse(storage.read_text(uri, endpoint)) if storage.exists(uri, endpoint) else None
