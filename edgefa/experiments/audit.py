"""`edgefa audit`: the diagnostic protocol over BP, FA, DFA, hybrid and penalized DFA on the
pre-LN residual MLP, over seeds: one table (JSON, markdown), per-stage Gamma and the deep-stream
norms over training as plots, and an HTML page with all of it.

Every configuration trains `resmlp` (width x depth, SGD with momentum) on the same data and split
per seed, with alignment logged each epoch (the trajectory of ||h_L|| and ||g_L||). Each run is then
diagnosed (diagnostics/diagnosis.py) against its frozen-random-blocks baseline, trained once per
(rule, seed) and shared by every penalty of DFA (frozen blocks make the penalty inert under DFA).

Reductions over seeds, named wherever they are shown: accuracy and cosines as mean ± sample std
(ddof 1); growth, ||h_L|| and ||g_L||, which span orders of magnitude, as the median.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EdgefaError
from ..report.format import fmt_cosine_spread, fmt_pct, fmt_sci
from ..report.markdown import markdown_table_lines
from ..report.outputs import write_files
from ..report.page import figure, heading, note, page, section, standalone_svg, subtitle, text_kv_table, text_table
from ..report.svg import PALETTE, lines_chart
from .grid import comma_items, mean_std, pool_map

SCHEMA = "edgefa.audit/1"
FILES = ("audit.json", "audit.md", "audit_gamma.svg", "audit_h_L.svg", "audit_g_L.svg", "audit.html")
DEFAULT_CONFIGS = "bp,fa,dfa,hybrid,dfa+1e-4,dfa+1e-2,dfa+1e-1"
RULES = ("bp", "fa", "dfa", "usf", "hybrid")

# Reported for the 4-block d=256 pre-LN residual MLP on CIFAR-10 (the figures the protocol was
# introduced with); shown beside ours for comparison, never used in a computation.
REFERENCE = {
    "bp": {"accuracy": 0.609, "growth": 1.3, "g_L": 4e-4},
    "dfa": {"accuracy": 0.308, "growth": 237.0, "g_L": 5e-10, "baseline_accuracy": 0.349},
    "dfa λ=1e-2": {"accuracy": 0.363, "h_L": 4e4, "g_L": 9e-7, "gamma_deep": 0.155},
}
REFERENCE_SOURCE = "reported for the 4-block d=256 pre-LN residual MLP on CIFAR-10"


@dataclass(frozen=True)
class AuditSpec:
    """One configuration: a rule and the residual-stream penalty lambda."""

    method: str
    penalty: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.method} λ={lambda_text(self.penalty)}" if self.penalty else self.method


def lambda_text(x: float) -> str:
    """1e-2, not 0.01: penalties are read as powers of ten."""
    mantissa, exponent = f"{x:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def parse_configs(text: str) -> list[AuditSpec]:
    """`bp,fa,dfa,hybrid,dfa+1e-2` -> specs; `RULE+LAMBDA` is RULE with penalty LAMBDA."""
    specs = []
    for item in comma_items(text, "--configs"):
        m = re.fullmatch(r"([a-z]+)(?:\+(.+))?", item.lower())
        if not m or m.group(1) not in RULES:
            raise EdgefaError(f"--configs: {item!r} is not RULE or RULE+LAMBDA (rules: {', '.join(RULES)})")
        penalty = 0.0
        if m.group(2) is not None:
            try:
                penalty = float(m.group(2))
            except ValueError:
                raise EdgefaError(f"--configs: {item!r}: {m.group(2)!r} is not a number") from None
            if not (math.isfinite(penalty) and penalty > 0):
                raise EdgefaError(f"--configs: {item!r}: lambda must be finite and > 0")
        specs.append(AuditSpec(m.group(1), penalty))
    return specs


@dataclass
class AuditConfig:
    configs: list[AuditSpec]
    seeds: list[int]
    dataset: str = "digits"
    width: int = 256
    depth: int = 4
    activation: str = "relu"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.003
    momentum: float = 0.9
    hybrid_every: int = 10
    jobs: int = 1
    device: str = "cpu"
    settings: dict = field(default_factory=dict)     # diagnostics/diagnosis.py Settings, as a dict

    def check(self) -> None:
        if not (self.configs and self.seeds):
            raise EdgefaError("--configs and --seeds each need at least one value")
        for name in ("width", "depth", "epochs", "batch_size", "jobs", "hybrid_every"):
            if getattr(self, name) < 1:
                raise EdgefaError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise EdgefaError(f"--lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise EdgefaError(f"--momentum must be in [0, 1), got {self.momentum}")
        from ..shared.datasets import load_dataset

        load_dataset(self.dataset)      # a bad --dataset is one line now, not in a worker after the work began

    def train_config(self, method: str, penalty: float, seed: int):
        from ..training.trainer import TrainConfig

        return TrainConfig(method=method, dataset=self.dataset, activation=self.activation, epochs=self.epochs,
                           batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, seed=seed,
                           feedback_seed=seed + 1, hybrid_every=self.hybrid_every, device=self.device,
                           model="resmlp", width=self.width, depth=self.depth, penalty=penalty)


# --- the work, in worker processes or in this one -------------------------------------------------

def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9.+-]+", "-", label.replace("λ=", "lambda"))


def _train_task(task: dict) -> dict:
    """Train one run (or baseline) and save it; returns where, and how long it took."""
    import torch

    from ..training.trainer import TrainConfig, save_run, train

    torch.set_num_threads(task["threads"])
    started = time.perf_counter()
    run = train(TrainConfig(**task["config"]))
    save_run(run, task["out"])
    return {"out": task["out"], "seconds": time.perf_counter() - started,
            "diverged": run.metrics.get("diverged")}


def _diagnose_task(task: dict) -> dict:
    """Diagnose one saved run against its saved baseline; writes RUN/diagnosis.json."""
    import torch

    from ..diagnostics.diagnosis import Settings, Thresholds, diagnose, write_diagnosis
    from ..training.trainer import load_run

    torch.set_num_threads(task["threads"])
    settings = dict(task["settings"])
    settings = Settings(Thresholds(**settings.pop("thresholds", {})), **settings)
    run = load_run(task["run"], task["device"])
    baseline = load_run(task["baseline"], task["device"])
    result = diagnose(run, settings, baseline, device=task["device"])
    write_diagnosis(result, task["run"])
    return {"run": task["run"], "diagnosis": result}


def run_audit(config: AuditConfig, out_dir: str | os.PathLike,
              on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train, baseline and diagnose every (configuration, seed); returns audit.json's body."""
    from ..shared.datasets import load_dataset
    from ..diagnostics.diagnosis import baseline_config

    config.check()
    load_dataset(config.dataset)                     # a bad data spec fails here, once, in one line
    out = Path(out_dir)
    threads = 1 if config.jobs > 1 else max(1, (os.cpu_count() or 1))
    started = time.perf_counter()
    runs, baselines = [], {}
    for spec in config.configs:
        for seed in config.seeds:
            train_config = config.train_config(spec.method, spec.penalty, seed)
            base = baseline_config(train_config)
            key = json.dumps(asdict(base), sort_keys=True)
            if key not in baselines:
                name = f"{spec.method}-seed{seed}" + (f"-lambda{spec.penalty:g}" if base.penalty else "")
                baselines[key] = {"config": asdict(base), "out": str(out / "baselines" / name), "threads": threads}
            runs.append({"spec": spec, "seed": seed, "baseline": baselines[key]["out"],
                         "task": {"config": asdict(train_config), "threads": threads,
                                  "out": str(out / "runs" / f"{_slug(spec.label)}-seed{seed}")}})
    train_tasks = [r["task"] for r in runs] + list(baselines.values())
    total = len(train_tasks) + len(runs)
    done = [0]

    def tick(what: str):
        def on_done(_result):
            done[0] += 1
            if on_progress:
                on_progress(what, done[0], total)
        return on_done

    trained = {r["out"]: r for r in pool_map(_train_task, train_tasks, config.jobs, tick("train"))}
    diagnose_tasks = [{"run": r["task"]["out"], "baseline": r["baseline"], "settings": config.settings,
                       "device": config.device, "threads": threads} for r in runs]
    diagnosed = pool_map(_diagnose_task, diagnose_tasks, config.jobs, tick("diagnose"))

    rows = []
    for r, d in zip(runs, diagnosed):
        metrics = json.loads((Path(r["task"]["out"]) / "metrics.json").read_text())
        rows.append(run_row(r["spec"], r["seed"], d["diagnosis"], metrics, trained[r["task"]["out"]]["seconds"],
                            trained[r["baseline"]]["seconds"], r["task"]["out"]))
    desc = asdict(config)
    desc["configs"] = [s.label for s in config.configs]
    return {"schema": SCHEMA, "config": desc, "runs": rows, "summary": summarize(rows, config.configs),
            "reference": REFERENCE, "reference_source": REFERENCE_SOURCE,
            "reductions": {"accuracy, cosines": "mean ± sample std (ddof 1) over seeds",
                           "growth, h_L, g_L": "median over seeds"},
            "seconds": time.perf_counter() - started}


