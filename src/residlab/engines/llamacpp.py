"""The llama.cpp engine: the quantised GGUF through llama-cpp-python, steered by llama.cpp's own
control-vector adapter.

Layers: llama.cpp adds control vector layer ``il`` to the output of decoder block ``il`` (0-based;
its buffer starts at layer 1 and layer 0 cannot be steered). That is residlab's convention, so a
residlab layer is passed through unchanged (tested against the torch engine).

Positions: a control vector is a context-wide setting, so the engine switches it between the
phases of a generation: the prompt minus its last token, the last prompt token, and the generated
tokens (:class:`~residlab.interventions.positions.SteeringPhases`). That gives exactly residlab's
rules ``all``, ``prompt``, ``generated`` and ``prompt_last+generated``; token-index rules and
per-row vectors are torch-engine only. An adaptive strength schedule runs exactly too: each step's
active sequences are decoded in groups of equal scale, the control vector scaled per group (a 0/1
schedule costs at most two decode calls a step; ``entropy`` gives each row its own scale, so its
rows decode one by one).

Batching: up to ``batch_size`` prompts run as parallel llama.cpp sequences in one context, all of
them decoded in one ``llama_decode`` call per step; finished sequences leave the batch. Token ids
come from the same Hugging Face tokenizer as the torch engine, so both engines see the same input.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from residlab.core.errors import ResidlabError
from residlab.core.generation import BatchDecoder, DecodedBatch, PromptBatch, SamplingParams, pick_next_tokens
from residlab.engines.base import Engine, SteeringSpec
from residlab.interventions.positions import NO_STEERING, PHASED_RULES, SteeringPhases, steering_phases
from residlab.interventions.schedules import ScheduleStep, StrengthSchedule

_quiet_callback: Any = None  # kept alive: llama.cpp holds the pointer


@dataclass(frozen=True)
class _ControlVector:
    """A steering delta in llama.cpp's buffer layout, built once per call."""

    data: np.ndarray  # float32 [(n_layer - 1) * n_embd], row k = layer k + 1
    first_layer: int
    last_layer: int


def import_llama_cpp() -> Any:
    """The low-level ``llama_cpp`` bindings, or a clear error saying how to install them."""
    try:
        from llama_cpp import llama_cpp
    except ImportError:
        raise ResidlabError(
            "the llama.cpp engine needs llama-cpp-python, which is not installed.",
            hint="`make install-llamacpp` (builds it from source once, a few minutes; the wheel is cached), "
            "or `pip install 'residlab[llamacpp]'`.",
        ) from None
    return llama_cpp


def _silence(lib: Any) -> None:
    global _quiet_callback
    if _quiet_callback is None and not os.environ.get("RESIDLAB_DEBUG"):
        _quiet_callback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(
            lambda level, text, user: None
        )
        lib.llama_log_set(_quiet_callback, ctypes.c_void_p())


ALL_LAYERS = 999  # llama.cpp caps n_gpu_layers at the model's depth (+ the output layer)


