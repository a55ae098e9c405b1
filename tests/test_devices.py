"""Device resolution (a pure function of the options and a Hardware description) and interventions on a
model split over several placements by an accelerate device map (on the CPU: blocks kept in memory
and blocks offloaded to disk, whose weights sit on the meta device until accelerate loads them)."""

from __future__ import annotations

import copy

import pytest
import torch

from residlab import SteeringVector
from residlab.core.errors import ResidlabError
from residlab.interventions.positions import ForwardContext
from residlab.models.devices import (
    Hardware,
    block_devices,
    check_device_map,
    describe_blocks,
    input_device,
    placement,
    resolve_device,
    resolve_dtype,
)
from residlab.models.lm import LanguageModel
from residlab.testing import tiny_model

CPU_ONLY = Hardware()
TWO_GPUS = Hardware(cuda_devices=2, cuda_bf16=True)
OLD_GPU = Hardware(cuda_devices=1, cuda_bf16=False)
MAC = Hardware(mps=True)


@pytest.mark.parametrize(
    ("spec", "hardware", "expected"),
    [
        ("auto", CPU_ONLY, "cpu"),
        ("auto", TWO_GPUS, "cuda:0"),
        ("auto", MAC, "mps"),
        ("cpu", TWO_GPUS, "cpu"),
        ("cuda", TWO_GPUS, "cuda:0"),
        ("cuda:1", TWO_GPUS, "cuda:1"),
        ("CUDA:1", TWO_GPUS, "cuda:1"),
        ("mps", MAC, "mps"),
    ],
)
def test_resolve_device(spec, hardware, expected):
    assert resolve_device(spec, hardware) == torch.device(expected)


@pytest.mark.parametrize(
    ("spec", "hardware", "words"),
    [
        ("cuda", CPU_ONLY, "no CUDA GPU"),
        ("cuda:2", TWO_GPUS, "has 2 CUDA GPU"),
        ("cuda:x", TWO_GPUS, "cannot read"),
        ("mps", CPU_ONLY, "no MPS"),
        ("tpu", TWO_GPUS, "unknown device"),
    ],
)
def test_resolve_device_refuses_what_the_machine_lacks(spec, hardware, words):
    with pytest.raises(ResidlabError, match=words) as err:
        resolve_device(spec, hardware)
    assert err.value.hint


@pytest.mark.parametrize(
    ("spec", "device", "hardware", "expected"),
    [
        (None, "cuda:0", TWO_GPUS, torch.float32),  # analyses stay exact unless asked
        ("auto", "cuda:0", TWO_GPUS, torch.bfloat16),
        ("auto", "cuda:0", OLD_GPU, torch.float16),
        ("auto", "mps", MAC, torch.float16),
        ("auto", "cpu", CPU_ONLY, torch.float32),
        ("auto", "cpu", Hardware(cpu_bf16=True), torch.bfloat16),  # AMX / AVX512-BF16: measured 2x faster
        ("fp16", "cpu", CPU_ONLY, torch.float16),
        (torch.bfloat16, "cpu", CPU_ONLY, torch.bfloat16),
    ],
)
def test_resolve_dtype(spec, device, hardware, expected):
    assert resolve_dtype(spec, device, hardware) == expected


def test_placement_and_device_maps():
    where = placement("auto", "auto", "auto", TWO_GPUS)
    assert where.device == torch.device("cuda:0") and where.dtype == torch.bfloat16
    assert where.from_pretrained_kwargs() == {"dtype": torch.bfloat16, "device_map": "auto"}
    assert placement("cpu", None, None, CPU_ONLY).from_pretrained_kwargs() == {"dtype": torch.float32}
    assert check_device_map(None) is None and check_device_map("balanced") == "balanced"
    with pytest.raises(ResidlabError, match="unknown device map"):
        check_device_map("everywhere")


def test_describe_blocks():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert describe_blocks([cpu, cpu]) == "cpu"
    assert describe_blocks([cpu, cpu, meta, meta, cpu]) == "cpu (blocks 0-1), meta (blocks 2-3), cpu (blocks 4-4)"


def test_forward_context_moves_once_per_device(qwen):
    ctx = ForwardContext(torch.tensor([[0, 1]]), torch.tensor([2]), torch.tensor([0]))
    assert ctx.to(torch.device("cpu")) is ctx
    moved = ctx.to(torch.device("meta"))
    assert moved.positions.device.type == "meta" and moved.row_index.device.type == "meta"
    tracker = qwen.tracker
    tracker.acquire()
    try:
        tracker.context = ctx
        first = tracker.context_on(torch.device("meta"))
        assert tracker.context_on(torch.device("meta")) is first  # cached for the pass
        assert tracker.context_on(torch.device("cpu")) is ctx
        assert tracker.steering_mask("all", torch.float32, torch.device("meta")).device.type == "meta"
    finally:
        tracker.release()


