"""Evaluation metrics and the SUV memorisation protocol, each against an independent reference:
brute-force LCS / substring, hand-computed ROUGE-L, HF ``generate`` for batched decoding, per-text HF loss
for perplexity, an oracle generator with known per-window overlaps, and one process vs 2 gloo ranks."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from fisherdist.data.jsonl import read_records, special_prefix, split_decode, write_jsonl
from fisherdist.errors import FisherdistError
from fisherdist.eval.generation import HFGenerator
from fisherdist.eval.lcs import lcs_length, longest_common_prefix, longest_common_substring, rouge_l
from fisherdist.eval.memorization import MemorizationSettings, evaluate_memorization
from fisherdist.eval.report import write_report
from fisherdist.eval.suite import evaluate_model
from fisherdist.eval.utility import perplexity, refusal_rate, task_accuracy
from tests.distributed import run_distributed

WORDS = "the a old sea ship man wind rain night house light river stone dark long cold bird tree road hill " \
        "bell door fire snow salt wave moon star iron wolf king ash reed".split()
GARBAGE = "zzz"


# -- shared tiny world: a word-level tokenizer (BOS added) and a random float64 Llama ---------------
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(WORDS + [GARBAGE, "chapter"])],
                            trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]")


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).double().eval()


def random_passages(n_tokens=(52, 60, 44), books=("moby", "moby", "emma"), seed=0, extra=None):
    """``[(book, text)]`` of random words; ``extra`` maps (passage, word index) -> a word to plant."""
    rng = random.Random(seed)
    out = []
    for p, (n, book) in enumerate(zip(n_tokens, books)):
        words = [rng.choice(WORDS) for _ in range(n)]
        for (pp, i), w in (extra or {}).items():
            if pp == p:
                words[i] = w
        out.append((book, " ".join(words)))
    return out


class Oracle:
    """A generator that continues known windows with a planned overlap: ``plan[(p, s)] = k`` returns the
    first ``k`` true tokens then garbage (k = C: verbatim, 0: garbage only). Built by slicing the token
    lists itself, independently of ``make_windows``."""

    def __init__(self, tok, passages_ids, prefix, stride, cont, plan_fn):
        self.table, self.plan, self.garbage = {}, {}, tok.convert_tokens_to_ids(GARBAGE)
        lead = special_prefix(tok)
        for p, (_, ids) in enumerate(passages_ids):
            for s in range(0, len(ids) - prefix - cont + 1, stride):
                key = tuple(lead + ids[s : s + prefix])
                assert key not in self.table, "ambiguous prompt in the test text"
                k = plan_fn(p, s)
                self.plan[p, s] = k
                self.table[key] = ids[s + prefix : s + prefix + k] + [self.garbage] * (cont - k)

    def __call__(self, prompts, max_new_tokens, seeds=None):
        return [self.table[tuple(p)][:max_new_tokens] for p in prompts]


# -- metrics ------------------------------------------------------------------------------------------
def brute_lcs(a, b):
    def is_subseq(s, t):
        it = iter(t)
        return all(x in it for x in s)

    for r in range(len(a), 0, -1):
        if any(is_subseq(c, b) for c in itertools.combinations(a, r)):
            return r
    return 0


def brute_substring(a, b):
    best = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a) + 1):
            if any(list(a[i:j]) == list(b[k : k + j - i]) for k in range(len(b) - (j - i) + 1)):
                best = max(best, j - i)
    return best


def test_token_metrics_match_brute_force():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # textbook example
    assert longest_common_substring("xabcdy", "zabcdw") == 4
    assert longest_common_prefix([1, 2, 3, 9], [1, 2, 3, 4, 5]) == 3
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 8))]
        b = [rng.randrange(3) for _ in range(rng.randrange(0, 9))]
        assert lcs_length(a, b) == brute_lcs(a, b), (a, b)
        assert longest_common_substring(a, b) == brute_substring(a, b), (a, b)
        assert longest_common_prefix(a, b) == next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 words each side: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS 2, P = 2/2, R = 2/4 -> F = 2PR/(P+R) = 2/3
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    # Porter stemming: cats/cat and running/runs/run agree
    assert rouge_l("the cats running", "the cat runs") == pytest.approx(1.0)
    assert rouge_l("alpha beta", "") == 0.0


# -- generation ---------------------------------------------------------------------------------------
def test_batched_greedy_matches_hf_generate_and_sampling_is_seeded_per_row():
    model = tiny_model()
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 2 + 8, 3 + 8, 4, 5, 6, 7], [1, 4, 30]]
    ours = HFGenerator(model, pad_id=0, eos_id=2, batch_size=3)(prompts, 9)
    for p, o in zip(prompts, ours):
        ref = model.generate(torch.tensor([p]), max_new_tokens=9, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert o == (ref[: ref.index(2)] if 2 in ref else ref)
    assert any(len(o) == 9 for o in ours)  # not everything stops at EOS at once
    sampler = HFGenerator(model, temperature=1.0, batch_size=4)
    a = sampler(prompts, 6, [10, 11, 12, 13])
    assert a == sampler(prompts, 6, [10, 11, 12, 13])
    assert a[1:] == HFGenerator(model, temperature=1.0, batch_size=1)(prompts[1:], 6, [11, 12, 13])
    assert a != sampler(prompts, 6, [20, 21, 22, 23])


# -- memorisation with an oracle ----------------------------------------------------------------------
def _plan(p, s):
    return [16, 0, 13, 5, 12, 0][(p + s // 4) % 6]


def oracle_setup():
    tok = tiny_tokenizer()
    texts = random_passages()
    ids = [(b, tok(t, add_special_tokens=False)["input_ids"]) for b, t in texts]
    settings = MemorizationSettings(prefix_len=8, stride=4, continuation_len=16, thresholds=[4, 8, 12, 16], main_threshold=12)
    return tok, ids, settings, Oracle(tok, ids, 8, 4, 16, _plan)


def test_memorization_counts_match_oracle_plan():
    tok, ids, settings, oracle = oracle_setup()
    summary, scores = evaluate_memorization(ids, oracle, tok, settings)
    assert [(s.passage, s.start) for s in scores] == list(oracle.plan)
    for s in scores:
        k = oracle.plan[s.passage, s.start]
        assert (s.lcs, s.substring, s.prefix_match) == (k, k, k)
        assert s.rougeL == pytest.approx(k / 16)  # k true words + garbage: P = R = k / 16
    for book in ("moby", "emma", None):
        ks = [k for (p, _), k in oracle.plan.items() if book is None or ids[p][0] == book]
        stats = summary["overall"] if book is None else summary["books"][book]
        assert stats["windows"] == len(ks)
        assert stats["verbatim"] == sum(k >= 12 for k in ks)
        assert stats["over_threshold"] == {str(t): sum(k >= t for k in ks) for t in (4, 8, 12, 16)}
        assert stats["mean_lcs"] == pytest.approx(sum(ks) / len(ks))
        assert stats["max_lcs"] == max(ks)
        assert stats["mean_rougeL"] == pytest.approx(sum(ks) / 16 / len(ks))
    sampled = evaluate_memorization(ids, oracle, tok, settings.model_copy(update={"max_windows": 5}))[1]
    assert len(sampled) == 5 and set((s.passage, s.start) for s in sampled) <= set(oracle.plan)


def test_task_accuracy_with_oracle():
    tok = tiny_tokenizer()
    records = [{"prompt": f"the {w} ash", "response": f" {w} reed"} for w in WORDS[2:9]]
    lead = special_prefix(tok)
    right = {i for i in range(len(records)) if i % 3 != 1}

    def answer(prompts, n, seeds=None):
        out = []
        for p in prompts:
            i = next(j for j, r in enumerate(records) if lead + tok(r["prompt"], add_special_tokens=False)["input_ids"] == list(p))
            resp = tok(records[i]["response"], add_special_tokens=False)["input_ids"]
            out.append((resp if i in right else resp[::-1]) + [5] * (n - len(resp)))
        return out

    assert task_accuracy(answer, tok, records) == {"accuracy": len(right) / len(records), "correct": len(right), "total": len(records)}


def test_refusal_rate_with_oracle():
    """A reply refuses when it starts with the refusal's first 3 words, whatever follows (and only then)."""
    tok = tiny_tokenizer()
    prompts = [f"the {w} ash" for w in WORDS[2:10]]
    lead = special_prefix(tok)
    replies = {0: "old sea ship man", 1: "old sea ship", 3: "old sea wind", 4: "sea ship man", 6: "old sea ship bird tree"}

    def answer(ps, n, seeds=None):
        out = []
        for p in ps:
            i = next(j for j, q in enumerate(prompts) if lead + tok(q, add_special_tokens=False)["input_ids"] == list(p))
            out.append(tok(replies.get(i, "dark long"), add_special_tokens=False)["input_ids"][:n])
        return out

    refused = sum(replies.get(i, "").startswith("old sea ship") for i in range(len(prompts)))
    assert refused == 3
    assert refusal_rate(answer, tok, prompts, " old sea ship man", new_tokens=8) == {
        "rate": refused / len(prompts), "refused": refused, "total": len(prompts)}


