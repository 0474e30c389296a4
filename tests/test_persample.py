"""Per-example statistics against a float64 oracle: one ``autograd.grad`` per example."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fisherdist.errors import FisherdistError
from fisherdist.fisher.persample import PerSampleStats, find_targets
from fisherdist.fisher.targets import clean_fqn
from tests.fisher_oracle import model_dtype

VOCAB = 11


def nll_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each sample (-100 ignored)."""
    lg, lb = logits[:, :-1], labels[:, 1:]
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="none")
    tok = tok.view(lb.shape)
    return tok.sum(1) / (lb != -100).sum(1)


def oracle(model: nn.Module, fqns: list[str], loss_fn, w: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """sum_i w_i g_i^2 and sum_i w_i g_i with one backward per example, on a copy whose targets train."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    ps = [params[f].requires_grad_(True) for f in fqns]
    losses = loss_fn(model)
    out = {f: [torch.zeros_like(p), torch.zeros_like(p)] for f, p in zip(fqns, ps)}
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], ps, retain_graph=True, allow_unused=True)
        for f, g in zip(fqns, grads):
            if g is not None:
                out[f][0] += w[i] * g * g
                out[f][1] += w[i] * g
    return out


def collect(model, fqns, loss_fn, w, scale, **kw) -> dict[str, list[torch.Tensor]]:
    ps = PerSampleStats(find_targets(model, fqns), want_first=True, **kw)
    ps.set_batch(w, grad_scale=scale)
    ps.attach()
    (loss_fn(model).sum() / scale).backward()
    ps.detach()
    return ps.results


def assert_close(ours, ref, fqns, dtype=torch.float64, tol=1e-6) -> None:
    assert set(ours) == set(fqns)
    for f in fqns:
        for a, b in zip(ours[f], ref[f]):
            assert a.dtype == dtype and a.shape == b.shape
            err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
            assert err <= tol, (f, err)


class TinyNet(nn.Module):
    """Embedding (padding row) -> HF RMSNorm -> Linear+bias (3-D) -> torch RMSNorm -> head, plus a 2-D Linear."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.emb = nn.Embedding(VOCAB, 6, padding_idx=0)
        self.norm1 = LlamaRMSNorm(6)
        self.fc = nn.Linear(6, 8)
        self.norm2 = nn.RMSNorm(8)
        self.head = nn.Linear(8, VOCAB, bias=False)
        self.pooled = nn.Linear(8, VOCAB)  # sees (B, 8) inputs

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm2(torch.tanh(self.fc(self.norm1(self.emb(ids)))))
        return self.head(h) + self.pooled(h.mean(1)).unsqueeze(1)


def mlp_case():
    torch.manual_seed(0)
    net = TinyNet().double()
    for p in net.parameters():
        nn.init.normal_(p, std=0.7)
    ids = torch.randint(1, 5, (5, 7))  # small id range: many repeated tokens per sample
    ids[1, 4:] = 0  # padding
    labels = ids.clone()
    labels[1, 4:] = -100
    labels[3, :2] = -100
    return net, lambda m: nll_per_sample(m(ids), labels)


W5 = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)


@pytest.mark.parametrize("fused", [True, False])
def test_mlp_matches_oracle(fused: bool) -> None:
    net, loss_fn = mlp_case()
    fqns = [n for n, _ in net.named_parameters()]
    ref = oracle(net, fqns, loss_fn, W5)
    ours = collect(net, fqns, loss_fn, W5, 4.0, fused=fused, max_elements=20)  # forces chunks of 1-2 samples
    assert_close(ours, ref, fqns)