def run_row(spec: AuditSpec, seed: int, diagnosis: dict, metrics: dict, seconds: float, baseline_seconds: float,
            run_dir: str) -> dict:
    """One run's line of the audit: the diagnosis in brief, and its trajectory during training."""
    stages = diagnosis["stages"]
    deep = list(stages)[-1]
    trajectory = []
    for row in metrics.get("epochs", []):
        found = (row.get("alignment") or {}).get("stages") or {}
        last = found.get(deep) or {}
        trajectory.append({"epoch": row["epoch"], "h_L": last.get("h_norm_mean"), "g_L": last.get("grad_norm_mean"),
                           "test_accuracy": row.get("test_accuracy")})
    d = diagnosis["diagnostics"]
    return {"config": spec.label, "method": spec.method, "penalty": spec.penalty, "seed": seed, "run_dir": run_dir,
            "verdict": diagnosis["verdict"], "fired": diagnosis["fired"],
            "accuracy": diagnosis["run"]["test_accuracy"],
            "baseline_accuracy": d["baseline"].get("baseline_accuracy"),
            "growth": d["growth"]["value"], "h_L": stages[deep]["h_norm"], "g_L": stages[deep]["grad_norm"],
            "stability": d["stability"]["value"], "deep_stage": deep,
            "gamma": {name: s["gamma"] for name, s in stages.items()},
            "degenerate": {name: s["degenerate"] for name, s in stages.items()},
            "null_mean": {name: (s.get("null") or {}).get("mean") for name, s in stages.items()},
            "rho_rule": stages[deep]["rho_rule"], "rho_bp": stages[deep]["rho_bp"],
            "rho_random": stages[deep]["rho_random"],
            "diverged_at_epoch": (diagnosis["run"].get("diverged") or {}).get("epoch"),
            "trajectory": trajectory, "train_seconds": seconds, "baseline_seconds": baseline_seconds}


