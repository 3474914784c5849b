"""Automatic per-op precision search among int4, int8 and bf16, scored by measured perplexity on held-out text.

Every decoder op is quantized once to int4 and once to int8 (GPTQ on the float model's calibration
inputs, or RTN); a candidate plan swaps those weights in and scores the search windows, text kept apart
from both the calibration and the evaluation plays. Seeded by the sensitivity ranking, the search
promotes the top ``j`` ops to bf16 and the next ``k`` to int8, and for each ``j`` bisects on the smallest
``k`` that meets the perplexity bound. The chosen plan is then quantized as the checkpoint will be (GPTQ
in order, each layer on the quantized ones before it) and scored again; while that written model misses
the bound, the search goes on under a bound lowered by the gap it measured (``verified_search``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ember.analysis.sensitivity import make_quantizer
from ember.kernels.linear.spec import WeightScheme
from ember.quant.calibration import capture_activations, collect_layer_inputs, find_decoder_layers, run_layer
from ember.quant.plan import OP_LINEARS, OpRef, op_shapes, op_weight_bytes

BF16_COUNTS = (0, 1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One evaluated plan: ``plan`` maps every decoder op to its precision."""

    plan: dict[OpRef, str]
    weight_bytes: int
    ppl: float
    dppl: float  # % of the float model's perplexity on the search windows
    label: str
    tpot_ms: float | None = None  # measured single-stream decode time per token (latency objective)
    written_dppl: float | None = None  # the plan quantized as the checkpoint is, scored on the same windows

    def counts(self) -> dict[str, int]:
        return {p: sum(1 for v in self.plan.values() if v == p) for p in ("int4", "int8", "bf16")}

    def to_row(self) -> dict[str, Any]:
        return {"label": self.label, **self.counts(), "weight_bytes": self.weight_bytes, "ppl": self.ppl,
                "dppl_percent": self.dppl, "tpot_ms": self.tpot_ms, "bf16_ops": " ".join(r.key() for r, p in self.plan.items() if p == "bf16"),
                "int8_ops": " ".join(r.key() for r, p in self.plan.items() if p == "int8"),
                "written_dppl_percent": self.written_dppl}


@torch.no_grad()
def windows_nll(model: nn.Module, windows: Sequence[torch.Tensor], score_from: int = 0) -> float:
    """Mean next-token NLL of ``model`` over ``windows`` ([batch, seq] ids), counting the targets at
    positions ``score_from`` and later of each window (strided evaluation windows score only the tokens
    that have the first part of the window as context)."""
    total, count = 0.0, 0
    first = max(score_from - 1, 0)  # logits at position p predict the token at p + 1
    for window in windows:
        logits = model(input_ids=window, use_cache=False).logits[:, first:-1].float()
        targets = window[:, first + 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                         reduction="sum"))
        count += targets.numel()
    return total / count


