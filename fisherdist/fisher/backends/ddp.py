"""DDP: the squared local gradient rides in DDP's own bucket all-reduce (``register_comm_hook``).

DDP replicates gradients, but each rank keeps only its dim-0 row chunk of every statistic (the same
placement as FSDP2), so Fisher memory is 1/N like optimizer state under ZeRO-1. DDP takes one comm hook per
model, ever: the first accumulator installs a dispatcher that serves every accumulator registered on the
model (a ``SinkSet``); with none left it is DDP's default average.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch._C._distributed_c10d import GradBucket  # dist.GradBucket, where its stub declares it
from torch.futures import Future
from torch.nn.parallel import DistributedDataParallel

from fisherdist.fisher.backends.base import Backend, StatSink
from fisherdist.fisher.backends.fused import SinkSet, split_by_dtype
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.targets import param_shape

_SINKS = "_fisherdist_sinks"  # the SinkSet attribute on the DistributedDataParallel module


def _bucket_stats(sinks: SinkSet, bucket: GradBucket) -> list[tuple[StatSink, str, list[torch.Tensor]]]:
    entries = []
    for sink in sinks.recording():
        by_id = {id(p): f for f, p in sink.targets.items()}
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            fqn = by_id.get(id(p))
            stats = sink.local_stats(fqn, g) if fqn is not None else None
            if fqn is not None and stats is not None:
                entries.append((sink, fqn, stats))
    return entries


def _dispatch(sinks: SinkSet, group: dist.ProcessGroup | None, world: int, bucket: GradBucket) -> Future[torch.Tensor]:
    """DDP's average of the bucket, plus the summed statistics: those in the gradient's dtype in the same
    all-reduce, the others in one more all-reduce per dtype (never cast)."""
    buffer = bucket.buffer()
    entries = _bucket_stats(sinks, bucket)
    flats = [t.reshape(-1) for _, _, stats in entries for t in stats]
    groups = list(split_by_dtype(flats, buffer.dtype).items())  # the gradient's dtype first
    sends = [torch.cat([buffer / world] + [flats[i] for i in groups[0][1]])]
    sends += [torch.cat([flats[i] for i in idx]) for _, idx in groups[1:]]
    works = [dist.all_reduce(s, group=group, async_op=True) for s in sends[1:]]
    fut = dist.all_reduce(sends[0], group=group, async_op=True).get_future()

    def unpack(_f: Future[list[torch.Tensor]]) -> torch.Tensor:
        for w in works:
            w.wait()
        buffer.copy_(sends[0][: buffer.numel()])
        outs: list[torch.Tensor] = [torch.empty(0)] * len(flats)
        for k, (_, idx) in enumerate(groups):
            pos = buffer.numel() if k == 0 else 0
            for i in idx:
                outs[i] = sends[k][pos : pos + flats[i].numel()]
                pos += flats[i].numel()
        k = 0
        for sink, fqn, stats in entries:
            start, numel = sink.placement.ranges[fqn][sink.placement.rank]
            sink.deliver(fqn, [o[start : start + numel] for o in outs[k : k + len(stats)]])
            k += len(stats)
        return buffer

    done: Future[torch.Tensor] = fut.then(unpack)
    return done


class DDPBackend(Backend):
    name = "ddp"
    fuses_local_grads = True

    def __init__(self, model: DistributedDataParallel, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(model, group or model.process_group)
        self.ddp = model

    def placement(self, targets: dict[str, nn.Parameter]) -> Placement:
        return Placement.rows({f: param_shape(p) for f, p in targets.items()}, self.rank, self.world)

    def install(self, sink: StatSink) -> None:
        sinks = getattr(self.model, _SINKS, None)
        if not isinstance(sinks, SinkSet):
            sinks = SinkSet()
            setattr(self.model, _SINKS, sinks)
            world, group = self.world, self.group

            def hook(_state: object, bucket: GradBucket) -> Future[torch.Tensor]:  # DDP checks these annotations
                return _dispatch(sinks, group, world, bucket)

            self.ddp.register_comm_hook(None, hook)
        sinks.add(sink)

    def remove(self, sink: StatSink) -> None:
        sinks = getattr(self.model, _SINKS, None)
        if isinstance(sinks, SinkSet):
            sinks.discard(sink)  # the dispatcher stays: DDP cannot take its comm hook back

    def reduced_grad(self, fqn: str, param: nn.Parameter) -> torch.Tensor | None:
        if param.grad is None:
            return None
        start, numel = Placement.rows({fqn: param_shape(param)}, self.rank, self.world).ranges[fqn][self.rank]
        return param.grad.reshape(-1)[start : start + numel]
