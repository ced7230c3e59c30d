"""Evaluate a trained SAE on the model it was trained for, by splicing its reconstruction into the forward pass.

For every batch of contexts the model runs three times: clean, with the hooked module's output replaced by
the SAE's reconstruction ("spliced"), and with it replaced by zeros ("zero-ablated"). Replacement happens
only at the positions the SAE was trained on (not padding; not special tokens with ``drop_special``).

Metrics (``evaluate`` returns them; ``out/metrics.json``):
- reconstruction: FVU = ``Σ‖x - x̂‖² / Σ‖x - mean(x)‖²`` over all evaluated tokens, explained variance
  ``1 - FVU``, MSE, mean cosine(x, x̂);
- sparsity: L0 (mean active latents per token), dead fraction (latents that never fire on the evaluated
  tokens), dense fraction (latents firing on more than ``dense_threshold`` of them), and a latent-density
  histogram (``density.png``);
- downstream, causal LM: next-token cross-entropy clean / spliced / zero-ablated, the CE loss recovered
  ``(CE_zero - CE_spliced) / (CE_zero - CE_clean)``, and KL(clean ‖ spliced) per token;
- downstream, encoder: cosine between clean and spliced final hidden states (per token) and between their
  mean-pooled embeddings (per context, the sentence-transformers pooling), with the zero-ablated values and
  the fraction recovered ``(cos_spliced - cos_zero) / (1 - cos_zero)``.
A self-contained HTML page (``report.html``) lists a random sample of live latents with their
top-activating token contexts (the text with the token marked).

The SAE may be any module with ``forward(x) -> x̂``; latent metrics need ``encode`` and ``decode`` too
(every fastsae SAE has them).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .activations import (Batch, TextSource, _check_positive, _prepare, add_text_arguments, describe_text_source,
                          hooked_tensor, iter_batches, load_model, model_device, replace_output, resolve_hook,
                          tokenizer_template)


class Splice:
    """A forward hook on ``module`` that overwrites its output at ``keep`` positions with ``values``.

    Set ``keep [B, L]`` (bool) and ``values [n_keep, d]`` before each forward pass; with ``values=None``
    the hook only records the output (``captured``) and leaves it unchanged. With ``input_module`` it also
    records that module's input (``captured_input``): what a transcoder reads.
    """

    def __init__(self, module: nn.Module, hook: str, input_module: Optional[nn.Module] = None):
        self.hook = hook
        self.keep: Optional[Tensor] = None
        self.values: Optional[Tensor] = None
        self.captured: Optional[Tensor] = None
        self.captured_input: Optional[Tensor] = None
        self.handle = module.register_forward_hook(self._fn)
        self.input_handle = (input_module.register_forward_pre_hook(self._fn_in) if input_module is not None
                             else None)

    def _fn_in(self, module, args):
        if self.values is None:
            self.captured_input = args[0]

    def _fn(self, module, args, out):
        x = hooked_tensor(out, self.hook)
        if self.values is None:
            self.captured = x
            return None
        new = x.clone()
        new[self.keep.to(x.device)] = self.values.to(device=x.device, dtype=x.dtype)
        return replace_output(out, new)

    def remove(self) -> None:
        self.handle.remove()
        if self.input_handle is not None:
            self.input_handle.remove()


def _final(out) -> Tensor:
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    return out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]


def _is_causal_lm(model: nn.Module, out) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return getattr(out, "logits", None) is not None and bool(can_generate and can_generate())


class _TopActivations:
    """The ``n`` largest activations of every latent over all tokens seen, with where they occurred."""

    def __init__(self, n: int, d_sae: int):
        self.values = torch.full((n, d_sae), -math.inf)
        self.where = torch.full((n, d_sae), -1, dtype=torch.long)

    def update(self, f: Tensor, where: Tensor) -> None:
        n = self.values.shape[0]
        vals = torch.cat([self.values, f.float()])
        locs = torch.cat([self.where, where[:, None].expand(-1, f.shape[1])])
        top = vals.topk(min(n, vals.shape[0]), dim=0)
        self.values = top.values
        self.where = locs.gather(0, top.indices)


def _density_png(freq: np.ndarray, n_tokens: int, title: str) -> Optional[bytes]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    if alive.size:
        ax.hist(np.log10(alive), bins=50, color="#3b6ea8")
    ax.set_xlabel("log10(fraction of tokens on which the latent fires)")
    ax.set_ylabel("latents")
    dead = int((freq == 0).sum())
    ax.set_title(f"{title}\n{dead} of {freq.size} latents never fire on {n_tokens} tokens", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _context_html(tokenizer, ids: list, pos: int, left: int = 24, right: int = 8) -> str:
    lo, hi = max(0, pos - left), min(len(ids), pos + 1 + right)
    ell_l, ell_r = ("…" if lo > 0 else ""), ("…" if hi < len(ids) else "")
    # Decoding growing prefixes of the window and taking the differences marks the token inside its word
    # ("sjo<mark>er</mark>d" rather than "sjo <mark>##er</mark> ##d") for WordPiece and BPE alike.
    a = tokenizer.decode(ids[lo:pos]) if pos > lo else ""
    b = tokenizer.decode(ids[lo:pos + 1])
    c = tokenizer.decode(ids[lo:hi])
    if b.startswith(a) and c.startswith(b) and len(b) > len(a):
        return ell_l + html.escape(a) + f"<mark>{html.escape(b[len(a):])}</mark>" + html.escape(c[len(b):]) + ell_r

    def dec(x, y):
        return html.escape(tokenizer.decode(ids[x:y])) if y > x else ""

    tok = html.escape(tokenizer.decode(ids[pos:pos + 1])) or "&nbsp;"
    return ell_l + dec(lo, pos) + f" <mark>{tok}</mark> " + dec(pos + 1, hi) + ell_r


def top_contexts(tokenizer, latent: int, contexts: list, top: _TopActivations,
                 context_length: int) -> list:
    """``[(activation, context html)]`` for one latent, largest first."""
    rows = []
    for v, w in zip(top.values[:, latent].tolist(), top.where[:, latent].tolist()):
        if w < 0 or not v > 0:
            continue
        c, p = divmod(w, context_length)
        rows.append((v, _context_html(tokenizer, contexts[c], p)))
    return rows


def _html_report(metrics: dict, png: Optional[bytes], latents: list) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in metrics.items()
                   if not isinstance(v, (dict, list)))
    img = (f'<img alt="latent density" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
           if png else "<p>(matplotlib not installed: no density histogram)</p>")
    parts = []
    for lat in latents:
        items = "".join(f"<li><span class=act>{v:.3g}</span> {ctx}</li>" for v, ctx in lat["contexts"])
        parts.append(f"<section><h3>latent {lat['latent']}</h3><p>fires on {100 * lat['frequency']:.3g}% of "
                     f"tokens; max activation {lat['max']:.3g}</p><ol>{items}</ol></section>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fastsae evaluation</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}}
table{{border-collapse:collapse}} th,td{{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}}
li{{font-family:ui-monospace,monospace;font-size:.85em;margin:.3em 0;white-space:pre-wrap}}
mark{{background:#ffb347;font-weight:bold}} .act{{color:#3b6ea8;margin-right:.6em}}
section{{border-top:1px solid #ccc;margin-top:1.2em}}
</style></head><body>
<h1>fastsae evaluation</h1>
<table>{rows}</table>
<h2>Latent density</h2>{img}
<h2>Top-activating contexts of {len(latents)} randomly sampled live latents</h2>
{''.join(parts) or '<p>(no latents: the SAE has no encode/decode, or none fired)</p>'}
</body></html>
"""