class PlanEvaluator:
    """Holds each op's int4 and int8 fake-quantized weights and scores plans on the search windows.

    ``batches`` calibrate the quantizers; ``score_windows`` (default: ``batches``) are what a plan is
    scored on, counting the targets from position ``score_from`` of each.
    """

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor], group_size: int = 64,
                 method: str = "gptq", score_windows: Sequence[torch.Tensor] | None = None,
                 score_from: int = 0, method_args: dict | None = None) -> None:
        self.model, self.batches = model, list(batches)
        self.score_windows = list(self.batches if score_windows is None else score_windows)
        self.score_from = score_from
        _, layers = find_decoder_layers(model)
        self.ops = [OpRef(i, op) for i in range(len(layers)) for op in OP_LINEARS]
        self.shapes = op_shapes(model, self.ops)
        self.group_size = group_size
        self.original = {ref: [model.get_submodule(n).weight.data for n in ref.linear_names()] for ref in self.ops}
        self.weights = self._quantize_all(method, method_args)
        self.base_nll = self._nll()

    @torch.no_grad()
    def _quantize_all(self, method: str, method_args: dict | None) -> dict[tuple[OpRef, str], list[torch.Tensor]]:
        """Fake-quantized weights of every op at int4 and int8, from the float model's own inputs."""
        quantizers = {"int4": make_quantizer(method, WeightScheme(4, self.group_size, True), method_args),
                      "int8": make_quantizer(method, WeightScheme(8, None, True), method_args)}
        _, layers = find_decoder_layers(self.model)
        inputs = collect_layer_inputs(self.model, self.batches)
        out: dict[tuple[OpRef, str], list[torch.Tensor]] = {}
        firsts = [names[0] for names in OP_LINEARS.values()]  # each op's linears share this one's input
        for index, layer in enumerate(layers):
            with capture_activations(layer, firsts) as capture:
                inputs.hidden = run_layer(layer, inputs)
            for op, names in OP_LINEARS.items():
                x = torch.cat([t.reshape(-1, t.shape[-1]) for t in capture.inputs[names[0]]])
                linears = [layer.get_submodule(n) for n in names]
                for precision, quantize in quantizers.items():
                    out[(OpRef(index, op), precision)] = quantize(op, linears, x, layer)
        return out

    def _nll(self, model: nn.Module | None = None) -> float:
        return windows_nll(self.model if model is None else model, self.score_windows, self.score_from)

    def dppl(self, model: nn.Module) -> float:
        """Perplexity increase of ``model`` (e.g. a really quantized copy) on the search windows, % of
        the float model's."""
        return 100.0 * (math.exp(self._nll(model) - self.base_nll) - 1)

    def weight_bytes(self, plan: dict[OpRef, str]) -> int:
        return sum(op_weight_bytes(self.shapes[ref], p, self.group_size) for ref, p in plan.items())

    def evaluate(self, plan: dict[OpRef, str], label: str = "") -> Candidate:
        """Calibration perplexity of the model with each op at its planned precision."""
        try:
            for ref, precision in plan.items():
                chosen = self.original[ref] if precision == "bf16" else self.weights[(ref, precision)]
                for name, weight in zip(ref.linear_names(), chosen):
                    self.model.get_submodule(name).weight.data = weight
            nll = self._nll()
        finally:
            for ref in self.ops:
                for name, weight in zip(ref.linear_names(), self.original[ref]):
                    self.model.get_submodule(name).weight.data = weight
        return Candidate(dict(plan), self.weight_bytes(plan), math.exp(nll), 100.0 * (math.exp(nll - self.base_nll) - 1),
                         label)


def tiered_plan(ranking: Sequence[OpRef], num_bf16: int, num_int8: int) -> dict[OpRef, str]:
    """The top ``num_bf16`` ops of ``ranking`` in bf16, the next ``num_int8`` in int8, the rest int4."""
    plan = {}
    for position, ref in enumerate(ranking):
        plan[ref] = "bf16" if position < num_bf16 else "int8" if position < num_bf16 + num_int8 else "int4"
    return plan


def search_precisions(evaluator: PlanEvaluator, ranking: Sequence[OpRef], max_ppl_increase: float,
                      bf16_counts: Sequence[int] = BF16_COUNTS,
                      on_candidate: Callable[[Candidate], None] | None = None,
                      seen: dict[tuple[int, int], Candidate] | None = None) -> tuple[Candidate | None, list[Candidate]]:
    """Smallest-memory plan within ``max_ppl_increase`` (% of the float model's perplexity on the search
    windows), and every candidate.

    For each count j of bf16 ops, bisect on the count k of int8 ops after them (perplexity falls as k
    grows, which the bisection assumes; every evaluated point is kept, so a non-monotone step shows
    in the candidate list). ``seen`` caches the scored (j, k) across calls. Returns (the feasible
    candidate with the fewest weight bytes or None, all).
    """
    ranking = [ref for ref in ranking if ref in evaluator.shapes]
    seen = {} if seen is None else seen

    def score(j: int, k: int) -> Candidate:
        if (j, k) not in seen:
            seen[(j, k)] = evaluator.evaluate(tiered_plan(ranking, j, k), label=f"bf16={j} int8={k}")
            if on_candidate is not None:
                on_candidate(seen[(j, k)])
        return seen[(j, k)]

    for j in bf16_counts:
        if j > len(ranking):
            break
        lo, hi = 0, len(ranking) - j  # find the smallest k with dppl <= bound in [lo, hi]
        if score(j, hi).dppl > max_ppl_increase:
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if score(j, mid).dppl <= max_ppl_increase:
                hi = mid
            else:
                lo = mid + 1
    candidates = list(seen.values())
    return smallest_feasible(candidates, max_ppl_increase), candidates


