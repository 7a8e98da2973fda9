"""What rank 0 sends the other ranks each step: the tensors ModelRunner.prepare built, plus the
rows to compute logits for and the copy-on-write block copies. Nothing about requests.

They travel as one flat int64 tensor (one broadcast) described by a small header (shapes and
dtypes, sent over each rank's pipe), so the metadata can gain fields without a protocol change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from worker.engine.models.llama import AttentionMetadata

Header = tuple[tuple[tuple[str, str, tuple[int, ...]], ...], dict]


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor         # [num_tokens] int64
    positions: torch.Tensor         # [num_tokens] int64
    meta: AttentionMetadata
    logit_rows: torch.Tensor        # [num_rows] int64: the tokens whose logits are sampled from
    block_copies: torch.Tensor      # [num_copies, 2] int64: (src, dst) before the forward

    def _named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        named = [("input_ids", self.input_ids), ("positions", self.positions), ("logit_rows", self.logit_rows),
                 ("block_copies", self.block_copies)]
        for f in fields(self.meta):
            value = getattr(self.meta, f.name)
            if isinstance(value, torch.Tensor):
                named.append(("meta." + f.name, value))
        return named

    def pack(self) -> tuple[Header, torch.Tensor]:
        named = self._named_tensors()
        for name, t in named:
            if t.is_floating_point() or t.is_complex():
                raise TypeError(f"step input {name} is {t.dtype}: only integer tensors travel as int64")
        specs = tuple((name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in named)
        extras = {f.name: getattr(self.meta, f.name) for f in fields(self.meta)
                  if not isinstance(getattr(self.meta, f.name), torch.Tensor)}
        payload = torch.cat([t.reshape(-1).to(torch.int64) for _, t in named])
        return (specs, extras), payload

    @classmethod
    def receive(cls, header: Header, device: torch.device) -> "StepInputs":
        """Other ranks: the payload rank 0 broadcasts after sending them `header`."""
        specs, extras = header
        payload = torch.empty(sum(math.prod(shape) for _, _, shape in specs), dtype=torch.int64, device=device)
        if payload.numel():
            dist.broadcast(payload, src=0)
        return cls.unpack(header, payload)

    @classmethod
    def unpack(cls, header: Header, payload: torch.Tensor) -> "StepInputs":
        specs, extras = header
        values, meta_values, offset = {}, dict(extras), 0
        for name, dtype, shape in specs:
            n = math.prod(shape)
            t = payload[offset:offset + n].reshape(shape).to(getattr(torch, dtype))
            offset += n
            if name.startswith("meta."):
                meta_values[name[5:]] = t
            else:
                values[name] = t
        return cls(meta=AttentionMetadata(**meta_values), **values)
