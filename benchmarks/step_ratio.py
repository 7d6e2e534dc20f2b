"""DFA step over BP step (and FA, uSF) for the residual MLP and the causal transformer, side by side.

    .venv/bin/python benchmarks/step_ratio.py [--device cpu|cuda|cpu,cuda] [--threads 4]
        [--pairs 60] [--warmup 8] [--rules bp,dfa,fa,usf] [--models resmlp,transformer] [--quick]
        [--out DIR]

Models (built by edgefa.training.trainer.build_model, exactly as `train` builds them):
    resmlp       the standard setting: 784 inputs, embed to d=256, 4 pre-LN residual blocks
                 (expansion 1), terminal LN, 10 classes; batch 128
    transformer  causal transformer on T=64 real-valued features (one per position), width 128,
                 4 blocks, 4 heads, expansion 1, 10 classes read at the last position; batch 32
A step = forward + cross-entropy, zero_grad(set_to_none=True), backward, SGD step (momentum 0.9,
lr 1e-4 so random data keeps every loss finite; lr changes values, not work). On CUDA the step is
bracketed by torch.cuda.synchronize(), so its time is the GPU's work too; the phases are then
read from CUDA events, which add no synchronization inside the step.

Every rule starts from the same initial weights (same seed; checked) and gets the same batch in
each round. One round runs one step per rule, in an order shuffled per round; the headline is the
median of the per-round ratios rule/bp with its 25th-75th percentile (as the other benchmarks,
benchmarks/_pairs.py: warm-up rounds discarded, stalled rounds set aside and replaced) and a
bootstrap 95 % interval of that median. FLOPs per step (torch.utils.flop_counter, forward and
backward apart) are counted once per rule, so the JSON shows how much work DFA actually removes.

Writes <out>/step_ratio.json and <out>/step_ratio.md (--quick: step_ratio_quick.*, small models,
4 rounds, so a smoke run never overwrites the real result).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edgefa first
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from torch.nn import functional as F

from _pairs import RESULTS_DIR, fmt, load_now, machine_info, ms, ratio_summary, run_pairs, spread
from edgefa.training.trainer import TrainConfig, build_model, make_optimizer

RULES = ("bp", "dfa", "fa", "usf")
MODELS = ("resmlp", "transformer")
LR, MOMENTUM, SEED, CLASSES = 1e-4, 0.9, 0, 10
PHASES = ("forward_incl_loss", "zero_grad_and_backward", "optimizer_step")
BOOTSTRAP = 2000

# name -> (TrainConfig fields, n_features, batch)
SETUPS = {
    "resmlp": ({"model": "resmlp", "width": 256, "depth": 4}, 784, 128),
    "transformer": ({"model": "transformer", "width": 128, "depth": 4, "heads": 4}, 64, 32),
}
QUICK_SETUPS = {
    "resmlp": ({"model": "resmlp", "width": 32, "depth": 2}, 64, 16),
    "transformer": ({"model": "transformer", "width": 16, "depth": 1, "heads": 2}, 8, 4),
}

WHY = {
    "dfa": (
        "DFA detaches each stage's input (stage = the embedding, then each whole residual block) and "
        "injects e @ B_stage at the stage's output, so the only backward work it drops is what carries "
        "the gradient from one stage into the previous one. In these pre-LN blocks that is almost "
        "nothing: the block's first op is a LayerNorm with its own weight and bias, so autograd still "
        "needs the gradient at the LN's output, which means every matmul's input gradient inside the "
        "block (fc2, fc1; proj, attention, qkv) is still computed. What is skipped is the LN's input "
        "gradient and the residual add (elementwise), and nothing at the embedding, whose input needs "
        "no gradient in BP either. DFA adds the projections e @ B_stage ([batch, classes] @ [classes, "
        "stage numel]) and a few autograd nodes. So DFA's backward FLOPs are BP's plus about 1 % (the "
        "projections: 1.010x for the resmlp, 1.007x for the transformer) and the step ratio is about 1 "
        "or a little above; in the plain MLP, where each stage is a single Linear, the same cut skips "
        "every input-gradient matmul (half of the backward matmul FLOPs), which is where DFA's speed-up "
        "comes from (benchmarks/host_step.py)."),
    "fa": (
        "FA does BP's work with B in place of W in every input gradient (same matmul shapes, same "
        "FLOPs), through a custom autograd Function per layer; any difference from 1 is that "
        "Function's overhead (its backward is Python, and it saves x and B for every layer)."),
    "cuda": (
        "these shapes are small for a GPU: a step is a long sequence of small kernels and the GPU "
        "mostly waits for the CPU to issue them (Python, autograd, launches; measured on an H200, the "
        "resmlp's 0.5 GFLOP step took longer than on 4 CPU threads of its host), so the ratio follows "
        "the number of kernels more than the FLOPs, and DFA adds some (per stage a detach, the e @ B "
        "matmul and the add into the stage's gradient): a few % over BP there."),
    "usf": (
        "uSF is FA with B = sign(W) * mean|W| built from the current weights in every forward pass: "
        "BP's FLOPs plus, per layer and step, weight-sized elementwise passes (abs, mean, sign, "
        "multiply)."),
}


def build(setup: tuple, rule: str, device: torch.device, like=None):
    fields, n_features, _ = setup
    torch.manual_seed(SEED)
    model = build_model(TrainConfig(method=rule, **fields), n_features, CLASSES).to(device)
    if like is not None:  # the same initial weights exactly (feedback buffers differ per rule)
        model.load_state_dict(like.state_dict(), strict=False)
        for p, q in zip(model.parameters(), like.parameters()):
            assert torch.equal(p, q), "initial weights differ"
    return model, make_optimizer(model, LR, MOMENTUM)


def count_flops(model, x, y) -> dict:
    """FLOPs of one forward (incl. loss) and of its backward, counted by torch's flop counter
    (matmuls and convolutions; elementwise ops count 0). Leaves no gradient behind."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fwd:
        loss = F.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": int(fwd.get_total_flops()), "backward": int(bwd.get_total_flops())}


