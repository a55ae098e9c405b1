"""Replacing activations while a model runs: the general edit, and skipping whole blocks.

An :class:`Edit` replaces the value at one site of some layers with ``fn(value, ctx)``, where ``ctx``
is the pass's :class:`~residlab.interventions.positions.ForwardContext` (real positions, -1 for
left padding). Sites are the block sites of :mod:`residlab.interventions.sites`:

- output sites, whose module output is replaced: ``block`` (the residual after block i), ``attn``
  (attention's contribution, before any post-norm the family applies), ``mlp`` and the norms'
  outputs (``input_norm``, ``pre_mlp_norm``, ``post_attn_norm``, ``post_mlp_norm``);
- input sites, whose module input is replaced before the module runs: ``block_input`` (the residual
  entering block i) and ``mlp_act`` (the MLP's hidden activation, the input of its down-projection).

Like recording and steering, an edit's hooks exist only inside the ``with`` block and are removed
on exit, exceptions included; the model's weights are never touched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from residlab.core.errors import ResidlabError
from residlab.interventions.hooks import HookSet, first_input, join_output, split_output
from residlab.interventions.positions import ForwardContext
from residlab.interventions.sites import SITES, block_site
from residlab.interventions.target import HookTarget

EditFn = Callable[..., torch.Tensor]  # fn(value, ctx) -> new value, or fn(value, ctx, module_input)
EDIT_SITES = tuple(SITES)


class Edit:
    """A context manager that replaces a site's value with ``fn(value, ctx)`` at each edited layer.

    ``fn`` is one callable for every layer or a mapping layer -> callable. It gets the tensor
    (``[batch, tokens, width]``, left-padded) and the pass's context, and returns a tensor of the
    same shape (cast back to the value's dtype). With ``with_input=True`` (output sites only) it is
    called as ``fn(value, ctx, module_input)``, where ``module_input`` is the hidden state the module
    received (for ``block``: the residual entering the block).
    """

    def __init__(
        self,
        lm: HookTarget,
        layers: int | Iterable[int],
        site: str,
        fn: EditFn | Mapping[int, EditFn],
        *,
        with_input: bool = False,
    ) -> None:
        self._site = block_site(site, purpose="edit")
        self._lm = lm
        self.site = site
        self.where = self._site.reads
        if with_input and self.where != "output":
            raise ResidlabError(
                f"with_input=True needs an output site; {site!r} is an input site.",
                hint="use site 'block', 'attn' or 'mlp'.",
            )
        self.with_input = with_input
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        if not layer_list:
            raise ResidlabError("no layer to edit was given.", hint="pass at least one layer.")
        fns: dict[int, EditFn] = {}
        for layer in layer_list:
            index = lm.check_layer(layer)
            if isinstance(fn, Mapping):
                if layer not in fn and index not in fn:
                    raise ResidlabError(f"no edit function for layer {layer}.", hint="give one per edited layer.")
                fns[index] = fn[layer] if layer in fn else fn[index]
            else:
                fns[index] = fn
        self.fns = fns
        self._hooks = HookSet()

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.fns)

    def _context(self, device: torch.device) -> ForwardContext:
        return self._lm.tracker.context_on(device)  # the edited block's device (a split model has several)

    def _apply(self, fn: EditFn, value: torch.Tensor, *extra: Any) -> torch.Tensor:
        new = fn(value, self._context(value.device), *extra)
        if not isinstance(new, torch.Tensor) or new.shape != value.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ResidlabError(
                f"an edit function for site {self.site!r} returned {got}, expected shape {tuple(value.shape)}.",
                hint="return a tensor of the same shape as the value it was given.",
            )
        return new.to(value.dtype)

    def _hook_with_input(self, fn: EditFn):
        def hook(module, args, kwargs, output):
            hidden, rest = split_output(output)
            return join_output(self._apply(fn, hidden, first_input(args, kwargs)), rest)

        return hook

    def __enter__(self) -> Edit:
        self._lm.tracker.acquire()
        try:
            for layer, fn in self.fns.items():
                module = self._lm.block_part(layer, self._site.part)
                if self.with_input:
                    self._hooks.forward(module, self._hook_with_input(fn), with_kwargs=True)
                else:
                    self._hooks.replace(module, self.where, functools.partial(self._apply, fn))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.remove_all()
        self._lm.tracker.release()


def skip_blocks(lm: HookTarget, layers: int | Iterable[int], from_position: int = 1) -> Edit:
    """Skip whole decoder blocks: each block's output := its input at real positions >= ``from_position``.

    Position 0 (the first real token, often an attention sink) is left alone by default, as in
    Csordas et al. (2025). Layers before the first skipped one are untouched (the model is causal in
    depth); padding is never edited.
    """

    def fn(value: torch.Tensor, ctx: ForwardContext, block_input: torch.Tensor) -> torch.Tensor:
        keep_input = (ctx.positions >= from_position).unsqueeze(-1)
        return torch.where(keep_input, block_input.to(value.dtype), value)

    return Edit(lm, layers, "block", fn, with_input=True)
