"""`edgefa experiment preference`: held-out preference accuracy against label noise, per rule.

For every sigma (the standard deviation of the Gaussian noise added to the utility difference
before a synthetic pair's label is drawn), every rule (bp, fa, dfa, usf, hybrid-K) and every
seed, one scorer is trained on synthetic pairs (`training/preference_train.py`). The seed draws
the pairs, the held-out split, the weights, the feedback (seed + 1) and the batch order; for a
given seed every rule and sigma sees the same items and the same noise draws (scaled by sigma), so
the rules are compared on identical data and the ceiling can only fall as sigma grows.

The *ceiling* of a run is the Bayes-optimal accuracy on its held-out pairs: the share whose label
agrees with the noise-free utility sign (the accuracy of the true utility as a scorer). At sigma 0
it is 100 %; no scorer beats it in expectation.

Outputs (`write_outputs`): preference.json (every run), preference.md (rows sigma, columns rules,
mean +- sample std over seeds, and the ceiling), preference.svg and preference.html (accuracy
against sigma, one line per rule, and the ceiling).

numpy and the report module at import time; torch only inside `run_sweep`.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


from ..errors import EdgefaError
from .grid import comma_items, mean_std
from ..report.format import fmt_pct
from ..report.markdown import markdown_table_lines
from ..report.outputs import write_files
from ..report.page import figure, heading, note, page, section, standalone_svg, subtitle, text_kv_table, text_table
from ..report.svg import PALETTE, lines_chart

SCHEMA = "edgefa.preference-sweep/1"
PLAIN_RULES = ("bp", "fa", "dfa", "usf")
CEILING_COLOR = "#777777"
FILES = ("preference.json", "preference.md", "preference.svg", "preference.html")


# --- the grid -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RuleSpec:
    """A rule of the grid: `label` as written (hybrid-K), the trainer's method and K."""

    label: str
    method: str
    k: int | None = None


def parse_rules(text: str) -> list[RuleSpec]:
    """`bp,dfa,hybrid-10` -> rule specs; `hybrid` alone is hybrid-10."""
    rules = []
    for item in comma_items(text, "--rules"):
        name = item.lower()
        if name in PLAIN_RULES:
            rules.append(RuleSpec(name, name))
            continue
        m = re.fullmatch(r"hybrid(?:-(-?\d+))?", name)
        if not m:
            raise EdgefaError(f"--rules: unknown rule {item!r}; expected {', '.join(PLAIN_RULES)} or hybrid-K "
                              "(a BP step every K-th step)")
        k = int(m.group(1)) if m.group(1) is not None else 10
        if k < 1:
            raise EdgefaError(f"--rules: {item}: K must be at least 1 (a BP step every K-th step)")
        rules.append(RuleSpec(f"hybrid-{k}", "hybrid", k))
    labels = [r.label for r in rules]
    if len(set(labels)) != len(labels):
        raise EdgefaError(f"--rules: {text!r} names the same rule twice")
    return rules


def parse_sigmas(text: str) -> list[float]:
    sigmas = []
    for item in comma_items(text, "--sigmas"):
        try:
            sigma = float(item)
        except ValueError:
            raise EdgefaError(f"--sigmas: {item!r} is not a number") from None
        if not (math.isfinite(sigma) and sigma >= 0):
            raise EdgefaError(f"--sigmas: sigma must be finite and >= 0, got {item}")
        sigmas.append(sigma)
    if len(set(sigmas)) != len(sigmas):
        raise EdgefaError(f"--sigmas: {text!r} gives the same sigma twice")
    return sorted(sigmas)


