"""Rows on the trained model: evaluation (val loss, the HellaSwag scorer against a direct computation),
compiled = eager, and greedy generation with the KV cache = without it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2repro.doctor.harness import (
    DoctorContext,
    hellaswag_scores,
    training_shaped_val_batch,
    val_batches,
    val_loss_of,
)
from gpt2repro.doctor.report import Failure, Row, failed, passed, skipped, verdict

NO_TRAINING = "the training row failed, so there is no trained model to check"


def _tolerance(dtype: str, fp32: float, half: float) -> float:
    return fp32 if dtype == "fp32" else half


def synthetic_hellaswag(n: int) -> list:
    """``n`` HellaSwag-format items from the embedded corpus: a passage's start as the context, its true
    continuation and three other passages' continuations as endings (no data file needed)."""
    from gpt2repro.evals.hellaswag import HellaSwagItem
    from gpt2repro.sources import embedded_documents

    passages = [d for d in embedded_documents() if len(d) > 400][-(n + 3) :]  # the train split's end

    def cut(text: str, start: int, length: int) -> str:
        end = text.find(" ", start + length)
        return text[start : end if end > 0 else start + length]

    items = []
    for i in range(n):
        text = passages[i]
        split = text.find(" ", 160)
        endings = [cut(passages[(i + k) % len(passages)], split + 1, 50) for k in range(1, 4)]
        label = i % 4
        endings.insert(label, cut(text, split + 1, 50))
        context = text[:split]
        items.append(
            HellaSwagItem(
                label=label,
                harness_context=context,
                harness_endings=tuple(endings),
                completion_context=context,
                completion_endings=tuple(endings),
            )
        )
    return items


def _direct_logprob(model, context: list[int], ending: list[int], device, dtype: str) -> float:
    """Sum of log p(ending | context) from one plain forward pass (no packing, no masks)."""
    from gpt2repro.runtime import autocast, evaluation_mode

    ids = torch.tensor([context + ending], device=device)
    with evaluation_mode(model) as gpt, autocast(device, dtype):
        logits, _ = gpt(ids[:, :-1])
    logp = F.log_softmax(logits[0, len(context) - 1 :].float(), dim=-1)
    return float(logp.gather(1, torch.tensor(ending, device=device)[:, None]).sum())


def _scorer_against_direct(model, items: list, scores: list, device, dtype: str) -> float:
    """Largest relative difference between the scorer's and a direct pass's log-likelihoods (2 items)."""
    from gpt2repro.evals.hellaswag import candidate_tokens

    worst = 0.0
    for item, score in list(zip(items, scores, strict=True))[:2]:
        for (context, ending), lp in zip(candidate_tokens(item, "completion"), score.logprobs, strict=True):
            direct = _direct_logprob(model, context, ending, device, dtype)
            worst = max(worst, abs(direct - lp) / max(1.0, abs(direct)))
    return worst


def check_evaluation(ctx: DoctorContext) -> list[Row]:
    """val_loss() on the trained (possibly compiled) model, and score_hellaswag() on a few items, its
    log-likelihoods compared with a direct forward pass (the scorer packs endings and masks attention)."""
    if ctx.trained is None:
        return [skipped("evaluation", NO_TRAINING)]
    trainer = ctx.trained.trainer
    val = val_loss_of(ctx, trainer.model, trainer.dtype)
    items = synthetic_hellaswag(ctx.sizes.hellaswag_items)
    scores = hellaswag_scores(ctx, trainer.model, items, trainer.dtype)
    worst = _scorer_against_direct(trainer.model, items, scores, ctx.device, trainer.dtype)
    tol = _tolerance(trainer.dtype, 1e-4, 3e-2)
    acc = sum(sc.pred_norm == sc.label for sc in scores) / len(scores)
    figure = (
        f"val loss {val['loss']:.3f} on {val['tokens']:,} tokens; HellaSwag scorer on {len(items)} "
        f"synthetic items: acc_norm {acc:.2f}, = direct forward within {worst:.1e} (tol {tol:.0e})"
    )
    metrics = dict(val_loss=val["loss"], val_tokens=val["tokens"], hellaswag_acc_norm=acc,
                   scorer_rel_diff=worst, tolerance=tol)  # fmt: skip
    if not math.isfinite(val["loss"]):
        why = "the val loss is not finite"
        return [failed("evaluation", "gpt2repro.evals.val.val_loss", why, figure=figure, **metrics)]
    if worst > tol:
        why = f"packed scoring differs from a direct forward pass by {worst:.2e} (relative)"
        fix = "report it: the masked-attention path of evals/scoring.py is wrong on this device"
        call = "gpt2repro.evals.hellaswag.score_hellaswag"
        return [failed("evaluation", call, why, fix=fix, figure=figure, **metrics)]
    return [passed("evaluation", figure, **metrics)]


