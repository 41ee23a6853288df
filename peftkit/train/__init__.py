"""Training from the command line: data formats, the Trainer glue, evaluation, plots, the demo task.

- :mod:`.data`: JSON Lines formats, tokenisation with loss masks, batching.
- :mod:`.task`: the built-in demo task (orders -> JSON), generated and scored here.
- :mod:`.loop`: transformers' Trainer taught to checkpoint and resume peftkit adapters.
- :mod:`.evaluate`: batched greedy generation, exact match, loss, accuracy.
- :mod:`.options`, :mod:`.command`: ``peftkit train``; :mod:`.tools`: generate/eval/merge/inspect.
"""
