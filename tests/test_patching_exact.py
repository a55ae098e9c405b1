"""Exact patching (batched, padded, with a shared prefix) against a hand-written hook reference on
tiny models of every mapped family, and the ablations on the same machinery."""

from __future__ import annotations

import pytest
import torch

from residlab.analyses.patching.ablation import ablation_sources
from residlab.analyses.patching.activations import last_logits, record_values, unit_shape
from residlab.analyses.patching.exact import PatchRun, exact_effects, shared_prefix
from residlab.analyses.patching.metrics import MetricTargets, get_metric
from residlab.analyses.patching.pairs import encode_pairs
from residlab.analyses.patching.sites import FAMILIES, PatchSite, site_grid
from residlab.data.prompt_pairs import PromptPair
from residlab.interventions.sites import SITES
from residlab.models.architectures import get_module

# Texts the tiny tokenizer splits into equal lengths; the two pairs differ in length (left padding).
PAIRS = [
    PromptPair("Natalia sold clips in May", "Natalia sold clips in April", " and", " then"),
    PromptPair("The answer is 72", "The answer is 24", ".", " +"),
]
SITE_NAMES = ["block", "attn", "mlp", "attn_heads", "mlp_act"]


def _setup(lm, pairs=PAIRS):
    batch = encode_pairs(lm, pairs)
    layers = list(range(lm.num_layers))
    clean = record_values(lm, batch.clean_ids, batch.attention_mask, SITE_NAMES, layers)
    corrupted = record_values(lm, batch.corrupted_ids, batch.attention_mask, SITE_NAMES, layers)
    targets = MetricTargets(batch.answer, batch.wrong, clean.logits.log_softmax(-1))
    run = PatchRun(batch.corrupted_ids, batch.attention_mask, targets, corrupted.values, clean.values, corrupted.logits)
    return batch, run, unit_shape(lm, clean.values, batch.num_tokens)


def _module(lm, layer, site):
    part, reads = SITES[site]
    block = lm.blocks[layer]
    return (block if not part else get_module(block, getattr(lm.arch, part))), reads


def _hand_value(lm, ids, layer, site):
    """The site's value for one unpadded prompt, by a plain torch hook."""
    module, reads = _module(lm, layer, site)
    got: dict[str, torch.Tensor] = {}

    def keep(value: torch.Tensor) -> None:  # returns None: the hook only reads
        got["v"] = value

    if reads == "output":
        handle = module.register_forward_hook(lambda m, a, o: keep(o[0] if isinstance(o, tuple) else o))
    else:
        handle = module.register_forward_pre_hook(
            lambda m, a, k: keep(a[0] if a else k["hidden_states"]), with_kwargs=True
        )
    with torch.no_grad():
        lm.model(input_ids=ids[None])
    handle.remove()
    return got["v"][0]


def _hand_effect(lm, pairs, site: PatchSite, head_dim: int, width: int, metric) -> float:
    """Reference: each pair run alone (no padding, no batching), patched by a plain torch hook."""
    family = FAMILIES[site.family]
    total = 0.0
    for pair in pairs:
        clean_ids, corrupt_ids = (torch.tensor(lm.tokenizer(t)["input_ids"]) for t in (pair.clean, pair.corrupted))
        pad = width - len(clean_ids)
        answer, wrong = (
            torch.tensor(lm.tokenizer(t, add_special_tokens=False)["input_ids"][:1]) for t in (pair.answer, pair.wrong)
        )
        clean_logits = lm.model(input_ids=clean_ids[None]).logits[:, -1].detach()
        targets = MetricTargets(answer, wrong, clean_logits.log_softmax(-1))
        handles = []
        for layer in site.layers:
            source = _hand_value(lm, clean_ids, layer, family.site)
            module, reads = _module(lm, layer, family.site)

            def patch(value, source=source, pad=pad):
                value = value.clone()
                if family.unit == "position":
                    if site.index >= pad:
                        value[0, site.index - pad] = source[site.index - pad]
                elif family.unit == "head":
                    sl = slice(site.index * head_dim, (site.index + 1) * head_dim)
                    value[0, :, sl] = source[:, sl]
                else:
                    value[0, :, site.index] = source[:, site.index]
                return value

            if reads == "output":
                hook = lambda m, a, o, patch=patch: (patch(o[0]), *o[1:]) if isinstance(o, tuple) else patch(o)  # noqa: E731
                handles.append(module.register_forward_hook(hook))
            else:
                handles.append(module.register_forward_pre_hook(lambda m, a, patch=patch: (patch(a[0]), *a[1:])))
        with torch.no_grad():
            patched = metric(lm.model(input_ids=corrupt_ids[None]).logits[:, -1], targets)
            for h in handles:
                h.remove()
            base = metric(lm.model(input_ids=corrupt_ids[None]).logits[:, -1], targets)
        total += float(patched - base)
    return total / len(pairs)