def test_perplexity_matches_per_text_reference():
    tok, model = tiny_tokenizer(), tiny_model()
    texts = [t for _, t in random_passages((7, 30, 12, 19))]
    got = perplexity(model, tok, texts, max_length=24, batch_size=3)
    nll = cnt = 0.0
    for t in texts:
        ids = tok(t, truncation=True, max_length=24, return_tensors="pt")["input_ids"]
        n = ids.shape[1] - 1
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)  # float64 (HF's loss upcasts to fp32 only)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        cnt += n
    assert got["tokens"] == cnt
    assert got["perplexity"] == pytest.approx(math.exp(nll / cnt), rel=1e-10)


# -- distributed == single process ----------------------------------------------------------------
def full_eval():
    tok, model = tiny_tokenizer(), tiny_model()
    ids = [(b, tok(t, add_special_tokens=False)["input_ids"]) for b, t in random_passages()]
    settings = MemorizationSettings(prefix_len=8, stride=4, continuation_len=16, thresholds=[2, 4, 8], main_threshold=4, batch_size=3)
    heldout = [t for _, t in random_passages((9, 20, 15, 11, 8), seed=1, books="abcde")]
    task = [{"prompt": f"the {w}", "response": f"{w} sea"} for w in WORDS[:5]]
    metrics, scores = evaluate_model(model, tok, ids, settings, heldout=heldout, task=task)
    return metrics, [s.row() for s in scores]


