"""Harvesting one layer's activations from a corpus into shuffled, resumable safetensors shards.

The forward pass stops right after the recorded site (a hook raises a private exception, caught
here), so the blocks above it and the unembedding never run. Padding and BOS positions are skipped.
Each shard is shuffled before it is written and written atomically (training then shuffles
several shards' rows together); ``manifest.json`` is rewritten after each shard, so a killed harvest resumes at the
first window it had not stored. A store's folder name carries a fingerprint of the model, layer,
site, corpus, split and context length, so several SAEs reuse one harvest.

Each row keeps its provenance (window index, position, token id), which the dashboard uses to show
contexts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from residlab.core.errors import ResidlabError
from residlab.core.io import atomic_path, write_json
from residlab.interventions.record import SITES, Recording

if TYPE_CHECKING:
    from residlab.models.lm import Batch, LanguageModel

MANIFEST = "manifest.json"
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _StopForward(Exception):
    """Raised by the hook after the recorded site, to skip the rest of the forward pass."""


@dataclass(frozen=True)
class HarvestSpec:
    """What a harvest reads; :attr:`fingerprint` names its folder."""

    model: str
    layer: int
    site: str
    corpus: str  # the corpus name
    corpus_fingerprint: str
    split: str
    context_len: int
    store_dtype: str = "float32"
    # Positions before this are not read: position 0 of every window is an attention sink whose norm
    # dwarfs the rest (and is BOS where the tokenizer adds one), so it would dominate the SAE's loss.
    first_position: int = 1

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def folder_name(self) -> str:
        model = "".join(c if c.isalnum() or c in "-._" else "_" for c in self.model)
        return f"{model}-L{self.layer}-{self.site}-{self.corpus.replace(':', '_')}-{self.split}-{self.fingerprint}"


# --------------------------------------------------------------------------- windows of tokens


def token_windows(lm: LanguageModel, documents: Sequence[str], context_len: int) -> list[list[int]]:
    """Every document tokenised (with the tokenizer's special tokens) and cut into windows of at most
    ``context_len`` tokens; windows shorter than 2 tokens are dropped."""
    if context_len < 2:
        raise ResidlabError(
            f"context length must be at least 2, got {context_len}.", hint="pass --context-len 2 or more."
        )
    windows: list[list[int]] = []
    for doc in documents:
        ids = lm.tokenizer(doc, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), context_len):
            window = ids[start : start + context_len]
            if len(window) >= 2:
                windows.append(list(window))
    return windows


def keep_mask(lm: LanguageModel, batch: Batch, first_position: int = 1) -> torch.Tensor:
    """[batch, tokens] bool: the positions an SAE reads and replaces: real tokens at position >=
    ``first_position`` of their window (position 0 is an attention sink), never BOS or padding."""
    keep = batch.attention_mask.bool()
    positions = batch.attention_mask.cumsum(-1) - 1
    keep &= positions >= first_position
    bos = lm.tokenizer.bos_token_id
    if bos is not None:
        keep &= batch.input_ids != bos
    return keep


@torch.inference_mode()
def site_activations(lm: LanguageModel, batch: Batch, layer: int, site: str) -> torch.Tensor:
    """[batch, tokens, d] activations of ``site`` at ``layer``, running the model only up to that site."""
    if site not in SITES:
        raise ResidlabError(f"unknown site {site!r}.", hint=f"use one of {', '.join(SITES)}.")
    rel, where = SITES[site]
    module = lm.block_part(layer, rel)

    def stop(*_: Any) -> None:
        raise _StopForward

    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with Recording(lm, [layer], positions="all", sites=[site]) as rec:
        # registered after the recording hook on the same module, so it runs right after it
        handle = module.register_forward_hook(stop) if where == "output" else module.register_forward_pre_hook(stop)
        try:
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions)
        except _StopForward:
            pass
        finally:
            handle.remove()
    return rec[layer, site]


# --------------------------------------------------------------------------- the store


class ActivationStore:
    """A harvested folder: shards of ``activations`` [n, d] plus ``window``, ``position``, ``token``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ResidlabError(f"no activation store at {self.folder}.", hint="run `residlab sae harvest` first.")
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None

    @property
    def spec(self) -> HarvestSpec:
        return HarvestSpec(**self.manifest["spec"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    @property
    def num_tokens(self) -> int:
        return sum(int(s["tokens"]) for s in self.shards)

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    def shard(self, index: int) -> dict[str, torch.Tensor]:
        """Shard ``index``'s tensors (the last one read is kept in memory)."""
        if self._cache is None or self._cache[0] != index:
            self._cache = (index, load_file(str(self.folder / self.shards[index]["file"])))
        return self._cache[1]

    def activations(self, limit: int | None = None) -> torch.Tensor:
        """The first ``limit`` rows (all by default) as float32 [n, d]."""
        parts, have = [], 0
        for i in range(len(self.shards)):
            rows = self.shard(i)["activations"].float()
            parts.append(rows if limit is None else rows[: limit - have])
            have += parts[-1].shape[0]
            if limit is not None and have >= limit:
                break
        return torch.cat(parts) if parts else torch.empty(0, self.d)

    def mean(self) -> torch.Tensor:
        """The mean activation over every stored token, float32 [d]."""
        total = torch.zeros(self.d, dtype=torch.float64)
        for i in range(len(self.shards)):
            total += self.shard(i)["activations"].double().sum(dim=0)
        return (total / max(1, self.num_tokens)).float()

    def batches(
        self, batch_size: int, *, seed: int = 0, start_step: int = 0, mix_shards: int = 4
    ) -> Iterator[torch.Tensor]:
        """Endless float32 batches. Each epoch visits the shards in a seeded order, ``mix_shards`` at a
        time, and shuffles the rows of those shards together (a shard holds consecutive documents, so
        mixing several keeps one document's tokens from crowding a batch). Batch ``i`` is the same
        whatever ``start_step`` the stream started at."""
        sizes = [int(s["tokens"]) for s in self.shards]
        if sum(sizes) < batch_size:
            raise ResidlabError(
                f"the store holds {sum(sizes)} tokens, fewer than one batch of {batch_size}.",
                hint="harvest more tokens or use a smaller batch.",
            )
        if mix_shards < 1:
            raise ResidlabError(f"mix_shards must be at least 1, got {mix_shards}.", hint="use e.g. 4.")
        position = start_step * batch_size  # tokens consumed so far
        epoch, offset = divmod(position, sum(sizes))
        carry = torch.zeros(0, self.d)  # the rows of the last group that did not fill a batch
        while True:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(sizes), generator=generator).tolist()
            for start in range(0, len(order), mix_shards):
                group = order[start : start + mix_shards]
                group_size = sum(sizes[i] for i in group)
                perm = torch.randperm(group_size, generator=generator)  # drawn even when skipped
                if offset >= group_size:
                    offset -= group_size
                    continue
                rows = torch.cat([self.shard(i)["activations"] for i in group])[perm[offset:]].float()
                offset = 0
                # One copy per group: batches are slices of it (re-concatenating the remainder for every
                # batch copied the whole group each step).
                rows = torch.cat([carry, rows]) if carry.shape[0] else rows
                full = rows.shape[0] // batch_size * batch_size
                for begin in range(0, full, batch_size):
                    yield rows[begin : begin + batch_size]
                carry = rows[full:]
            epoch += 1


@dataclass(frozen=True)
class HarvestStats:
    """What one harvest call did."""

    tokens: int
    seconds: float
    windows: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _write_shard(folder: Path, index: int, rows: dict[str, list[torch.Tensor]], seed: int) -> dict[str, Any]:
    tensors = {name: torch.cat(parts) for name, parts in rows.items()}
    generator = torch.Generator().manual_seed(seed * 7919 + index)
    perm = torch.randperm(tensors["activations"].shape[0], generator=generator)
    tensors = {name: t[perm].contiguous() for name, t in tensors.items()}
    name = f"shard_{index:05d}.safetensors"
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp))
    return {"file": name, "tokens": int(perm.numel())}