def llama_case(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=24, vocab_size=23, max_position_embeddings=32, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).double()
    for p in model.parameters():  # non-trivial norms and larger weights than the default init
        nn.init.normal_(p, mean=0.3 if p.dim() == 1 else 0.0, std=0.3)
    ids = torch.randint(0, 23, (4, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # prompt tokens
    return model, lambda m: nll_per_sample(m(input_ids=ids, attention_mask=mask).logits, labels)


W4 = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64)


def test_llama_all_params_on_ready_before_grad() -> None:
    model, loss_fn = llama_case()
    fqns = [n for n, _ in model.named_parameters()]
    ref = oracle(model, fqns, loss_fn, W4)
    params = dict(model.named_parameters())
    got, grad_seen = {}, {}

    def on_ready(fqn: str, stats: list[torch.Tensor]) -> None:
        got[fqn] = [s.clone() for s in stats]
        grad_seen[fqn] = params[fqn].grad is not None  # must run before the gradient is accumulated

    ps = PerSampleStats(find_targets(model, fqns), want_first=True, on_ready=on_ready, max_elements=64)
    ps.set_batch(W4, grad_scale=torch.tensor(3.0, dtype=torch.float64))
    ps.attach()
    (loss_fn(model).sum() / 3.0).backward()
    ps.detach()
    assert_close(got, ref, fqns)
    assert not any(grad_seen.values())
    assert not ps.results


@pytest.mark.parametrize("reentrant", [True, False])
def test_llama_gradient_checkpointing(reentrant: bool) -> None:
    model, loss_fn = llama_case()
    fqns = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.input_layernorm.weight", "model.embed_tokens.weight"]
    ref = oracle(model, fqns, loss_fn, W4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    for fused in (True, False):
        ps = PerSampleStats(find_targets(model, fqns), want_first=True, fused=fused)
        ps.set_batch(W4)
        ps.attach()
        for _ in range(2):  # a second pass must not trip the called-twice check after recomputes
            loss_fn(model).sum().backward()
        ps.detach()
        assert_close({f: [s / 2 for s in v] for f, v in ps.results.items()}, ref, fqns)


def test_lora_frozen_base_and_factors() -> None:
    from peft import LoraConfig, get_peft_model

    model, loss_fn = llama_case()
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.3)  # default B=0 would make the base-weight gradients trivial
    fqns = [n for n, _ in peft_model.named_parameters()
            if ("q_proj" in n or "v_proj" in n) and n.endswith("weight") and ("base_layer" in n or "lora_" in n)]
    assert len(fqns) == 12
    ref = oracle(peft_model, fqns, loss_fn, W4)
    for fused in (True, False):
        ours = collect(peft_model, fqns, loss_fn, W4, 2.0, fused=fused)
        assert_close(ours, ref, fqns)
    params = dict(peft_model.named_parameters())
    assert all(not params[f].requires_grad and params[f].grad is None for f in fqns if "base_layer" in f)


def test_detach_leaves_model_untouched() -> None:
    net, loss_fn = mlp_case()
    twin = copy.deepcopy(net)
    ps = PerSampleStats(find_targets(net, [n for n, _ in net.named_parameters()]))
    ps.set_batch(torch.ones(5, dtype=torch.float64))
    ps.attach()
    loss_fn(net).sum().backward()
    ps.detach()
    net.zero_grad(set_to_none=True)
    for m in (net, twin):
        out = loss_fn(m)
        out.sum().backward()
    assert torch.equal(loss_fn(net), loss_fn(twin))
    for (n, p), (_, q) in zip(net.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    assert all(not m._forward_hooks and "forward" not in vars(m) for m in net.modules())


def test_unsupported_and_tied_are_one_line_errors() -> None:
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.Linear(2, 2))
    with pytest.raises(FisherdistError, match=r"0\.weight.*Conv1d"):
        PerSampleStats(find_targets(model, ["0.weight"]))
    tied, _ = llama_case(tie=True)
    with pytest.raises(FisherdistError, match="tied"):
        find_targets(tied, ["model.embed_tokens.weight"])
    with pytest.raises(FisherdistError, match="not a parameter"):
        find_targets(model, ["1.nope"])


@pytest.mark.parametrize("fused", [True, False])
def test_module_called_twice_is_an_error(fused: bool) -> None:
    lin = nn.Linear(3, 3)
    ps = PerSampleStats(find_targets(lin, ["weight"]), fused=fused)
    ps.set_batch(torch.ones(2))
    ps.attach()
    lin(torch.randn(2, 3)).sum().backward()  # one call per backward is fine, repeatedly
    lin(torch.randn(2, 3)).sum().backward()
    with pytest.raises(FisherdistError, match="called twice"):
        lin(lin(torch.randn(2, 3)))
    ps.detach()


def _wrapped_worker(rank: int, world: int, kind: str) -> dict[str, float]:
    """Statistics of this rank's half of the batch under FSDP2 / DDP, and the reduced gradient."""
    model, _ = llama_case()
    ids = torch.randint(0, 23, (4, 9), generator=torch.Generator().manual_seed(5))
    full_loss = lambda m: nll_per_sample(m(input_ids=ids).logits, ids)  # noqa: E731
    rows = slice(2 * rank, 2 * rank + 2)
    local_loss = lambda m: nll_per_sample(m(input_ids=ids[rows]).logits, ids[rows])  # noqa: E731
    fqns = [n for n, _ in model.named_parameters()]
    w = W4[rows]
    ref = oracle(model, fqns, local_loss, w)
    mean_grad = {f: v[1] / world for f, v in oracle(model, fqns, full_loss, torch.ones(4, dtype=torch.float64)).items()}
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        layer_cls = type(model.model.layers[0])
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer_cls}), use_orig_params=True,
                                           device_id=torch.device("cpu"))
    elif kind == "zero3":
        from fisherdist.distributed.wrap_deepspeed import wrap_zero

        model.to(model_dtype(kind))  # the float64 oracle above; ZeRO-3 partitions float32
        wrapped = wrap_zero(3, model, None, micro_batch_size=2).module
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    targets = find_targets(model, fqns)  # after wrapping: FSDP1 names carry _fsdp_wrapped_module
    got = {}
    ps = PerSampleStats(targets, want_first=True, on_ready=lambda f, s: got.__setitem__(f, [t.clone() for t in s]))
    ps.set_batch(w, grad_scale=1.0)
    ps.attach()
    loss = local_loss(wrapped).sum()
    wrapped.backward(loss) if kind == "zero3" else loss.backward()
    ps.detach()
    dtype = model_dtype(kind)
    assert_close(got, ref, fqns, dtype, tol=1e-6 if dtype == torch.float64 else 1e-5)
    errs = {}
    with contextlib.ExitStack() as stack:
        if kind == "fsdp1":
            stack.enter_context(FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True))
        for f, p in model.named_parameters():  # FSDP1 wraps in place: names carry _fsdp_wrapped_module
            if kind == "zero3":
                from deepspeed.utils import safe_get_full_grad

                g = safe_get_full_grad(p)
            else:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            ref_g = mean_grad[clean_fqn(f)]
            errs[f] = ((g.double() - ref_g).abs().max() / ref_g.abs().max()).item()
    assert len(errs) == len(fqns)
    return {"errs": errs, "dtype": dtype}


