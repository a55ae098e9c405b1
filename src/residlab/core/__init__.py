"""The bottom layer, imported by everything and importing nothing of residlab's: errors with hints
(``errors``), where downloads and conversions are cached (``cache``), the one I/O layer (``io``: atomic
writes, the NaN-safe JSON writer, the strict reader of users' JSONL and text files), residlab's own
append-only records (``records``), figures (``plotting``), and the shared types (``types``: the model-shape
protocol and the log callback; ``generation``: prompts, generations and the batching loop every engine
shares)."""