@dataclass
class SweepConfig:
    sigmas: list[float]
    rules: list[RuleSpec]
    seeds: list[int]
    pairs: int = 2000                 # per run, held-out share included
    epochs: int = 10
    dim: int = 16
    hidden: list[int] = field(default_factory=lambda: [32, 32])
    activation: str = "relu"
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    loss: str = "bradley-terry"
    margin: float = 1.0
    test_fraction: float = 0.25
    device: str = "auto"

    def check(self) -> None:
        """Every problem a user can fix, as one EdgefaError (before anything runs)."""
        if not (self.sigmas and self.rules and self.seeds):
            raise EdgefaError("--sigmas, --rules and --seeds each need at least one value")
        for name in ("epochs", "dim", "batch_size"):
            if getattr(self, name) < 1:
                raise EdgefaError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.pairs < 4:
            raise EdgefaError(f"--pairs must be at least 4, got {self.pairs}")
        if not self.hidden or any(w < 1 for w in self.hidden):
            raise EdgefaError(f"--hidden needs widths of at least 1, got {self.hidden}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise EdgefaError(f"--lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise EdgefaError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise EdgefaError(f"--margin must be finite and >= 0, got {self.margin}")
        if not 0 < self.test_fraction < 1:
            raise EdgefaError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")

    def describe(self) -> dict:
        d = asdict(self)
        d["rules"] = [r.label for r in self.rules]
        return d


# --- running it ---------------------------------------------------------------------------------

def run_sweep(config: SweepConfig, on_run: Callable[[dict], None] | None = None) -> dict:
    """Train every (sigma, rule, seed) of the grid; the result dict is preference.json's body."""
    from ..shared.preference_pairs import synthetic_pairs
    from ..training.preference_train import train_preference
    from ..training.trainer import TrainConfig

    config.check()
    runs = []
    started = time.perf_counter()
    for sigma in config.sigmas:
        for seed in config.seeds:
            pairs = synthetic_pairs(config.pairs, dim=config.dim, sigma=sigma, seed=seed)
            for rule in config.rules:
                train_config = TrainConfig(
                    method=rule.method, dataset=f"synthetic:{config.pairs}", hidden=list(config.hidden),
                    activation=config.activation, epochs=config.epochs, batch_size=config.batch_size,
                    lr=config.lr, momentum=config.momentum, seed=seed, feedback_seed=seed + 1,
                    test_fraction=config.test_fraction, hybrid_every=rule.k or 10, device=config.device,
                    loss=config.loss)
                t0 = time.perf_counter()
                run = train_preference(train_config, pairs, margin=config.margin)
                m = run.metrics
                last = m["epochs"][-1]
                row = {"sigma": sigma, "rule": rule.label, "method": rule.method, "k": rule.k, "seed": seed,
                       "heldout_accuracy": m["final_test_accuracy"], "ceiling": m["heldout_ceiling"],
                       "true_accuracy": m["final_test_true_accuracy"], "train_accuracy": last["train_accuracy"],
                       "heldout_loss": last["test_loss"], "n_train": m["n_train"], "n_test": m["n_test"],
                       "device": m["device"], "seconds": time.perf_counter() - t0}
                runs.append(row)
                if on_run:
                    on_run(row)
    return {"schema": SCHEMA, "config": config.describe(), "sigmas": list(config.sigmas),
            "rules": [r.label for r in config.rules], "seeds": list(config.seeds), "runs": runs,
            "std": "sample standard deviation over seeds (ddof=1)", "seconds": time.perf_counter() - started,
            "ceiling_definition": "share of held-out pairs whose label agrees with the sign of the noise-free "
                                  "utility difference (the Bayes-optimal accuracy)"}


# --- summaries ----------------------------------------------------------------------------------

def summary(result: dict) -> dict:
    """{"accuracy": {rule: [(mean, std) per sigma]}, "true_accuracy": the same for the agreement with
    the noise-free utility, "ceiling": [(mean, std) per sigma]}."""
    runs = result["runs"]

    def per_rule(key):
        return {rule: [mean_std([r.get(key) for r in runs if r["rule"] == rule and r["sigma"] == s])
                       for s in result["sigmas"]] for rule in result["rules"]}
    # one ceiling per (sigma, seed): every rule of a seed trains on the same pairs and split
    ceiling = [mean_std(list({r["seed"]: r["ceiling"] for r in runs if r["sigma"] == s}.values()))
               for s in result["sigmas"]]
    return {"accuracy": per_rule("heldout_accuracy"), "true_accuracy": per_rule("true_accuracy"), "ceiling": ceiling}


def table_rows(result: dict, key: str = "accuracy") -> tuple[list[str], list[list[str]]]:
    """The header and rows of the table: sigma, one column per rule (`key` of `summary`), the ceiling."""
    s = summary(result)
    header = ["sigma", *result["rules"], "ceiling (Bayes)"]
    rows = [[f"{sigma:g}", *(fmt_pct(*s[key][rule][i]) for rule in result["rules"]), fmt_pct(*s["ceiling"][i])]
            for i, sigma in enumerate(result["sigmas"])]
    return header, rows


def caption(result: dict) -> str:
    c = result["config"]
    seeds = result["seeds"]
    spread = ("mean ± sample std (ddof=1)" if len(seeds) > 1 else "one seed: no std") + \
             f" over seeds {', '.join(map(str, seeds))}"
    n_test = result["runs"][0]["n_test"] if result["runs"] else "?"
    loss = c["loss"] + (f" (margin {c['margin']:g})" if c["loss"] == "hinge" else "")
    return (f"Held-out preference accuracy, {spread}. {c['pairs']} synthetic pairs per run ({n_test} held out), "
            f"{c['dim']} features, MLP {c['dim']}-{'-'.join(map(str, c['hidden']))}-1 ({c['activation']}), "
            f"{loss}, {c['epochs']} epochs of batch {c['batch_size']}, SGD lr {c['lr']:g} momentum "
            f"{c['momentum']:g}. Ceiling: {result['ceiling_definition']}.")


TRUE_NOTE = ("Agreement with the noise-free utility: the share of held-out pairs on which the scorer's order "
             "matches the sign of the noise-free utility difference (how well each rule recovered the utility "
             "from noisy labels); the ceiling column is the labels' own agreement.")


def markdown_table(result: dict) -> str:
    """The table (held-out accuracy), its caption, then the agreement with the noise-free utility."""
    lines = [*markdown_table_lines(*table_rows(result), right_aligned=True), "", caption(result), ""]
    if any(r.get("true_accuracy") is not None for r in result["runs"]):
        lines += ["Agreement with the noise-free utility (same runs):", "",
                  *markdown_table_lines(*table_rows(result, "true_accuracy"), right_aligned=True), "", TRUE_NOTE, ""]
    return "\n".join(lines)


def accuracy_chart(result: dict) -> str | None:
    """Held-out accuracy (%) against sigma: one line per rule (mean over seeds), and the ceiling."""
    s = summary(result)
    sigmas = result["sigmas"]

    def pct(points):
        return [None if m is None else 100 * m for m, _ in points]

    lines = [(rule, sigmas, pct(s["accuracy"][rule]), PALETTE[i % len(PALETTE)])
             for i, rule in enumerate(result["rules"])]
    lines.append(("ceiling (Bayes)", sigmas, pct(s["ceiling"]), CEILING_COLOR))
    return lines_chart(lines, "preference-sweep", "held-out preference accuracy against label noise sigma",
                       "label noise sigma (std of the Gaussian added to u(a) - u(b))",
                       "held-out preference accuracy (%)", markers=True)


def render_report(result: dict) -> str:
    """preference.html: the plot, the table, every run, the configuration."""
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise EdgefaError(f"not an {SCHEMA} document")
    runs = [[f"{r['sigma']:g}", r["rule"], r["seed"], fmt_pct(r["heldout_accuracy"]), fmt_pct(r["ceiling"]),
             fmt_pct(r["true_accuracy"]), f"{r['seconds']:.1f} s"] for r in result["runs"]]
    title = "edgefa experiment preference"
    body = [heading(title),
            subtitle(f'{len(result["runs"])} runs: sigma {", ".join(f"{s:g}" for s in result["sigmas"])}'
                     f' \u00b7 rules {", ".join(result["rules"])} \u00b7 seeds {", ".join(map(str, result["seeds"]))}'
                     f' \u00b7 {round(result.get("seconds", 0))} s'),
            figure("Held-out preference accuracy against label noise", accuracy_chart(result),
                   caption="Lines: the mean over seeds. The grey line is the ceiling: the accuracy of the "
                           "noise-free utility itself on the same held-out labels."),
            section("Held-out preference accuracy"),
            text_table(*table_rows(result)),
            note(caption(result)),
            section("Agreement with the noise-free utility"),
            text_table(*table_rows(result, "true_accuracy")),
            note(TRUE_NOTE),
            section("Every run"),
            text_table(["sigma", "rule", "seed", "held-out accuracy", "ceiling", "agrees with the true utility",
                        "time"], runs, numeric_from=2),
            section("Configuration"),
            text_kv_table(result["config"].items())]
    return page(title, body)


def write_outputs(result: dict, out_dir) -> list[Path]:
    """preference.json, .md, .svg and .html in `out_dir`; the paths, in that order."""
    chart = accuracy_chart(result)
    texts = [json.dumps(result, indent=2) + "\n", markdown_table(result), standalone_svg(chart) if chart else "",
             render_report(result)]
    return write_files(out_dir, dict(zip(FILES, texts, strict=True)))