def _dist_full_eval(rank, world):
    torch.set_num_threads(1)
    return full_eval()


def test_two_ranks_return_the_single_process_report():
    single = full_eval()
    ranks = run_distributed(_dist_full_eval, 2, timeout=120)
    for metrics, rows in ranks:
        assert rows == single[1]
        util, ref_util = metrics.pop("utility"), dict(single[0]["utility"])
        assert metrics == {k: v for k, v in single[0].items() if k != "utility"}
        assert util["task"] == ref_util["task"]
        assert util["perplexity"]["perplexity"] == pytest.approx(ref_util["perplexity"]["perplexity"], rel=1e-12)


# -- report and CLI --------------------------------------------------------------------------------
def test_report_json_png_and_deltas(tmp_path):
    tok, ids, settings, oracle = oracle_setup()
    before = {**evaluate_memorization(ids, oracle, tok, settings)[0], "utility": {"perplexity": {"perplexity": 9.0}}}
    forgetful = Oracle(tok, ids, 8, 4, 16, lambda p, s: 0)
    after = {**evaluate_memorization(ids, forgetful, tok, settings)[0], "utility": {"perplexity": {"perplexity": 9.5}}}
    json_path, png_path = write_report(tmp_path, before, after)
    doc = json.loads(json_path.read_text())
    assert set(doc) == {"before", "after", "delta"}
    assert set(doc["before"]) == {"settings", "overall", "books", "utility"} and set(doc["before"]["books"]) == {"moby", "emma"}
    assert doc["after"]["overall"]["verbatim"] == 0
    assert doc["delta"]["verbatim"] == -before["overall"]["verbatim"]
    assert doc["delta"]["perplexity"] == pytest.approx(0.5)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_end_to_end_and_bad_inputs(tmp_path, capsys):
    from fisherdist.cli import main

    tok, model = tiny_tokenizer(), tiny_model()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    books = write_jsonl(tmp_path / "books.jsonl", [{"book": b, "text": t} for b, t in random_passages()])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for _, t in random_passages(seed=2)])
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "eval" / "memorization_tiny.yaml")  # the shipped keys
    common = [f"model.path={tmp_path / 'm'}", "model.dtype=float64", f"data.books={books}", f"data.heldout={heldout}",
              "data.task=null", "memorization.prefix_len=8", "memorization.stride=8", "memorization.continuation_len=8",
              "memorization.thresholds=[2,4]", "memorization.main_threshold=4", f"out={tmp_path / 'out'}"]
    assert main(["eval", "memorization", cfg, *common, f"after.path={tmp_path / 'm'}", "after.dtype=float64"]) == 0
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["before"]["overall"] == doc["after"]["overall"] and doc["delta"]["verbatim"] == 0
    assert (tmp_path / "out" / "report.png").is_file() and (tmp_path / "out" / "windows_before.jsonl").is_file()
    # 2 ranks; "after" loaded sharded (each rank reads its rows, both run the one FSDP2 copy): same report
    sharded = [*common[:-1], f"out={tmp_path / 'out2'}", f"after.path={tmp_path / 'm'}", "after.dtype=float64",
               "after.load=sharded", "nproc=2"]
    assert main(["eval", "memorization", cfg, *sharded]) == 0
    doc2 = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert doc2["before"]["overall"] == doc2["after"]["overall"] == doc["before"]["overall"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"book": "x", "text": "the sea"}\n[1, 2]\n')
    capsys.readouterr()
    assert main(["eval", "memorization", cfg, *common, f"data.books={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fisherdist: error: {bad}:2: expected a JSON object, got list"
    assert main(["eval", "memorization", cfg, *common, f"data.books={tmp_path / 'missing.jsonl'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing.jsonl" in err and "data.books" in err


def test_threshold_outside_continuation_is_rejected():
    with pytest.raises(ValueError, match=r"LCS threshold 9 must lie in 1..continuation_len=8"):
        MemorizationSettings(continuation_len=8, thresholds=[4, 9], main_threshold=4)


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": 3}\n')
    with pytest.raises(FisherdistError, match=rf"^{p}:3: missing string field 'text' \(got int\)$"):
        read_records(p, ["text"])
    p.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(FisherdistError, match=rf"^{p}:2: not valid JSON"):
        read_records(p, ["text"])
    with pytest.raises(FisherdistError, match=r"nope.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl", ["text"])
    tok = tiny_tokenizer()
    prefix, cont = tok("the old sea", add_special_tokens=False)["input_ids"], tok("ship man", add_special_tokens=False)["input_ids"]
    prompt, verbatim = split_decode(tok, prefix, cont)
    assert prompt + verbatim == "the old sea ship man" and special_prefix(tok) == [tok.bos_token_id]
