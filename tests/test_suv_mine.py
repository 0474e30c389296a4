"""SUV stages 1-2: mining keeps exactly the windows a sequential SUV-style scan keeps (hits, no TOC prompts,
skip a window after a hit), and preference pairs never prefer the verbatim text."""

from __future__ import annotations

import json

import pytest
import torch

from fisherdist.data.jsonl import encode, write_jsonl
from fisherdist.eval.continuations import SamplingSource
from fisherdist.eval.generation import HFGenerator
from fisherdist.methods.suv.mine import MineSettings, mine, mine_file
from fisherdist.methods.suv.prefs import PrefsSettings, build_preferences, prefs_file
from tests.distributed import run_distributed
from tests.test_eval import Oracle, brute_lcs, random_passages, tiny_model, tiny_tokenizer

P, STRIDE, C = 8, 4, 16


def _plan(p, s):
    j = s // STRIDE + p
    return 16 if j % 5 in (0, 1, 2) else (13 if j % 7 == 3 else 3)


def mining_setup():
    tok = tiny_tokenizer()
    texts = random_passages(extra={(0, 20): "chapter", (2, 3): "chapter"})
    ids = [(b, encode(tok, t)) for b, t in texts]
    return tok, ids, Oracle(tok, ids, P, STRIDE, C, _plan)


def reference_scan(tok, ids, min_lcs):
    """SUV's sequential scan: after a kept hit jump one window (P tokens), else move one stride."""
    toc = tok.convert_tokens_to_ids("chapter")
    kept = []
    for p, (_, seq) in enumerate(ids):
        s = 0
        while s <= len(seq) - P - C:
            if _plan(p, s) >= min_lcs and toc not in seq[s : s + P]:
                kept.append((p, s))
                s += P
            else:
                s += STRIDE
    return kept


def test_mining_keeps_exactly_the_sequential_scan_rows():
    tok, ids, oracle = mining_setup()
    settings = MineSettings(prefix_len=P, stride=STRIDE, continuation_len=C, min_lcs=12, min_rougeL=0.95, max_rows_per_book=None)
    rows, summary = mine(ids, oracle, tok, settings)
    expected = reference_scan(tok, ids, 12)
    assert [(r["passage"], r["start"]) for r in rows] == expected
    assert summary["toc_dropped"] > 0 and summary["rows"] == len(expected)
    assert summary["hits"] - summary["toc_dropped"] > len(expected)  # de-duplication removed some hits
    for r in rows:
        seq = ids[r["passage"]][1]
        assert r["prompt"] == tok.decode(seq[r["start"] : r["start"] + P])
        assert r["prompt"] + r["verbatim"] == tok.decode(seq[r["start"] : r["start"] + P + C])
        assert "chapter" not in r["prompt"]
        k = _plan(r["passage"], r["start"])
        assert (r["lcs"], r["book"]) == (k, ids[r["passage"]][0]) and r["rougeL"] == pytest.approx(k / C)
    # ROUGE-L alone can make a hit: 13/16 >= 0.8 turns the LCS-13 windows into hits at min_lcs=14
    by_rouge = mine(ids, oracle, tok, settings.model_copy(update={"min_lcs": 14, "min_rougeL": 0.8}))[0]
    assert [(r["passage"], r["start"]) for r in by_rouge] == expected


def test_row_cap_keeps_highest_rouge_per_book():
    tok, ids, oracle = mining_setup()
    settings = MineSettings(prefix_len=P, stride=STRIDE, continuation_len=C, min_lcs=12, max_rows_per_book=None)
    full = mine(ids, oracle, tok, settings)[0]
    capped = mine(ids, oracle, tok, settings.model_copy(update={"max_rows_per_book": 2}))[0]
    for book in {r["book"] for r in full}:
        kept = [r for r in capped if r["book"] == book]
        dropped = [r for r in full if r["book"] == book and r not in kept]
        assert len(kept) == min(2, len(kept) + len(dropped))
        assert all(d["rougeL"] <= min(k["rougeL"] for k in kept) for d in dropped)
    assert capped == sorted(capped, key=lambda r: (r["passage"], r["start"]))


