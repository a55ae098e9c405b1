"""Sparse autoencoders on tiny random models: corpus split, harvest, training invariants, evaluation, files."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from residlab.core.errors import ResidlabError
from residlab.data.corpus import Corpus, load_corpus
from residlab.saes import build_sae
from residlab.saes.activations import ActivationStore, HarvestSpec, harvest, site_activations, token_windows
from residlab.saes.base import HookPoint, geometric_median
from residlab.saes.evaluation import SAEEvalResult, downstream_ce, reconstruction_metrics, topk_jaccard
from residlab.saes.files import load_sae, save_sae
from residlab.saes.topk import TopKConfig
from residlab.saes.training import TrainConfig, train_sae
from residlab.saes.vsae import VSAEConfig
from residlab.testing import tiny_model

DOCS = [f"Document {i}: the quick brown fox {i} jumps over {i * 7} lazy dogs and counts to {i * 3}." for i in range(60)]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("qwen2", layers=4)


def _spec(lm, layer=1, site="block", context_len=16):
    return HarvestSpec(lm.name, layer, site, "test", "fp", "train", context_len)


def identity_oracle(d_in: int, layer: int = 1) -> torch.nn.Module:
    """A real TopK SAE that reconstructs exactly: latents +e_i and -e_i, k = d_in (one of each pair fires)."""
    sae = build_sae(TopKConfig(d_in=d_in, d_sae=2 * d_in, k=d_in, hook=HookPoint("tiny-qwen2", layer)))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# --------------------------------------------------------------------------- corpus


def test_corpus_split_is_disjoint_deterministic_and_order_free():
    corpus = Corpus("c", tuple(DOCS), "test", "none")
    train, held = corpus.split("train", eval_fraction=0.2), corpus.split("eval", eval_fraction=0.2)
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(DOCS)
    assert 0 < len(held) < len(DOCS)
    reversed_corpus = Corpus("c", tuple(reversed(DOCS)), "test", "none")
    assert set(reversed_corpus.split("eval", eval_fraction=0.2)) == set(held)


def test_user_text_file_corpus(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\n\nsecond doc\n")
    corpus = load_corpus(str(path))
    assert corpus.documents == ("first doc", "second doc")
    with pytest.raises(ResidlabError, match="unknown corpus"):
        load_corpus("no-such-corpus")


def test_wiki_corpus_ships_with_the_package():
    corpus = load_corpus("wiki")
    assert len(corpus.documents) > 5000
    assert "CC BY-SA" in corpus.licence
    assert len(corpus.split("eval")) > 100


# --------------------------------------------------------------------------- harvest


def test_harvest_stops_after_the_recorded_layer(lm):
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(lm.blocks)]
    head = lm.model.lm_head.register_forward_hook(lambda m, a, o: ran.append("head"))
    try:
        batch = lm.encode(["hello there", "a longer text to pad the other row"])
        acts = site_activations(lm, batch, 1, "block")
    finally:
        for h in [*handles, head]:
            h.remove()
    assert ran == [0, 1]
    with lm.record([1], positions="all") as rec:
        lm.forward(batch)
    assert torch.allclose(acts, rec[1])


@pytest.mark.parametrize("site", ["block_input", "mlp", "mlp_act"])
def test_harvest_sites_match_a_full_recording(lm, site):
    batch = lm.encode(["hello there friend"])
    acts = site_activations(lm, batch, 2, site)
    with lm.record([2], positions="all", sites=[site]) as rec:
        lm.forward(batch)
    assert torch.allclose(acts, rec[2, site])


def test_harvest_skips_padding_and_resumes_after_a_kill(lm, tmp_path, monkeypatch):
    import residlab.saes.activations as activations

    spec = _spec(lm)
    full, _ = harvest(lm, DOCS, spec, tmp_path / "full", max_tokens=600, batch_size=4, shard_tokens=100, progress=False)
    windows = token_windows(lm, DOCS, 16)
    # no padding rows, and no position 0 (the attention sink every window starts with)
    assert full.num_tokens == sum(len(w) - 1 for w in windows[: full.manifest["windows_done"]])
    real_write, calls = activations._write_shard, []

    def dying_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(activations, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        harvest(lm, DOCS, spec, tmp_path / "killed", max_tokens=600, batch_size=4, shard_tokens=100, progress=False)
    monkeypatch.setattr(activations, "_write_shard", real_write)
    partial = ActivationStore(tmp_path / "killed" / spec.folder_name)
    assert len(partial.shards) == 2 and not partial.manifest["complete"]
    resumed, stats = harvest(
        lm, DOCS, spec, tmp_path / "killed", max_tokens=600, batch_size=4, shard_tokens=100, progress=False
    )
    assert stats.tokens == full.num_tokens - partial.num_tokens
    assert torch.equal(resumed.activations(), full.activations())
    assert resumed.manifest["complete"]


def test_store_batches_are_the_same_from_any_start(lm, tmp_path):
    store, _ = harvest(lm, DOCS, _spec(lm), tmp_path, max_tokens=500, batch_size=8, shard_tokens=90, progress=False)
    stream = store.batches(64, seed=3)
    first = [next(stream) for _ in range(12)]  # more than one epoch
    later = store.batches(64, seed=3, start_step=7)
    for expected in first[7:]:
        assert torch.equal(next(later), expected)


def test_store_batches_mix_rows_of_several_shards(lm, tmp_path):
    store, _ = harvest(lm, DOCS, _spec(lm), tmp_path, max_tokens=500, batch_size=8, shard_tokens=90, progress=False)
    assert len(store.shards) >= 4
    rows = {tuple(r.tolist()): i for i in range(len(store.shards)) for r in store.shard(i)["activations"]}
    one_batch = next(store.batches(64, seed=0, mix_shards=4))
    shards_in_batch = {rows[tuple(r.tolist())] for r in one_batch}
    assert len(shards_in_batch) >= 3  # one shard alone would fill a batch of 64 without mixing
    unmixed = next(store.batches(64, seed=0, mix_shards=1))
    assert len({rows[tuple(r.tolist())] for r in unmixed}) <= 2
    total = sum(int(s["tokens"]) for s in store.shards)
    epoch = torch.cat(list(itertools.islice(store.batches(10, seed=0), total // 10 + 1)))[:total]
    assert len({tuple(r.tolist()) for r in epoch}) == len(rows)  # an epoch visits every row once


# --------------------------------------------------------------------------- the SAEs


def test_topk_selects_exactly_k_and_decoder_stays_unit_norm(lm, tmp_path):
    store, _ = harvest(lm, DOCS, _spec(lm), tmp_path / "h", max_tokens=800, progress=False)
    cfg = TopKConfig(d_in=64, d_sae=256, k=8, dead_window=200, hook=HookPoint(lm.name, 1))
    trained = train_sae(cfg, store, TrainConfig(total_tokens=128 * 30, batch_size=128, warmup_steps=3), tmp_path / "t")
    sae = trained.sae
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)
    x = store.activations(64)
    out = sae(x)
    positive = out.pre.topk(8, dim=-1).values[:, -1] > 0
    assert ((out.z != 0).sum(-1)[positive] == 8).all()
    assert ((out.z != 0).sum(-1) <= 8).all()
    assert trained.history[-1]["nmse"] < trained.history[0]["nmse"]


def test_parallel_gradient_is_removed():
    sae = build_sae(TopKConfig(d_in=8, d_sae=32, k=4))
    terms, _ = sae.loss(torch.randn(64, 8) * 3)
    terms.total.backward()
    sae.remove_parallel_gradient()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(dim=1), torch.zeros(32), atol=1e-6)


def test_dead_latent_bookkeeping_and_aux_k():
    sae = build_sae(TopKConfig(d_in=8, d_sae=16, k=2, dead_window=100, aux_k=4))
    z = torch.zeros(60, 16)
    z[:, 3] = 1.0
    sae.record_firing(z)
    sae.record_firing(z[:, :] * 0)  # nothing fires: 120 tokens without latent 3 firing... except it fired
    assert sae.tokens_since_fired[3] == 60 and sae.tokens_since_fired[0] == 120
    assert sae.dead_mask.sum() == 15 and not sae.dead_mask[3]
    x = torch.randn(32, 8)
    assert float(sae.aux_k_loss(x, sae(x)).detach()) > 0
    sae.tokens_since_fired.zero_()
    assert float(sae.aux_k_loss(x, sae(x)).detach()) == 0.0


def test_geometric_median_resists_an_outlier():
    points = torch.cat([torch.zeros(20, 3), torch.full((1, 3), 1000.0)])
    assert geometric_median(points).norm() < 1.0 < points.mean(0).norm()


def test_training_resumes_to_the_same_sae(lm, tmp_path):
    store, _ = harvest(lm, DOCS, _spec(lm), tmp_path / "h", max_tokens=800, progress=False)
    cfg = VSAEConfig(d_in=64, d_sae=128, k=4, sample=True, hook=HookPoint(lm.name, 1))
    train = TrainConfig(total_tokens=64 * 20, batch_size=64, warmup_steps=2, checkpoint_every=5)
    whole = train_sae(cfg, store, train, tmp_path / "whole", progress=False).sae
    train_sae(cfg, store, train, tmp_path / "split", progress=False, stop_after=10)
    resumed = train_sae(cfg, store, train, tmp_path / "split", progress=False).sae
    for name, tensor in whole.state_dict().items():
        assert torch.allclose(tensor, resumed.state_dict()[name]), name


def test_vsae_sampling_is_honest_and_codes_keep_their_sign():
    sae = build_sae(VSAEConfig(d_in=8, d_sae=32, k=4))
    x = torch.randn(16, 8)
    assert torch.equal(sae(x, sample=False).z, sae(x, sample=False).z)
    assert not torch.equal(sae(x, sample=True).z, sae(x, sample=False).z)
    z = sae(x, sample=False).z
    assert ((z != 0).sum(-1) == 4).all() and (z < 0).any()
    stability = topk_jaccard(sae, x)
    assert 0.0 <= stability["jaccard_sample_vs_sample"] <= 1.0
    with torch.no_grad():
        sae.b_var.fill_(-6.0)  # little noise: mostly the same latents win
    quiet = topk_jaccard(sae, torch.randn(400, 8))["jaccard_mean_vs_sample"]
    with torch.no_grad():
        sae.b_var.fill_(2.0)
    loud = topk_jaccard(sae, torch.randn(400, 8))["jaccard_mean_vs_sample"]
    assert quiet > 0.8 > loud


# --------------------------------------------------------------------------- evaluation


def test_identity_oracle_splice_gives_the_original_ce(lm):
    sae = identity_oracle(lm.hidden_size)
    windows = token_windows(lm, DOCS[:6], 16)
    ce = downstream_ce(lm, sae, windows, torch.zeros(lm.hidden_size), batch_size=3)
    assert ce["ce_loss_sae"] == pytest.approx(ce["ce_loss_original"], abs=1e-4)
    assert ce["ce_loss_zero_ablation"] != pytest.approx(ce["ce_loss_original"], abs=1e-3)
    assert ce["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_reconstruction_metrics_both_conventions():
    sae = identity_oracle(8)
    x = torch.rand(100, 8) + 5.0
    perfect = reconstruction_metrics(sae, x)
    assert perfect["fve_centred"] == pytest.approx(1.0) and perfect["fve_raw"] == pytest.approx(1.0)
    with torch.no_grad():
        sae.W_dec.mul_(0.9)  # x_hat = 0.9 x: the error is 0.1 x
    shifted = reconstruction_metrics(sae, x)
    centred = x - x.mean(0)
    assert shifted["fve_raw"] == pytest.approx(0.99, abs=1e-5)
    assert shifted["fve_centred"] == pytest.approx(1 - 0.01 * x.pow(2).sum() / centred.pow(2).sum(), abs=1e-4)
    assert shifted["fve_centred"] < shifted["fve_raw"]
    assert shifted["nmse_centred"] == pytest.approx(1 - shifted["fve_centred"])
    assert perfect["alive_fraction"] == 0.5  # x > 0 everywhere: the -e_i latents never fire
    assert perfect["l0"] == pytest.approx(8.0)


def test_alive_over_several_stores_counts_the_union(lm, tmp_path):
    from residlab.saes.pipeline import alive_over

    first, _ = harvest(lm, DOCS[:30], _spec(lm), tmp_path / "a", max_tokens=300, progress=False)
    second, _ = harvest(lm, DOCS[30:], _spec(lm), tmp_path / "b", max_tokens=300, progress=False)
    torch.manual_seed(0)
    sae = build_sae(TopKConfig(d_in=lm.hidden_size, d_sae=256, k=2, hook=HookPoint(lm.name, 1)))
    both = alive_over(sae, [first, second], batch_size=100)
    union = reconstruction_metrics(sae, torch.cat([first.activations(), second.activations()]))
    assert both["tokens"] == first.num_tokens + second.num_tokens
    assert both["alive_fraction"] == pytest.approx(union["alive_fraction"])
    alone = [alive_over(sae, [store])["alive_fraction"] for store in (first, second)]
    assert max(alone) < both["alive_fraction"] < 1.0  # k=2 of 256: the union finds latents each store missed
    with pytest.raises(ValueError):
        alive_over(sae, [])


def test_eval_result_writes_json_and_plots(tmp_path):
    metrics = reconstruction_metrics(identity_oracle(8), torch.randn(50, 8))
    result = SAEEvalResult(
        "m", 1, "block", "topk", None, 16, 8, 1000, metrics, {"ce_loss_recovered": 1.0}, {}, [{"step": 1, "nmse": 0.5}]
    )
    paths = result.save(tmp_path)
    assert {p.name for p in paths} == {"sae_eval.json", "latent_density.png", "training_curve.png"}
    assert json.loads((tmp_path / "sae_eval.json").read_text())["summary"]["fve_centred"] == pytest.approx(1.0)
    assert result.row()["nmse"] == pytest.approx(metrics["nmse_centred"])


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("cfg", [TopKConfig(d_in=8, d_sae=32, k=4), VSAEConfig(d_in=8, d_sae=32, k=4, sample=True)])
def test_save_load_round_trip(tmp_path, cfg):
    sae = build_sae(cfg)
    sae.tokens_since_fired.fill_(7)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    x = torch.randn(5, 8)
    assert torch.allclose(loaded(x, sample=False).x_hat, sae(x, sample=False).x_hat)
    assert int(loaded.tokens_since_fired[0]) == 7
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved["d_in"] == 8 and saved["metadata"]["hook_name"] == "blocks.0.hook_resid_post"


def test_saelens_loads_a_residlab_topk_sae(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[saelens]')")
    sae = build_sae(TopKConfig(d_in=16, d_sae=64, k=6))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    save_sae(sae, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = torch.randn(10, 16) * 4
    assert torch.allclose(theirs.encode(x), sae(x).z, atol=1e-5)
    assert torch.allclose(theirs(x), sae(x).x_hat, atol=1e-5)


# --------------------------------------------------------------------------- decompose and steer


def test_decomposition_recovers_a_sparse_combination(lm):
    from residlab.saes.decompose import decompose_vector, latent_vector
    from residlab.vectors.steering_vector import SteeringVector

    torch.manual_seed(0)
    sae = build_sae(TopKConfig(d_in=64, d_sae=256, k=8, hook=HookPoint(lm.name, 1)))
    v = 3.0 * sae.W_dec[10].detach() + 1.0 * sae.W_dec[200].detach()
    vector = SteeringVector.from_tensor(v, model=lm, layer=1, source="test")
    result = decompose_vector(sae, vector, lm=lm, max_latents=4)
    assert result.explained_fraction > 0.999
    assert [row["latent"] for row in result.fit[:2]] == [10, 200]
    assert result.fit[0]["coefficient"] == pytest.approx(3.0, abs=1e-2)
    assert sum(row["share"] for row in result.fit) == pytest.approx(result.explained_fraction, abs=1e-4)
    assert result.fit[0]["promoted"] and result.readout[0]["latent"] in (10, 200)
    with pytest.raises(ResidlabError, match="top contexts need the model"):
        decompose_vector(sae, vector, contexts=object())  # type: ignore[arg-type]
    steer = latent_vector(sae, 10, lm, scale=2.0)
    assert steer.layers == [1] and steer.norm() == pytest.approx(2.0, abs=1e-5) and steer.info["sae_latent"] == 10
    with lm.steer(steer, 1.0, positions="all"):
        lm.forward(["steered text"])  # a latent vector steers like any other


@pytest.mark.real_model
def test_real_model_harvest_stops_early_and_oracle_splice_is_exact():
    from residlab.models.loading import load
    from residlab.saes.pipeline import stop_ratio

    real = load("smollm2-135m-instruct", dtype="float32")
    windows = token_windows(real, load_corpus("wiki").split("eval")[:6], 64)
    ratio = stop_ratio(real, windows, 3, "block", batch_size=3)
    assert ratio["ratio"] < 0.6  # 4 of 30 blocks and no unembedding
    sae = identity_oracle(real.hidden_size, layer=3)
    sae.cfg = TopKConfig(
        d_in=real.hidden_size, d_sae=2 * real.hidden_size, k=real.hidden_size, hook=HookPoint(real.name, 3)
    )
    ce = downstream_ce(real, sae, windows, torch.zeros(real.hidden_size), batch_size=3)
    assert ce["ce_loss_sae"] == pytest.approx(ce["ce_loss_original"], abs=1e-3)
    assert ce["ce_loss_zero_ablation"] > ce["ce_loss_original"] + 1.0


def test_keep_mask_leaves_out_padding_bos_and_the_first_position(qwen):
    from residlab.saes.activations import keep_mask

    bos = qwen.tokenizer.bos_token_id
    batch = qwen.pad([[bos, 5, 6, 7], [8, 9]])  # left-padded: the second row starts at column 2
    keep = keep_mask(qwen, batch)
    assert keep.tolist() == [[False, True, True, True], [False, False, False, True]]
    assert keep_mask(qwen, batch, first_position=0).tolist() == [[False, True, True, True], [False, False, True, True]]


# --------------------------------------------------------------------------- BatchTopK


def test_batchtopk_keeps_k_per_token_on_average_and_learns_its_threshold(lm, tmp_path):
    from residlab.saes.batchtopk import BatchTopKConfig, batch_topk_codes

    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.1, 0.2, 5.0, 4.0]])
    codes = batch_topk_codes(pre, 2)  # the 4 largest of the whole batch, whichever row they are in
    assert codes.tolist() == [[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]]
    store, _ = harvest(lm, DOCS, _spec(lm), tmp_path / "h", max_tokens=800, progress=False)
    cfg = BatchTopKConfig(d_in=64, d_sae=256, k=8, dead_window=200, hook=HookPoint(lm.name, 1), threshold_lr=0.2)
    trained = train_sae(cfg, store, TrainConfig(total_tokens=128 * 30, batch_size=128, warmup_steps=3), tmp_path / "t")
    sae = trained.sae
    x = store.activations(256)
    with torch.no_grad():
        terms, out = sae.loss(x)
    assert int((out.z != 0).sum()) == 8 * 256  # the batch rule: k per token on average, exactly
    threshold = float(sae.threshold[0])
    assert threshold > 0 and torch.all(sae.threshold == threshold)
    inference = sae(x).z  # the JumpReLU rule keeps about as many as the batch rule did
    assert 0.5 * 8 < float((inference != 0).sum(-1).float().mean()) < 2 * 8
    assert torch.all(inference[inference != 0] > threshold)
    assert trained.history[-1]["nmse"] < trained.history[0]["nmse"]


def test_saelens_loads_a_residlab_batchtopk_sae_as_jumprelu(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[sae]')")
    from residlab.saes.batchtopk import BatchTopKConfig

    sae = build_sae(BatchTopKConfig(d_in=16, d_sae=64, k=6))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.threshold.fill_(0.7)
    save_sae(sae, tmp_path / "sae")
    assert float(load_sae(tmp_path / "sae").threshold[3]) == pytest.approx(0.7)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = torch.randn(10, 16) * 4
    assert torch.allclose(theirs.encode(x), sae(x).z, atol=1e-5)
    assert torch.allclose(theirs(x), sae(x).x_hat, atol=1e-5)
