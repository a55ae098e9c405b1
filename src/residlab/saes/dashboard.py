"""A static HTML dashboard for an SAE: one self-contained file (data, script and style inline, no server).

For each chosen latent: its firing density on held-out text, its top-activating contexts with every
token shaded by the latent's activation there, and the tokens its decoder direction promotes and
suppresses (logit lens). A search box filters latents by number or by token text; the page reads
``#search=...`` from its address too, so a link can open a filtered view.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from residlab.core.io import atomic_write_text
from residlab.saes.activations import ActivationStore
from residlab.saes.base import SparseAutoencoder
from residlab.saes.latent_lens import latent_lens

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel


@dataclass(frozen=True)
class DashboardOptions:
    """Which latents and how much of each."""

    latents: tuple[int, ...] = ()  # empty: ``sample`` alive latents chosen with ``seed``
    sample: int = 48
    contexts: int = 8
    context_radius: int = 12  # tokens shown either side of the top-activating token
    lens_tokens: int = 8
    seed: int = 0


def _density_and_columns(
    sae: SparseAutoencoder, acts: torch.Tensor, options: DashboardOptions, batch_size: int = 4096
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Every latent's firing density, the latents to show, and only their codes [n, len(latents)]
    (the full code matrix of a wide SAE over tens of thousands of tokens would take gigabytes)."""

    def encoded():
        with torch.no_grad():
            for start in range(0, acts.shape[0], batch_size):
                yield sae(acts[start : start + batch_size].float(), sample=False).z

    fired = torch.zeros(sae.cfg.d_sae)
    for z in encoded():
        fired += (z != 0).float().sum(dim=0)
    density = fired / max(1, acts.shape[0])
    latents = _pick_latents(density, options)
    columns = torch.cat([z[:, latents] for z in encoded()]) if latents else torch.zeros(acts.shape[0], 0)
    return density, latents, columns


def _pick_latents(density: torch.Tensor, options: DashboardOptions) -> list[int]:
    if options.latents:
        return list(options.latents)
    alive = (density > 0).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(options.seed)
    chosen = alive[torch.randperm(alive.numel(), generator=generator)[: options.sample]]
    return sorted(chosen.tolist())


def latent_cards(
    lm: LanguageModel, sae: SparseAutoencoder, store: ActivationStore, options: DashboardOptions
) -> list[dict[str, Any]]:
    """Per latent: density, logit-lens tokens, and top contexts as (token text, activation) lists."""
    shards = [store.shard(i) for i in range(len(store.shards))]
    acts = torch.cat([s["activations"].float() for s in shards])
    window = torch.cat([s["window"] for s in shards]).long()
    position = torch.cat([s["position"] for s in shards]).long()
    token = torch.cat([s["token"] for s in shards]).long()
    density, latents, columns = _density_and_columns(sae.cpu(), acts, options)
    row_of = {(int(w), int(p)): i for i, (w, p) in enumerate(zip(window.tolist(), position.tolist(), strict=True))}
    cards = []
    for index, latent in enumerate(latents):
        column = columns[:, index]
        top = column.topk(min(options.contexts, column.numel())).indices.tolist()
        contexts = []
        for row in top:
            if float(column[row]) <= 0:
                break
            w, p = int(window[row]), int(position[row])
            tokens = []
            for q in range(max(0, p - options.context_radius), p + options.context_radius + 1):
                i = row_of.get((w, q))
                if i is not None:
                    tokens.append([lm.tokenizer.decode([int(token[i])]), round(float(column[i]), 4), q == p])
            contexts.append({"max": round(float(column[row]), 4), "tokens": tokens})
        cards.append(
            {
                "latent": latent,
                "density": float(density[latent]),
                "contexts": contexts,
                **latent_lens(lm, sae.to(lm.device), latent, k=options.lens_tokens),
            }
        )
    return cards


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:.8em 0}
.ctx{font-family:monospace;white-space:pre-wrap;margin:.2em 0}
.tok{border-radius:2px}.peak{outline:1px solid #c00}
.lens{font-family:monospace;color:#555}.bar{display:inline-block;height:.7em;background:#4a7}
#search{font-size:1.1em;width:24em;padding:.3em}
"""

_SCRIPT = """
const cards = JSON.parse(document.getElementById('data').textContent);
const root = document.getElementById('cards');
function esc(s){const d=document.createElement('span');d.textContent=s;return d.innerHTML;}
function render(card){
  const el=document.createElement('div'); el.className='card'; el.id='latent-'+card.latent;
  el.dataset.search=(String(card.latent)+' '+card.promoted.join(' ')+' '+card.suppressed.join(' ')+' '+
    card.contexts.map(c=>c.tokens.map(t=>t[0]).join('')).join(' ')).toLowerCase();
  const width=Math.max(1,Math.round(200*Math.min(1,Math.log10(1e5*card.density+1)/5)));
  let h='<h3>latent '+card.latent+'</h3><div>density '+card.density.toExponential(2)+
    ' <span class="bar" style="width:'+width+'px"></span></div>'+
    '<div class="lens">promotes: '+card.promoted.map(esc).join(' | ')+'</div>'+
    '<div class="lens">suppresses: '+card.suppressed.map(esc).join(' | ')+'</div>';
  for(const c of card.contexts){
    h+='<div class="ctx">';
    for(const [text,act,peak] of c.tokens){
      const a=c.max>0?Math.max(0,act)/c.max:0;
      h+='<span class="tok'+(peak?' peak':'')+'" data-act="'+act+'" style="background:rgba(255,120,0,'+
        a.toFixed(3)+')">'+esc(text)+'</span>';
    }
    h+='</div>';
  }
  el.innerHTML=h; return el;
}
for(const card of cards){root.appendChild(render(card));}
function filter(q){
  q=q.trim().toLowerCase(); let shown=0;
  for(const el of root.children){const hit=!q||el.dataset.search.includes(q);el.style.display=hit?'':'none';shown+=hit;}
  document.getElementById('count').textContent=shown+' of '+root.children.length+' latents';
}
const box=document.getElementById('search');
box.addEventListener('input',()=>filter(box.value));
const m=location.hash.match(/search=([^&]*)/); if(m){box.value=decodeURIComponent(m[1]);}
filter(box.value);
"""


def render_dashboard(cards: list[dict[str, Any]], title: str, facts: dict[str, Any]) -> str:
    """The dashboard page for ``cards`` (see :func:`latent_cards`)."""
    data = json.dumps(cards).replace("</", "<\\/")  # a token "</script>" must not end the data block
    fact_line = " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in facts.items())
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{fact_line}</p>"
        "<input id='search' type='search' placeholder='latent number or token text'> <span id='count'></span>"
        f"<div id='cards'></div><script id='data' type='application/json'>{data}</script>"
        f"<script>{_SCRIPT}</script></body></html>"
    )


def write_dashboard(
    lm: LanguageModel,
    sae: SparseAutoencoder,
    store: ActivationStore,
    path: str | Path,
    options: DashboardOptions | None = None,
) -> Path:
    """Write the dashboard of ``sae`` over the held-out ``store`` to ``path``."""
    options = options or DashboardOptions()
    cards = latent_cards(lm, sae, store, options)
    hook = sae.cfg.hook
    facts = {
        "model": hook.model,
        "layer": hook.layer,
        "site": hook.site,
        "arch": sae.cfg.arch,
        "width": sae.cfg.d_sae,
        "k": sae.cfg.k,
        "held-out tokens": store.num_tokens,
    }
    atomic_write_text(path, render_dashboard(cards, f"SAE dashboard: {hook.model} layer {hook.layer}", facts))
    return Path(path)
