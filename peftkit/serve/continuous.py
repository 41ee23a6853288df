"""The continuous (iteration-level) scheduler: rows join and leave the running batch at every step.

Orca (Yu et al., OSDI 2022) schedules per decoding step instead of per request batch; vLLM,
LoRAX and SGLang do the same, and S-LoRA / Punica add a different adapter per row. Here::

    loop:
        admit   queued jobs while the running set has rows (max_batch) and tokens
                (max_running_tokens: prompt + max_tokens reserved per row) to spare
        prefill the admitted jobs together (left-padded, adapter_names per row) -> their
                first token and a cache of their own, which joins the running cache
        decode  one forward of every running row: its last token, its own position, its own
                adapter (kvcache.RowCache holds the left-padded batched cache and mask)
        leave   rows that finished (EOS, stop string, max_tokens, cancelled) leave the cache now

The model lock is taken per step, so adapters load and unload between two steps (the engine's
admin gate makes the worker wait for them); a running row whose adapter went away fails alone.
An exception in a prefill fails only the jobs being admitted; one in a decode step fails the
running rows, and the worker carries on with an empty batch.

Greedy rows equal one-request-at-a-time ``generate`` (tests/test_serve_continuous.py): the same
positions, the same masked keys, only padding columns that the mask zeroes.
"""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Optional

import torch

from ..core.site import BASE, adapter_routing
from . import kvcache
from .rows import advance, pick

if TYPE_CHECKING:
    from .engine import Engine, Job


class _Row:
    """A running job with what the scheduler tracks for it."""

    __slots__ = ("job", "epoch", "last", "pos", "since")

    def __init__(self, job: "Job", epoch: int, last: int, pos: int):
        self.job, self.epoch, self.last, self.pos, self.since = job, epoch, last, pos, time.monotonic()


def reserved(job: "Job") -> int:
    """KV positions a job may come to hold: its prompt plus ``max_tokens``."""
    return len(job.prompt_ids) + job.max_tokens


