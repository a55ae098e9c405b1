import functools
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import PROMPTS

from residlab import ResidlabError, UnknownArchitectureError
from residlab.models.architectures import (
    ARCHITECTURES,
    ArchitectureMap,
    GuessedArchitectureWarning,
    architecture_for,
    get_module,
    guess_architecture,
)
from residlab.models.lm import LanguageModel
from residlab.testing import TINY_FAMILIES, UNMAPPED_FAMILIES, tiny_model, tiny_tokenizer

MAPPED_FAMILIES = (*TINY_FAMILIES, "mistral", "qwen3")
GUESSED_FAMILIES = UNMAPPED_FAMILIES  # no table: their maps are guessed


@functools.cache
def _tiny(family: str) -> LanguageModel:
    """A tiny random model of ``family`` (residlab.testing's configs); a guessed map warns, quietly here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GuessedArchitectureWarning)
        return tiny_model(family)


@pytest.fixture(params=MAPPED_FAMILIES)
def any_lm(request) -> LanguageModel:
    return _tiny(request.param)


@pytest.fixture(params=GUESSED_FAMILIES)
def guessed_lm(request) -> LanguageModel:
    return _tiny(request.param)


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _norms(arch: ArchitectureMap) -> dict[str, str | None]:
    return {
        "input_norm": arch.input_norm,
        "post_attn_norm": arch.post_attn_norm,
        "pre_mlp_norm": arch.pre_mlp_norm,
        "post_mlp_norm": arch.post_mlp_norm,
    }


@pytest.mark.parametrize("family", MAPPED_FAMILIES + GUESSED_FAMILIES)
def test_every_mapped_path_resolves_to_a_module_of_its_kind(family):
    lm = _tiny(family)
    arch = lm.arch
    assert arch.family == lm.model.config.model_type and arch.guessed == (family in GUESSED_FAMILIES)
    assert isinstance(get_module(lm.model, arch.blocks), torch.nn.ModuleList)
    assert get_module(lm.model, arch.decoder) is lm.decoder
    assert _is_norm(get_module(lm.model, arch.final_norm))
    assert isinstance(get_module(lm.model, arch.unembed), torch.nn.Linear)
    for block in lm.blocks:
        for rel in (arch.attn, arch.mlp):
            assert isinstance(get_module(block, rel), torch.nn.Module)
        down = get_module(block, arch.mlp_down)
        assert isinstance(down, torch.nn.Linear) or type(down).__name__ == "Conv1D"  # GPT-2's transposed Linear
        for role, path in _norms(arch).items():
            if path is not None:
                assert _is_norm(get_module(block, path)), role
    assert lm.num_layers == 3 and lm.hidden_size == 64


@pytest.mark.parametrize("family", MAPPED_FAMILIES + GUESSED_FAMILIES)
def test_norm_roles_match_the_block_wiring(family):
    """Each norm sits where its role says: input_norm's output is what attention reads, pre_mlp_norm's
    what the MLP reads, and a post-norm reads its branch's output (Llama's ``post_attention_layernorm``
    is a pre-MLP norm, Gemma 3's a true post-attention norm: names alone would get this wrong)."""
    lm = _tiny(family)
    arch = lm.arch
    block = lm.blocks[1]
    seen: dict[str, torch.Tensor] = {}

    def output_of(key):
        return lambda module, args, output: seen.__setitem__(key, output[0] if isinstance(output, tuple) else output)

    def input_of(key):
        return lambda module, args, kwargs: seen.__setitem__(key, args[0] if args else kwargs["hidden_states"])

    handles = [
        get_module(block, arch.attn).register_forward_pre_hook(input_of("attn_in"), with_kwargs=True),
        get_module(block, arch.attn).register_forward_hook(output_of("attn_out")),
        get_module(block, arch.mlp).register_forward_pre_hook(input_of("mlp_in"), with_kwargs=True),
        get_module(block, arch.mlp).register_forward_hook(output_of("mlp_out")),
    ]
    for role, path in _norms(arch).items():
        if path is not None:
            module = get_module(block, path)
            handles.append(module.register_forward_pre_hook(input_of(f"{role}_in"), with_kwargs=True))
            handles.append(module.register_forward_hook(output_of(f"{role}_out")))
    try:
        lm.forward(PROMPTS)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(seen["input_norm_out"], seen["attn_in"])
    assert torch.equal(seen["pre_mlp_norm_out"], seen["mlp_in"])
    for branch in ("attn", "mlp"):
        post = f"post_{branch}_norm"
        if _norms(arch)[post] is not None:
            assert torch.equal(seen[f"{post}_in"], seen[f"{branch}_out"])
    assert arch.sandwich_norms == (arch.family == "gemma3_text")
    # with a parallel residual the MLP reads the block's own input (normalised), not attention's result
    assert arch.parallel_residual == (family in ("gpt_neox", "phi", "stablelm_parallel"))
    assert (arch.post_attn_norm is None) == (arch.post_mlp_norm is None) == (not arch.sandwich_norms)


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
    assert {a.family for a in ARCHITECTURES.values()} == {_tiny(f).arch.family for f in MAPPED_FAMILIES}
    assert set(TINY_FAMILIES) <= {a.family.replace("_text", "") for a in ARCHITECTURES.values()}


