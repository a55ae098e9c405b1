import pytest
import torch

from residlab import UnknownArchitectureError
from residlab.models.architectures import ARCHITECTURES, architecture_for, get_module
from residlab.models.lm import LanguageModel
from residlab.testing import TINY_FAMILIES, tiny_tokenizer


def test_every_mapped_path_resolves(lm):
    arch = lm.arch
    for path in (arch.decoder, arch.blocks, arch.final_norm, arch.embed, arch.unembed):
        assert isinstance(get_module(lm.model, path), torch.nn.Module)
    for block in lm.blocks:
        for rel in (arch.attn, arch.mlp, arch.mlp_down, *arch.block_norms):
            assert isinstance(get_module(block, rel), torch.nn.Module)
    assert lm.num_layers == 3 and lm.hidden_size == 64


def test_block_output_is_hidden_states_plus_one(lm):
    """Layer i = output of block i = HF hidden_states[i + 1] (for all but the last block, whose
    HF hidden state has the final norm applied in some families)."""
    with lm.record(layers=range(lm.num_layers), positions="all") as rec:
        out = lm.model(**{"input_ids": lm.encode(["Natalia sold clips"]).input_ids}, output_hidden_states=True)
    for layer in range(lm.num_layers - 1):
        torch.testing.assert_close(rec[layer], out.hidden_states[layer + 1])


def test_unknown_architecture_is_a_clear_error():
    class Weird(torch.nn.Module):
        class config:  # noqa: N801
            model_type = "weirdformer"

    with pytest.raises(UnknownArchitectureError) as info:
        LanguageModel(Weird(), tiny_tokenizer(), name="weird")
    assert "weirdformer" in str(info.value) and "architectures.py" in str(info.value)


def test_all_required_families_are_mapped():
    for family in ("llama", "qwen2", "gemma3_text", "gpt2", "gpt_neox"):
        assert family in ARCHITECTURES
    assert set(TINY_FAMILIES) <= {a.family.replace("_text", "") for a in ARCHITECTURES.values()}


def test_gpt_neox_parallel_residual_flag(lm):
    assert architecture_for(lm.model).parallel_residual == (lm.arch.family == "gpt_neox")
