"""The serving engine: one base model, many adapters, requests batched across adapters.

One worker thread owns the model. HTTP handlers submit :class:`Job` objects to a bounded queue
and a scheduler runs them with ``adapter_names`` set per row, so requests for different adapters
(any method that runs in a mixed batch, see :func:`peftkit.core.site.adapter_routing`) share
every base-model matrix product:

- ``scheduler="continuous"`` (default, :mod:`.continuous`): iteration-level batching. Queued
  requests prefill and join the running batch at the next decoding step; finished rows leave at
  once. The running set is capped by rows (``max_batch``) and reserved tokens
  (``max_running_tokens``: prompt + ``max_tokens`` per row); the rest wait in the queue.
- ``scheduler="static"`` (:mod:`.static`): gather for ``batch_wait_s``, run one ``generate``.

Both stream each row's text as it is produced (:mod:`.rows`). A full queue raises
:class:`EngineFull` with a ``retry_after`` estimate. Loading and unloading adapters take the model
lock through an admin gate that the worker yields to between steps (continuous) or batches
(static); a job whose adapter was unloaded fails alone. Any exception in a batch fails that
batch's jobs and the worker carries on.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

BASE_NAME = "base"  # the `model` field that selects no adapter
SCHEDULERS = ("continuous", "static")


class EngineFull(RuntimeError):
    """The request queue is full; the client should retry in about ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


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