def check_compiled_matches_eager(ctx: DoctorContext) -> list[Row]:
    """The compiled training graph and the eager model give the same loss and logits on a val batch of the
    training shape (train mode, gradients on: the graph training compiled, no recompilation)."""
    from gpt2repro.runtime import autocast

    if ctx.trained is None:
        return [skipped("compiled = eager", NO_TRAINING)]
    trainer, s = ctx.trained.trainer, ctx.sizes
    if not trainer.compiled:
        return [
            skipped("compiled = eager", s.compile_skip_reason or "the model is not compiled on this device")
        ]
    x, y = training_shaped_val_batch(ctx)
    x, y = x.to(ctx.device), y.to(ctx.device)
    trainer.model.train()
    with autocast(ctx.device, trainer.dtype):
        logits_c, loss_c = trainer.model(x, y)  # gradients on, as in training: the same compiled graph
        with torch.no_grad():
            logits_e, loss_e = trainer.raw_model(x, y)
    logits_c, loss_c = logits_c.detach(), float(loss_c.detach())
    loss_e = float(loss_e)
    loss_rel = abs(loss_c - loss_e) / abs(loss_e)
    logit_rel = float((logits_c.float() - logits_e.float()).abs().max() / logits_e.float().abs().max())
    del logits_c, logits_e  # free the compiled forward's graph
    tol_loss = _tolerance(trainer.dtype, 1e-3, 1e-2)  # fp32 on CUDA runs TF32 matmuls
    tol_logits = _tolerance(trainer.dtype, 1e-2, 6e-2)
    figure = (
        f"loss {loss_c:.4f} vs {loss_e:.4f} (rel {loss_rel:.1e}, tol {tol_loss:.0e}); "
        f"max logit diff {logit_rel:.1e} of max (tol {tol_logits:.0e}); {trainer.dtype}"
    )
    metrics = dict(
        loss_compiled=loss_c,
        loss_eager=loss_e,
        loss_rel_diff=loss_rel,
        logits_rel_diff=logit_rel,
    )
    disagrees = None
    if loss_rel > tol_loss or logit_rel > tol_logits:
        disagrees = Failure(
            "torch.compile(GPT) forward vs GPT forward",
            "the compiled model disagrees with the eager one beyond the tolerance",
            fix="train with --compile false and report it with this summary",
        )
    return [verdict("compiled = eager", figure, disagrees, **metrics)]


def _fresh_model(ctx: DoctorContext):
    from gpt2repro.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig.preset(ctx.sizes.model)).to(ctx.device)


def check_generation(ctx: DoctorContext) -> list[Row]:
    """Greedy decoding with the KV cache gives the same tokens as recomputing the whole context each step;
    a difference is accepted only at a near-tie of the two top logits (half-precision rounding)."""
    from gpt2repro.runtime import autocast, evaluation_mode, parse_dtype

    trained = ctx.trained is not None
    model = ctx.trained.trainer.model if trained else _fresh_model(ctx)
    dtype = ctx.trained.trainer.dtype if trained else parse_dtype("auto", ctx.device)
    prompt = val_batches(ctx)[0][0][:2, :8].to(ctx.device)
    n = ctx.sizes.gen_tokens
    with autocast(ctx.device, dtype):
        cached = model.generate(prompt, n, temperature=0.0, use_cache=True)
        plain = model.generate(prompt, n, temperature=0.0, use_cache=False)
    which = "trained" if trained else "untrained (training row failed)"
    name = "generation KV cache"
    differs = (cached != plain).any(dim=0).nonzero()
    if len(differs) == 0:
        figure = f"{n} greedy tokens x {len(prompt)} prompts identical with and without the cache"
        return [passed(name, f"{figure} ({which} model, {dtype})", tokens=n, first_difference=None)]
    pos = int(differs[0])
    rows = cached[:, pos] != plain[:, pos]
    with evaluation_mode(model) as gpt, autocast(ctx.device, dtype):
        logits = gpt(plain[rows, :pos])[0][:, -1].float()
    # how much better the uncached choice scores than the cached one, by the uncached logits
    margin = float(
        (logits.gather(1, plain[rows, pos, None]) - logits.gather(1, cached[rows, pos, None])).max()
    )
    tol = _tolerance(dtype, 1e-4, 0.1)
    figure = f"first difference at token {pos - prompt.shape[1] + 1} of {n}; logit margin {margin:.3f}"
    if margin <= tol:
        why = f"a near-tie (margin <= {tol}) in {dtype}: rounding, not a cache bug"
        return [passed(name, figure, why, first_difference=pos, margin=margin)]
    why = "the cached decoding picked a different greedy token where the choice is clear"
    call, fix = (
        "GPT.generate(use_cache=True) vs use_cache=False",
        "sample with --no-cache meanwhile; report it",
    )
    return [failed(name, call, why, fix=fix, figure=figure, first_difference=pos, margin=margin)]
