"""Host benchmark: one DFA training step vs one BP step on the same MLP, torch on the CPU, with
today's autograd DFA step, biotorch's DFA and the GEMMs alone timed in the same pairing.

    .venv/bin/python benchmarks/host_step.py [--pairs N] [--quick]

Model: edgefa's MLP, input 1024, 8 hidden layers of 1024 (ReLU), 10 classes; batch 128;
torch.optim.SGD(lr 1e-4, momentum 0.9) through edgefa's make_optimizer; 2 torch threads.
Contenders, each one turn per pair in a seeded shuffled order:

  dfa           what `edgefa train --method dfa` runs: `train_steps`' explicit DFA step
                (training/dfa_step.py: forward without a graph, update fused into the GEMM)
  dfa_autograd  the autograd DFA step (forward + cross-entropy, zero_grad(set_to_none=True),
                backward through rules.py's `_DFAOutput`, optimizer.step()), the path before it
  bp            the same step under rule bp
  biotorch_dfa  the anchor: biotorch 0.0.16's DFA (`BioModule(mode="dfa")` over an
                nn.Sequential with the same initial weights), its documented step: forward with
                targets and loss, backward, SGD step (the `bench` extra; absent-with-reason if
                it will not import)
  gemm_floor    the GEMMs alone: the 9 forward matmuls and the 9 weight-gradient matmuls
                (delta^T h) of one DFA step, on fixed tensors into preallocated outputs

Target: median per-pair time ratio dfa/bp <= 0.70. Every contender's ratio against the floor is
reported too. The autograd contenders also record their phases (forward incl. loss,
zero_grad + backward, optimizer step). Pairing and the stall rule: benchmarks/_pairs.py.
Writes benchmarks/results/host_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edgefa first

import numpy as np
import torch
from torch.nn import functional as F

from _pairs import fmt, load_now, machine_info, ms, ratio_summary, run_pairs, spread, write_json
from edgefa.models import MLP, MLPConfig
from edgefa.training.dfa_step import explicit_dfa_applies, explicit_dfa_step
from edgefa.training.trainer import make_optimizer

IN, HIDDEN, CLASSES, BATCH = 1024, [1024] * 8, 10, 128
# lr does not change what a step computes, only the values. 1e-4 keeps both rules finite for the
# whole run on random data; at 0.01 DFA's loss explodes by step ~20 here and NaN soon follows, so
# most timed steps would run on NaN weights. The JSON records that every loss stayed finite.
LR, MOMENTUM, THREADS, SEED = 1e-4, 0.9, 2, 0
TARGET = 0.70
PHASES = ("forward_incl_loss", "zero_grad_and_backward", "optimizer_step")
NAN_PHASES = (float("nan"),) * 3        # contenders without autograd phases


def build(rule: str, like: MLP | None = None) -> tuple[MLP, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    model = MLP(MLPConfig(IN, list(HIDDEN), CLASSES, rule=rule))
    if like is not None:  # same initial weights, exactly (the DFA model also holds feedback buffers)
        model.load_state_dict(like.state_dict(), strict=False)
        for p, q in zip(model.parameters(), like.parameters()):
            assert torch.equal(p, q), "initial weights differ"
    return model, make_optimizer(model, LR, MOMENTUM)


def build_biotorch(like: MLP):
    """biotorch's DFA over an nn.Sequential holding `like`'s initial weights, or (None, reason)."""
    try:
        from biotorch.module.biomodule import BioModule
    except Exception as exc:  # noqa: BLE001 -- any failure to import is the recorded reason
        return None, f"biotorch does not import with torch {torch.__version__}: {type(exc).__name__}: {exc}"
    layers = []
    for lin in like.linears():
        copy = torch.nn.Linear(lin.in_features, lin.out_features)
        copy.load_state_dict(lin.state_dict())
        layers += [copy, torch.nn.ReLU()]
    torch.manual_seed(SEED)   # biotorch draws its feedback matrices from torch's global RNG
    with contextlib.redirect_stdout(io.StringIO()):     # it prints a conversion report
        model = BioModule(torch.nn.Sequential(*layers[:-1]), mode="dfa", output_dim=CLASSES)
    # its layers use Module.register_backward_hook, which torch 2.x warns about on every backward
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    converted = [m for m in model.module if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():       # its conversion re-initializes; put the shared initial weights back
        for new, lin in zip(converted, like.linears(), strict=True):
            new.weight.copy_(lin.weight)
            new.bias.copy_(lin.bias)
    trained = [p for p in model.parameters() if p.requires_grad]
    return (model, torch.optim.SGD(trained, lr=LR, momentum=MOMENTUM)), None


def timed(step_fn, batches: list):
    """A closure running `step_fn(x, y)` on the next batch, timed. Returns seconds for the whole
    step, its three phases (NaN where step_fn does not report them), the involuntary context
    switches of this process during the step, and the loss (read after the clock stops)."""
    i = [0]

    def step():
        x, y = batches[i[0] % len(batches)]
        i[0] += 1
        cs0 = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
        t0 = time.perf_counter()
        phases, loss = step_fn(x, y)
        t3 = time.perf_counter()
        nivcsw = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - cs0
        return (t3 - t0, *phases, nivcsw, float(loss))

    return step


def autograd_step(model, opt, call=lambda model, x, y: model(x)):
    """forward + cross-entropy, zero_grad(set_to_none=True), backward, optimizer.step(), phased."""
    def step(x, y):
        t0 = time.perf_counter()
        loss = F.cross_entropy(call(model, x, y), y)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return (t1 - t0, t2 - t1, t3 - t2), loss.detach()
    return step


def explicit_step(model, opt):
    assert explicit_dfa_applies(model, opt), "train_steps would not take the explicit step here"
    return lambda x, y: (NAN_PHASES, explicit_dfa_step(model, opt, x, y))


def gemm_floor_step(model: MLP):
    """The matmuls of one DFA step and nothing else: h_l W_l^T (forward, bias and activation left
    out) and delta_l^T h_{l-1} (weight gradients), into preallocated outputs."""
    gen = torch.Generator().manual_seed(SEED + 1)
    weights = [lin.weight.detach().clone() for lin in model.linears()]
    inputs = [torch.randn(BATCH, w.shape[1], generator=gen) for w in weights]
    deltas = [torch.randn(BATCH, w.shape[0], generator=gen) for w in weights]
    outs = [torch.empty(BATCH, w.shape[0]) for w in weights]
    grads = [torch.empty_like(w) for w in weights]

    def step(x, y):
        for h, w, o in zip(inputs, weights, outs):
            torch.mm(h, w.t(), out=o)
        for d, h, g in zip(deltas, inputs, grads):
            torch.mm(d.t(), h, out=g)
        return NAN_PHASES, 0.0
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=60, help="clean timed pairs after warm-up (default 60)")
    ap.add_argument("--warmup", type=int, default=8, help="warm-up pairs, discarded (default 8)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 4 pairs, 2 warm-up")
    args = ap.parse_args()
    pairs, warmup = (4, 2) if args.quick else (args.pairs, args.warmup)

    torch.set_num_threads(THREADS)
    bp = build("bp")
    dfa = build("dfa", like=bp[0])
    dfa_autograd = build("dfa", like=bp[0])
    biotorch, biotorch_absent = build_biotorch(bp[0])
    models = {"dfa": dfa, "dfa_autograd": dfa_autograd, "bp": bp}
    steps = {"dfa": explicit_step(*dfa), "dfa_autograd": autograd_step(*dfa_autograd), "bp": autograd_step(*bp)}
    if biotorch is not None:
        models["biotorch_dfa"] = biotorch
        steps["biotorch_dfa"] = autograd_step(
            *biotorch, call=lambda model, x, y: model(x, targets=y, loss_function=F.cross_entropy))
    steps["gemm_floor"] = gemm_floor_step(bp[0])

    # A handful of seeded random batches, cycled; in each pair every contender gets the same batch.
    gen = torch.Generator().manual_seed(SEED)
    batches = [(torch.randn(BATCH, IN, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen))
               for _ in range(4)]

    # Python's cyclic GC firing inside one contender's step would be noise; collect now, then pause it.
    gc.collect()
    gc.disable()
    try:
        results, info = run_pairs({name: timed(fn, batches) for name, fn in steps.items()},
                                  pairs, warmup, seed=SEED, time_of=lambda r: r[0])
    finally:
        gc.enable()

    # Columns: total, forward, backward, optimizer (s), involuntary context switches, loss.
    res = {name: np.array(r) for name, r in results.items()}
    clean = np.array(info["clean"])
    summary = ratio_summary(res["dfa"][:, 0], res["bp"][:, 0], "dfa", "bp", clean)
    summary["involuntary_context_switches_per_step"] = {r: spread(res[r][:, 4]) for r in res}
    # Every other ratio, per pair over the same clean pairs (raw times are in `step` and below).
    pairs_of_interest = [("dfa", "dfa_autograd"), ("dfa_autograd", "bp"), ("biotorch_dfa", "bp"),
                         ("dfa", "biotorch_dfa")] + [(n, "gemm_floor") for n in res if n != "gemm_floor"]
    ratios = {f"{a}/{b}": spread(res[a][clean, 0] / res[b][clean, 0])
              for a, b in pairs_of_interest if a in res and b in res}
    times = {n: ms(res[n][clean, 0]) for n in res}
    # The phase breakdown of the autograd contenders (clean pairs).
    autograd = [n for n in ("dfa_autograd", "bp", "biotorch_dfa") if n in res]
    phases = {r: {name: ms(res[r][clean, k + 1]) for k, name in enumerate(PHASES)} for r in autograd}
    med = {r: {k: v.get("median", float("nan")) for k, v in p.items()} for r, p in phases.items()}
    ratio_met = summary["ratio_stats"].get("median", np.inf) <= TARGET

    payload = {
        "benchmark": "host_step",
        "what": "one training step of edgefa's MLP, torch CPU, same initial weights: dfa (train_steps' "
                "explicit DFA step) vs bp (forward + cross-entropy, zero_grad(set_to_none=True), backward, "
                "SGD step); the autograd DFA step, biotorch's DFA and the GEMMs alone in the same pairing",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info({"torch_intra_op": torch.get_num_threads(),
                                 "torch_inter_op": torch.get_num_interop_threads()}),
        "config": {"in_features": IN, "hidden": HIDDEN, "n_classes": CLASSES, "batch": BATCH,
                   "optimizer": f"torch.optim.SGD(lr={LR}, momentum={MOMENTUM}) via make_optimizer",
                   "contenders": list(steps), "pairs": pairs, "warmup_pairs": warmup,
                   "order": "shuffled within each pair (seeded)", "gc": "disabled while timing",
                   "stall_rule": f"a pair is stalled when any step took > {info['stall_factor']}x its "
                                 "contender's fastest step; headline stats use the clean pairs"},
        "step": summary,
        "ratios_per_pair": ratios,
        "times_ms": times,
        "anchors": {"biotorch_dfa": ({"version": _version("biotorch"), "ratio_over_bp": ratios.get("biotorch_dfa/bp")}
                                     if biotorch is not None else {"absent": biotorch_absent})},
        "phases_ms": phases,
        "phase_medians_sum_ms": {r: sum(m.values()) for r, m in med.items()},
        "target": {"dfa_over_bp_max": TARGET, "met": bool(ratio_met)},
        "numerics": {r: {"loss_first": float(res[r][0, 5]), "loss_last": float(res[r][-1, 5]),
                         "all_losses_finite": bool(np.isfinite(res[r][:, 5]).all()),
                         "params_finite_at_end": all(bool(torch.isfinite(p).all()) for p in m.parameters())}
                     for r, (m, _) in models.items()},
        "pairs_info": info,
        "load_at_end": load_now(),
    }
    path = write_json("host_step", payload)

    s, a, c = summary["ratio_stats"], summary["all_pairs"]["ratio_stats"], summary["cross_check"]
    print(f"host step: {info['pairs_clean']} clean pairs of {info['pairs_run']} run, after {warmup} warm-up; "
          f"{torch.get_num_threads()} threads; load {payload['load_at_end'].get('loadavg')}")
    for name, t in times.items():
        print(f"  {name:13s} {fmt(t, ' ms')}")
    print(f"  dfa/bp per pair: {fmt(s)}  target <= {TARGET}: {'met' if ratio_met else 'NOT met'}")
    print(f"  all pairs: {fmt(a)}; cross-check ratio of p10 times {c['p10_time_ratio']:.3f}, "
          f"of min times {c['min_time_ratio']:.3f}")
    for name, r in ratios.items():
        print(f"  {name:26s} {fmt(r)}")
    if biotorch is None:
        print(f"  biotorch_dfa absent: {biotorch_absent}")
    for rule in autograd:
        print(f"  {rule:12s} phases (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in med[rule].items()))
    if not all(v["all_losses_finite"] and v["params_finite_at_end"] for v in payload["numerics"].values()):
        print("  WARNING: a loss or weight went non-finite; the timings are not of a sane model")
    print(f"wrote {path}")


def _version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
