"""When fine-tuning has diverged: the rule, and the stops it leads to (device side; standard library only,
so the CLI can name its defaults without loading numpy).

The engine already refuses a step it cannot prove finite (step_bounds). That catches overflow, not
a run that blows up in finite numbers: at `--lr 10` the loss goes 0.2 -> 1.8e3 -> 4.8e5 -> 2.3e9
while every step is "finite". So each step's loss is also judged by one rule:

    diverged  if the loss is NaN/Inf, or
              if loss > FACTOR x max(median of the last WINDOW losses of accepted steps, chance loss)

The chance loss is that of a model that knows nothing (ln n_classes for cross-entropy, ln 2 for
Bradley-Terry): near the end of a good run the median falls towards 0 and one hard batch would
otherwise look like a runaway. The first loss of a run is never judged runaway (it measures the
state the run started from, not anything the run did); it starts the history.

A step's loss is measured on the weights *before* its update, so a diverged loss at step k says the
state reached by the steps before k is bad: the caller rolls back to its last good checkpoint and
stops. A refused step (its update could overflow) leaves the weights as they were; after
`max_refusals` of them in one run the caller stops too. Both stops are one line that says what to do.
A checkpoint is only ever written for a judged state: the state after the last update, which no
step has measured yet, is first judged by its loss on that update's batch (a forward pass,
`probe`), so a good checkpoint is never overwritten by diverged weights. Locally the Finetuner
applies the rule; over the link the device does (link/service.py says why), with the host's limits.

Measured (benchmarks/divergence_rule.py, two digits MLPs, 3 seeds x 400 steps per cell): at the
bundles' own lr and batch 32 the largest loss / reference is 1.04, and 2.75 at most for any batch
of 8 or more that keeps its accuracy; the rule fires at the first judged step (step 1 of the run)
at lr 10 and lr 1e6 for batch >= 4, by step 4 at batch 1. It also fires in runs that collapse at a
small lr (batch 1: accuracy down to 10-47 %). It does not see a slow creep (the median follows it):
that is what the factor over the *recent* median trades for never firing on noise.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median

from ..errors import EdgefaError

DEFAULT_MAX_REFUSALS = 3      # the one default of `device finetune`, `finetune` and `fleet finetune`

# The verdicts of one step
OK, REFUSED, TOO_MANY_REFUSALS, DIVERGED = "ok", "refused", "too_many_refusals", "diverged"


class RunStopped(EdgefaError):
    """A fine-tuning run stopped before its last step; `result` is its summary up to the stop
    (with `stop`: what happened), for a report."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


class TooManyRefusals(RunStopped):
    pass


class Diverged(RunStopped):
    pass


@dataclass(frozen=True)
class DivergenceRule:
    """The limits, shared by local and link fine-tuning (module docstring)."""
    factor: float = 10.0      # a loss this many times the reference is a runaway
    window: int = 20          # the reference is the median of this many recent accepted losses

    def reference(self, recent, chance_loss: float) -> float:
        return max(median(recent), chance_loss)

    def runaway(self, loss: float, recent, chance_loss: float) -> str | None:
        """Why `loss` is a divergence (one phrase), or None; `recent`: losses of accepted steps."""
        if not math.isfinite(loss):
            return f"loss {loss}"
        if not len(recent):
            return None
        reference = self.reference(recent, chance_loss)
        if loss > self.factor * reference:
            return (f"loss {loss:.3g} > {self.factor:g} x {reference:.3g} (the larger of the median of the "
                    f"last {len(recent)} accepted losses, {median(recent):.3g}, and the chance loss "
                    f"{chance_loss:.3g})")
        return None


def chance_loss(n_classes: int, pairs: bool) -> float:
    """The loss of a model that knows nothing: uniform over the classes, or a coin for a pair."""
    return math.log(2.0) if pairs else math.log(n_classes)


class DivergenceGuard:
    """One run's judge: feed it every step's (loss, accepted) in order; it keeps the recent
    accepted losses (bounded by the rule's window) and counts nothing else. `refused_in_run` comes
    from the caller's own record (the checkpointed list of refused steps), so a resumed or repeated
    step is counted once."""

    def __init__(self, chance: float, rule: DivergenceRule | None = None,
                 max_refusals: int = DEFAULT_MAX_REFUSALS):
        self.rule, self.chance, self.max_refusals = rule or DivergenceRule(), chance, max_refusals
        self.recent: deque[float] = deque(maxlen=self.rule.window)
        self.reason: str | None = None          # why the last verdict was DIVERGED

    def reset(self) -> None:
        """Forget the history (the state was replaced: a rollback, a deploy, a reset)."""
        self.recent.clear()

    def judge(self, loss: float, accepted: bool, refused_in_run: int) -> str:
        """The verdict on one step. `refused_in_run` includes this step when it was refused."""
        self.reason = self.rule.runaway(loss, self.recent, self.chance)
        if self.reason:
            return DIVERGED
        if not accepted:
            return TOO_MANY_REFUSALS if refused_in_run >= self.max_refusals else REFUSED
        self.recent.append(loss)
        return OK

    def probe(self, loss: float) -> str | None:
        """Judge the loss of a state about to be checkpointed (its loss on the last batch); not
        recorded. Why it diverged, or None."""
        return self.rule.runaway(loss, self.recent, self.chance)


# Inputs the graphs see are standardized with the bundle's mean and std, so well-scaled data lies
# within a few tens of 0. Beyond this, the data alone can blow a step up whatever the learning rate
# (X = 1e38 overflows float32 in the first matmul), and the stop says to check it.
SUSPECT_INPUT = 1e3


def _data_advice(largest_input: float | None) -> str:
    """', or check the data (...)' where the data may be the cause (largest |x| the graphs see,
    after standardizing, above SUSPECT_INPUT or not finite); '' otherwise or when not known."""
    if largest_input is None or largest_input <= SUSPECT_INPUT:
        return ""
    return f", or check the data (its largest |x| after standardizing is {largest_input:.3g})"


def diverged_message(step: int, reason: str, back_to_step: int, lr: float,
                     largest_input: float | None = None) -> str:
    """The one line a diverged run ends with. `largest_input`: the largest |x| of the (standardized)
    training data, where the caller knows it."""
    data = _data_advice(largest_input)
    return (f"diverged at step {step}: {reason}; rolled back to the last good checkpoint, at step "
            f"{back_to_step} (the next step to run); lower --lr (was {lr:g}){data}{',' if data else ''} "
            "and run again")


def refusals_message(step: int, refused: list[int], next_step: int, largest_input: float | None = None) -> str:
    """The one line a run stopped by refused steps ends with (`largest_input`: as for diverged_message)."""
    return (f"stopped after step {step}: {len(refused)} steps refused for NaN/Inf (steps {refused}); "
            f"the last good weights are saved at step {next_step} (the next step to run); lower --lr"
            f"{_data_advice(largest_input)}, or raise --max-refusals")