def _median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def summarize(rows: list[dict], specs: list[AuditSpec]) -> list[dict]:
    """One entry per configuration, reduced over its seeds (the reductions are named in the JSON)."""
    out = []
    for spec in specs:
        mine = [r for r in rows if r["config"] == spec.label]
        stages = list(mine[0]["gamma"]) if mine else []
        fired = {k: sum(k in r["fired"] for r in mine) for k in ("growth", "gradient_floor", "stability", "baseline")}
        out.append({
            "config": spec.label, "seeds": len(mine),
            "accuracy": mean_std([r["accuracy"] for r in mine]),
            "baseline_accuracy": mean_std([r["baseline_accuracy"] for r in mine]),
            "growth": _median(r["growth"] for r in mine), "h_L": _median(r["h_L"] for r in mine),
            "g_L": _median(r["g_L"] for r in mine), "stability": mean_std([r["stability"] for r in mine]),
            "gamma": {s: mean_std([r["gamma"][s] for r in mine]) for s in stages},
            "degenerate": {s: sum(r["degenerate"][s] for r in mine) for s in stages},
            "null_mean": {s: mean_std([r["null_mean"][s] for r in mine])[0] for s in stages},
            "rho_rule": mean_std([r["rho_rule"] for r in mine]), "rho_bp": mean_std([r["rho_bp"] for r in mine]),
            "rho_random": mean_std([r["rho_random"] for r in mine]),
            "walk_back": sum(r["verdict"] != "trustworthy" for r in mine), "fired": fired,
            "diverged": sum(r["diverged_at_epoch"] is not None for r in mine),
        })
    return out


