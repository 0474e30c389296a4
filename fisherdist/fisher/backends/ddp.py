"""DDP: the squared local gradient rides in DDP's own bucket all-reduce (``register_comm_hook``).

DDP replicates gradients, but each rank keeps only its dim-0 row chunk of every statistic (the same
placement as FSDP2), so Fisher memory is 1/N like optimizer state under ZeRO-1.
"""


import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fisherdist.fisher.backends.base import Backend, StatSink
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.targets import param_shape


class DDPBackend(Backend):
    name = "ddp"
    fuses_local_grads = True

    def __init__(self, model: DistributedDataParallel, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(model, group or model.process_group)
        self._placement: Placement | None = None

    def placement(self, targets: dict[str, nn.Parameter]) -> Placement:
        self._placement = Placement.rows({f: param_shape(p) for f, p in targets.items()}, self.rank, self.world)
        return self._placement

    def install(self, sink: StatSink) -> None:
        by_id = {id(p): f for f, p in sink.targets.items()}
        placement = self._placement
        assert placement is not None, "placement() must run before install()"
        world, group = self.world, self.group

        def hook(_state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:  # DDP checks these annotations
            buffer = bucket.buffer()
            entries = []  # (fqn, stats) for targets in this bucket
            if sink.recording():
                for p, g in zip(bucket.parameters(), bucket.gradients()):
                    fqn = by_id.get(id(p))
                    if fqn is not None:
                        stats = sink.local_stats(fqn, g)
                        if stats is not None:
                            entries.append((fqn, stats))
            # Same collective as DDP's default hook: average of the gradients, plus the summed statistics.
            fused = torch.cat([buffer / world] + [t.reshape(-1).to(buffer.dtype) for _, s in entries for t in s])
            fut = dist.all_reduce(fused, group=group, async_op=True).get_future()

            def unpack(f: torch.futures.Future) -> torch.Tensor:
                out = f.value()[0]
                buffer.copy_(out[: buffer.numel()])
                pos = buffer.numel()
                for fqn, stats in entries:
                    start, numel = placement.ranges[fqn][placement.rank]
                    frags = []
                    for t in stats:
                        frags.append(out[pos + start : pos + start + numel])
                        pos += t.numel()
                    sink.deliver(fqn, frags)
                return buffer

            return fut.then(unpack)

        self.model.register_comm_hook(None, hook)

    def reduced_grad(self, fqn: str, param: nn.Parameter) -> torch.Tensor | None:
        if param.grad is None or self._placement is None:
            return None
        start, numel = self._placement.ranges[fqn][self.rank]
        return param.grad.reshape(-1)[start : start + numel]