def test_exact_patching_equals_hand_hooks(lm):
    _check_against_hand_hooks(lm, "logit_diff")


@pytest.mark.parametrize("metric_name", ["kl", "probability"])
def test_exact_patching_equals_hand_hooks_other_metrics(qwen, metric_name):
    _check_against_hand_hooks(qwen, metric_name)


def _check_against_hand_hooks(lm, metric_name):
    batch, run, shape = _setup(lm)
    metric = get_metric(metric_name)
    last = batch.num_tokens - 1
    sites = [
        PatchSite("resid", (1,), last),
        PatchSite("resid", (0,), last - 1),
        PatchSite("attn", (2,), last),
        PatchSite("mlp", (0,), last),
        PatchSite("heads", (1,), 2),
        PatchSite("neurons", (2,), 5),
        PatchSite("mlp", (0, 1), last),  # a window of two layers
        PatchSite("resid", (1,), 0),  # a column that is padding in the shorter pair
    ]
    got = exact_effects(lm, run, sites, metric, shape.head_dim, max_rows=6)  # several sites per pass
    want = [_hand_effect(lm, PAIRS, s, shape.head_dim, batch.num_tokens, metric) for s in sites]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=2e-4, rtol=1e-3), (got, want)
    assert any(abs(w) > 1e-4 for w in want)  # the comparison is not vacuous


def test_batching_and_prefix_do_not_change_effects(qwen):
    batch, run, shape = _setup(qwen)
    metric = get_metric("logit_diff")
    sites = site_grid(FAMILIES["resid"], qwen.num_layers, shape) + site_grid(FAMILIES["heads"], qwen.num_layers, shape)
    one_by_one = exact_effects(qwen, run, sites, metric, shape.head_dim, max_rows=1, reuse_prefix=False)
    batched = exact_effects(qwen, run, sites, metric, shape.head_dim, max_rows=64)
    assert shared_prefix(run) > 0  # the prompts share their first columns: the prefix path ran
    assert torch.allclose(one_by_one, batched, atol=1e-4)
    assert (one_by_one != 0).sum() > len(sites) // 4


def test_padded_batch_scores_each_pair_as_alone(lm):
    batch = encode_pairs(lm, PAIRS)
    assert batch.attention_mask[1].all() and not batch.attention_mask[0].all()  # pair 0 is left-padded
    with torch.no_grad():
        padded = last_logits(lm, batch.clean_ids, batch.attention_mask)
        for i, pair in enumerate(PAIRS):
            alone = lm.model(input_ids=torch.tensor([lm.tokenizer(pair.clean)["input_ids"]])).logits[0, -1]
            assert torch.allclose(padded[i], alone, atol=1e-4)


def test_patching_clean_everywhere_restores_clean_score(qwen):
    """Patching the whole last layer's residual stream at the last position gives the clean metric."""
    batch, run, shape = _setup(qwen)
    metric = get_metric("logit_diff")
    effect = exact_effects(qwen, run, [PatchSite("resid", (qwen.num_layers - 1,), batch.num_tokens - 1)], metric, 16)
    with torch.no_grad():
        clean_score = float(metric(last_logits(qwen, batch.clean_ids, batch.attention_mask), run.targets).mean())
    assert effect[0].item() == pytest.approx(clean_score - run.base_score(metric), abs=1e-4)


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_ablations_run_on_the_same_machinery(qwen, kind):
    batch, run, shape = _setup(qwen)
    sources = ablation_sources(kind, run.sources, batch.attention_mask)  # ablate the clean run's activations
    clean_logits = last_logits(qwen, batch.clean_ids, batch.attention_mask).detach()
    ablate = PatchRun(batch.clean_ids, batch.attention_mask, run.targets, run.sources, sources, clean_logits)
    metric = get_metric("logit_diff")
    site = PatchSite("mlp", (1,), batch.num_tokens - 1)
    got = exact_effects(qwen, ablate, [site], metric, shape.head_dim)[0].item()
    key = (1, "mlp")
    replacement = sources[key][:, -1]
    if kind == "zero":
        assert replacement.abs().max() == 0
    elif kind == "mean":
        assert torch.allclose(replacement[0], run.sources[key][:, -1].mean(0))
    else:
        assert torch.equal(replacement[0], run.sources[key][1, -1])

    def fn(value, ctx):
        value = value.clone()
        value[:, -1] = replacement
        return value

    with torch.no_grad(), qwen.edit(1, "mlp", fn):
        ablated = metric(last_logits(qwen, batch.clean_ids, batch.attention_mask), run.targets).mean().item()
    assert got == pytest.approx(ablated - ablate.base_score(metric), abs=1e-4)
    assert abs(got) > 1e-4
