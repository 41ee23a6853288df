"""``peftkit serve``: an OpenAI-compatible HTTP server for one base model and many adapters.

Needs the ``serve`` extra (``pip install peftkit[serve]``: FastAPI and uvicorn). See
docs/serving.md for usage; engine.py owns the model and the queue, continuous.py (default) and
static.py schedule requests across adapters, rows.py and kvcache.py are their per-row parts,
app.py is the HTTP layer, cli.py the command.
"""
from .engine import BASE_NAME, SCHEDULERS, Engine, EngineFull, Job

__all__ = ["BASE_NAME", "SCHEDULERS", "Engine", "EngineFull", "Job", "create_app", "Limits"]


def __getattr__(name):
    if name in ("create_app", "Limits"):  # FastAPI is only imported when the HTTP layer is used
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