def smallest_feasible(candidates: Sequence[Candidate], max_ppl_increase: float) -> Candidate | None:
    """The memory objective: the feasible candidate with the fewest weight bytes."""
    feasible = [c for c in candidates if c.dppl <= max_ppl_increase]
    return min(feasible, key=lambda c: c.weight_bytes) if feasible else None


def verified_search(evaluator: PlanEvaluator, ranking: Sequence[OpRef], max_ppl_increase: float,
                    written: Callable[[Candidate], float], *,
                    pick: Callable[[list[Candidate], float], Candidate | None] = smallest_feasible,
                    bf16_counts: Sequence[int] = BF16_COUNTS, on_candidate: Callable[[Candidate], None] | None = None,
                    max_rounds: int = 4) -> tuple[Candidate | None, list[Candidate]]:
    """The chosen plan, checked as it will be written: ``written(candidate)`` gives the Δppl of the
    really quantized model on the same windows.

    Round 1 searches under ``max_ppl_increase`` and ``pick`` chooses among the candidates. When the
    written model misses the bound by more than its candidate scored (a gap g between the stand-in
    weights and the real ones), the next round searches under ``max_ppl_increase - g``, which rules
    that candidate out. Returns (the first written candidate within the bound or None after
    ``max_rounds``, every candidate, ``written_dppl`` set on those that were written).
    """
    seen: dict[tuple[int, int], Candidate] = {}
    checked: dict[str, Candidate] = {}
    target, chosen = max_ppl_increase, None
    for _ in range(max_rounds):
        search_precisions(evaluator, ranking, target, bf16_counts, on_candidate, seen=seen)
        best = pick(list(seen.values()), target)
        if best is None or best.label in checked:
            break
        best = dataclasses.replace(best, written_dppl=written(best))
        checked[best.label] = best
        if best.written_dppl <= max_ppl_increase:
            chosen = best
            break
        target = max_ppl_increase - (best.written_dppl - best.dppl)
    return chosen, [checked.get(c.label, c) for c in seen.values()]


def written_dppl(evaluator: PlanEvaluator, config, plan: dict[OpRef, str]) -> float:
    """Δppl on the search windows of ``plan`` quantized as the checkpoint is: ``quantize_model`` on a copy
    of the float model with ``config`` (bits 4) and the plan's int8 and bf16 ops, calibrated on the
    evaluator's batches."""
    import copy

    from ember.quant import quantize_model
    from ember.quant.plan import linear_precisions

    precisions = {name: p for name, p in linear_precisions(plan).items() if p != "int4"}
    model = copy.deepcopy(evaluator.model)
    quantize_model(model, dataclasses.replace(config, precisions=precisions), calib_batches=evaluator.batches)
    return evaluator.dppl(model)


def frontier_candidates(candidates: Sequence[Candidate], max_ppl_increase: float) -> list[Candidate]:
    """Per bf16 count, the feasible plan with the fewest int8 ops: where the latency objective measures."""
    best: dict[int, Candidate] = {}
    for cand in candidates:
        if cand.dppl <= max_ppl_increase:
            j = cand.counts()["bf16"]
            if j not in best or cand.weight_bytes < best[j].weight_bytes:
                best[j] = cand
    return [best[j] for j in sorted(best)]