def test_gpt_neox_parallel_residual_flag(lm):
    assert architecture_for(lm.model).parallel_residual == (lm.arch.family == "gpt_neox")


def test_an_unmapped_family_gets_a_guessed_map_and_says_so():
    import transformers as tf

    tokenizer = tiny_tokenizer()
    config = tf.PhiConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with pytest.warns(GuessedArchitectureWarning, match=r"model_type='phi'; guessed .*blocks=model\.layers"):
        lm = LanguageModel(model, tokenizer, name="tiny-phi")
    assert lm.arch.guessed and lm.arch.blocks == "model.layers" and lm.arch.mlp_down == "mlp.fc2"
    assert "phi" not in ARCHITECTURES  # the guess is not written into the table


@pytest.mark.parametrize("family", MAPPED_FAMILIES)
def test_the_guesser_reproduces_every_declared_map(family):
    """The fallback is checked against the tables: on every mapped family it finds the declared map."""
    lm = _tiny(family)
    assert guess_architecture(lm.model) == replace(lm.arch, guessed=True)


def test_guessed_models_record_and_steer_like_mapped_ones(guessed_lm):
    lm = guessed_lm
    ids = lm.encode(PROMPTS[:1]).input_ids
    with lm.record(layers=[0, 1, 2, "final_norm"], positions="all") as rec:
        out = lm.model(input_ids=ids, output_hidden_states=True)
    for layer in range(2):
        torch.testing.assert_close(rec[layer], out.hidden_states[layer + 1])
    torch.testing.assert_close(rec["final_norm"], out.hidden_states[-1])
    from conftest import random_vector

    vec = random_vector(lm, [1])
    handle = lm.blocks[1].register_forward_hook(
        lambda m, a, o: (o[0] + vec.directions[1], *o[1:]) if isinstance(o, tuple) else o + vec.directions[1]
    )
    try:
        expected = lm.forward(PROMPTS[:1])  # one prompt: no padding, which the bare hook would steer too
    finally:
        handle.remove()
    with lm.steer(vec, positions="all"):
        torch.testing.assert_close(lm.forward(PROMPTS[:1]), expected, rtol=0, atol=0)


def test_a_part_the_guess_did_not_find_is_a_clear_error():
    lm = _tiny("phi")
    arch = replace(lm.arch, post_attn_norm=None, attn="")
    object.__setattr__(lm, "arch", arch)  # as if the guess had found no attention module
    try:
        with pytest.raises(ResidlabError, match="has no attn module: its guessed map found none"):
            with lm.record(layers=[1], sites=["attn"]):
                pass
    finally:
        object.__setattr__(lm, "arch", replace(arch, attn="self_attn"))


@pytest.mark.parametrize("family", MAPPED_FAMILIES)
def test_final_norm_is_hugging_faces_last_hidden_state(family):
    # Regression (docs said layer i = hidden_states[i + 1] for every i): HF's last entry is taken after the
    # final norm, so it is not the last block's output; record offers it by name.
    lm = _tiny(family)
    last = lm.num_layers - 1
    with lm.record(layers=[last, "final_norm"], positions="all") as rec:
        out = lm.model(input_ids=lm.encode(PROMPTS[:1]).input_ids, output_hidden_states=True)
    assert len(out.hidden_states) == lm.num_layers + 1
    torch.testing.assert_close(rec["final_norm"], out.hidden_states[-1])
    assert not torch.allclose(rec[last], out.hidden_states[-1])
    torch.testing.assert_close(rec["final_norm"], lm.model_part("final_norm")(rec[last]))
    with pytest.raises(ResidlabError, match="unknown layer 'final'"):
        lm.record(layers=["final"])
