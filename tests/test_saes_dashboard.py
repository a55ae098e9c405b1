"""The SAE dashboard, rendered by a real headless Chromium (the page builds its content with JavaScript)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from residlab.saes import HookPoint, TopKConfig
from residlab.saes.activations import HarvestSpec, harvest
from residlab.saes.dashboard import DashboardOptions, write_dashboard
from residlab.saes.training import TrainConfig, train_sae
from residlab.testing import tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Skipped where Chromium is missing, except under CI (CI=true), where `make test` must have installed it.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed (apt-get install -y chromium)"
)
DOCS = [f"The {i}th document talks about apples, pears and the number {i * 11}." for i in range(40)]


def _dump_dom(url: str, profile) -> str:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed under CI: `make test` (make install) should have installed it.")
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    lm = tiny_model("qwen2", layers=3)
    spec = HarvestSpec(lm.name, 1, "block", "test", "fp", "eval", 16)
    store, _ = harvest(lm, DOCS, spec, tmp / "h", max_tokens=600, progress=False)
    cfg = TopKConfig(d_in=64, d_sae=128, k=4, hook=HookPoint(lm.name, 1))
    sae = train_sae(cfg, store, TrainConfig(total_tokens=64 * 10, batch_size=64), tmp / "t", progress=False).sae
    latents = (3, 17, 40)
    path = write_dashboard(lm, sae, store, tmp / "dash.html", DashboardOptions(latents=latents, contexts=3))
    return path, latents, tmp


def test_dashboard_renders_every_latent_with_highlighted_tokens(dashboard):
    path, latents, tmp = dashboard
    dom = _dump_dom(path.as_uri(), tmp / "profile1")
    cards = re.findall(r'<div class="card" id="latent-(\d+)"', dom)
    assert [int(c) for c in cards] == list(latents)
    assert "3 of 3 latents" in dom
    assert re.search(r'class="tok peak" data-act="[0-9.]+" style="background:rgba\(255,120,0,1\.000\)"', dom)
    assert "promotes:" in dom and "suppresses:" in dom


def test_dashboard_search_filters_latents(dashboard):
    path, latents, tmp = dashboard
    dom = _dump_dom(path.as_uri() + "#search=17", tmp / "profile2")
    hidden = re.findall(r'<div class="card" id="latent-(\d+)"[^>]*style="display: none;"', dom)
    assert sorted(int(h) for h in hidden) == [3, 40]
    assert "1 of 3 latents" in dom