def stepper(model, opt, batches: list, device: torch.device):
    """One timed step on the next batch: (seconds, forward, backward, optimizer phases, loss)."""
    i = [0]
    cuda = device.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if cuda else None

    def step():
        x, y = batches[i[0] % len(batches)]
        i[0] += 1
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if cuda:
            events[0].record()
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        if cuda:
            events[1].record()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        if cuda:
            events[2].record()
        opt.step()
        if cuda:
            events[3].record()
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        if cuda:  # GPU time between the events (ms -> s)
            phases = [events[k].elapsed_time(events[k + 1]) / 1e3 for k in range(3)]
        else:
            phases = [t1 - t0, t2 - t1, t3 - t2]
        return (t3 - t0, *phases, loss.item())

    return step


def bootstrap_median_ci(ratios: np.ndarray, seed: int = SEED) -> dict:
    """Percentile bootstrap 95 % interval of the median of the per-round ratios."""
    if ratios.size < 2:
        return {"lo": None, "hi": None, "resamples": 0}
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(ratios, size=(BOOTSTRAP, ratios.size), replace=True), axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return {"lo": float(lo), "hi": float(hi), "resamples": BOOTSTRAP, "level": 0.95}


def measure(name: str, setup: tuple, rules: list[str], device: torch.device, pairs: int, warmup: int) -> dict:
    fields, n_features, batch = setup
    ref = build(setup, rules[0], device)
    built = {rules[0]: ref}
    for rule in rules[1:]:
        built[rule] = build(setup, rule, device, like=ref[0])
    gen = torch.Generator().manual_seed(SEED)
    batches = [(torch.randn(batch, n_features, generator=gen).to(device),
                torch.randint(0, CLASSES, (batch,), generator=gen).to(device)) for _ in range(4)]
    flops = {r: count_flops(m, *batches[0]) for r, (m, _) in built.items()}

    gc.collect()
    gc.disable()
    try:
        results, info = run_pairs({r: stepper(m, o, batches, device) for r, (m, o) in built.items()},
                                  pairs, warmup, seed=SEED, time_of=lambda res: res[0])
    finally:
        gc.enable()

    res = {r: np.array(v) for r, v in results.items()}
    clean = np.array(info["clean"])
    out = {"setup": {**fields, "n_features": n_features, "n_classes": CLASSES, "batch": batch,
                     "n_parameters": sum(p.numel() for p in ref[0].parameters()),
                     "stages_dfa_cuts_between": ref[0].stage_names() if hasattr(ref[0], "stage_names") else None},
           "step_ms": {r: ms(res[r][clean, 0]) for r in rules},
           "phases_ms": {r: {p: ms(res[r][clean, k + 1]) for k, p in enumerate(PHASES)} for r in rules},
           "flops_per_step": flops, "ratios": {}, "pairs_info": info}
    if "bp" in rules:
        for r in rules:
            if r == "bp":
                continue
            s = ratio_summary(res[r][:, 0], res["bp"][:, 0], r, "bp", clean)
            s["bootstrap_ci_of_median"] = bootstrap_median_ci(res[r][clean, 0] / res["bp"][clean, 0])
            s["phase_ratios"] = {p: spread(res[r][clean, k + 1] / res["bp"][clean, k + 1])
                                 for k, p in enumerate(PHASES)}
            bf = flops["bp"]["backward"]
            s["backward_flops_ratio"] = flops[r]["backward"] / bf if bf else None
            out["ratios"][r] = s
    out["numerics"] = {r: {"loss_first": float(res[r][0, 4]), "loss_last": float(res[r][-1, 4]),
                           "all_losses_finite": bool(np.isfinite(res[r][:, 4]).all())} for r in rules}
    return out


