"""The peer half of benchmarks/steering_parity.py: runs in a separate environment with steering-vectors and
repeng (they need transformers < 5 and numpy < 2), never imports residlab.

    python steering_parity_peer.py JOB.json OUT.npz

JOB.json lists models (a model dir, token ids) and cases (library, operator, layer, vector, strength).
OUT.npz gets each case's logits at every position (float32, keyed by case id) and each model's
unsteered logits ("<model>/plain"); OUT.json the peer libraries' versions, the GGUF files repeng wrote
for its cases (its own export, which the residlab side then imports) and the model type repeng reads
from residlab's exported files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def load_model(model_dir: str):
    """The model as transformers 4 reads it; a config written by transformers 5 keeps rope_theta under
    rope_parameters, which transformers 4 would silently ignore (a different model), so it is passed on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    extra = {}
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" not in raw and "rope_theta" in rope:
        extra["rope_theta"] = rope["rope_theta"]
    config = AutoConfig.from_pretrained(model_dir, **extra)
    # Built from the config and the weights file directly: transformers 4 refuses safetensors files
    # without a "format" header entry, which residlab's converted models do not carry.
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    weights = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(str(path)))
    tied = ("model.embed_tokens.weight", "lm_head.weight")  # a tied pair is stored once, under either name
    if getattr(config, "tie_word_embeddings", False):
        for name, other in (tied, tied[::-1]):
            if name not in weights and other in weights:
                weights[name] = weights[other]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    model.tie_weights()
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"{model_dir}: weights do not fit ({missing[:5]} missing, {unexpected[:5]} unexpected)")
    return model.eval()


def logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float().numpy()


def steering_vectors_case(model, ids, case) -> np.ndarray:
    from steering_vectors import SteeringVector, ablation_operator, ablation_then_addition_operator

    operators = {"add": None, "project_out": ablation_operator(), "clamp": ablation_then_addition_operator()}
    vector = SteeringVector({case["layer"]: torch.tensor(case["vector"], dtype=torch.float32)}, "decoder_block")
    with vector.apply(model, multiplier=case["strength"], operator=operators[case["operator"]]):
        return logits(model, ids)


def repeng_case(model, ids, case, gguf_path: Path) -> np.ndarray:
    from repeng import ControlModel, ControlVector

    control = ControlModel(model, [case["layer"]])
    wrapped = model.model.layers[case["layer"]]
    if hasattr(wrapped.block, "attention_type"):  # transformers 4.57's Qwen2 reads it off each layer; repeng
        wrapped.attention_type = wrapped.block.attention_type  # 0.4.0's wrapper does not pass it through
    try:
        # float64 directions, as repeng's own training leaves them (numpy), exported by repeng itself
        vector = ControlVector(model.config.model_type, {case["layer"]: np.asarray(case["vector"], dtype=np.float64)})
        vector.export_gguf(str(gguf_path))
        control.set_control(vector, coeff=case["strength"], normalize=case["operator"] == "add_norm_preserving")
        return logits(control, ids)
    finally:
        control.unwrap()


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    results: dict[str, np.ndarray] = {}
    meta: dict[str, str] = {}
    for model_job in job["models"]:
        model = load_model(model_job["dir"])
        ids = torch.tensor([model_job["token_ids"]])
        results[f"{model_job['name']}/plain"] = logits(model, ids)
        for case in model_job["cases"]:
            if case["library"] == "steering-vectors":
                results[case["id"]] = steering_vectors_case(model, ids, case)
            else:
                gguf = Path(job["gguf_dir"]) / f"{case['id'].replace('/', '_')}.gguf"
                results[case["id"]] = repeng_case(model, ids, case, gguf)
                meta[case["id"]] = str(gguf)
        for name, path in model_job.get("read_gguf", {}).items():  # residlab's exports, read by repeng
            from repeng import ControlVector

            meta[f"{model_job['name']}/repeng_reads/{name}"] = ControlVector.import_gguf(path).model_type
    np.savez(out_path, **results)
    import steering_vectors
    import transformers

    versions = {"transformers": transformers.__version__, "numpy": np.__version__, "torch": torch.__version__}
    versions["steering_vectors"] = getattr(steering_vectors, "__version__", _version("steering-vectors"))
    versions["repeng"] = _version("repeng")
    Path(out_path).with_suffix(".json").write_text(json.dumps({"files": meta, "versions": versions}))


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