# --- the table, the plots, the page (from report/: page, svg, markdown, format) ---------------------

LETTERS = {"growth": "a", "gradient_floor": "b", "stability": "c", "baseline": "d"}


def _verdict(s: dict) -> str:
    if not s["walk_back"]:
        return f"trustworthy {s['seeds']}/{s['seeds']}"
    why = " ".join(f"{LETTERS[k]}×{n}" for k, n in s["fired"].items() if n)
    return f"walk back {s['walk_back']}/{s['seeds']} ({why})"


def _gamma_deep(s: dict) -> str:
    stages = list(s["gamma"])
    if not stages:
        return "-"
    deep = stages[-1]
    if s["degenerate"][deep] == s["seeds"]:
        return "degenerate"
    cell = fmt_cosine_spread(*s["gamma"][deep])
    return cell + (f" ({s['degenerate'][deep]} degenerate)" if s["degenerate"][deep] else "")


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    header = ["config", "test acc %", "frozen-blocks acc %", "growth (a)", "||h_L||", "||g_L|| (b)",
              "drift (c)", "Gamma deepest", "null Gamma", "rho rule / bp / rand", "diverged", "verdict"]
    rows = []
    for s in result["summary"]:
        deep = list(s["gamma"])[-1] if s["gamma"] else None
        null = s["null_mean"].get(deep) if deep else None
        rho = " / ".join(f"{ms[0]:+.2f}" if ms[0] is not None else "-" for ms in (s["rho_rule"], s["rho_bp"],
                                                                                  s["rho_random"]))
        rows.append([s["config"], fmt_pct(*s["accuracy"], unit=""), fmt_pct(*s["baseline_accuracy"], unit=""),
                     f"{fmt_sci(s['growth'])}x" if s["growth"] is not None else "-", fmt_sci(s["h_L"]),
                     fmt_sci(s["g_L"]), fmt_cosine_spread(*s["stability"]), _gamma_deep(s),
                     f"{null:+.3f}" if null is not None else "n/a", rho, f"{s['diverged']}/{s['seeds']}", _verdict(s)])
    return header, rows


def reference_rows() -> tuple[list[str], list[list[str]]]:
    header = ["config", "test acc %", "frozen-blocks acc %", "growth", "||h_L||", "||g_L||", "Gamma deepest"]
    rows = []
    for label, ref in REFERENCE.items():
        rows.append([label, fmt_pct(ref.get("accuracy"), unit=""), fmt_pct(ref.get("baseline_accuracy"), unit=""),
                     f"{ref['growth']:g}x" if "growth" in ref else "-", fmt_sci(ref.get("h_L")),
                     fmt_sci(ref.get("g_L")),
                     f"{ref['gamma_deep']:+.3f}" if "gamma_deep" in ref else "-"])
    return header, rows


def caption(result: dict) -> str:
    c = result["config"]
    st = c["settings"].get("thresholds", {})
    return (f"resmlp width {c['width']} x {c['depth']} blocks ({c['activation']}), {c['dataset']}, {c['epochs']} "
            f"epochs, SGD lr {c['lr']:g} momentum {c['momentum']:g}, batch {c['batch_size']}, seeds "
            f"{', '.join(map(str, c['seeds']))}. Accuracy and cosines: mean ± sample std (ddof 1) over seeds; "
            "growth, ||h_L||, ||g_L||: median over seeds. ||h_L||: mean over the evaluation batch of the "
            "per-sample norm (dim 1) at the deepest stage; ||g_L||: the same of d loss_n / d h_L (true BP). "
            "Gamma: per-sample cosine of the rule's signal with the BP gradient at the deepest stage, mean over "
            "samples; null: the same with fresh random feedback (mean over draws and seeds). rho: perturbation "
            "correlation at the deepest stage (rule, BP positive control, random negative control). Thresholds: "
            f"(a) > {st.get('growth_max', 50):g}x, (b) < {st.get('grad_floor', 1e-7):g}, "
            f"(c) > {st.get('stability_max', 0.3):g}, (d) margin < {st.get('margin', 0.02) * 100:g} points.")


