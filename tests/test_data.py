"""Tests for dogbread.data: split assignment, labeled-tree listing and manifests (no Ray)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from dogbread.data import (
    MANIFEST_SCHEMA,
    SPLITS,
    assign_split,
    list_labeled_tree,
    load_labeled,
    read_manifest,
    write_manifest,
)
from dogbread.errors import DataError


def make_tree(root: Path, relpaths: list[str]) -> Path:
    """Files at `relpaths` under root. Listing only looks at names, so they may be empty."""
    root.mkdir(parents=True, exist_ok=True)
    for relpath in relpaths:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return root


def splits_by_relpath(uri: str) -> dict[str, str]:
    table = list_labeled_tree(uri).table
    return dict(zip(table["relpath"].to_pylist(), table["split"].to_pylist(), strict=True))


def rows_by_relpath(manifest) -> dict[str, dict]:
    return {row["relpath"]: row for row in manifest.table.to_pylist()}


# --- assign_split -------------------------------------------------------------------------------


def test_assign_split_is_deterministic():
    paths = [f"bread/img_{i}.jpg" for i in range(200)]
    first = [assign_split(p) for p in paths]
    assert [assign_split(p) for p in paths] == first
    assert set(first) == set(SPLITS)  # 200 paths reach all three splits
    # The same fractions passed explicitly give the same answer as the defaults.
    assert [assign_split(p, 0.1, 0.1) for p in paths] == first


def test_assign_split_depends_on_the_relative_path_only(tmp_path):
    names = [f"{c}/{i:03d}.jpg" for c in ("bread", "dog") for i in range(40)]
    before = splits_by_relpath(str(make_tree(tmp_path / "a", names)))
    assert before == {name: assign_split(name) for name in names}
    # Adding files (new ones in each class, a nested folder) leaves the old files' splits alone.
    more = [f"{c}/new_{i:03d}.jpg" for c in ("bread", "dog") for i in range(60)]
    more += ["dog/nested/deeper/x.png"]
    after = splits_by_relpath(str(make_tree(tmp_path / "a", more)))
    assert len(after) == len(names) + len(more)
    assert {name: after[name] for name in names} == before
    # The same relative tree under another root gets the same splits.
    elsewhere = splits_by_relpath(str(make_tree(tmp_path / "b" / "copy", names)))
    assert elsewhere == before


@pytest.mark.parametrize("val_fraction, test_fraction", [(0.1, 0.1), (0.2, 0.05), (0.0, 0.3)])
def test_split_fractions_are_roughly_respected(val_fraction, test_fraction):
    n = 10_000
    counts = Counter(
        assign_split(f"class_{i % 3}/photo_{i:05d}.jpg", val_fraction, test_fraction)
        for i in range(n)
    )
    assert set(counts) <= set(SPLITS)
    assert abs(counts["val"] / n - val_fraction) <= 0.02
    assert abs(counts["test"] / n - test_fraction) <= 0.02
    assert abs(counts["train"] / n - (1 - val_fraction - test_fraction)) <= 0.02


def test_zero_fractions_put_everything_in_train():
    assert {assign_split(f"dog/{i}.jpg", 0.0, 0.0) for i in range(500)} == {"train"}


# --- list_labeled_tree --------------------------------------------------------------------------


TREE = [
    "dog/d1.jpg",
    "bread/b1.jpg",
    "bread/sub/deeper/b2.png",
    "dog/puppies/p1.JPEG",
    "dog/puppies/old/p2.webp",
    "bread/notes.txt",  # not an image
    "dog/.DS_Store",  # hidden file
    "bread/.hidden.jpg",  # hidden, even with an image extension
    "README.md",  # at the root: no class
    "stray.jpg",  # an image at the root: no class either
]


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "tree", TREE)


def test_list_labeled_tree_labels_come_from_the_top_folder(tree):
    manifest = list_labeled_tree(str(tree))
    assert manifest.class_names == ("bread", "dog")
    assert manifest.class_names.index("bread") == 0 and manifest.class_names.index("dog") == 1
    assert manifest.table.schema == MANIFEST_SCHEMA
    rows = rows_by_relpath(manifest)
    assert {k: r["label"] for k, r in rows.items()} == {
        "bread/b1.jpg": "bread",
        "bread/sub/deeper/b2.png": "bread",
        "dog/d1.jpg": "dog",
        "dog/puppies/p1.JPEG": "dog",
        "dog/puppies/old/p2.webp": "dog",
    }
    for relpath, row in rows.items():
        assert row["path"] == os.path.join(str(tree), relpath)
        assert row["split"] == assign_split(relpath)


def test_list_labeled_tree_skips_and_counts_non_images_and_root_files(tree):
    manifest = list_labeled_tree(str(tree))
    assert manifest.skipped_non_images == 5
    listed = set(manifest.table["relpath"].to_pylist())
    for skipped in ("bread/notes.txt", "dog/.DS_Store", "bread/.hidden.jpg", "README.md"):
        assert skipped not in listed
    assert "stray.jpg" not in listed


def test_class_names_are_sorted_not_in_creation_order(tmp_path):
    root = make_tree(tmp_path / "t", ["zebra/z.jpg", "apple/a.jpg", "mango/m.jpg"])
    manifest = list_labeled_tree(str(root))
    assert manifest.class_names == ("apple", "mango", "zebra")


def test_the_synthetic_tree_lists_sixty_images_per_class(synthetic_tree):
    manifest = list_labeled_tree(synthetic_tree)
    assert manifest.class_names == ("bread", "dog")
    assert manifest.table.num_rows == 120
    assert Counter(manifest.table["label"].to_pylist()) == {"bread": 60, "dog": 60}
    assert manifest.skipped_non_images == 0
    sizes = {s: manifest.split(s).num_rows for s in SPLITS}
    assert sum(sizes.values()) == 120
    assert sizes["train"] > sizes["val"] and sizes["train"] > sizes["test"]
    for split in SPLITS:
        assert set(manifest.split(split)["split"].to_pylist()) <= {split}


def test_hidden_top_level_folders_are_not_classes(tmp_path):
    root = make_tree(
        tmp_path / "t",
        ["bread/b.jpg", "dog/d.jpg", ".ipynb_checkpoints/b-checkpoint.jpg", ".cache/thumb.jpg"],
    )
    assert list_labeled_tree(str(root)).class_names == ("bread", "dog")


# --- errors -------------------------------------------------------------------------------------


def assert_one_line_data_error(uri: str, match: str) -> str:
    with pytest.raises(DataError, match=match) as info:
        list_labeled_tree(uri)
    message = str(info.value)
    assert "\n" not in message
    assert uri in message
    return message


def test_missing_path_is_a_data_error(tmp_path):
    assert_one_line_data_error(str(tmp_path / "nowhere"), "input not found")


def test_empty_tree_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_data_error(str(tmp_path / "empty"), "no images found")


def test_tree_of_only_non_images_is_a_data_error(tmp_path):
    root = make_tree(tmp_path / "t", ["bread/notes.txt", "dog/.DS_Store", "x.jpg"])
    # Either "no images found in ..." or "class folder(s) with no images in ...: bread, dog".
    assert_one_line_data_error(str(root), "no images")


def test_a_single_class_is_a_data_error(tmp_path):
    root = make_tree(tmp_path / "t", ["bread/a.jpg", "bread/b.jpg", "bread/sub/c.jpg"])
    message = assert_one_line_data_error(str(root), "only one class")
    assert "(bread)" in message


def test_an_empty_class_folder_is_a_data_error(tmp_path):
    root = make_tree(tmp_path / "t", ["bread/a.jpg", "dog/b.jpg", "cat/notes.txt"])
    (root / "owl").mkdir()
    message = assert_one_line_data_error(str(root), "class folder")
    assert message.endswith(": cat, owl")


# --- manifests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["manifest.parquet", "sub/dir/manifest.csv"])
def test_manifest_round_trip(tree, tmp_path, name):
    manifest = list_labeled_tree(str(tree))
    uri = str(tmp_path / "out" / name)
    write_manifest(manifest, uri)
    assert os.path.getsize(uri) > 0
    back = read_manifest(uri)
    assert back.table.schema == MANIFEST_SCHEMA
    assert back.table.to_pylist() == manifest.table.to_pylist()
    assert back.class_names == manifest.class_names
    for split in SPLITS:
        assert back.split(split).num_rows == manifest.split(split).num_rows


def test_csv_manifest_keeps_numeric_looking_class_names(tmp_path):
    root = make_tree(tmp_path / "t", ["01/a.jpg", "02/b.jpg", "02/c.jpg"])
    manifest = list_labeled_tree(str(root))
    assert manifest.class_names == ("01", "02")
    uri = str(tmp_path / "m.csv")
    write_manifest(manifest, uri)
    back = read_manifest(uri)
    assert back.class_names == ("01", "02")
    assert back.table.to_pylist() == manifest.table.to_pylist()


def test_a_minimal_csv_manifest_gets_relpath_and_split(tmp_path):
    uri = tmp_path / "hand.csv"
    uri.write_text("path,label\n/data/x/1.jpg,bread\n/data/x/2.jpg,dog\n")
    manifest = read_manifest(str(uri))
    assert manifest.class_names == ("bread", "dog")
    assert manifest.table.to_pylist() == [
        {
            "path": "/data/x/1.jpg",
            "relpath": "/data/x/1.jpg",
            "label": "bread",
            "split": assign_split("/data/x/1.jpg"),
        },
        {
            "path": "/data/x/2.jpg",
            "relpath": "/data/x/2.jpg",
            "label": "dog",
            "split": assign_split("/data/x/2.jpg"),
        },
    ]


def test_manifest_errors_are_data_errors(tmp_path):
    missing = str(tmp_path / "missing.parquet")
    with pytest.raises(DataError, match="cannot read manifest"):
        read_manifest(missing)
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("path\n/a.jpg\n")
    with pytest.raises(DataError, match="lacks column"):
        read_manifest(str(no_label))


def test_load_labeled_reads_a_manifest_or_lists_a_tree(tree, tmp_path):
    listed = list_labeled_tree(str(tree))
    from_tree = load_labeled(str(tree))
    assert from_tree.table.to_pylist() == listed.table.to_pylist()
    uri = str(tmp_path / "m.parquet")
    # Written with other fractions: the manifest's splits are used, not recomputed.
    custom = list_labeled_tree(str(tree), val_fraction=0.0, test_fraction=1.0)
    assert set(custom.table["split"].to_pylist()) == {"test"}
    write_manifest(custom, uri)
    loaded = load_labeled(uri)
    assert loaded.table.to_pylist() == custom.table.to_pylist()
    assert loaded.class_names == ("bread", "dog")
    assert isinstance(loaded.table, pa.Table)