class ContinuousScheduler:
    """Runs the engine's jobs with iteration-level batching (see the module docstring)."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.rows: list[_Row] = []
        self.cache: Optional[kvcache.RowCache] = None
        self._route = contextlib.ExitStack()  # the decode steps' routing, open while the rows stay
        self._route_key: Optional[tuple] = None
        self._admin_seen = engine.admin_ops

    # ----- the worker loop ----------------------------------------------------------------
    def run(self) -> None:
        """Serve until the engine closes; then fail what is left."""
        eng = self.engine
        try:
            while True:
                budget = eng.max_running_tokens - sum(reserved(r.job) for r in self.rows)
                new = eng.take(block=not self.rows, rows=eng.max_batch - len(self.rows), tokens=budget,
                               cost=reserved, wait_s=0.0)
                if new is None:  # closing
                    break
                eng.wait_for_admins()
                try:
                    with eng.lock:
                        self._after_admin()
                        if new:
                            self._admit(new)
                        if self.rows:
                            self._decode()
                except Exception as e:  # e.g. a failing event sink: fail these rows, keep serving
                    self._fail_all(new, f"internal error: {type(e).__name__}: {e}")
        finally:
            self._route.close()
            for r in self.rows:
                r.job.fail("the server is shutting down")
            self.rows, self.cache = [], None

    # ----- steps ------------------------------------------------------------------------
    def _forward(self, ids, mask, pos, cache, names, keep_routing: bool):
        eng = self.engine
        target = eng.forward_target()
        kw = {eng.cache_kwarg: cache, "use_cache": True}
        if eng.takes_logits_to_keep:
            kw["logits_to_keep"] = 1
        if names is None or not hasattr(eng.model, "peft_config"):
            ctx = contextlib.nullcontext()
        elif keep_routing:
            key = (tuple(names), eng.admin_ops)
            if key != self._route_key:
                self._route.close()
                self._route.enter_context(adapter_routing(names, reuse=True))
                self._route_key = key
            ctx = contextlib.nullcontext()
        else:
            ctx = adapter_routing(names)
        with torch.inference_mode(), ctx:
            out = target(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
        if keep_routing:  # a decoding step (prefills are counted apart)
            eng.count_forward(ids.shape[0])
        else:
            eng.prefills += 1
        return out.logits[:, -1, :].float(), kvcache.returned_cache(out)

    def _names(self, jobs) -> list[str]:
        return [BASE if j.adapter == self.engine.base_name else j.adapter for j in jobs]

    def _admit(self, jobs: list["Job"]) -> None:
        eng = self.engine
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                job.finish("cancelled")
            elif not eng.has_adapter(job.adapter):
                job.fail(f"adapter {job.adapter!r} was unloaded before this request ran")
            else:
                live.append(job)
        if not live:
            return
        try:
            width = max(len(j.prompt_ids) for j in live)
            ids = torch.full((len(live), width), eng.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, j in enumerate(live):
                ids[i, width - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
                mask[i, width - len(j.prompt_ids):] = 1
            ids, mask = ids.to(eng.device), mask.to(eng.device)
            logits, cache = self._forward(ids, mask, kvcache.positions(mask), kvcache.new_cache(),
                                          self._names(live), keep_routing=False)
            joined = kvcache.RowCache(cache, mask)
            toks = pick(logits, live)
        except Exception as e:  # this prefill only: the running rows carry on
            for job in live:
                job.fail(f"generation failed: {type(e).__name__}: {e}")
            return
        rows = [_Row(j, eng.epoch(j.adapter), t, len(j.prompt_ids)) for j, t in zip(live, toks)]
        for r in rows:
            advance(eng, r.job, r.last)
        if self.cache is None:
            self.cache = joined
        else:
            self.cache.join(joined)
        self.rows.extend(rows)
        self._leave()

    def _decode(self) -> None:
        eng = self.engine
        try:
            ids = torch.tensor([[r.last] for r in self.rows], dtype=torch.long, device=eng.device)
            pos = torch.tensor([[r.pos] for r in self.rows], dtype=torch.long, device=eng.device)
            mask = self.cache.grow()
            logits, _ = self._forward(ids, mask, pos, self.cache.cache, self._names([r.job for r in self.rows]),
                                      keep_routing=True)
            toks = pick(logits, [r.job for r in self.rows])
        except Exception as e:  # the running rows fail; the worker carries on
            self._fail_all([], f"generation failed: {type(e).__name__}: {e}")
            return
        for r, t in zip(self.rows, toks):
            r.last, r.pos = t, r.pos + 1
            if r.job.finished is None:
                advance(eng, r.job, t)
        self._leave()

    def _leave(self) -> None:
        """Drop finished rows from the batch and the cache."""
        keep = [i for i, r in enumerate(self.rows) if r.job.finished is None]
        if len(keep) == len(self.rows):
            return
        now = time.monotonic()
        for r in self.rows:
            if r.job.finished is not None:
                self.engine.record_service(now - r.since)
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
            self._route.close()
            self._route_key = None
        else:
            self.cache.keep(keep)

    def _fail_all(self, new: list["Job"], message: str) -> None:
        """Fail every running row and ``new`` job, and start over with an empty batch."""
        for job in [r.job for r in self.rows] + list(new):
            try:
                job.fail(message)
            except Exception:
                pass
        self.rows, self.cache = [], None
        self._route.close()
        self._route_key = None

    def _after_admin(self) -> None:
        """After adapters were loaded or unloaded: fail rows whose adapter is gone or replaced."""
        eng = self.engine
        if eng.admin_ops == self._admin_seen:
            return
        self._admin_seen = eng.admin_ops
        self._route.close()
        self._route_key = None
        for r in self.rows:
            if not eng.has_adapter(r.job.adapter) or eng.epoch(r.job.adapter) != r.epoch:
                r.job.fail(f"adapter {r.job.adapter!r} was unloaded while this request ran")
        self._leave()