class Scripted:
    """A chosen source with fixed candidates per prompt; records which rows each try was asked about."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def propose(self, rows, attempt):
        self.calls.append((attempt, [r["prompt"] for r in rows]))
        return [self.script[r["prompt"]][attempt] if attempt < len(self.script[r["prompt"]]) else None for r in rows]


def test_preferences_accept_low_lcs_fall_back_flagged_and_never_prefer_verbatim():
    tok = tiny_tokenizer()
    verb = " old ship man wind rain night"
    mined = [{"prompt": p, "verbatim": verb, "book": "b"} for p in ("the sea", "a moon", "the star", "a wolf")]
    source = Scripted({
        "the sea": [verb, " old ship man wind king", " old bird tree road hill"],  # verbatim, LCS 4, LCS 1
        "a moon": [" old ship man reed", " old ship ash"],                       # LCS 3, LCS 2: both > 1
        "the star": [verb, verb, verb],                                            # only verbatim
        "a wolf": ["  ", None],                                                   # blank
    })
    prefs, summary = build_preferences(mined, source, tok, PrefsSettings(max_chosen_lcs=1, max_tries=4))
    assert summary == {"mined": 4, "pairs": 2, "flagged": 1, "dropped": 2}
    by_prompt = {p["prompt"]: p for p in prefs}
    assert by_prompt["the sea"]["chosen"] == " old bird tree road hill" and not by_prompt["the sea"]["flagged"]
    assert by_prompt["a moon"]["chosen"] == " old ship ash" and by_prompt["a moon"]["flagged"]
    for p in prefs:
        assert p["chosen"] != p["rejected"] == verb
        assert p["chosen_lcs"] == brute_lcs(encode(tok, p["chosen"]), encode(tok, verb))
    assert source.calls[2] == (2, ["the sea", "a moon", "the star", "a wolf"])
    assert source.calls[3] == (3, ["a moon", "the star", "a wolf"])  # "the sea" was settled at try 2


def test_self_sampling_source_is_seeded_and_batch_independent():
    tok, model = tiny_tokenizer(), tiny_model(seed=1)
    mined = [{"prompt": t[:40].rsplit(" ", 1)[0], "verbatim": " " + " ".join(t.split()[8:20]), "book": b}
             for b, t in random_passages((30, 30, 30, 30), books="abcd")]
    settings = PrefsSettings(max_new_tokens=12, max_chosen_lcs=2, max_tries=3, batch_size=3)
    prefs, summary = build_preferences(mined, SamplingSource.from_model(model, tok, settings), tok, settings)
    assert summary["pairs"] == len(mined)
    for p in prefs:
        assert p["chosen"] != p["rejected"] and p["chosen"].strip()
        assert p["chosen_lcs"] == brute_lcs(encode(tok, p["chosen"]), encode(tok, p["rejected"]))
        assert p["flagged"] == (p["chosen_lcs"] > 2)
    one_by_one = settings.model_copy(update={"batch_size": 1})
    assert build_preferences(mined, SamplingSource.from_model(model, tok, one_by_one), tok, one_by_one)[0] == prefs


def test_prefs_from_user_jsonl_and_files(tmp_path):
    tok = tiny_tokenizer()
    mined = write_jsonl(tmp_path / "mined.jsonl", [{"prompt": "the sea", "verbatim": " old ship man", "book": "b", "lcs": 3},
                                                   {"prompt": "a moon", "verbatim": " cold snow", "book": "c", "lcs": 2}])
    conts = write_jsonl(tmp_path / "conts.jsonl", [{"prompt": "the sea", "continuation": " old ship man"},
                                                   {"prompt": "the sea", "continuation": " dark river"}])
    settings = PrefsSettings(source="jsonl", jsonl_path=str(conts), max_chosen_lcs=0)
    prefs, summary = prefs_file(mined, tmp_path / "prefs.jsonl", None, tok, settings)
    assert prefs == [{"prompt": "the sea", "chosen": " dark river", "rejected": " old ship man", "book": "b",
                      "chosen_lcs": 0, "flagged": False}]
    assert summary["dropped"] == 1  # "a moon" has no user continuation
    assert [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()] == prefs
    with pytest.raises(ValueError, match="source=model needs model_path"):
        PrefsSettings(source="model")


def hf_mining():
    tok, model = tiny_tokenizer(), tiny_model(seed=2)
    ids = [(b, encode(tok, t)) for b, t in random_passages()]
    settings = MineSettings(prefix_len=P, stride=STRIDE, continuation_len=C, min_lcs=2, batch_size=5)
    return mine(ids, HFGenerator.for_tokenizer(model, tok, batch_size=5), tok, settings)


def _dist_mining(rank, world):
    torch.set_num_threads(1)
    return hf_mining()


def test_mine_file_and_two_ranks_match_one_process(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model(seed=2)
    books = write_jsonl(tmp_path / "books.jsonl", [{"book": b, "text": t} for b, t in random_passages()])
    settings = MineSettings(prefix_len=P, stride=STRIDE, continuation_len=C, min_lcs=2, batch_size=5)
    rows, summary = mine_file(model, tok, books, tmp_path / "mined.jsonl", settings)
    assert rows and (rows, summary) == hf_mining()
    assert [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()] == rows
    for got in run_distributed(_dist_mining, 2, timeout=120):
        assert got == (rows, summary)