# -------------------------------------------------------------------- a model split by a device map


@pytest.fixture(scope="module")
def split_pair(tmp_path_factory):
    """(reference, split): the same tiny 4-block model whole, and dispatched by accelerate with blocks
    1, 2 and the unembedding offloaded to disk (weights on ``meta`` until each forward)."""
    from accelerate import dispatch_model

    lm = tiny_model("qwen2", layers=4)
    reference = LanguageModel(copy.deepcopy(lm.model), lm.tokenizer, name=lm.name)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.layers.3": "cpu",
        "model.norm": "cpu",
        "lm_head": "disk",
    }
    offload = tmp_path_factory.mktemp("offload")
    split = dispatch_model(lm.model, device_map=device_map, main_device="cpu", offload_dir=str(offload))
    return reference, LanguageModel(split, lm.tokenizer, name=lm.name)


def test_the_split_model_really_is_split(split_pair):
    _, split = split_pair
    stored = [next(b.parameters()).device.type for b in split.blocks]
    assert stored == ["cpu", "meta", "meta", "cpu"]
    assert [d.type for d in block_devices(split.blocks)] == ["cpu"] * 4  # where accelerate runs them
    assert input_device(split.model) == torch.device("cpu")
    assert split.device == torch.device("cpu")


def test_steering_and_recording_across_a_split_model(split_pair):
    reference, split = split_pair
    g = torch.Generator().manual_seed(0)
    vector = SteeringVector.from_layers(
        {1: torch.randn(64, generator=g) * 3, 2: torch.randn(64, generator=g) * 3}, model=reference, source="test"
    )
    texts = ["hello world, a longer text", "hi"]
    results = []
    for lm in (reference, split):
        with lm.steer(vector, 1.5, "all"), lm.record([0, 2, 3], "last", sites=("block", "mlp")) as rec:
            logits = lm.forward(texts)
        results.append((logits, {key: rec[key] for key in [(0, "block"), (2, "block"), (2, "mlp"), (3, "block")]}))
    (ref_logits, ref_rec), (split_logits, split_rec) = results
    torch.testing.assert_close(split_logits, ref_logits)
    for key in ref_rec:
        torch.testing.assert_close(split_rec[key], ref_rec[key])
        assert split_rec[key].device == split.device
    with reference.steer(vector, 1.5, "all"):
        steered = reference.forward(texts)
    assert not torch.allclose(steered, reference.forward(texts))  # the steering did something


def test_per_row_steered_generation_and_edits_across_a_split_model(split_pair):
    reference, split = split_pair
    g = torch.Generator().manual_seed(1)
    vectors = [
        SteeringVector.from_layers({2: torch.randn(64, generator=g) * 4}, model=reference, source="test")
        for _ in range(3)
    ]
    prompts = ["Natalia sold clips.", "How many?", "Weng earns $12 an hour."]
    outputs = []
    for lm in (reference, split):
        with lm.steer(vectors, [1.0, 0.5, 2.0], "prompt_last+generated"):
            steered = [g.text for g in lm.generate(prompts, max_new_tokens=6, chat=False, batch_size=2)]
        with lm.skip([1, 2]):
            skipped = lm.forward(["hello world"])
        outputs.append((steered, skipped))
    assert outputs[0][0] == outputs[1][0]
    torch.testing.assert_close(outputs[1][1], outputs[0][1])


def test_load_with_a_device_map(tmp_path):
    from residlab.models.loading import load
    from residlab.testing import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    lm = load(str(folder), device="auto", device_map={"": "cpu"})  # through accelerate's loading path
    assert lm.device == torch.device("cpu")
    plain = load(str(folder))
    torch.testing.assert_close(lm.forward(["hello"]), plain.forward(["hello"]))


def test_cli_refuses_a_gpu_this_machine_lacks():
    from typer.testing import CliRunner

    from residlab.cli.main import app

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(app, ["info", "--device", "cuda:0"])
    assert result.exit_code == 2
    assert "no CUDA GPU" in result.output and "hint:" in result.output
    result = CliRunner().invoke(app, ["eval", "--device-map", "everywhere"])
    assert result.exit_code == 2 and "unknown device map" in result.output
