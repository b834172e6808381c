from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from slim_ray.config import DataConfig
from slim_ray.datasets import load_raw
from slim_ray.errors import DataError
from slim_ray.prepare import filter_interactions, prepare_dataset, run_prepare
from slim_ray.storage import load_prepared

FORMATS = ["recbole", "amazon2014", "amazon2018", "amazon2023"]


def _cfg(fmt: str, files: tuple[Path, Path], **kw) -> DataConfig:
    return DataConfig(format=fmt, interactions=files[0], items=files[1], **kw)


@pytest.fixture
def files_for(request, recbole_files, amazon2014_files, amazon2018_files, amazon2023_files):
    return {"recbole": recbole_files, "amazon2014": amazon2014_files,
            "amazon2018": amazon2018_files, "amazon2023": amazon2023_files}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_sequences(fmt, files_for, tmp_path):
    stats = run_prepare(_cfg(fmt, files_for[fmt]), tmp_path / "out")
    items, seqs, saved = load_prepared(tmp_path / "out")
    assert saved == json.loads(json.dumps(stats))
    assert stats["before_filtering"] == {"users": 4, "items": 6, "interactions": 13,
                                         "density": pytest.approx(13 / 24)}
    assert stats["after_filtering"]["users"] == 3 and stats["after_filtering"]["items"] == 5
    assert items["item_id"].tolist() == [1, 2, 3, 4, 5]
    assert items["raw_id"].tolist() == ["i1", "i2", "i3", "i4", "i5"]
    by_user = seqs.set_index("raw_user_id")
    # u1 has i2 and i3 at the same timestamp: file order is kept.
    assert by_user.loc["u1", "item_ids"].tolist() == [1, 2, 3, 4]
    assert by_user.loc["u2", "item_ids"].tolist() == [2, 1, 3, 5]
    assert by_user.loc["u3", "item_ids"].tolist() == [4, 1, 2]
    assert by_user.loc["u1", "timestamps"].tolist() == [100, 200, 200, 400]
    alpha = items.set_index("raw_id").loc["i1"]
    assert alpha["title"] == "Alpha"
    assert "Action" in list(alpha["categories"]) and "Drama" in list(alpha["categories"])
    assert "Alpha" in alpha["text"] and "Drama" in alpha["text"]
    if fmt != "recbole":
        assert alpha["brand"] == "Acme" and "Brand: Acme" in alpha["text"]
        assert "Toys" in list(alpha["categories"])


def test_leave_one_out_split_and_max_len(recbole_files, tmp_path):
    run_prepare(_cfg("recbole", recbole_files, max_len=2), tmp_path / "out")
    _, seqs, _ = load_prepared(tmp_path / "out")
    u1 = seqs.set_index("raw_user_id").loc["u1"]
    assert u1["train_item_ids"].tolist() == [1, 2]
    assert (u1["valid_history"].tolist(), u1["valid_target"]) == ([1, 2], 3)
    assert (u1["test_history"].tolist(), u1["test_target"]) == ([2, 3], 4)  # last max_len=2 only
    u3 = seqs.set_index("raw_user_id").loc["u3"]
    assert (u3["valid_history"].tolist(), u3["valid_target"]) == ([4], 1)
    assert (u3["test_history"].tolist(), u3["test_target"]) == ([4, 1], 2)
    assert seqs["user_id"].tolist() == [1, 2, 3]


def test_movies_text_uses_genres_and_year(recbole_files):
    items, _, stats = prepare_dataset(load_raw(_cfg("recbole", recbole_files)), DataConfig())
    assert stats["domain"] == "movies"
    assert items.loc[0, "text"] == "Alpha (1999). Genres: Action, Drama."


def test_kcore_is_iterative():
    rows = [("A", "x"), ("A", "y"), ("A", "z"), ("A", "q"), ("B", "x"), ("B", "y"), ("B", "z"),
            ("C", "x"), ("C", "y"), ("C", "w"), ("D", "w"), ("D", "v")]
    inter = pd.DataFrame([(u, i, 1.0, n) for n, (u, i) in enumerate(rows)],
                         columns=["user", "item", "rating", "timestamp"])
    kept = filter_interactions(inter, None, kcore=2, min_seq_len=3)
    # One pass would keep C (x, y, w); removing D then w then C needs three rounds.
    assert sorted(set(kept["user"])) == ["A", "B"]
    assert sorted(set(kept["item"])) == ["x", "y", "z"]


def test_rating_threshold(recbole_files):
    cfg = _cfg("recbole", recbole_files, rating_threshold=4)
    _, seqs, stats = prepare_dataset(load_raw(cfg), cfg)
    # ratings >= 4 leave u1 with 3 items (i1, i2, i4) and u3 with 3; u2 keeps 2 and is dropped.
    assert stats["after_filtering"]["users"] == 2
    assert stats["after_filtering"]["interactions"] == 6


