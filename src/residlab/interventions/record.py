"""Recording the residual stream (and block parts) at chosen layers and positions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from residlab.core.errors import ResidlabError
from residlab.interventions.hooks import HookSet
from residlab.interventions.positions import RECORDING_RULES, PositionRule, select_positions, validate_rule
from residlab.interventions.sites import MODEL_SITES, SITES, block_site, model_site
from residlab.interventions.target import HookTarget

__all__ = ["MODEL_SITES", "SITES", "Layer", "Recording"]

Layer = int | str  # a block number, or a model-level site by name ("final_norm")


class Recording:
    """A context manager that records activations for every forward pass run inside it.

    ``layers`` are block numbers (negative from the end) and model-level sites by name
    (``"final_norm"``: the last block's output after the final norm, Hugging Face's last
    ``hidden_states`` entry). ``sites`` are the block sites recorded at each numbered layer (see
    :mod:`residlab.interventions.sites`).

    ``rec[layer]`` (site ``block``), ``rec[layer, site]`` or ``rec["final_norm"]`` gives the tensor for
    one pass, or, when several passes were recorded with ``last`` or index positions, their rows
    concatenated along the batch dimension. ``rec.calls(layer, site)`` gives each pass separately (use it
    for ``all`` positions across generation steps). Tensors are detached and kept on the device of the
    model's inputs (also when a device map splits the blocks over several GPUs).
    ``rec.positions`` holds each pass's [batch, tokens] real positions (-1 = padding).
    """

    def __init__(
        self,
        lm: HookTarget,
        layers: Iterable[Layer],
        positions: PositionRule = "last",
        sites: Sequence[str] = ("block",),
    ) -> None:
        self._lm = lm
        wanted = list(layers)
        named = tuple(dict.fromkeys(x for x in wanted if isinstance(x, str)))
        for name in named:
            model_site(name)
        numbered = dict.fromkeys(lm.check_layer(layer) for layer in wanted if not isinstance(layer, str))
        self.layers: tuple[Layer, ...] = (*numbered, *named)
        self.rule = validate_rule(positions, RECORDING_RULES)
        for site in sites:
            block_site(site)
        self.sites = tuple(sites)
        self._data: dict[tuple[Layer, str], list[torch.Tensor]] = {}
        self.positions: list[torch.Tensor] = []
        self._hooks = HookSet()

    @staticmethod
    def _key(layer: Layer, site: str) -> tuple[Layer, str]:
        return (layer, "") if isinstance(layer, str) else (layer, site)

    def _store(self, key: tuple[Layer, str], hidden: torch.Tensor) -> None:
        # positions are selected on the block's own device (a split model runs blocks on several),
        # then gathered where the model's inputs are, so layers can be stacked together
        ctx = self._lm.tracker.context_on(hidden.device)
        picked = select_positions(hidden, self.rule, ctx).detach()
        self._data.setdefault(key, []).append(picked.to(self._lm.device))

    def _recorder(self, key: tuple[Layer, str]):
        return lambda hidden: self._store(key, hidden)

    def __enter__(self) -> Recording:
        self._lm.tracker.acquire()
        try:
            self._hooks.pre_forward(self._lm.decoder, self._remember_positions)
            for layer in self.layers:
                if isinstance(layer, str):
                    site = MODEL_SITES[layer]
                    self._hooks.observe(self._lm.model_part(site.part), site.reads, self._recorder((layer, "")))
                    continue
                for name in self.sites:
                    site = SITES[name]
                    module = self._lm.block_part(layer, site.part)
                    self._hooks.observe(module, site.reads, self._recorder((layer, name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _remember_positions(self, module, args, kwargs) -> None:
        # Runs after the tracker's pre-hook (registered earlier), so the context is current.
        ctx = self._lm.tracker.context
        if ctx is not None:
            self.positions.append(ctx.positions)

    def __exit__(self, *exc) -> None:
        self._hooks.remove_all()
        self._lm.tracker.release()

    def calls(self, layer: Layer, site: str = "block") -> list[torch.Tensor]:
        """The recorded tensor of each forward pass, in order."""
        key = self._key(layer, site)
        if key not in self._data:
            recorded = sorted(map(str, self._data))
            raise KeyError(f"nothing recorded for layer {layer!r}, site {site!r}; recorded: {recorded}")
        return list(self._data[key])

    def __getitem__(self, key: Layer | tuple[Layer, str]) -> torch.Tensor:
        layer, site = key if isinstance(key, tuple) else (key, "block")
        calls = self.calls(layer, site)
        if len(calls) == 1:
            return calls[0]
        if self.rule == "all":
            raise ResidlabError(
                f"{len(calls)} forward passes were recorded with positions='all'; their lengths differ.",
                hint="use rec.calls(layer) to get each pass separately.",
            )
        return torch.cat(calls, dim=0)
