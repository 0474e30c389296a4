"""Per-layer-type maths of exact per-example gradient statistics, from captured inputs and output grads.

Every function here reduces over samples *inside* the function (``sq = sum_i w_i g_i**2``,
``first = sum_i w_i g_i``) so the (B, *param.shape) per-sample tensor exists only one chunk at a time.
Nothing here syncs with the host: shapes are known on the host, all data stays on the device.
"""

from __future__ import annotations

import torch
from torch import nn

from fisherdist.errors import FisherdistError


class Moments:
    """Running ``sq`` and (optionally) ``first`` of one parameter, flattened, in the statistics dtype."""

    def __init__(self, shape: tuple[int, ...], want_first: bool, like: torch.Tensor) -> None:
        self.shape = shape  # from activations: never read a (possibly sharded) parameter
        self.want_first = want_first
        self.sq: torch.Tensor | None = None  # allocated by the first chunk (saves a fill pass)
        self.first: torch.Tensor | None = None

    def add(self, per_sample: torch.Tensor, w: torch.Tensor) -> None:
        """Add a chunk ``(c, ...)`` of per-sample gradients weighted by ``w`` (c,); consumes ``per_sample``."""
        flat = per_sample.reshape(per_sample.shape[0], -1)
        if self.want_first:
            self.first = torch.mv(flat.t(), w) if self.first is None else self.first.addmv_(flat.t(), w)
        sq = flat.square_().t()
        self.sq = torch.mv(sq, w) if self.sq is None else self.sq.addmv_(sq, w)

    def result(self, scale: torch.Tensor | float) -> list[torch.Tensor]:
        assert self.sq is not None, "no chunk was added"
        out = [self.sq.mul_(scale * scale).view(self.shape)]
        if self.first is not None:
            out.append(self.first.mul_(scale).view(self.shape))
        return out


def _batch_first(t: torch.Tensor, w: torch.Tensor, what: str) -> torch.Tensor:
    """View ``t`` as (B, tokens, features); the first dim must be the sample dim."""
    if t.dim() < 2 or t.shape[0] != w.shape[0]:
        raise FisherdistError(
            f"per-sample statistics: {what} has shape {tuple(t.shape)}, expected the first dim to be the "
            f"{w.shape[0]} samples of the batch (set_batch weights)"
        )
    return t.reshape(t.shape[0], -1, t.shape[-1])


def linear_stats(
    x: torch.Tensor,
    gout: torch.Tensor,
    w: torch.Tensor,
    *,
    weight_target: bool,
    bias_target: bool,
    want_first: bool,
    want_grad_sum: bool,
    max_elements: int,
) -> tuple[dict[str, Moments], torch.Tensor | None]:
    """Per-sample ``G_i = gout_i^T a_i`` by one ``bmm`` per chunk of samples (tokens summed in the matmul).

    Returns the moments per attribute and, when ``want_grad_sum``, ``sum_i G_i`` (the ordinary weight
    gradient, so a fused caller need not run autograd's own weight-grad matmul).
    """
    dt = w.dtype
    a = _batch_first(x, w, "Linear input").to(dt)
    g = _batch_first(gout, w, "Linear output gradient").to(dt)
    b, out_f, in_f = a.shape[0], g.shape[-1], a.shape[-1]
    moments: dict[str, Moments] = {}
    if bias_target:
        moments["bias"] = Moments((out_f,), want_first, w)
        moments["bias"].add(g.sum(1), w)
    if not (weight_target or want_grad_sum):
        return moments, None
    if weight_target:
        moments["weight"] = Moments((out_f, in_f), want_first, w)
    grad_sum = None
    chunk = max(1, min(b, max_elements // max(1, out_f * in_f)))
    gt = g.transpose(1, 2)
    for s in range(0, b, chunk):
        per = torch.bmm(gt[s : s + chunk], a[s : s + chunk])
        if want_grad_sum:
            grad_sum = per.sum(0) if grad_sum is None else grad_sum.add_(per.sum(0))
        if weight_target:
            moments["weight"].add(per, w[s : s + chunk])
    return moments, grad_sum


def embedding_stats(
    module: nn.Embedding, ids: torch.Tensor, gout: torch.Tensor, w: torch.Tensor, *, want_first: bool
) -> Moments:
    """Per-sample sums over repeated tokens, without host syncs and without a (B, V, D) tensor.

    Keys ``i*V + v`` are sorted; a cumulative sum of key changes numbers the (sample, token) segments;
    ``index_add_`` sums each segment into a fixed-size (B*T, D) buffer (unused rows stay zero).
    """
    if module.scale_grad_by_freq or module.sparse:
        raise FisherdistError("per-sample statistics: nn.Embedding with scale_grad_by_freq or sparse is not supported")
    ids2 = ids.reshape(ids.shape[0], -1) if ids.dim() > 1 else ids.reshape(-1, 1)
    if ids2.shape[0] != w.shape[0]:
        raise FisherdistError(f"per-sample statistics: Embedding input has shape {tuple(ids.shape)}, expected {w.shape[0]} samples")
    vocab, dim = module.num_embeddings, module.embedding_dim
    n = ids2.numel()
    g = gout.reshape(n, dim).to(w.dtype)
    if module.padding_idx is not None:
        g = g * (ids2.reshape(-1) != module.padding_idx).unsqueeze(1).to(g.dtype)
    rows = torch.arange(ids2.shape[0], device=ids2.device).unsqueeze(1)
    keys = (rows * vocab + ids2).reshape(-1)
    sorted_keys, order = keys.sort()
    seg = torch.cat([sorted_keys.new_zeros(1), (sorted_keys[1:] != sorted_keys[:-1]).long()]).cumsum(0)
    sums = torch.zeros(n, dim, dtype=g.dtype, device=g.device).index_add_(0, seg, g[order])
    seg_key = torch.zeros(n, dtype=keys.dtype, device=keys.device).scatter_(0, seg, sorted_keys)
    token, sample = seg_key % vocab, seg_key // vocab
    coef = w[sample].unsqueeze(1)
    m = Moments((vocab, dim), want_first, w)
    zeros = torch.zeros(vocab, dim, dtype=w.dtype, device=w.device)
    m.sq = zeros.index_add_(0, token, coef * sums * sums).view(-1)
    if want_first:
        m.first = torch.zeros_like(zeros).index_add_(0, token, coef * sums).view(-1)
    return m


def is_rmsnorm(module: nn.Module) -> bool:
    """HF Llama-family RMSNorm (``weight`` + ``variance_epsilon``) or ``torch.nn.RMSNorm``."""
    hf = type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
    return hf or isinstance(module, nn.RMSNorm)


def rmsnorm_stats(module: nn.Module, x: torch.Tensor, gout: torch.Tensor, w: torch.Tensor, *, want_first: bool) -> Moments:
    """Per-sample ``sum_t gout * x_hat``; ``x_hat`` is recomputed with the module's own casts."""
    if isinstance(module, nn.RMSNorm):
        if len(module.normalized_shape) != 1:
            raise FisherdistError("per-sample statistics: nn.RMSNorm over more than one dim is not supported")
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:  # HF: normalise in float32, cast back to the input dtype before the weight multiply
        h = x.to(torch.float32)
        eps = float(vars(module)["variance_epsilon"])  # a plain float attribute of HF's RMSNorm
        hat = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    prod = _batch_first(gout, w, "RMSNorm output gradient").to(w.dtype) * _batch_first(hat, w, "RMSNorm input").to(w.dtype)
    m = Moments((prod.shape[-1],), want_first, w)
    m.add(prod.sum(1), w)
    return m
