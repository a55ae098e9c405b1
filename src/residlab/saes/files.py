"""Saving and loading SAEs in SAELens' on-disk layout.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``W_dec``
[d_sae, d_in], ``b_enc``, ``b_dec``, plus the architecture's own tensors). ``cfg.json`` carries
SAELens' keys (``architecture``, ``d_in``, ``d_sae``, ``k``, ``metadata.hook_name`` in
TransformerLens naming...) and residlab's full config under ``"residlab"``. A TopK SAE is read by
SAELens' ``SAE.load_from_disk`` as its own ``topk`` architecture, a BatchTopK SAE as ``jumprelu`` (its inference
rule is a JumpReLU at one threshold, stored per latent), both with the same equations; the variational
SAE has no SAELens counterpart (it keeps signed codes) and is written as ``residlab_vsae``, which
only residlab reads. Training state (dead-latent counters) goes to a separate file SAELens ignores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from residlab.core.errors import ResidlabError
from residlab.core.io import atomic_path, write_json
from residlab.saes.base import SAEConfig, SparseAutoencoder, architecture, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
STATE_FILE = "residlab_state.safetensors"
SAELENS_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "vsae": "residlab_vsae"}
# residlab site -> TransformerLens hook name (what SAELens users look for in metadata.hook_name)
TL_HOOKS = {
    "block": "blocks.{layer}.hook_resid_post",
    "block_input": "blocks.{layer}.hook_resid_pre",
    "attn": "blocks.{layer}.hook_attn_out",
    "mlp": "blocks.{layer}.hook_mlp_out",
    "mlp_act": "blocks.{layer}.mlp.hook_post",
}


def saelens_config(cfg: SAEConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cfg.json``'s content for ``cfg``."""
    hook = cfg.hook
    return {
        "architecture": SAELENS_ARCH.get(cfg.arch, f"residlab_{cfg.arch}"),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": "6.0.0",
            "model_name": hook.model,
            "hook_name": TL_HOOKS[hook.site].format(layer=hook.layer),
            "hook_head_index": None,
            "context_size": cfg.context_len,
            "dataset_path": cfg.corpus,
            "prepend_bos": True,
        },
        "residlab": {**cfg.to_dict(), **(extra or {})},
    }


def save_sae(sae: SparseAutoencoder, folder: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` into ``folder`` (atomically, as a whole folder)."""
    folder = Path(folder)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sae.state_dict().items()}
    counters = state.pop("tokens_since_fired")
    with atomic_path(folder, is_dir=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        save_file({"tokens_since_fired": counters.to(torch.int64)}, str(tmp / STATE_FILE))
        write_json(tmp / CFG_FILE, saelens_config(sae.cfg, extra))
    return folder


def read_config(folder: str | Path) -> tuple[SAEConfig, dict[str, Any]]:
    """The residlab config in ``folder/cfg.json`` and the whole JSON."""
    path = Path(folder) / CFG_FILE
    if not path.is_file():
        raise ResidlabError(f"no SAE at {folder} (no {CFG_FILE}).", hint="pass a folder written by `sae train`.")
    payload = json.loads(path.read_text())
    if "residlab" not in payload:
        raise ResidlabError(f"{path} was not written by residlab.", hint="residlab reads the SAEs it wrote.")
    saved = payload["residlab"]
    names = set(architecture(saved.get("arch", "")).config_cls.__dataclass_fields__)
    return SAEConfig.from_dict({k: v for k, v in saved.items() if k in names or k == "arch"}), payload


def load_sae(folder: str | Path, *, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """An SAE saved by :func:`save_sae`."""
    folder = Path(folder)
    cfg, _ = read_config(folder)
    sae = build_sae(cfg)
    state = load_file(str(folder / WEIGHTS_FILE))
    counters = folder / STATE_FILE
    state["tokens_since_fired"] = (
        load_file(str(counters))["tokens_since_fired"]
        if counters.is_file()
        else torch.zeros(cfg.d_sae, dtype=torch.long)
    )
    sae.load_state_dict(state)
    return sae.to(device).eval()