KINDS = ["fsdp2", "fsdp1", "ddp", "zero3"]


def _wrapped_all(rank: int, world: int) -> dict[str, dict]:
    """Every wrapper in ONE launch (spawning is the slow part); a failed check is kept per wrapper."""
    out: dict[str, dict] = {}
    for kind in KINDS:
        try:
            out[kind] = _wrapped_worker(rank, world, kind)
        except AssertionError as err:
            out[kind] = {"error": str(err)}
    return out


@pytest.fixture(scope="module")
def wrapped_results() -> list[dict[str, dict]]:
    from tests.distributed import run_distributed

    return run_distributed(_wrapped_all, 2, timeout=300)


@pytest.mark.parametrize("kind", KINDS)
def test_wrapped_fsdp_ddp(wrapped_results: list[dict[str, dict]], kind: str) -> None:
    for per_kind in wrapped_results:
        result = per_kind[kind]
        assert "error" not in result, result.get("error")
        tol = 1e-6 if result["dtype"] == torch.float64 else 1e-5  # ZeRO-3 runs the float32 copy
        assert max(result["errs"].values()) <= tol, result  # the fused weight gradient survives the reduction


class _CustomLinear(nn.Linear):
    """A Linear subclass with its own forward (like bitsandbytes' Linear4bit): never swapped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.clone(), self.bias)  # clone stands in for dequantisation


def test_linear_subclass_uses_hook_path() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(_CustomLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    loss_fn = lambda m: m(x).pow(2).mean((1, 2))  # noqa: E731
    fqns = ["0.weight", "0.bias", "2.weight"]
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    ps = PerSampleStats(find_targets(net, fqns), want_first=True, fused=True)
    ps.set_batch(w)
    ps.attach()
    assert "forward" not in vars(net[0]) and "forward" in vars(net[2])
    loss_fn(net).sum().backward()
    ps.detach()
    assert_close(ps.results, oracle(net, fqns, loss_fn, w), fqns)