def _load_sae(sae, device):
    if isinstance(sae, (str, os.PathLike)):
        from .io import load

        path = Path(os.fspath(sae))
        if not path.exists():
            raise FileNotFoundError(f"sae: {path} does not exist")
        return load(path, device=device)
    if not isinstance(sae, nn.Module) and not callable(sae):
        raise TypeError(f"sae must be a saved SAE folder or a module, got {type(sae).__name__}")
    return sae


def evaluate(
    sae,
    model,
    hook: str,
    text: TextSource,
    *,
    tokenizer=None,
    out=None,
    max_tokens: Optional[int] = 16384,
    context_length: int = 128,
    batch_size: int = 8,
    pack: bool = True,
    drop_special: bool = False,
    skip_tokens: int = 0,
    text_field: str = "text",
    n_latents: int = 16,
    top_n: int = 8,
    dense_threshold: float = 0.1,
    seed: int = 0,
    device=None,
    progress: bool = True,
    input_hook: Optional[str] = None,
) -> dict:
    """Metrics of ``sae`` spliced into ``model`` at ``hook`` over ``text`` (see the module docstring).

    ``sae``: a folder saved by ``sae.save`` or a module. ``model``: a path / model name or an ``nn.Module``
    (with ``tokenizer``). Use the tokenisation settings of the harvest, and ``skip_tokens`` = the number of
    tokens harvested to evaluate on held-out text. With ``out``, writes ``metrics.json``, ``density.png``
    and ``report.html`` there. Returns the metrics dict (plus ``"latents"``: the sampled latents' contexts).

    A transcoder (``sae.is_transcoder``) reads the input of ``input_hook`` (default: ``hook`` itself, e.g. an MLP)
    and its prediction replaces ``hook``'s output: the reconstruction metrics compare it with that output, and the
    downstream ones (CE loss recovered, KL) measure the model with the MLP replaced by the transcoder.
    """
    _check_positive("max_tokens", max_tokens, allow_none=True)
    _check_positive("context_length", context_length)
    _check_positive("batch_size", batch_size)
    _check_positive("n_latents", n_latents)
    _check_positive("top_n", top_n)
    if not 0 < dense_threshold <= 1:
        raise ValueError(f"dense_threshold must lie in (0, 1], got {dense_threshold}")
    sae = _load_sae(sae, device)
    model, tokenizer = _prepare(model, tokenizer, device)
    module = resolve_hook(model, hook)
    transcoder = bool(getattr(sae, "is_transcoder", False))
    if input_hook is not None and not transcoder:
        raise ValueError("input_hook is for transcoders: this SAE reconstructs the hooked output itself")
    input_module = resolve_hook(model, input_hook or hook) if transcoder else None
    dev = model_device(model)
    template = tokenizer_template(tokenizer)
    has_code = all(hasattr(sae, a) for a in ("encode", "decode"))
    d_sae = getattr(sae, "d_sae", None) if has_code else None

    from tqdm.auto import tqdm

    splice = Splice(module, hook, input_module)
    stats = dict(n=0, sq_err=0.0, sum_sq=0.0, cos=0.0, l0=0.0)
    sum_x = None
    fire = torch.zeros(d_sae, dtype=torch.long) if d_sae else None
    top = _TopActivations(top_n, d_sae) if d_sae else None
    down = dict(n_pos=0, ce_clean=0.0, ce_spliced=0.0, ce_zero=0.0, kl=0.0, kl_zero=0.0,
                n_tok=0, tok_cos=0.0, tok_cos_zero=0.0, n_ctx=0, emb_cos=0.0, emb_cos_zero=0.0)
    causal = None
    contexts: list = []
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, disable=not progress, desc="eval")
    t0 = time.perf_counter()
    try:
        for batch in iter_batches(tokenizer, text, context_length=context_length, batch_size=batch_size, pack=pack,
                                  drop_special=drop_special, skip_tokens=skip_tokens, text_field=text_field,
                                  template=template):
            keep = batch.keep.clone()
            if max_tokens is not None:
                # Truncate in token order (row-major), as the harvest does.
                left = max_tokens - stats["n"]
                flat = keep.flatten()
                over = torch.cumsum(flat.long(), 0) > left
                keep = (flat & ~over).reshape(keep.shape)
            if not keep.any():
                if max_tokens is not None and stats["n"] >= max_tokens:
                    break
                continue
            ids = batch.input_ids.to(dev)
            mask = batch.attention_mask.to(dev)
            with torch.inference_mode():
                splice.values = None
                clean = model(input_ids=ids, attention_mask=mask)
                x = splice.captured[keep.to(dev)].float()
                if transcoder:  # x is the output to predict; the transcoder reads the module's input
                    src = splice.captured_input[keep.to(dev)].float()
                    f = sae.encode(src)
                    x_hat = sae(src)
                elif has_code:
                    f = sae.encode(x)
                    x_hat = sae.decode(f)
                else:
                    x_hat = sae(x)
                splice.keep = keep
                splice.values = x_hat
                spliced = model(input_ids=ids, attention_mask=mask)
                splice.values = torch.zeros_like(x_hat)
                zeroed = model(input_ids=ids, attention_mask=mask)
                splice.values = None
            # -- reconstruction and sparsity
            x64, xh64 = x.double(), x_hat.double()
            stats["n"] += x.shape[0]
            stats["sq_err"] += float(((x64 - xh64) ** 2).sum())
            stats["sum_sq"] += float((x64 ** 2).sum())
            sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
            stats["cos"] += float(torch.nn.functional.cosine_similarity(x64, xh64, dim=-1).sum())
            if has_code:
                active = f != 0
                stats["l0"] += float(active.sum())
                if fire is not None:
                    fire += active.sum(0).cpu()
                    base = len(contexts)
                    rows, cols = keep.nonzero(as_tuple=True)
                    where = (base + rows) * context_length + cols
                    top.update(f.cpu(), where)
            contexts.extend(batch.contexts)
            # -- downstream
            if causal is None:
                causal = _is_causal_lm(model, clean)
            if causal:
                valid = (mask[:, :-1] * mask[:, 1:]).bool()
                target = ids[:, 1:][valid]
                lc, ls, lz = (o.logits[:, :-1][valid].float().log_softmax(-1) for o in (clean, spliced, zeroed))
                down["n_pos"] += int(target.numel())
                for name, lp in (("ce_clean", lc), ("ce_spliced", ls), ("ce_zero", lz)):
                    down[name] += float(-lp.gather(-1, target[:, None]).sum())
                pc = lc.exp()
                down["kl"] += float((pc * (lc - ls)).sum())
                down["kl_zero"] += float((pc * (lc - lz)).sum())
            else:
                hc, hs, hz = (_final(o).float() for o in (clean, spliced, zeroed))
                m = mask.bool()
                down["n_tok"] += int(m.sum())
                down["tok_cos"] += float(torch.nn.functional.cosine_similarity(hc[m], hs[m], dim=-1).sum())
                down["tok_cos_zero"] += float(torch.nn.functional.cosine_similarity(hc[m], hz[m], dim=-1).sum())
                w = mask[..., None].float()

                def pool(h):
                    return (h * w).sum(1) / w.sum(1).clamp_min(1)

                ec, es, ez = pool(hc), pool(hs), pool(hz)
                down["n_ctx"] += ec.shape[0]
                down["emb_cos"] += float(torch.nn.functional.cosine_similarity(ec, es, dim=-1).sum())
                down["emb_cos_zero"] += float(torch.nn.functional.cosine_similarity(ec, ez, dim=-1).sum())
            bar.update(x.shape[0])
            if max_tokens is not None and stats["n"] >= max_tokens:
                break
    finally:
        splice.remove()
        bar.close()
    n = stats["n"]
    if n == 0:
        raise ValueError(f"text: the text source {describe_text_source(text)} yielded no tokens"
                         + (f" after skip_tokens={skip_tokens}" if skip_tokens else ""))
    mean = sum_x / n
    total_var = stats["sum_sq"] - n * float((mean ** 2).sum())
    fvu = stats["sq_err"] / total_var if total_var > 0 else float("nan")
    metrics = dict(
        model=getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        hook=hook, **({"input_hook": input_hook or hook} if transcoder else {}),
        text_source=describe_text_source(text), skip_tokens=skip_tokens, n_tokens=n,
        n_contexts=len(contexts), fvu=fvu, explained_variance=1 - fvu, mse=stats["sq_err"] / n,
        cosine_x_xhat=stats["cos"] / n,
    )
    latents = []
    png = None
    if has_code:
        metrics["l0"] = stats["l0"] / n
        if fire is not None:
            freq = (fire.double() / n).numpy()
            metrics.update(d_sae=int(d_sae), dead_fraction=float((fire == 0).double().mean()),
                           dense_fraction=float((freq > dense_threshold).mean()), dense_threshold=dense_threshold)
            png = _density_png(freq, n, f"{getattr(sae, 'architecture', type(sae).__name__)} SAE at {hook}")
            live = torch.nonzero(fire > 0).flatten()
            g = torch.Generator().manual_seed(seed)
            sample = live[torch.randperm(live.numel(), generator=g)[:n_latents]].sort().values.tolist()
            for j in sample:
                latents.append(dict(latent=j, frequency=float(freq[j]), max=float(top.values[0, j]),
                                    contexts=top_contexts(tokenizer, j, contexts, top, context_length)))
    if causal:
        p = max(down["n_pos"], 1)
        ce_c, ce_s, ce_z = down["ce_clean"] / p, down["ce_spliced"] / p, down["ce_zero"] / p
        metrics.update(kind="causal_lm", ce_clean=ce_c, ce_spliced=ce_s, ce_zero_ablated=ce_z,
                       ce_loss_recovered=(ce_z - ce_s) / (ce_z - ce_c) if ce_z != ce_c else float("nan"),
                       kl_spliced=down["kl"] / p, kl_zero_ablated=down["kl_zero"] / p)
    elif causal is not None:
        t, c = max(down["n_tok"], 1), max(down["n_ctx"], 1)
        tc, tz = down["tok_cos"] / t, down["tok_cos_zero"] / t
        ec, ez = down["emb_cos"] / c, down["emb_cos_zero"] / c
        metrics.update(kind="encoder", final_hidden_cosine=tc, final_hidden_cosine_zero_ablated=tz,
                       embedding_cosine=ec, embedding_cosine_zero_ablated=ez,
                       embedding_cosine_recovered=(ec - ez) / (1 - ez) if ez != 1 else float("nan"))
    metrics["seconds"] = time.perf_counter() - t0
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(dict(metrics, latents=latents), indent=2))
        if png:
            (out / "density.png").write_bytes(png)
        (out / "report.html").write_text(_html_report(metrics, png, latents), encoding="utf-8")
    metrics["latents"] = latents
    return metrics


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
SUMMARY_KEYS = ("n_tokens", "fvu", "explained_variance", "l0", "dead_fraction", "dense_fraction", "ce_clean",
                "ce_spliced", "ce_zero_ablated", "ce_loss_recovered", "kl_spliced", "final_hidden_cosine",
                "embedding_cosine", "embedding_cosine_zero_ablated", "embedding_cosine_recovered")


