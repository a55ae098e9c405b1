"""Steering vectors as value objects: ``SteeringVector`` (per-layer directions, provenance, arithmetic,
safetensors files with self-describing metadata), llama.cpp / repeng control-vector GGUF files
(``gguf_control``), and opening any supported vector file (``files``). No model code: a vector is checked
against anything with a name, a depth and a width (``residlab.core.types.ModelShape``)."""
