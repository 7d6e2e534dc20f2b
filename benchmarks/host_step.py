"""Host benchmark: one DFA training step vs one BP step on the same MLP, torch on the CPU.

    .venv/bin/python benchmarks/host_step.py [--pairs N] [--quick]

Model: edgefa's MLP, input 1024, 8 hidden layers of 1024 (ReLU), 10 classes; batch 128;
torch.optim.SGD(lr 1e-4, momentum 0.9) through edgefa's make_optimizer; 2 torch threads.
A step = forward + cross-entropy, zero_grad(set_to_none=True), backward, optimizer.step().
Target: median per-pair time ratio DFA/BP <= 0.70.

The phases of every timed step are recorded too (forward incl. loss, zero_grad + backward,
optimizer step), so the JSON shows *where* the ratio comes from: DFA keeps BP's forward, the
weight-gradient half of the backward and the optimizer step, and drops the input gradients.
Pairing and the stall rule are explained in benchmarks/_pairs.py.
Writes benchmarks/results/host_step.json.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edgefa first

import numpy as np
import torch
from torch.nn import functional as F

from _pairs import fmt, load_now, machine_info, ms, ratio_summary, run_pairs, spread, write_json
from edgefa.models import MLP, MLPConfig
from edgefa.training.trainer import make_optimizer

IN, HIDDEN, CLASSES, BATCH = 1024, [1024] * 8, 10, 128
# lr does not change what a step computes, only the values. 1e-4 keeps both rules finite for the
# whole run on random data; at 0.01 DFA's loss explodes by step ~20 here and NaN soon follows, so
# most timed steps would run on NaN weights. The JSON records that every loss stayed finite.
LR, MOMENTUM, THREADS, SEED = 1e-4, 0.9, 2, 0
TARGET = 0.70
PHASES = ("forward_incl_loss", "zero_grad_and_backward", "optimizer_step")


def build(rule: str, like: MLP | None = None) -> tuple[MLP, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    model = MLP(MLPConfig(IN, list(HIDDEN), CLASSES, rule=rule))
    if like is not None:  # same initial weights, exactly (the DFA model also holds feedback buffers)
        model.load_state_dict(like.state_dict(), strict=False)
        for p, q in zip(model.parameters(), like.parameters()):
            assert torch.equal(p, q), "initial weights differ"
    return model, make_optimizer(model, LR, MOMENTUM)


def stepper(model: MLP, opt: torch.optim.Optimizer, batches: list):
    """A closure doing one timed step on the next batch. Returns seconds for the whole step and
    its three phases, the involuntary context switches of this process during the step, and the
    loss (read after the clock stops)."""
    i = [0]

    def step():
        x, y = batches[i[0] % len(batches)]
        i[0] += 1
        cs0 = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        nivcsw = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - cs0
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2, nivcsw, loss.item()

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

    # A handful of seeded random batches, cycled; in each pair both rules get the same batch.
    gen = torch.Generator().manual_seed(SEED)
    batches = [(torch.randn(BATCH, IN, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen))
               for _ in range(4)]

    # Python's cyclic GC firing inside one contender's step would be noise; collect now, then pause it.
    gc.collect()
    gc.disable()
    try:
        results, info = run_pairs({"dfa": stepper(*dfa, batches), "bp": stepper(*bp, batches)},
                                  pairs, warmup, seed=SEED, time_of=lambda r: r[0])
    finally:
        gc.enable()

    # Columns: total, forward, backward, optimizer (s), involuntary context switches, loss.
    res = {rule: np.array(r) for rule, r in results.items()}
    clean = np.array(info["clean"])
    summary = ratio_summary(res["dfa"][:, 0], res["bp"][:, 0], "dfa", "bp", clean)
    summary["involuntary_context_switches_per_step"] = {r: spread(res[r][:, 4]) for r in res}
    # The phase breakdown (clean pairs): the step ratio is (F + B_dfa + O) / (F + B_bp + O).
    phases = {r: {name: ms(res[r][clean, k + 1]) for k, name in enumerate(PHASES)} for r in res}
    phase_ratios = {name: spread(res["dfa"][clean, k + 1] / res["bp"][clean, k + 1])
                    for k, name in enumerate(PHASES)}
    med = {r: {k: v["median"] for k, v in p.items()} for r, p in phases.items()}
    ratio_met = summary["ratio_stats"].get("median", np.inf) <= TARGET

    payload = {
        "benchmark": "host_step",
        "what": "one training step (forward + cross-entropy, zero_grad(set_to_none=True), backward, "
                "SGD step) of edgefa's MLP, rule dfa vs rule bp, same initial weights, torch CPU",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info({"torch_intra_op": torch.get_num_threads(),
                                 "torch_inter_op": torch.get_num_interop_threads()}),
        "config": {"in_features": IN, "hidden": HIDDEN, "n_classes": CLASSES, "batch": BATCH,
                   "optimizer": f"torch.optim.SGD(lr={LR}, momentum={MOMENTUM}) via make_optimizer",
                   "pairs": pairs, "warmup_pairs": warmup, "order": "shuffled within each pair (seeded)",
                   "gc": "disabled while timing",
                   "stall_rule": f"a pair is stalled when a step took > {info['stall_factor']}x its "
                                 "contender's fastest step; headline stats use the clean pairs"},
        "step": summary,
        "phases_ms": phases,
        "phase_ratios_dfa_over_bp": phase_ratios,
        "phase_medians_sum_ms": {r: sum(m.values()) for r, m in med.items()},
        "target": {"dfa_over_bp_max": TARGET, "met": bool(ratio_met)},
        "numerics": {r: {"loss_first": float(res[r][0, 5]), "loss_last": float(res[r][-1, 5]),
                         "all_losses_finite": bool(np.isfinite(res[r][:, 5]).all()),
                         "params_finite_at_end": all(bool(torch.isfinite(p).all()) for p in m.parameters())}
                     for r, (m, _) in (("dfa", dfa), ("bp", bp))},
        "pairs_info": info,
        "load_at_end": load_now(),
    }
    path = write_json("host_step", payload)

    s, a, c = summary["ratio_stats"], summary["all_pairs"]["ratio_stats"], summary["cross_check"]
    print(f"host step: {info['pairs_clean']} clean pairs of {info['pairs_run']} run, after {warmup} warm-up; "
          f"{torch.get_num_threads()} threads")
    print(f"  dfa  {fmt(summary['dfa_ms'], ' ms')}")
    print(f"  bp   {fmt(summary['bp_ms'], ' ms')}")
    print(f"  dfa/bp per pair: {fmt(s)}  target <= {TARGET}: {'met' if ratio_met else 'NOT met'}")
    print(f"  all pairs: {fmt(a)}; cross-check ratio of p10 times {c['p10_time_ratio']:.3f}, "
          f"of min times {c['min_time_ratio']:.3f}")
    for rule in ("dfa", "bp"):
        print(f"  {rule:4s} phases (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in med[rule].items()))
    if not all(v["all_losses_finite"] and v["params_finite_at_end"] for v in payload["numerics"].values()):
        print("  WARNING: a loss or weight went non-finite; the timings are not of a sane model")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
