"""Pairwise preference data: synthetic pairs from a hidden utility, and JSONL files of
`prompt` / `chosen` / `rejected` through a byte-level tokenizer. numpy only.

A pair is (chosen, rejected): the scorer should give the chosen one the higher score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

BYTE_VOCAB = 256          # token ids 0..255 are the UTF-8 bytes themselves
SEP, PAD = 256, 257       # between prompt and response; after the end
VOCAB_SIZE = 258


@dataclass
class PreferencePairs:
    """N pairs: `chosen[i]` is preferred to `rejected[i]`. Feature vectors (float32 [N, D]) for
    synthetic data, token ids (int64 [N, T], PAD after the end) for text."""
    chosen: np.ndarray
    rejected: np.ndarray
    name: str
    true_margin: np.ndarray | None = None     # synthetic: u(chosen) - u(rejected) without noise

    def __post_init__(self):
        if self.chosen.shape != self.rejected.shape or self.chosen.ndim != 2:
            raise DataError(f"{self.name}: chosen {self.chosen.shape} and rejected {self.rejected.shape} "
                            "must be two arrays of the same 2-D shape")

    def __len__(self) -> int:
        return len(self.chosen)


# --- synthetic pairs from a hidden utility ------------------------------------------------------

def hidden_utility(dim: int, seed: int):
    """u(x) = v . tanh(A x) with A [16, dim] and v [16] drawn once from `seed`: smooth, nonlinear."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((16, dim)) / np.sqrt(dim)
    v = rng.standard_normal(16) / 4.0
    return lambda X: np.tanh(np.asarray(X, np.float64) @ A.T) @ v


def synthetic_pairs(n: int, dim: int = 16, sigma: float = 0.0, seed: int = 0,
                    utility_seed: int = 1234) -> PreferencePairs:
    """n pairs of items x ~ N(0, I_dim). The label is drawn from the utility difference plus
    Gaussian noise of standard deviation `sigma` (the annotators' disagreement): item a is chosen
    when u(a) - u(b) + N(0, sigma^2) > 0. `true_margin` keeps the noiseless u(chosen) - u(rejected),
    so a held-out set can be scored against the true preference (margin > 0) as well."""
    if n < 1 or dim < 1:
        raise DataError(f"synthetic pairs: n and dim must be at least 1, got {n} and {dim}")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise DataError(f"synthetic pairs: sigma must be finite and >= 0, got {sigma}")
    rng = np.random.default_rng(seed)
    u = hidden_utility(dim, utility_seed)
    a, b = rng.standard_normal((n, dim)), rng.standard_normal((n, dim))
    diff = u(a) - u(b)
    a_wins = diff + sigma * rng.standard_normal(n) > 0
    chosen = np.where(a_wins[:, None], a, b).astype(np.float32)
    rejected = np.where(a_wins[:, None], b, a).astype(np.float32)
    return PreferencePairs(chosen, rejected, f"synthetic(sigma={sigma:g})", np.where(a_wins, diff, -diff))


# --- JSONL preference files through a byte-level tokenizer ----------------------------------------

def encode_pair_text(prompt: str, response: str, max_len: int) -> np.ndarray:
    """UTF-8 bytes of the prompt, SEP, the response's bytes, cut to `max_len` from the left (the
    response's end is kept: it is what differs), PAD after the end."""
    ids = list(prompt.encode("utf-8")) + [SEP] + list(response.encode("utf-8"))
    ids = ids[-max_len:]
    return np.array(ids + [PAD] * (max_len - len(ids)), dtype=np.int64)


def load_preference_jsonl(path, max_len: int = 256) -> PreferencePairs:
    """One JSON object per line with string fields `prompt`, `chosen`, `rejected` (blank lines
    skipped). A bad line is one error naming the file and the line."""
    path = Path(path)
    if max_len < 2:
        raise DataError(f"max_len must be at least 2, got {max_len}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path.name}: no such file ({path})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path.name}: cannot read ({str(e).splitlines()[0]})") from None
    chosen, rejected = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name}:{number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path.name}:{number}: expected an object with prompt, chosen, rejected")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{path.name}:{number}: {key!r} must be a string, got {type(row.get(key)).__name__}")
        chosen.append(encode_pair_text(row["prompt"], row["chosen"], max_len))
        rejected.append(encode_pair_text(row["prompt"], row["rejected"], max_len))
    if not chosen:
        raise DataError(f"{path.name}: no preference pairs")
    return PreferencePairs(np.stack(chosen), np.stack(rejected), path.name)