class Engine:
    """Owns the model, the request queue and the scheduling worker.

    Args:
        model: a :class:`~peftkit.PeftModel` or a plain transformers causal LM (it becomes a
            PeftModel when the first adapter is loaded).
        tokenizer: a transformers tokenizer (``encode``, ``decode``, ``eos_token_id``,
            optionally ``pad_token_id`` and ``apply_chat_template``).
        max_batch: most rows running at once (continuous) or in one generate call (static).
        batch_wait_s: static only: how long the worker waits for more requests after the first.
        max_queue: waiting requests beyond this are refused (:class:`EngineFull`).
        scheduler: ``"continuous"`` (iteration-level batching) or ``"static"``.
        max_running_tokens: continuous only: most KV positions the running rows may reserve
            (each reserves its prompt plus ``max_tokens``); default ``max_batch * 1024``. A
            request larger than this alone still runs, by itself.
    """

    base_name = BASE_NAME

    def __init__(self, model, tokenizer, max_batch: int = 32, batch_wait_s: float = 0.005, max_queue: int = 256,
                 scheduler: str = "continuous", max_running_tokens: Optional[int] = None):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}.")
        for key, v in (("max_batch", max_batch), ("max_queue", max_queue), ("max_running_tokens", max_running_tokens)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{key} must be a positive integer, got {v!r}.")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait_s, self.max_queue = max_batch, batch_wait_s, max_queue
        self.scheduler = scheduler
        self.max_running_tokens = max_running_tokens or max_batch * 1024
        # name -> folder it came from ("" for adapters the given PeftModel already had)
        self.adapters: dict[str, str] = {n: "" for n in getattr(model, "peft_config", {})}
        self._epochs: dict[str, int] = {}  # name -> which load of that name (a reload is a new adapter)
        self.lock = threading.Lock()
        self.admin_ops = 0  # adapter loads and unloads so far
        self._admins = 0  # admin operations waiting for or holding the lock
        self._gate = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.batches = 0  # generate calls (static) or decoding steps (continuous) so far
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)  # their rows, latest
        self.prefills = 0  # continuous: prefill forwards of admitted requests
        self._service_s = 1.0  # moving average of how long a request runs once admitted
        self._probe_model()
        from .continuous import ContinuousScheduler
        from .static import StaticScheduler

        runner = (ContinuousScheduler if scheduler == "continuous" else StaticScheduler)(self)
        self._worker = threading.Thread(target=self._serve, args=(runner,), name="peftkit-serve-worker", daemon=True)
        self._worker.start()

    # ----- the model ------------------------------------------------------------------
    def _probe_model(self) -> None:
        import inspect

        from . import kvcache

        target = self.forward_target()
        self.device = next(self.model.parameters()).device
        self.cache_kwarg = kvcache.cache_kwarg(target)
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(target.forward).parameters

    def forward_target(self):
        """The transformers model whose forward the continuous scheduler calls (a PeftModel's
        adapted base model: routing is set around it)."""
        get = getattr(self.model, "get_base_model", None)
        return get() if get is not None and hasattr(self.model, "peft_config") else self.model

    def count_forward(self, rows: int) -> None:
        """Record one batched forward (or generate call) of ``rows`` rows."""
        self.batches += 1
        self.batch_sizes.append(rows)

    def record_service(self, seconds: float) -> None:
        """Fold one finished request's running time into the Retry-After estimate."""
        self._service_s = 0.9 * self._service_s + 0.1 * seconds

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

    def epoch(self, name: str) -> int:
        """Which load of adapter ``name`` is current (rows check it did not change under them)."""
        return self._epochs.get(name, 0)

    @contextlib.contextmanager
    def _admin(self):
        """Hold the model lock for an adapter change; the worker yields to it between steps."""
        with self._gate:
            self._admins += 1
        try:
            with self.lock:
                yield
                self.admin_ops += 1
        finally:
            with self._gate:
                self._admins -= 1
                self._gate.notify_all()

    def wait_for_admins(self) -> None:
        """Called by the worker before each step: let waiting adapter changes go first."""
        with self._gate:
            while self._admins:
                self._gate.wait()

    def load_adapter(self, name: str, folder: str) -> None:
        """Load the adapter saved in ``folder`` under ``name`` (between two steps of the running batch)."""
        from ..config import ConfigError, PeftConfig
        from ..model import PeftModel

        if PeftConfig.from_pretrained(folder).is_prompt_learning:
            raise ConfigError(f"{folder} holds a prompt-learning adapter; the server batches adapters per "
                              "row, which prompt methods do not support. Serve LoRA-family adapters.")
        with self._admin():
            if name in self.adapters:
                raise ValueError(f"An adapter named {name!r} is already loaded; unload it first or pick another name.")
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(folder, name)
            else:
                self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name)
            self.adapters[name] = folder
            self._epochs[name] = self._epochs.get(name, 0) + 1

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (between two steps; its running rows fail alone)."""
        with self._admin():
            if name not in self.adapters:
                raise KeyError(name)
            self.model.delete_adapter(name)
            del self.adapters[name]

    # ----- requests -------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead of it, drained ``max_batch``
        at a time at the measured running time per request (1 to 60)."""
        with self._cv:
            waiting = len(self._pending)
        return int(min(60, max(1, math.ceil(self._service_s * (waiting / self.max_batch + 1)))))

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`EngineFull` when the queue is full or closed."""
        with self._cv:
            if self._closing:
                raise EngineFull("the server is shutting down.", 1)
            if len(self._pending) < self.max_queue:
                self._pending.append(job)
                self._cv.notify()
                return
        raise EngineFull(f"{self.max_queue} requests are already waiting; retry shortly.", self.retry_after())

    def queued(self) -> int:
        """How many requests wait for admission."""
        with self._cv:
            return len(self._pending)

    def take(self, block: bool, rows: int, tokens: Optional[int] = None, cost=None,
             wait_s: float = 0.0) -> Optional[list[Job]]:
        """For the worker: up to ``rows`` queued jobs in order, whose ``cost(job)`` adds up to at
        most ``tokens`` (the first may exceed it when nothing else runs, i.e. ``block``), waiting
        for a first one when ``block`` and then ``wait_s`` for more; ``None`` once closing."""
        out, used = [], 0
        deadline = None
        with self._cv:
            while True:
                if self._closing:
                    for job in out:  # taken but never run
                        job.fail("the server is shutting down")
                    return None
                while self._pending and len(out) < rows:
                    need = cost(self._pending[0]) if cost is not None else 0
                    if tokens is not None and used + need > tokens and not (block and not out):
                        return out
                    out.append(self._pending.popleft())
                    used += need
                if len(out) >= rows or (out and wait_s <= 0) or (not block and not out):
                    return out
                if not out:
                    self._cv.wait()
                    continue
                if deadline is None:
                    deadline = time.monotonic() + wait_s
                left = deadline - time.monotonic()
                if left <= 0:
                    return out
                self._cv.wait(left)

    def close(self) -> None:
        """Stop the worker after the running step or batch; queued and running requests fail."""
        with self._cv:
            self._closing = True
            left = list(self._pending)
            self._pending.clear()
            self._cv.notify_all()
        for job in left:
            job.fail("the server is shutting down")
        self._worker.join(timeout=30)

    def _serve(self, runner) -> None:
        runner.run()