def usable_cores() -> int:
    """The cores this process may run on (``taskset``, cgroup cpusets), not every core the machine has:
    more llama.cpp threads than cores makes decoding several times slower."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def gpu_layers(requested: int | None, supports_gpu: bool) -> int:
    """How many layers llama.cpp offloads: ``None`` -> all of them where the build has GPU support
    (CUDA, Metal...), else none; ``-1`` -> all; ``0`` -> none; ``n`` -> the first ``n``. Asking a
    CPU-only build for GPU layers is an error (it would silently run on the CPU)."""
    if requested is None:
        return ALL_LAYERS if supports_gpu else 0
    if requested < -1:
        raise ResidlabError(f"--n-gpu-layers {requested} is not a layer count.", hint="use -1 (all), 0 or more.")
    if requested == 0:
        return 0
    if not supports_gpu:
        raise ResidlabError(
            f"--n-gpu-layers {requested}, but this llama-cpp-python was built without GPU support.",
            hint="rebuild it on a machine with a CUDA toolkit (`make install-llamacpp` builds with -DGGML_CUDA=on "
            "when nvcc is found), or pass --n-gpu-layers 0.",
        )
    return ALL_LAYERS if requested == -1 else requested


class LlamaCppEngine(Engine):
    """Generate and score with llama.cpp. Build one with :func:`residlab.engines.open_engine`."""

    kind = "llamacpp"
    first_steerable_layer = 1  # the control-vector buffer starts at layer 1

    def __init__(
        self,
        gguf_path: str | Path,
        tokenizer: Any,
        *,
        name: str,
        eos_ids: Sequence[int] = (),
        threads: int | None = None,
        n_gpu_layers: int | None = None,
    ) -> None:
        self._lib = lib = import_llama_cpp()
        _silence(lib)
        self.gguf_path = Path(gguf_path)
        if not self.gguf_path.is_file():
            raise ResidlabError(f"no GGUF file at {self.gguf_path}.", hint="check the path.")
        super().__init__(tokenizer, name)
        self.threads = threads or usable_cores()
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        self.n_gpu_layers = gpu_layers(n_gpu_layers, bool(lib.llama_supports_gpu_offload()))
        params.n_gpu_layers = self.n_gpu_layers
        self._model = lib.llama_model_load_from_file(str(self.gguf_path).encode(), params)
        if not self._model:
            raise ResidlabError(
                f"llama.cpp could not load {self.gguf_path}.",
                hint="the file may be truncated or of an architecture this llama-cpp-python does not know "
                "(RESIDLAB_DEBUG=1 shows llama.cpp's log).",
            )
        self._num_layers = int(lib.llama_model_n_layer(self._model))
        self._hidden_size = int(lib.llama_model_n_embd(self._model))
        self.vocab_size: int = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self._ctx: Any = None
        self._ctx_shape = (0, 0)  # (sequences, cells)
        self._batch: Any = None
        self._batch_capacity = 0
        self._cvec_applied: _ControlVector | None = None
        self.n_batch = 2048

    # -- facts ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def identity(self) -> str:
        stat = self.gguf_path.stat()
        # GPU kernels round differently from the CPU's: offloaded runs keep records of their own
        gpu = "" if self.n_gpu_layers == 0 else f"@gpu{self.n_gpu_layers if self.n_gpu_layers != ALL_LAYERS else ''}"
        return f"llamacpp:{self.gguf_path.name}:{stat.st_size}{gpu}"

    # -- llama.cpp state ----------------------------------------------------------------------
    def _context(self, sequences: int, cells: int) -> Any:
        """A context with room for ``sequences`` parallel sequences and ``cells`` KV cells in all."""
        lib = self._lib
        have_seq, have_cells = self._ctx_shape
        if self._ctx is not None and have_seq >= sequences and have_cells >= cells:
            return self._ctx
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        sequences = max(sequences, have_seq)
        cells = max(cells, have_cells)
        cells = -(-cells // 256) * 256
        params = lib.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = self.n_batch
        params.n_ubatch = min(512, self.n_batch)
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = self.threads
        params.n_outputs_max_per_seq = 0  # teacher-forced scoring needs every position's logits
        params.kv_unified = True  # one pool of cells for all sequences (measured: as fast as split pools)
        params.no_perf = True
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise ResidlabError(
                f"llama.cpp could not create a context ({sequences} sequences, {cells} cells).",
                hint="lower --batch-size or --max-new-tokens (the KV cache did not fit in memory).",
            )
        self._ctx, self._ctx_shape, self._cvec_applied = ctx, (sequences, cells), None
        return ctx

    def _token_batch(self, capacity: int) -> Any:
        if self._batch is None or self._batch_capacity < capacity:
            if self._batch is not None:
                self._lib.llama_batch_free(self._batch)
            capacity = max(capacity, self.n_batch)
            self._batch = self._lib.llama_batch_init(capacity, 0, 1)
            self._batch_capacity = capacity
        return self._batch

    def set_control_vector(self, cvec: _ControlVector | None) -> None:
        """Apply a control vector through llama.cpp's adapter (``None`` switches it off); a no-op
        when that very vector is already applied."""
        if cvec is self._cvec_applied:
            return
        if cvec is None:
            status = self._lib.llama_set_adapter_cvec(self._ctx, None, 0, self.hidden_size, -1, -1)
        else:
            pointer = cvec.data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            status = self._lib.llama_set_adapter_cvec(
                self._ctx, pointer, cvec.data.size, self.hidden_size, cvec.first_layer, cvec.last_layer
            )
        if status != 0:
            raise ResidlabError("llama.cpp refused the control vector.", hint="RESIDLAB_DEBUG=1 shows its log.")
        self._cvec_applied = cvec

    def control_vector(self, steering: SteeringSpec | None) -> _ControlVector | None:
        """Check ``steering`` against this model and lay it out as llama.cpp wants it: one row per
        layer 1..n_layer-1 (layer 0 has no slot), zeros elsewhere. ``None`` when nothing steers."""
        if steering is None or steering.strength == 0:
            return None
        if steering_phases(steering.rule) is None:
            raise ResidlabError(
                f"the llama.cpp engine supports the position rules {', '.join(PHASED_RULES)}, not {steering.rule!r}.",
                hint="use one of those rules, or --engine torch for token-index rules.",
            )
        steering.vector.check_compatible(self, strict_name=False)
        deltas = steering.deltas()
        if any(layer < self.first_steerable_layer for layer in deltas):
            raise ResidlabError(
                "llama.cpp cannot steer layer 0 (its control-vector buffer starts at layer 1).",
                hint="steer at a layer >= 1, or use --engine torch.",
            )
        data = np.zeros((self.num_layers - 1, self.hidden_size), dtype=np.float32)
        for layer, delta in deltas.items():
            data[layer - 1] = delta
        return _ControlVector(data.reshape(-1), min(deltas), max(deltas))

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> int:
        """Decode (token, position, sequence, wants_logits) items in order, in chunks of n_batch;
        return how many logits rows the last chunk produced."""
        lib, ctx = self._lib, self._ctx
        outputs = 0
        for start in range(0, len(items), self.n_batch):
            chunk = items[start : start + self.n_batch]
            batch = self._token_batch(len(chunk))
            outputs = 0
            for i, (token, pos, seq, logits) in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
                outputs += logits
            batch.n_tokens = len(chunk)
            status = lib.llama_decode(ctx, batch)
            if status != 0:
                raise ResidlabError(
                    f"llama_decode failed with status {status}"
                    + (" (no room left in the KV cache)." if status == 1 else "."),
                    hint="lower the batch size or the token budget; RESIDLAB_DEBUG=1 shows llama.cpp's log.",
                )
        return outputs

    def _logits(self, rows: int) -> np.ndarray:
        pointer = self._lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self.vocab_size))

    # -- the engine interface -----------------------------------------------------------------
    @contextlib.contextmanager
    def _steered(self, steering: SteeringSpec | None) -> Iterator[BatchDecoder]:
        """Prompts run as parallel sequences, the control vector switched per phase of the rule."""
        cvec = self.control_vector(steering)
        phases = steering_phases(steering.rule) if cvec is not None else NO_STEERING  # type: ignore[union-attr]
        schedule = steering.schedule if cvec is not None and phases.generated else None  # type: ignore[union-attr]
        yield functools.partial(self._decode_batch, cvec=cvec, phases=phases, schedule=schedule)  # type: ignore[arg-type]

    def _decode_batch(
        self,
        prompts: PromptBatch,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        *,
        cvec: _ControlVector | None,
        phases: SteeringPhases,
        schedule: StrengthSchedule | None = None,
    ) -> DecodedBatch:
        rows = prompts.token_ids
        count = len(rows)
        max_new_tokens = sampling.max_new_tokens
        self._context(count, sum(len(r) for r in rows) + count * (max_new_tokens + 1))
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        # Prompt minus its last token, then the last prompt tokens (whose logits give the first
        # generated token), then one token per active sequence per step; the control vector is
        # switched between these phases as the position rule says.
        self.set_control_vector(cvec if phases.prompt_body else None)
        self._decode([(tok, pos, seq, False) for seq, r in enumerate(rows) for pos, tok in enumerate(r[:-1])])
        self.set_control_vector(cvec if phases.prompt_last else None)
        self._decode([(r[-1], len(r) - 1, seq, True) for seq, r in enumerate(rows)])
        self.set_control_vector(cvec if phases.generated else None)
        active = list(range(count))
        positions = [len(r) for r in rows]
        outputs: list[list[int]] = [[] for _ in rows]
        finished = [False] * count
        eos = frozenset() if sampling.ignore_eos else self.eos_ids
        memory = self._lib.llama_get_memory(self._ctx)
        logits = torch.from_numpy(self._logits(len(active)))  # a view of llama.cpp's buffer
        scale = dict.fromkeys(active, 1.0)
        for step in range(max_new_tokens):
            picks = pick_next_tokens(logits, sampling, generator).tolist()
            for seq, token in zip(active, picks, strict=True):
                outputs[seq].append(token)
            if schedule is not None:
                scale = self._schedule_scales(schedule, active, picks, logits, scale, outputs)
            still: list[int] = []
            for seq, token in zip(active, picks, strict=True):
                if token in eos:
                    finished[seq] = True
                    self._lib.llama_memory_seq_rm(memory, seq, -1, -1)  # frees its KV cells
                else:
                    still.append(seq)
            active = still
            if not active or step == max_new_tokens - 1:
                break
            items = [(outputs[seq][-1], positions[seq] + step, seq, True) for seq in active]
            if schedule is None:
                self._decode(items)
                logits = torch.from_numpy(self._logits(len(active)))
            else:
                logits = self._decode_scaled(items, [scale[seq] for seq in active], cvec)  # type: ignore[arg-type]
        return DecodedBatch(outputs, [not f for f in finished])

    def _schedule_scales(
        self,
        schedule: StrengthSchedule,
        active: list[int],
        picks: list[int],
        logits: torch.Tensor,
        scale: dict[int, float],
        outputs: list[list[int]],
    ) -> dict[int, float]:
        """sequence -> the schedule's scale for the position of its new token."""
        step = ScheduleStep(
            torch.tensor(picks),
            logits.float(),
            torch.tensor([scale[seq] for seq in active], dtype=torch.float32),
            [outputs[seq] for seq in active],
            self.tokenizer.decode,
        )
        return dict(zip(active, schedule.scales(step).tolist(), strict=True))

    def _decode_scaled(
        self, items: list[tuple[int, int, int, bool]], scales: list[float], cvec: _ControlVector
    ) -> torch.Tensor:
        """Decode one token per sequence, each under ``scale * cvec`` (the context-wide control vector
        set once per group of equal scale); logits [items, vocab] in the items' order."""
        logits = torch.empty((len(items), self.vocab_size), dtype=torch.float32)
        for value in sorted(set(scales)):
            group = [i for i, s in enumerate(scales) if s == value]
            scaled = None
            if value != 0:
                scaled = (
                    cvec
                    if value == 1
                    else _ControlVector(cvec.data * np.float32(value), cvec.first_layer, cvec.last_layer)
                )
            self.set_control_vector(scaled)
            self._decode([items[i] for i in group])
            logits[group] = torch.from_numpy(self._logits(len(group)).copy())
        return logits

    def score(self, token_ids: Sequence[int], steering: SteeringSpec | None = None) -> np.ndarray:
        """Teacher-forced logits [tokens, vocab] for one sequence (steering at every position)."""
        ids = list(token_ids)
        if not ids:
            raise ResidlabError("nothing to score.", hint="pass at least one token id.")
        cvec = None
        if steering is not None:
            cvec = self.control_vector(SteeringSpec(steering.vector, steering.strength, "all", steering.layers))
        self._context(1, len(ids) + 1)
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        self.set_control_vector(cvec)
        rows = []
        for start in range(0, len(ids), self.n_batch):
            chunk = [(tok, start + i, 0, True) for i, tok in enumerate(ids[start : start + self.n_batch])]
            produced = self._decode(chunk)
            rows.append(self._logits(produced).copy())
        return np.concatenate(rows, axis=0)

    def close(self) -> None:
        """Free llama.cpp's context, batch and model (also done when the engine is collected)."""
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing sensible left to do
            pass

    def __repr__(self) -> str:
        return (
            f"LlamaCppEngine({self.name!r}, gguf={self.gguf_path.name}, layers={self.num_layers}, "
            f"d_model={self.hidden_size}, threads={self.threads})"
        )
