"""Hugging Face ``datasets`` inputs give the same samples as the JSONL path: Parquet, CSV, Arrow and
``save_to_disk`` directories, column renames, and streaming with the same record-to-rank rule, top-up and
resume position; bad references fail with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fisherdist.data.batches import data_batches, load_texts
from fisherdist.data.jsonl import read_records
from fisherdist.errors import FisherdistError
from tests.tiny_hf import texts, write_jsonl


class WordTokenizer:
    """Independent of the code under test: one id per word, BOS first, truncation as HF does."""

    pad_token_id = 0

    def __call__(self, text: str, truncation: bool = True, max_length: int = 10**9) -> dict[str, list[int]]:
        ids = [1] + [2 + sum(map(ord, w)) % 97 for w in text.split()]
        return {"input_ids": ids[:max_length] if truncation else ids}


ROWS = texts(11)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import datasets

    root = tmp_path_factory.mktemp("data")
    ds = datasets.Dataset.from_dict({"content": ROWS, "n": list(range(len(ROWS)))})
    ds.to_parquet(str(root / "d.parquet"))
    ds.select([]).to_parquet(str(root / "empty.parquet"))
    ds.to_csv(str(root / "d.csv"), index=False)
    ds.save_to_disk(str(root / "arrow"))
    datasets.DatasetDict({"train": ds.select(range(3)), "validation": ds}).save_to_disk(str(root / "dict"))
    (root / "repo").mkdir()
    ds.to_parquet(str(root / "repo" / "train.parquet"))
    (root / "d.json").write_text(json.dumps([{"content": r} for r in ROWS]))
    return {"jsonl": str(write_jsonl(root / "d.jsonl", ROWS)), "parquet": f"{root}/d.parquet?text=content",
            "csv": f"{root}/d.csv?text=content", "arrow": f"{root}/arrow?text=content",
            "dict": f"{root}/dict?split=validation&text=content", "repo": f"{root}/repo?text=content",
            "json": f"{root}/d.json?text=content", "root": str(root)}


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow", "dict", "repo", "json"])
def test_every_source_reads_the_jsonl_records(sources, kind):
    assert [r["text"] for r in read_records(sources[kind], ["text"])] == ROWS
    assert load_texts(sources[kind], "text", num_samples=4) == ROWS[:4]


def _flat(batches) -> list[dict[str, list]]:  # type: ignore[no-untyped-def]
    return [{k: v.tolist() for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("world,skip", [(1, 0), (2, 3), (3, 1)])
@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_streaming_batches_equal_the_jsonl_path(sources, kind, world, skip):
    tok = WordTokenizer()
    for rank in range(world):
        want, n = data_batches(sources["jsonl"], "text", tok, 6, 2, rank, world, skip=skip, num_samples=10)
        got, unknown = data_batches(sources[kind] + "&streaming=true", "text", tok, 6, 2, rank, world, skip=skip,
                                    num_samples=10)
        assert unknown is None and n == len(want) > 0
        assert _flat(got) == _flat(want)
    last = want[-1]  # 10 - skip records never fill the last step evenly here: it is topped up, marked invalid
    assert torch.is_tensor(last["valid"])


def test_streaming_top_up_is_the_first_record_and_invalid(sources):
    tok = WordTokenizer()
    got = list(data_batches(sources["parquet"] + "&streaming=true", "text", tok, 6, 4, 2, 3)[0])
    assert len(got) == 1 and got[0]["valid"].tolist() == [True, True, True, False]  # records 8..10, then a copy
    first = tok(ROWS[0], max_length=6)["input_ids"]
    assert got[0]["input_ids"][3, : len(first)].tolist() == first


@pytest.mark.parametrize("suffix,message", [
    ("dict?split=test&text=content", "no split 'test' (available: train, validation)"),
    ("d.parquet?text=body", "no column 'body' for field 'text' (columns: content, n)"),
    ("d.parquet", "no column 'text' for field 'text' (columns: content, n)"),
    ("absent.parquet", "absent.parquet: file not found"),
    ("empty.parquet?text=content", "no records (split train is empty)"),
    ("d.parquet?streaming=maybe", "streaming='maybe'; expected true or false"),
])
def test_bad_references_fail_in_one_line(sources, suffix, message):
    with pytest.raises(FisherdistError) as err:
        read_records(f"{sources['root']}/{suffix}", ["text"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_jsonl_keeps_its_line_errors(tmp_path: Path):
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(FisherdistError, match=r"b.jsonl:2: missing string field 'text' \(got int\)"):
        read_records(bad, ["text"])
    with pytest.raises(FisherdistError, match=r"nope.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl", ["text"])


def test_config_accepts_dataset_directories_and_ids(sources):
    from fisherdist.config import DataConfig

    assert DataConfig(path=sources["arrow"]).path == sources["arrow"]
    assert DataConfig(path="someorg/corpus?split=train").path == "someorg/corpus?split=train"  # read later
    with pytest.raises(ValueError, match="no data file at"):
        DataConfig(path=sources["root"] + "/absent.parquet")


@pytest.mark.parametrize("world", [2, 3])
def test_config_keys_fold_into_the_references(sources, world):
    """data.split / data.streaming / data.columns as YAML keys read what the same keys in the reference read:
    the JSONL path's batches on every rank, the uneven last step topped up; a reference's own key wins."""
    from fisherdist.config import DataConfig

    root, tok = sources["root"], WordTokenizer()
    cfg = DataConfig(path=f"{root}/dict", split="validation", streaming=True, columns={"text": "content"})
    assert cfg.path == f"{root}/dict?split=validation&streaming=true&text=content"
    last_valid = 0
    for rank in range(world):
        want, _ = data_batches(sources["jsonl"], "text", tok, 6, 2, rank, world, skip=1)
        got, n = data_batches(cfg.path, "text", tok, 6, 2, rank, world, skip=1)
        assert n is None and _flat(got) == _flat(want)
        last_valid += int(want[-1]["valid"].sum())
    assert last_valid == 10 % (2 * world)  # 10 records after the skip never fill the last step on 2 or 3 ranks
    own = DataConfig(path=f"{root}/dict?split=train", split="validation", columns={"text": "content"})
    assert [r["text"] for r in read_records(own.path, ["text"])] == ROWS[:3]
    assert DataConfig(path=sources["jsonl"]).path == sources["jsonl"]  # no keys: the JSONL reader, unchanged


@pytest.mark.parametrize("keys,message", [
    ({"split": "test", "columns": {"text": "content"}}, "no split 'test' (available: train, validation)"),
    ({"columns": {"text": "body"}}, "no column 'body' for field 'text' (columns: content, n)"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_config_key_errors_are_one_line(sources, keys, message, streaming):
    from fisherdist.config import DataConfig

    cfg = DataConfig(path=f"{sources['root']}/dict", streaming=streaming, **keys)
    with pytest.raises(FisherdistError) as err:
        read_records(cfg.path, ["text"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_empty_stream_fails_in_one_line(sources):
    from fisherdist.config import DataConfig

    cfg = DataConfig(path=f"{sources['root']}/empty.parquet", streaming=True, columns={"text": "content"})
    with pytest.raises(FisherdistError) as err:
        list(data_batches(cfg.path, "text", WordTokenizer(), 6, 2, 0, 1)[0])
    assert "no records (split train is empty)" in str(err.value) and "\n" not in str(err.value)