def markdown(result: dict) -> str:
    """audit.md: the table, its caption, the reference figures, Gamma per stage."""
    lines = ["# edgefa audit", "", *markdown_table_lines(*table(result)), "", caption(result), "",
             f"Reference ({REFERENCE_SOURCE}):", "", *markdown_table_lines(*reference_rows()), "",
             "Gamma per stage (mean ± std over seeds):", ""]
    stages = list(result["summary"][0]["gamma"]) if result["summary"] else []
    gamma_rows = [[s["config"], *("degenerate" if s["degenerate"][st] == s["seeds"] else
                                  fmt_cosine_spread(*s["gamma"][st]) for st in stages)] for s in result["summary"]]
    lines += markdown_table_lines(["config", *stages], gamma_rows)
    return "\n".join(lines) + "\n"


def gamma_chart(result: dict) -> str | None:
    lines = []
    for i, s in enumerate(result["summary"]):
        stages = list(s["gamma"])
        ys = [s["gamma"][st][0] for st in stages]
        lines.append((s["config"], list(range(len(stages))), ys, PALETTE[i % len(PALETTE)]))
    return lines_chart(lines, "gamma", "Gamma per stage", "stage (0 = embed, then the blocks)",
                       "Gamma (mean over seeds)", markers=True)


def norms_chart(result: dict, key: str, label: str) -> str | None:
    lines = []
    for i, s in enumerate(result["summary"]):
        mine = [r for r in result["runs"] if r["config"] == s["config"]]
        epochs = sorted({p["epoch"] for r in mine for p in r["trajectory"]})
        ys = []
        for e in epochs:
            vals = [p[key] for r in mine for p in r["trajectory"] if p["epoch"] == e and p[key] and p[key] > 0]
            ys.append(math.log10(float(np.median(vals))) if vals else None)
        lines.append((s["config"], epochs, ys, PALETTE[i % len(PALETTE)]))
    return lines_chart(lines, key, label, "epoch", f"log10 {label} (median over seeds)")


def render_report(result: dict) -> str:
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise EdgefaError(f"not an {SCHEMA} document")
    header, rows = table(result)
    every = [[r["config"], r["seed"], fmt_pct(r["accuracy"], unit=""), fmt_pct(r["baseline_accuracy"], unit=""),
              fmt_sci(r["growth"]), fmt_sci(r["g_L"]),
              r["verdict"] + (" (" + ", ".join(LETTERS[k] for k in r["fired"]) + ")" if r["fired"] else ""),
              r["run_dir"]] for r in result["runs"]]
    trajectory_note = ("During training: the alignment probe logged each epoch (the first 256 training samples, "
                       "float64), at the deepest stage.")
    body = [heading("edgefa audit"),
            subtitle(f'{len(result["runs"])} runs \u00b7 {round(result.get("seconds", 0))} s'),
            text_table(header, rows),
            note(caption(result)),
            section(f"Reference: {REFERENCE_SOURCE}"),
            text_table(*reference_rows()),
            figure("Gamma per stage", gamma_chart(result),
                   caption="Per-sample cosine of the rule's signal with the true BP gradient at each stage output "
                           "(mean over samples, then over seeds); degenerate stages are left out."),
            figure("||h_L|| over training", norms_chart(result, "h_L", "||h_L||"), caption=trajectory_note),
            figure("||g_L|| over training", norms_chart(result, "g_L", "||g_L||"), caption=trajectory_note),
            section("Every run"),
            text_table(["config", "seed", "test acc %", "frozen acc %", "growth", "||g_L||", "verdict", "run"],
                       every, numeric_from=2),
            section("Configuration"),
            text_kv_table(result["config"].items())]
    return page("edgefa audit", body)


def write_outputs(result: dict, out_dir) -> list[Path]:
    """The FILES in `out_dir`: the paths, in that order."""
    charts = (gamma_chart(result), norms_chart(result, "h_L", "||h_L||"), norms_chart(result, "g_L", "||g_L||"))
    texts = [json.dumps(result, indent=2) + "\n", markdown(result),
             *(standalone_svg(chart) if chart else "" for chart in charts), render_report(result)]
    return write_files(out_dir, dict(zip(FILES, texts, strict=True)))