def measure_tpot(float_model: nn.Module, plan: dict[OpRef, str], group_size: int, tokenizer, dtype: str,
                 num_tokens: int = 128) -> float:
    """Single-stream decode time per token (ms) of ``plan`` in the engine: W2's prompt (the first 128
    tokens of W1's first prompt), ``num_tokens`` greedy tokens. Kernel time depends on each op's
    precision, not its values, so the plan is quantized with RTN into a scratch checkpoint."""
    import copy
    import random
    import tempfile

    from ember import LLM, SamplingParams
    from ember.quant import QuantConfig, quantize_model, save_quantized
    from ember.quant.plan import linear_precisions

    precisions = {n: p for n, p in linear_precisions(plan).items() if p != "int4"}
    model = copy.deepcopy(float_model)
    quantize_model(model, QuantConfig(method="rtn", bits=4, group_size=group_size, precisions=precisions))
    rng = random.Random(0)  # W1's first request: L, O, then the ids
    length, _ = rng.randint(64, 512), rng.randint(64, 256)
    vocab = float_model.config.vocab_size  # W2's ids fit SmolLM2's vocabulary; wrap them for smaller ones
    prompt = [rng.randint(100, 49052) % vocab for _ in range(length)][:128]
    with tempfile.TemporaryDirectory() as scratch:
        save_quantized(model, scratch, QuantConfig(method="rtn", bits=4, group_size=group_size, precisions=precisions))
        tokenizer.save_pretrained(scratch)
        llm = LLM(model=scratch, dtype=dtype)
        params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
        llm.generate({"prompt_token_ids": prompt[:16]}, SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    metrics = out.metrics
    return 1000 * (metrics.finished_time - metrics.first_token_time) / (num_tokens - 1)


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other one beats on both weight bytes and perplexity, by increasing bytes."""
    front, best = [], math.inf
    for cand in sorted(candidates, key=lambda c: (c.weight_bytes, c.ppl)):
        if cand.ppl < best:
            front.append(cand)
            best = cand.ppl
    return front


def write_candidates_csv(candidates: Sequence[Candidate], path: str) -> None:
    import csv

    rows = [c.to_row() for c in candidates]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_candidates(candidates: Sequence[Candidate], chosen: Candidate | None, bound: float, base_ppl: float,
                    path: str) -> None:
    """Perplexity on the search windows against weight bytes (every candidate, the Pareto front, the plans
    as written, the bound, the choice) and, when decode times were measured, against TPOT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [c for c in candidates if c.tpot_ms is not None]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.scatter([c.weight_bytes / 1e6 for c in candidates], [c.ppl for c in candidates], s=14, label="candidates")
    front = pareto_front(candidates)
    ax.plot([c.weight_bytes / 1e6 for c in front], [c.ppl for c in front], color="C1", label="Pareto front")
    written = [c for c in candidates if c.written_dppl is not None]
    ax.scatter([c.weight_bytes / 1e6 for c in written], [base_ppl * (1 + c.written_dppl / 100) for c in written],
               s=40, marker="x", color="C4", label="as written (quantized in order)", zorder=3)
    ax.set_xlabel("linear weight bytes (MB)")
    if timed:
        axes[0][1].scatter([c.tpot_ms for c in timed], [c.ppl for c in timed], s=20, label="measured plans")
        axes[0][1].set_xlabel("W2 TPOT (ms)")
    for panel, x_of in zip(axes[0], (lambda c: c.weight_bytes / 1e6, lambda c: c.tpot_ms)):
        panel.axhline(base_ppl * (1 + bound / 100), color="C2", linestyle="--", label=f"+{bound:g}% bound")
        if chosen is not None and x_of(chosen) is not None:
            panel.scatter([x_of(chosen)], [chosen.ppl], s=90, marker="*", color="C3", label="chosen", zorder=3)
        panel.set_ylabel("perplexity on the search windows")
        panel.grid(alpha=0.3)
        panel.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
