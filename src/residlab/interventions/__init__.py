"""Hooks on a running model: recording activations (``record``), adding steering deltas (``steer``),
replacing or skipping a site's value (``edit``), per-row steering of a batch whose rows come and go
(``row_steer``), all positioned by real token positions that mean the
same with and without the KV cache (``positions``, ``tracking``). Every intervention is a context manager
that always removes its hooks. They reach the model only through the ``HookTarget`` protocol
(``target``), never through ``LanguageModel``."""