def chunk_rows(
    lm: LanguageModel,
    windows: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    chunk: Sequence[int],
    spec: HarvestSpec,
) -> Rows:
    """The rows one chunk of windows adds to a store (``windows[i]`` for each ``i`` in ``chunk``;
    ``windows`` may hold only those, keyed by position in the full list): activations at the spec's
    site and their provenance, on the CPU in the store's dtype."""
    batch = lm.pad([windows[i] for i in chunk])
    acts = site_activations(lm, batch, spec.layer, spec.site)
    keep = keep_mask(lm, batch, spec.first_position)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    window_ids = torch.tensor(list(chunk), device=keep.device).unsqueeze(1).expand_as(keep)
    return {
        "activations": acts[keep].to("cpu", STORE_DTYPES[spec.store_dtype]),
        "window": window_ids[keep].to("cpu", torch.int32),
        "position": positions[keep].to("cpu", torch.int32),
        "token": batch.input_ids[keep].to("cpu", torch.int32),
    }


Rows = dict[str, torch.Tensor]
# Computes the rows of each chunk (lists of window indices), yielding them in the chunks' order; it
# may run ahead (a Ray pool does) and is closed when the harvest has enough.
ChunkRunner = Callable[[Sequence[list[int]], Iterator[list[int]], HarvestSpec], Iterator[Rows]]


