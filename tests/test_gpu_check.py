"""benchmarks/gpu_check.py: without CUDA it writes nothing and exits 0; its parity and throughput
sections run (on the CPU, on a tiny model) and find residlab's hooks equal to hand-written ones."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from residlab.testing import save_tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_writes_nothing(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "results")
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "results").exists()


def test_sections_on_a_tiny_model(gpu_check, tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    args = argparse.Namespace(
        model=str(folder),
        device="cpu",
        new_tokens=4,
        asc_limit=2,
        asc_pairs=4,
        asc_max_new_tokens=6,
        asc_keep="all",
        data_dir=None,
    )
    check = gpu_check.Check(args, time.perf_counter() + 120)
    parity = gpu_check.parity(check)
    assert parity["unsteered_max_abs_diff_vs_plain_model"] < 1e-5
    assert parity["steered_max_abs_diff_vs_hand_hook"] < 1e-5
    assert parity["steering_effect_max_abs_logit_change"] > 1e-3
    assert parity["per_row_batched_vs_alone_token_agreement"] == [1.0] * 4
    rows = gpu_check.throughput(check)["rows"]
    assert [r["batch_size"] for r in rows] == [1, 32] and all(r["tokens_per_s_steered"] > 0 for r in rows)


def test_asc_section_on_a_tiny_model(gpu_check, tmp_path):
    from residlab.data.problems import find_data_dir

    if find_data_dir() is None:
        pytest.skip("no GSM8K data folder here")
    folder = save_tiny_model(tmp_path / "tiny")
    args = argparse.Namespace(
        model=str(folder),
        device="cpu",
        new_tokens=4,
        asc_limit=2,
        asc_pairs=4,
        asc_max_new_tokens=6,
        asc_keep="all",
        data_dir=None,
    )
    result = gpu_check.asc(gpu_check.Check(args, time.perf_counter() + 120))
    assert set(result["conditions"]) == {"baseline", "asc"}
    assert all(c["n"] == 2 for c in result["conditions"].values())