def test_packaged_ml100k(tmp_path):
    stats = run_prepare(DataConfig(), tmp_path / "ml")
    assert stats["before_filtering"]["users"] == 943
    assert stats["before_filtering"]["items"] == 1682
    assert stats["before_filtering"]["interactions"] == 100_000
    assert stats["after_filtering"]["interactions"] == 100_000  # every ML-100k user has >= 20
    items, seqs, _ = load_prepared(tmp_path / "ml")
    assert len(items) == 1682 and len(seqs) == 943
    assert items.set_index("raw_id").loc["1", "title"] == "Toy Story"
    assert seqs["test_history"].map(len).max() == 50
    assert (seqs["item_ids"].map(len) == seqs["train_item_ids"].map(len) + 2).all()


# ------------------------------------------------------------------ bad input


def test_missing_file_names_the_field(tmp_path):
    with pytest.raises(DataError, match=r"data.interactions: file not found: .*nope.inter"):
        load_raw(DataConfig(interactions=tmp_path / "nope.inter", items=tmp_path / "nope.item"))


def test_missing_column_names_file_and_field(recbole_files):
    inter, item = recbole_files
    inter.write_text("user_id:token\titem_id:token\trating:float\nu1\ti1\t5\n")
    with pytest.raises(DataError, match=r"toy.inter: missing field 'timestamp'"):
        load_raw(_cfg("recbole", (inter, item)))


def test_unparseable_lines_name_file_and_line(recbole_files, amazon2018_files, amazon2014_files):
    inter, item = recbole_files
    inter.write_text(inter.read_text() + "u9\ti1\t5\n")  # a field short
    with pytest.raises(DataError, match=r"toy.inter:15: expected 4 tab-separated fields"):
        load_raw(_cfg("recbole", (inter, item)))
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\tyesterday\n")
    with pytest.raises(DataError, match=r"field 'timestamp' is not numeric on data row 1"):
        load_raw(_cfg("recbole", (inter, item)))
    reviews, meta = amazon2018_files
    bad = reviews.with_name("broken.json")
    bad.write_text('{"reviewerID": "a", "asin": "b", "overall": 5, "unixReviewTime": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"broken.json:2: not valid JSON"):
        load_raw(_cfg("amazon2018", (bad, meta)))
    bad.write_text('{"reviewerID": "a", "overall": 5, "unixReviewTime": 1}\n')
    with pytest.raises(DataError, match=r"broken.json:1: missing field 'asin'"):
        load_raw(_cfg("amazon2018", (bad, meta)))
    bad_meta = meta.with_name("meta_broken.json")
    bad_meta.write_text("{'asin': 'i1', 'title': \n")
    with pytest.raises(DataError, match=r"meta_broken.json:1: neither JSON nor a Python dict literal"):
        load_raw(_cfg("amazon2014", (amazon2014_files[0], bad_meta)))


def test_empty_after_filtering_writes_nothing(recbole_files, tmp_path):
    out = tmp_path / "out"
    run_prepare(_cfg("recbole", recbole_files), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=r"no interactions left after filtering .*data.kcore=3"):
        run_prepare(_cfg("recbole", recbole_files, kcore=3), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old output intact
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".out.v-")) == ["out", "toy.inter", "toy.item"]
    assert len(list(tmp_path.glob(".out.v-*"))) == 1  # the published version only: no half-written one left


def test_rating_threshold_without_ratings_is_an_error(recbole_files):
    inter, item = recbole_files
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\n")
    with pytest.raises(DataError, match="no rating field"):
        cfg = _cfg("recbole", (inter, item), rating_threshold=3)
        prepare_dataset(load_raw(cfg), cfg)


def test_atomic_folder_swap_never_shows_readers_a_missing_or_partial_folder(tmp_path):
    """write_atomic_dir flips a symlink: a reader polling during 100 publishes always finds the folder
    with complete files (two renames had a window with no folder); a failed write leaves the last
    version; old versions are cleaned up; a plain folder from before becomes the previous version."""
    import threading

    from slim_ray.storage import write_atomic_dir

    target = tmp_path / "model"
    target.mkdir()  # a folder written before symlinks
    (target / "a.txt").write_text("x")
    write_atomic_dir(target, lambda folder: (folder / "a.txt").write_text("0" * 1000))  # migrates it
    assert target.is_symlink() and len(list(tmp_path.glob(".model.v-*"))) == 2  # new + the old folder
    errors, done = [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                text = (target / "a.txt").read_text()
                if len(text) != 1000 or len(set(text)) != 1:
                    errors.append(f"partial: {text[:10]}...")
            except OSError as error:
                errors.append(repr(error))

    thread = threading.Thread(target=reader)
    thread.start()
    for version in range(1, 101):
        write_atomic_dir(target, lambda folder: (folder / "a.txt").write_text(str(version % 10) * 1000))
    done.set()
    thread.join()
    assert errors == [] and (target / "a.txt").read_text() == "0" * 1000 and target.is_symlink()

    def crash(folder):
        (folder / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic_dir(target, crash)
    assert (target / "a.txt").read_text() == "0" * 1000
    assert len(list(tmp_path.glob(".model.v-*"))) == 2  # the current version and the one before it