def cmd_eval(args) -> int:
    model, tok = load_model(args.model, device=args.device, allow_download=args.allow_download)
    out = args.out or os.path.join(args.sae, "eval")
    m = evaluate(args.sae, model, args.hook, args.text, tokenizer=tok, out=out,
                 max_tokens=args.max_tokens, context_length=args.context_length, batch_size=args.batch_size,
                 pack=args.pack, drop_special=args.drop_special, skip_tokens=args.skip_tokens,
                 text_field=args.text_field, n_latents=args.latents, top_n=args.top, seed=args.seed,
                 device=args.device, progress=not args.quiet, input_hook=args.input_hook)
    for k in SUMMARY_KEYS:
        if k in m:
            v = m[k]
            print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    print(f"report: {os.path.join(out, 'report.html')}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("eval", help="splice a trained SAE into a transformers model and measure what it preserves")
    p.add_argument("--sae", required=True, help="folder of a saved SAE")
    add_text_arguments(p)
    p.set_defaults(max_tokens=16384, batch_size=8)
    p.add_argument("--out", default=None, help="where metrics.json, density.png, report.html go (default SAE/eval)")
    p.add_argument("--latents", type=int, default=16, help="latents sampled for the report (default 16)")
    p.add_argument("--top", type=int, default=8, help="top contexts per latent (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent sample")
    p.add_argument("--input-hook", default=None,
                   help="a transcoder reads this module's input (default: --hook's own input, e.g. an MLP)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
