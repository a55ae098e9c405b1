"""Serving a (possibly steered) model behind an OpenAI-compatible HTTP endpoint, on any engine.

``server`` (HTTP, routes, limits), ``schema`` (validated requests), ``steering`` (per-request steering
by vector name), ``jobs`` (a request in flight; the scheduler interface), ``continuous`` (continuous
batching on the torch engine) with ``kv_rows`` (rows joining and leaving a KV cache), ``grouped``
(batches of alike-steered requests, for llama.cpp), ``openai_format`` (replies, stream chunks),
``metrics`` and ``loadtest`` (a bounded load test of a running server)."""
