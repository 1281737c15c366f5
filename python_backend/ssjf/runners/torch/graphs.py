"""The torch runner's decode step at fixed shapes, for CUDA graphs (`cuda_graphs`).

A decode step launches some 15 kernels per layer; on a GPU at small batches launching them
costs more than running them. With cuda_graphs each batch-size bucket's step is captured once
and replayed: the batch is padded to its bucket (the padding rows write into free slots, at
position 0, which a later prefill overwrites) and attention spans the whole cache, masked, so
that no shape depends on the step.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class GraphedDecode:
    """ModelRunner's decode at fixed shapes: one captured graph per batch-size bucket. It reads the
    runner's cache, tables and layer loop (`_forward`, `_attend_span`); `decode` replays it for slots 0..B-1."""

    def buckets(self) -> list[int]:
        """The padded batch sizes: powers of two up to the slot count, and the slot count."""
        sizes, n = [], 1
        while n < self.num_slots:
            sizes.append(n)
            n *= 2
        return sizes + [self.num_slots]

    def _decode_static(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """decode() for slots 0..B-1 with every shape fixed by B alone (what a graph captures):
        torch's attention over the whole cache, masked past each row's position."""
        attend = self._attend_span(self.slot_ids[: tok.shape[0]], pos, self.max_seq_len)
        return self.head(self._forward(self.embed(tok), attend)).float()

    def _static(self, size: int):
        """(token buffer, position buffer, run) for one bucket; run() fills the logits buffer. On
        CUDA run replays the captured graph; elsewhere (the tests) it runs the same step eagerly."""
        entry = self._graphs.get(size)
        if entry is None:
            tok = torch.zeros(size, dtype=torch.long, device=self.device)
            pos = torch.zeros(size, dtype=torch.long, device=self.device)
            if self.device.type == "cuda":
                # the warm-up runs for real: it writes K/V at position 0 of slots 0..size-1, which
                # running requests own, so those entries are put back after
                saved = self.k_cache[:, :size, :, 0].clone(), self.v_cache[:, :size, :, 0].clone()
                stream = torch.cuda.Stream(device=self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):  # warm-up off the capture: workspaces, lazy inits
                    for _ in range(2):
                        self._decode_static(tok, pos)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                self.k_cache[:, :size, :, 0], self.v_cache[:, :size, :, 0] = saved
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._graph_pool):
                    logits = self._decode_static(tok, pos)
                self._graph_pool = graph.pool()  # the buckets share one memory pool
                entry = (tok, pos, logits, graph.replay)
            else:
                box = [None]

                def run():
                    box[0] = self._decode_static(tok, pos)

                entry = (tok, pos, box, run)
            self._graphs[size] = entry
            log.info("model runner: decode for batch %d %s", size, "captured" if self.device.type == "cuda" else "ready")
        return entry

    def _replay(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        b = len(tokens)
        size = next(n for n in self.buckets() if n >= b)
        tok, pos, logits, run = self._static(size)
        tok.zero_()
        pos.zero_()
        tok[:b] = torch.tensor(tokens, dtype=torch.long)
        pos[:b] = torch.tensor(positions, dtype=torch.long)
        run()
        out = logits[0] if isinstance(logits, list) else logits
        return out[:b].clone()
