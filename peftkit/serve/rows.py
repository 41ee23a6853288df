"""What both schedulers do with one row's next token: sampling settings, stop rules, streaming.

:class:`RowSampling` applies per-row temperature and top-p to a batch of logits (temperature 0
rows become greedy), so greedy and sampled requests share a forward. :func:`advance` takes one
row's new token: it ends the row on cancellation, EOS, a stop string or ``max_tokens``, and
streams the text that is safe to send (text that may be the start of a stop string, or half of
a multi-byte character, is held back).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .engine import Engine, Job


class RowSampling:
    """Per-row temperature and nucleus (top-p) filtering of ``(rows, vocab)`` scores.

    Usable as a transformers logits processor (``__call__(input_ids, scores)``) and on its own
    (:meth:`filter`). Rows with temperature 0 keep only their most likely token.
    """

    def __init__(self, temps: torch.Tensor, top_ps: torch.Tensor):
        self.temps, self.top_ps = temps, top_ps

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        return self.filter(scores)

    def filter(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` divided by each row's temperature, tokens outside its nucleus at -inf."""
        greedy = self.temps == 0
        scores = scores / torch.where(greedy, 1.0, self.temps).unsqueeze(1).to(scores)
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = (probs.cumsum(-1) - probs) > self.top_ps.unsqueeze(1).to(probs)
        drop[:, 0] = False  # always keep the most likely token
        drop |= greedy.unsqueeze(1) & (torch.arange(scores.shape[1], device=scores.device) > 0)
        return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def pick(scores: torch.Tensor, jobs: Sequence["Job"]) -> list[int]:
    """Each row's next token from its last-position ``scores`` (rows, vocab): argmax for greedy
    rows, a draw from the filtered distribution for sampled ones."""
    if all(j.temperature == 0 for j in jobs):
        return scores.argmax(-1).tolist()
    dev = scores.device
    rule = RowSampling(torch.tensor([j.temperature for j in jobs], device=dev),
                       torch.tensor([j.top_p for j in jobs], device=dev))
    probs = rule.filter(scores.float()).softmax(-1)
    return torch.multinomial(probs, 1).squeeze(1).tolist()


def hold_back(job: "Job") -> int:
    """How many trailing characters of ``job``'s text might begin a stop string."""
    return max((len(s) for s in job.stop), default=1) - 1


def advance(engine: "Engine", job: "Job", tok: int) -> None:
    """Record ``tok`` as ``job``'s next token, finish the job if a stop rule says so, and
    stream its new text. A job whose event sink raises ends alone (as an error), not its batch."""
    try:
        _advance(engine, job, tok)
    except Exception as e:
        if job.finished is None:
            try:
                job.fail(f"internal error: {type(e).__name__}: {e}")
            except Exception:
                pass
        job.finished = job.finished or "error"


def _advance(engine: "Engine", job: "Job", tok: int) -> None:
    if job.cancelled.is_set():
        job.finish("cancelled")
        return
    if tok in engine.eos_ids:
        job.finish("stop")
        return
    job.tokens.append(tok)
    text = engine.decode(job.tokens)
    cut = min((text.find(s) for s in job.stop if s in text), default=-1)
    if cut >= 0:
        job.text = text[:cut]
        job.finish("stop")
        return
    job.text = text
    if len(job.tokens) >= job.max_tokens:
        job.finish("length")
        return
    ready = len(text) - hold_back(job) if job.stop else len(text)
    if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
        ready = min(ready, len(text) - 1)
    if ready > job.sent:
        job.emit("delta", text[job.sent:ready])
        job.sent = ready
