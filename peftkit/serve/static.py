"""The static scheduler: gather requests for a few milliseconds, run one ``generate`` for them.

The worker takes the first queued job, keeps collecting for ``batch_wait_s`` or until
``max_batch`` jobs, and runs *one* ``generate`` with ``adapter_names`` per row. Prompts are
left-padded; per-row ``max_tokens``, stop strings, EOS and cancellation end rows through a
stopping criterion that also streams each row's text; per-row temperature and top-p are a
logits processor. A request that arrives while a batch runs waits for the whole batch, and the
batch holds its rows until the longest ends: :mod:`.continuous` removes both waits. Kept as
``--scheduler static`` for comparison (benchmarks/serve_load.py) and for models whose cache the
continuous scheduler cannot split.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.site import BASE
from .rows import RowSampling, advance

if TYPE_CHECKING:
    from .engine import Engine, Job


class _RowStop:
    """Called by generate() after every step: each row's new token goes through
    :func:`~.rows.advance`; returns which rows are finished."""

    def __init__(self, engine: "Engine", jobs: list["Job"]):
        self.engine, self.jobs = engine, jobs

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(len(self.jobs), dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        for i, job in enumerate(self.jobs):
            if job.finished is None:
                advance(self.engine, job, last[i])
            done[i] = job.finished is not None
        return done


class StaticScheduler:
    """Runs the engine's jobs in static batches (see the module docstring)."""

    def __init__(self, engine: "Engine"):
        self.engine = engine

    def run(self) -> None:
        """Serve until the engine closes."""
        eng = self.engine
        while True:
            jobs = eng.take(block=True, rows=eng.max_batch, wait_s=eng.batch_wait_s)
            if jobs is None:
                return
            eng.wait_for_admins()
            try:
                self._run(jobs)
            except Exception as e:  # e.g. a failing event sink: fail these jobs, keep serving
                for job in jobs:
                    try:
                        job.fail(f"internal error: {type(e).__name__}: {e}")
                    except Exception:
                        pass

    def _run(self, jobs: list["Job"]) -> None:
        eng = self.engine
        with eng.lock:
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
                self._generate(live)
            except Exception as e:  # one bad batch must not stop the worker
                for job in live:
                    job.fail(f"generation failed: {type(e).__name__}: {e}")
                return
            for job in live:
                job.finish("length")  # rows that ran out of steps without another reason

    def _generate(self, jobs: list["Job"]) -> None:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        eng = self.engine
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), eng.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[i, width - len(j.prompt_ids):] = 1
        sample = any(j.temperature > 0 for j in jobs)
        cfg = GenerationConfig(max_new_tokens=max(j.max_tokens for j in jobs), do_sample=sample,
                               temperature=1.0 if sample else None, top_p=1.0 if sample else None,
                               top_k=0 if sample else None, pad_token_id=eng.pad_id,
                               eos_token_id=sorted(eng.eos_ids) or None)
        processors = LogitsProcessorList()
        if sample:
            processors.append(RowSampling(torch.tensor([j.temperature for j in jobs], device=eng.device),
                                          torch.tensor([j.top_p for j in jobs], device=eng.device)))
        kwargs = {}
        if hasattr(eng.model, "peft_config"):
            kwargs["adapter_names"] = [BASE if j.adapter == eng.base_name else j.adapter for j in jobs]
        eng.count_forward(len(jobs))
        with torch.inference_mode():
            eng.model.generate(input_ids=ids.to(eng.device), attention_mask=mask.to(eng.device),
                               generation_config=cfg, logits_processor=processors,
                               stopping_criteria=StoppingCriteriaList([_RowStop(eng, jobs)]), **kwargs)