def local_chunks(lm: LanguageModel) -> ChunkRunner:
    """The chunk runner of this process: one chunk at a time on ``lm``."""

    def run(windows: Sequence[list[int]], chunks: Iterator[list[int]], spec: HarvestSpec) -> Iterator[Rows]:
        for chunk in chunks:
            yield chunk_rows(lm, windows, chunk, spec)

    return run


def harvest(
    lm: LanguageModel,
    documents: Sequence[str],
    spec: HarvestSpec,
    root: str | Path,
    *,
    max_tokens: int,
    batch_size: int = 16,
    shard_tokens: int = 65_536,
    seed: int = 0,
    progress: bool = True,
    runner: ChunkRunner | None = None,
) -> tuple[ActivationStore, HarvestStats]:
    """Harvest ``spec`` from ``documents`` into ``root/<spec.folder_name>`` until it holds at least
    ``max_tokens`` tokens (or the documents run out), resuming what an earlier call stored.

    ``runner`` computes the chunks' rows (default: here, on ``lm``; a Ray pool spreads them over
    actors): the chunks, the shards they fill and their shuffles are the same whoever computes them."""
    from tqdm.auto import tqdm

    from residlab.core.io import check_writable_dir

    folder = check_writable_dir(Path(root) / spec.folder_name)
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["spec"] != asdict(spec):
            raise ResidlabError(f"{folder} holds another harvest.", hint="delete it or choose another --work-dir.")
    else:
        manifest = {"spec": asdict(spec), "d": lm.hidden_size, "shards": [], "windows_done": 0, "complete": False}
    windows = token_windows(lm, documents, spec.context_len)
    manifest["windows_total"] = len(windows)
    stored = sum(int(s["tokens"]) for s in manifest["shards"])
    start_window = int(manifest["windows_done"])
    rows: dict[str, list[torch.Tensor]] = {"activations": [], "window": [], "position": [], "token": []}
    pending = 0
    started, harvested = time.perf_counter(), 0
    bar = tqdm(total=max_tokens, initial=min(stored, max_tokens), unit="tok", disable=not progress, desc="harvest")
    index = start_window
    chunks = (list(range(i, min(i + batch_size, len(windows)))) for i in range(start_window, len(windows), batch_size))
    computed = (runner or local_chunks(lm))(windows, chunks, spec)
    try:
        for computed_rows in computed:
            if stored + pending >= max_tokens:
                break
            for name in rows:
                rows[name].append(computed_rows[name])
            got = int(computed_rows["window"].numel())
            # chunks are consecutive runs of batch_size windows from start_window
            pending, harvested, index = pending + got, harvested + got, min(index + batch_size, len(windows))
            bar.update(got)
            if pending >= shard_tokens or index >= len(windows) or stored + pending >= max_tokens:
                manifest["shards"].append(_write_shard(folder, len(manifest["shards"]), rows, seed))
                stored += pending
                manifest["windows_done"] = index
                write_json(manifest_path, manifest)
                rows = {name: [] for name in rows}
                pending = 0
    finally:
        close = getattr(computed, "close", None)
        if close is not None:
            close()  # a runner that computed ahead stops here
    bar.close()
    seconds = time.perf_counter() - started
    manifest["complete"] = stored >= max_tokens or index >= len(windows)
    if harvested:
        manifest["harvest_tokens_per_s"] = harvested / seconds
    write_json(manifest_path, manifest)
    return ActivationStore(folder), HarvestStats(harvested, seconds, index - start_window)
