"""Recording the residual stream (and block parts) at chosen layers and positions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from residlab.core.errors import ResidlabError
from residlab.interventions.hooks import HookSet, split_output
from residlab.interventions.positions import RECORDING_RULES, PositionRule, select_positions, validate_rule
from residlab.interventions.target import HookTarget

# site -> (which module, relative to a block ("" = the block), read its input or its output)
SITES: dict[str, tuple[str, str]] = {
    "block": ("", "output"),  # the residual stream after block i: the layer-i convention
    "block_input": ("", "input"),  # the residual stream before block i
    "attn": ("attn", "output"),  # attention's contribution (before any post-norm it lacks)
    "mlp": ("mlp", "output"),  # the MLP's contribution
    "mlp_act": ("mlp_down", "input"),  # the MLP's hidden activation (input of its down-projection)
}


class Recording:
    """A context manager that records activations for every forward pass run inside it.

    ``rec[layer]`` (site ``block``) or ``rec[layer, site]`` gives the tensor for one pass, or, when
    several passes were recorded with ``last`` or index positions, their rows concatenated along
    the batch dimension. ``rec.calls(layer, site)`` gives each pass separately (use it for ``all``
    positions across generation steps). Tensors are detached and stay on the model's device.
    ``rec.positions`` holds each pass's [batch, tokens] real positions (-1 = padding).
    """

    def __init__(
        self,
        lm: HookTarget,
        layers: Iterable[int],
        positions: PositionRule = "last",
        sites: Sequence[str] = ("block",),
    ) -> None:
        self._lm = lm
        self.layers = tuple(lm.check_layer(layer) for layer in layers)
        self.rule = validate_rule(positions, RECORDING_RULES)
        for site in sites:
            if site not in SITES:
                raise ResidlabError(f"unknown recording site {site!r}.", hint=f"use one of {', '.join(SITES)}.")
        self.sites = tuple(sites)
        self._data: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.positions: list[torch.Tensor] = []
        self._hooks = HookSet()

    def _store(self, layer: int, site: str, hidden: torch.Tensor) -> None:
        ctx = self._lm.tracker.context
        assert ctx is not None
        self._data.setdefault((layer, site), []).append(select_positions(hidden, self.rule, ctx).detach())

    def _make_hook(self, layer: int, site: str, where: str):
        if where == "output":

            def hook(module, args, output):
                self._store(layer, site, split_output(output)[0])

            return hook

        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._store(layer, site, hidden)

        return pre_hook

    def __enter__(self) -> Recording:
        self._lm.tracker.acquire()
        try:
            self._hooks.pre_forward(self._lm.decoder, self._remember_positions)
            for layer in self.layers:
                for site in self.sites:
                    rel, where = SITES[site]
                    module = self._lm.block_part(layer, rel)
                    hook = self._make_hook(layer, site, where)
                    if where == "output":
                        self._hooks.forward(module, hook)
                    else:
                        self._hooks.pre_forward(module, hook)
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

    def calls(self, layer: int, site: str = "block") -> list[torch.Tensor]:
        """The recorded tensor of each forward pass, in order."""
        key = (layer, site)
        if key not in self._data:
            raise KeyError(f"nothing recorded for layer {layer}, site {site!r}; recorded: {sorted(self._data)}")
        return list(self._data[key])

    def __getitem__(self, key: int | tuple[int, str]) -> torch.Tensor:
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
