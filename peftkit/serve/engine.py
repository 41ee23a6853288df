"""The serving engine: one base model, many adapters, requests batched across adapters.

One worker thread owns the model. HTTP handlers submit :class:`Job` objects to a bounded queue;
the worker takes the first job, keeps collecting for ``batch_wait_s`` (a few ms) or until
``max_batch`` jobs, and runs *one* ``generate`` for all of them with ``adapter_names`` set per
row, so requests for different adapters share every base-model matrix product (the mixed-adapter
path of :class:`~peftkit.core.site.Site`). Prompts are left-padded; per-row ``max_tokens``, stop
strings, EOS and client cancellation end rows independently through a stopping criterion that
also streams each row's new text; per-row temperature and top-p are a logits processor, so one
batch can mix greedy and sampled requests.

Loading and unloading adapters take the model lock, so they happen between batches; a job whose
adapter was unloaded while it waited fails alone. Any exception in a batch fails that batch's
jobs and the worker carries on.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..core.site import BASE

BASE_NAME = "base"  # the `model` field that selects no adapter


class EngineFull(RuntimeError):
    """The request queue is full; the client should retry later."""


@dataclass
class Job:
    """One generation request: a prompt for one adapter, with its limits and an event sink.

    ``emit(kind, payload)`` is called from the worker thread with ``("delta", text)`` as text is
    produced, then exactly once ``("done", {"finish_reason", "prompt_tokens", "completion_tokens"})``
    or ``("error", message)``.
    """

    prompt_ids: list[int]
    adapter: str
    max_tokens: int
    emit: Callable[[str, object], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finished: Optional[str] = None

    def finish(self, reason: str) -> None:
        """Flush the held-back text and report completion (once)."""
        if self.finished is not None:
            return
        self.finished = reason
        if len(self.text) > self.sent:
            self.emit("delta", self.text[self.sent:])
            self.sent = len(self.text)
        self.emit("done", {"finish_reason": reason, "prompt_tokens": len(self.prompt_ids),
                           "completion_tokens": len(self.tokens)})

    def fail(self, message: str) -> None:
        """Report an error (once)."""
        if self.finished is None:
            self.finished = "error"
            self.emit("error", message)


class _RowSampling:
    """Per-row temperature and nucleus (top-p) filtering; temperature 0 rows become greedy."""

    def __init__(self, temps: torch.Tensor, top_ps: torch.Tensor):
        self.temps, self.top_ps = temps, top_ps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        greedy = self.temps == 0
        scores = scores / torch.where(greedy, 1.0, self.temps).unsqueeze(1).to(scores)
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = (probs.cumsum(-1) - probs) > self.top_ps.unsqueeze(1).to(probs)
        drop[:, 0] = False  # always keep the most likely token
        drop |= greedy.unsqueeze(1) & (torch.arange(scores.shape[1], device=scores.device) > 0)
        return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


class _RowStop:
    """Called by generate() after every step: records each row's new token, streams its text and
    tells generate() which rows are finished."""

    def __init__(self, engine: "Engine", jobs: list[Job]):
        self.engine, self.jobs = engine, jobs
        self.hold = max((len(s) for j in jobs for s in j.stop), default=1) - 1

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(len(self.jobs), dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        for i, job in enumerate(self.jobs):
            if job.finished is None:
                self._step(job, last[i])
            done[i] = job.finished is not None
        return done

    def _step(self, job: Job, tok: int) -> None:
        if job.cancelled.is_set():
            job.finish("cancelled")
            return
        if tok in self.engine.eos_ids:
            job.finish("stop")
            return
        job.tokens.append(tok)
        text = self.engine.decode(job.tokens)
        cut = min((text.find(s) for s in job.stop if s in text), default=-1)
        if cut >= 0:
            job.text = text[:cut]
            job.finish("stop")
            return
        job.text = text
        if len(job.tokens) >= job.max_tokens:
            job.finish("length")
            return
        ready = len(text) - self.hold if job.stop else len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            ready = min(ready, len(text) - 1)
        if ready > job.sent:
            job.emit("delta", text[job.sent:ready])
            job.sent = ready


class Engine:
    """Owns the model and the batching worker.

    Args:
        model: a :class:`~peftkit.PeftModel` or a plain transformers causal LM (it becomes a
            PeftModel when the first adapter is loaded).
        tokenizer: a transformers tokenizer (``encode``, ``decode``, ``eos_token_id``,
            optionally ``pad_token_id`` and ``apply_chat_template``).
        max_batch: most requests run in one generate call.
        batch_wait_s: how long the worker waits for more requests after the first.
        max_queue: pending requests beyond this are refused (:class:`EngineFull`).
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, batch_wait_s: float = 0.005, max_queue: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        # name -> folder it came from ("" for adapters the given PeftModel already had)
        self.adapters: dict[str, str] = {n: "" for n in getattr(model, "peft_config", {})}
        self.lock = threading.Lock()
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.batches = 0  # generate calls so far (for tests and metrics)
        self.batch_sizes: list[int] = []
        self._worker = threading.Thread(target=self._loop, name="peftkit-serve-worker", daemon=True)
        self._worker.start()

    # ----- text -----------------------------------------------------------------------
    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``, with the tokenizer's usual special tokens when ``special``."""
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The model's chat template applied to ``messages`` (a plain transcript when it has none)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"

    # ----- adapters -------------------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        """Whether ``name`` can be requested (``"base"`` always can)."""
        return name == BASE_NAME or name in self.adapters

    def load_adapter(self, name: str, folder: str) -> None:
        """Load the adapter saved in ``folder`` under ``name`` (waits for the running batch)."""
        from ..config import ConfigError, PeftConfig
        from ..model import PeftModel

        if PeftConfig.from_pretrained(folder).is_prompt_learning:
            raise ConfigError(f"{folder} holds a prompt-learning adapter; the server batches adapters per "
                              "row, which prompt methods do not support. Serve LoRA-family adapters.")
        with self.lock:
            if name in self.adapters:
                raise ValueError(f"An adapter named {name!r} is already loaded; unload it first or pick another name.")
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(folder, name)
            else:
                self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name)
            self.adapters[name] = folder

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (waits for the running batch)."""
        with self.lock:
            if name not in self.adapters:
                raise KeyError(name)
            self.model.delete_adapter(name)
            del self.adapters[name]

    # ----- requests -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`EngineFull` when the queue is full."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise EngineFull(f"{self.queue.maxsize} requests are already waiting; retry shortly.") from None

    def close(self) -> None:
        """Stop the worker after the running batch."""
        self.queue.put(None)
        self._worker.join(timeout=30)

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        jobs, deadline = [first], time.monotonic() + self.batch_wait_s
        while len(jobs) < self.max_batch:
            wait = deadline - time.monotonic()
            try:
                nxt = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return jobs, True
            jobs.append(nxt)
        return jobs, False

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, stop = self._collect(first)
            try:
                self._run(jobs)
            except Exception as e:  # e.g. a failing event sink: fail these jobs, keep serving
                for job in jobs:
                    try:
                        job.fail(f"internal error: {type(e).__name__}: {e}")
                    except Exception:
                        pass
            if stop:
                return

    def _run(self, jobs: list[Job]) -> None:
        with self.lock:
            live = []
            for job in jobs:
                if job.cancelled.is_set():
                    job.finish("cancelled")
                elif not self.has_adapter(job.adapter):
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

    def _generate(self, jobs: list[Job]) -> None:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        device = next(self.model.parameters()).device
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[i, width - len(j.prompt_ids):] = 1
        sample = any(j.temperature > 0 for j in jobs)
        cfg = GenerationConfig(max_new_tokens=max(j.max_tokens for j in jobs), do_sample=sample,
                               temperature=1.0 if sample else None, top_p=1.0 if sample else None,
                               top_k=0 if sample else None, pad_token_id=self.pad_id,
                               eos_token_id=sorted(self.eos_ids) or None)
        processors = LogitsProcessorList()
        if sample:
            processors.append(_RowSampling(torch.tensor([j.temperature for j in jobs], device=device),
                                           torch.tensor([j.top_p for j in jobs], device=device)))
        kwargs = {}
        if hasattr(self.model, "peft_config"):
            kwargs["adapter_names"] = [BASE if j.adapter == BASE_NAME else j.adapter for j in jobs]
        self.batches += 1
        self.batch_sizes.append(len(jobs))
        with torch.inference_mode():
            self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                                logits_processor=processors, stopping_criteria=StoppingCriteriaList([_RowStop(self, jobs)]),
                                **kwargs)