def markdown(payload: dict) -> str:
    rules = payload["config"]["rules"]
    others = [r for r in rules if r != "bp"]
    lines = ["Wall time of one full training step (forward + cross-entropy, backward, SGD momentum 0.9 step) "
             "per rule against BP, rules alternated round by round; per-round ratio rule/bp, median "
             "[p25-p75] (bootstrap 95 % interval of the median); backward FLOPs rule/bp from torch's flop "
             "counter.", "",
             "| device | model | batch | bp step, median | " +
             " | ".join(f"{r}/bp per round | {r} backward FLOPs / bp" for r in others) + " | clean rounds |",
             "|---|---|---|---|" + "---|---|" * len(others) + "---|"]
    for dev, per_model in payload["results"].items():
        for model, res in per_model.items():
            st = res["setup"]
            shape = (f"resmlp {st['n_features']} -> {st['depth']} x {st['width']}"
                     if model == "resmlp" else
                     f"transformer T={st['n_features']}, d={st['width']}, {st['depth']} blocks, {st['heads']} heads")
            cells = []
            for r in others:
                s = res["ratios"][r]
                rs, ci = s["ratio_stats"], s["bootstrap_ci_of_median"]
                ci_txt = f" ({ci['lo']:.3f}-{ci['hi']:.3f})" if ci["lo"] is not None else ""
                cells.append(f"{rs['median']:.3f} [{rs['p25']:.3f}-{rs['p75']:.3f}]{ci_txt}")
                cells.append(f"{s['backward_flops_ratio']:.3f}" if s["backward_flops_ratio"] is not None else "–")
            info = res["pairs_info"]
            lines.append(f"| {dev} | {shape} | {st['batch']} | {res['step_ms']['bp']['median']:.2f} ms | "
                         + " | ".join(cells) + f" | {info['pairs_clean']} of {info['pairs_run']} |")
    m = payload["machine"]
    lines += ["", f"Machine: {m['cpu_model']} ({m['cores']} cores), torch {payload['torch']}, "
              f"{payload['config']['threads']} torch thread(s)"
              + (f", GPU {payload['gpu']}" if payload.get("gpu") else "") + ".",
              f"Command: `{payload['command']}`", "",
              "Why DFA is not faster here: " + WHY["dfa"]]
    if "cuda" in payload["results"]:
        lines += ["", "On CUDA: " + WHY["cuda"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or cpu,cuda (both, one after the other)")
    ap.add_argument("--threads", type=int, default=4, help="torch intra-op threads (default 4)")
    ap.add_argument("--pairs", type=int, default=60, help="clean timed rounds after warm-up (default 60)")
    ap.add_argument("--warmup", type=int, default=8, help="warm-up rounds, discarded (default 8)")
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated; bp is the reference")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="smoke check: small models, 4 rounds, 2 warm-up")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args()
    devices = [d.strip() for d in args.device.split(",") if d.strip()]
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(d not in ("cpu", "cuda") for d in devices) or not devices:
        ap.error("--device: cpu, cuda or cpu,cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here")
    if "bp" not in rules or any(r not in RULES for r in rules):
        ap.error(f"--rules: some of {', '.join(RULES)}, bp included")
    if any(m not in MODELS for m in models):
        ap.error(f"--models: some of {', '.join(MODELS)}")
    rules = ["bp"] + [r for r in rules if r != "bp"]
    pairs, warmup = (4, 2) if args.quick else (args.pairs, args.warmup)
    setups = QUICK_SETUPS if args.quick else SETUPS

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(args.threads)
    payload = {
        "benchmark": "step_ratio",
        "what": "one training step per rule (forward + cross-entropy, zero_grad, backward, SGD step), "
                "rules alternated round by round from the same initial weights; ratios rule/bp per round",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info({"torch_intra_op": torch.get_num_threads(),
                                 "torch_inter_op": torch.get_num_interop_threads()}),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
        "config": {"quick": args.quick, "devices": devices, "threads": args.threads, "rules": rules,
                   "models": models, "pairs": pairs, "warmup_pairs": warmup,
                   "optimizer": f"torch.optim.SGD(lr={LR}, momentum={MOMENTUM}) via make_optimizer",
                   "data": "4 seeded random batches, cycled; every rule gets the same batch in a round",
                   "order": "shuffled within each round (seeded)", "gc": "disabled while timing",
                   "cuda_timing": "synchronize before and after each step; phases from CUDA events",
                   "stall_rule": "a round is stalled when any rule's step took > 2x that rule's fastest step; "
                                 "headline stats use the clean rounds (benchmarks/_pairs.py)",
                   "interval": f"bootstrap percentile 95 % interval of the median ratio, {BOOTSTRAP} resamples"},
        "results": {},
        "notes": {k: WHY[k] for k in (*rules, *devices) if k in WHY},
    }
    for dev in devices:
        device = torch.device(dev)
        if dev == "cuda":
            torch.zeros(1, device=device)  # context creation outside the timing
        payload["results"][dev] = {}
        for model in models:
            res = measure(model, setups[model], rules, device, pairs, warmup)
            payload["results"][dev][model] = res
            info = res["pairs_info"]
            print(f"{dev} {model}: {info['pairs_clean']} clean rounds of {info['pairs_run']}, "
                  f"{torch.get_num_threads()} threads", flush=True)
            for r in rules:
                print(f"  {r:4s} step {fmt(res['step_ms'][r], ' ms')}", flush=True)
            for r, s in res["ratios"].items():
                ci = s["bootstrap_ci_of_median"]
                ci_txt = f" 95% CI {ci['lo']:.3f}-{ci['hi']:.3f}" if ci["lo"] is not None else ""
                print(f"  {r}/bp per round: {fmt(s['ratio_stats'])}{ci_txt}; backward FLOPs "
                      f"{s['backward_flops_ratio']:.3f} of bp", flush=True)
    # the measured verdict beside the explanation
    for dev, per_model in payload["results"].items():
        for model, res in per_model.items():
            if "dfa" in res["ratios"]:
                s = res["ratios"]["dfa"]
                payload["notes"][f"dfa_measured_{dev}_{model}"] = (
                    f"dfa/bp step {s['ratio_stats']['median']:.3f} per round (median), backward FLOPs "
                    f"{s['backward_flops_ratio']:.3f} of bp")
    payload["load_at_end"] = load_now()
    stem = "step_ratio_quick" if args.quick else "step_ratio"
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md = markdown(payload)
    md_path.write_text(md)
    print(md)
    print(f"wrote {json_path}\nwrote {md_path}")


if __name__ == "__main__":
    main()
