import json

import pytest
import torch

from residlab.analyses.cka_math import linear_cka
from residlab.analyses.guidance import CkaGuidanceLoss
from residlab.analyses.guidance_experiment import GuidanceConfig, prepare_data, run_guidance_experiment
from residlab.analyses.guidance_targets import TARGETS
from residlab.core.errors import ResidlabError


def _states(seed, shape=(2, 10, 6)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_guidance_loss_is_the_sum_of_one_minus_cka_over_the_mapping():
    target = [_states(0).requires_grad_(), _states(1).requires_grad_()]
    guide = [_states(2, (2, 10, 9)), _states(3, (2, 10, 9)), _states(4, (2, 10, 9))]
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 0] = False
    loss = CkaGuidanceLoss({0: 1, 1: 2}, weight=0.5)(target, guide, mask)
    hand = 0.5 * sum(
        1 - float(linear_cka(t.detach()[:, 1:].reshape(-1, 6), g[:, 1:].reshape(-1, 9)))
        for t, g in ((target[0], guide[1]), (target[1], guide[2]))
    )
    assert float(loss.detach()) == pytest.approx(hand, rel=1e-6)
    loss.backward()
    assert target[0].grad is not None and target[0].grad[:, 0].abs().sum() == 0  # masked position gets no gradient
    assert CkaGuidanceLoss.even_stride(2, 3).mapping == {0: 1, 1: 2}
    with pytest.raises(ResidlabError, match="empty"):
        CkaGuidanceLoss({})


@pytest.mark.parametrize("debiased", [False, True])
def test_minimising_the_guidance_loss_raises_cka(debiased):
    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    guide = [torch.tanh(inputs @ torch.randn(8, 5))]
    layer = torch.nn.Linear(8, 5)
    loss_fn = CkaGuidanceLoss({0: 0}, debiased=debiased)
    before = float(loss_fn.similarities([layer(inputs)], guide)[0].detach())
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(50):
        optimiser.zero_grad()
        loss_fn([layer(inputs)], guide).backward()
        optimiser.step()
    after = float(loss_fn.similarities([layer(inputs)], guide)[0].detach())
    assert after > before + 0.05 and after > 0.8


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_targets_give_logits_and_one_state_per_layer_and_are_causal(name):
    torch.manual_seed(0)
    model = TARGETS[name](11, 8, 3, 12)
    ids = torch.randint(0, 11, (2, 12))
    logits, states = model(ids)
    assert logits.shape == (2, 12, 11) and len(states) == 3 and states[0].shape == (2, 12, 8)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 11
    assert torch.allclose(model(changed)[0][:, :7], logits[:, :7], atol=1e-5)  # the future does not leak back


SMALL = GuidanceConfig(
    target="rnn",
    guide="tiny",
    seq_len=12,
    train_windows=12,
    eval_windows=4,
    vocab=50,
    width=16,
    layers=2,
    steps=4,
    batch_size=4,
    eval_every=2,
    seeds=(0, 1),
    conditions=("baseline", "guided", "guided_untrained"),
)


def test_prepare_data_windows_and_vocabulary(qwen):
    data = prepare_data(qwen, SMALL)
    assert data.train_ids.shape == (12, 12) and data.eval_ids.shape == (4, 12)
    assert int(data.train_labels.max()) <= SMALL.vocab and data.guide_layers == [1, 2]
    assert 0 < data.eval_coverage <= 1
    # a label is the token's rank among the most frequent train tokens, or the "other" class
    frequent = data.train_labels[data.train_labels < SMALL.vocab]
    assert frequent.numel() > 0


def test_experiment_runs_every_condition_resumes_and_is_deterministic(qwen, tmp_path):
    logs = []
    result = run_guidance_experiment(qwen, SMALL, tmp_path, log=logs.append, progress=False)
    assert [(r.condition, r.seed) for r in result.runs] == [
        (c, s) for s in (0, 1) for c in ("baseline", "guided", "guided_untrained")
    ]
    by = {(r.condition, r.seed): r for r in result.runs}
    assert by["baseline", 0].steps == [0, 2, 4]
    # same seed, same initial weights: the step-0 measurements agree across conditions
    assert by["baseline", 0].eval_ce[0] == by["guided", 0].eval_ce[0]
    assert by["baseline", 0].eval_ce[-1] != by["guided", 0].eval_ce[-1]
    assert by["guided", 0].guidance_loss[-1] is not None and by["baseline", 0].guidance_loss[-1] is None
    s = result.summary()
    assert "guided_minus_baseline_final_ce" in s and s["num_seeds"] == 2
    paths = result.save(tmp_path / "out")
    assert {p.name for p in paths} == {"guidance.json", "guidance_loss.png", "guidance_cka.png"}
    assert json.loads((tmp_path / "out" / "guidance.json").read_text())["guide_layers"] == [1, 2]
    # a second call reuses every finished run, and a fresh run of one condition reproduces it exactly
    again = run_guidance_experiment(qwen, SMALL, tmp_path, log=logs.append, progress=False)
    assert sum("reused" in line for line in logs) == 6
    assert again.runs[0].eval_ce == result.runs[0].eval_ce
    fresh = run_guidance_experiment(
        qwen, GuidanceConfig(**{**SMALL.__dict__, "conditions": ("baseline",)}), tmp_path / "other", progress=False
    )
    assert fresh.runs[0].eval_ce == by["baseline", 0].eval_ce


def test_bad_config_is_refused():
    with pytest.raises(ResidlabError, match="unknown target"):
        GuidanceConfig(target="lstm").check()
    with pytest.raises(ResidlabError, match="condition"):
        GuidanceConfig(conditions=("teacher",)).check()


def test_summary_pairs_runs_by_seed():
    from residlab.analyses.guidance_result import GuidanceResult, RunCurve

    def run(condition, seed, ces):
        return RunCurve(condition, seed, [0, 10, 20], [None, 1.0, 1.0], [None, 0.0, 0.0], ces, [[0.5]] * 3, [[0.4]] * 3)

    runs = [run("baseline", 0, [5.0, 4.0, 3.0]), run("guided", 0, [5.0, 3.0, 2.5]), run("baseline", 1, [5.0, 4.0, 3.2])]
    runs.append(run("guided", 1, [5.0, 3.9, 3.3]))
    s = GuidanceResult({}, "g", [0], 1, 1, 1.0, runs).summary()
    assert s["guided_minus_baseline_final_ce"] == pytest.approx(((2.5 - 3.0) + (3.3 - 3.2)) / 2)
    assert s["guided_seeds_better"] == 1 and s["guided_helps"] is False
    assert s["guided_mean_ce_over_training"] == pytest.approx(((3.0 + 2.5) / 2 + (3.9 + 3.3) / 2) / 2)
    assert s["guided_steps_to_baseline_final_ce"] == [10, None]  # 3.0 <= 3.0 at step 10
