"""Bring your own model (issue 19, sections 1 and 3): every model kind reaches the device, and a
network edgefa never trained becomes a frozen trunk under a new head the device trains by DFA.

    a. A small CNN written here, trained with BP on the host, exported by torch.onnx to a file,
       brought in with `edgefa bundle from-onnx` under a new head, deployed to a real torch-free
       device server and fine-tuned over the link on shifted digits: held-out accuracy on the
       shifted data rises, past the unadapted model's.
    b. The same from Python (`bundle_from_module`), fine-tuned locally.
    c. Every model kind exports and runs `edgefa device evaluate`; infer.onnx is the whole model.
    d. Bad input: one line, exit 2, nothing written.
    e. The trunk's ops are in the bundle's TensorRT readiness.

Real parts only: torch's own exporter, onnxruntime, the device server in a second process.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import assert_one_error_line, cli_in_process, run_edgefa
from test_link_live import device_server
from edgefa.bundle import TRUNK_GRAPH, read_bundle, trunk_of
from edgefa.exporters.export import export_bundle
from edgefa.exporters.own_model import bundle_from_module
from edgefa.models import MLP, CNN, CausalTransformer, MLPConfig, NetConfig, ResMLP, ViTMini
from edgefa.runtime.engine import OrtEngine
from edgefa.runtime.finetune import FinetuneConfig, Finetuner
from edgefa.shared.datasets import Dataset, Standardizer, load_digits, save_npz, stratified_split
from edgefa.shared.shift import SensorShift
from edgefa.training.trainer import Run, TrainConfig, make_optimizer, save_run

# torch.onnx's TorchScript exporter (dynamo=False: 0.1 s a model, not 5) announces its retirement
pytestmark = [pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
              pytest.mark.filterwarnings("ignore:The feature will be removed")]
INFER_TOL = 1e-4
# The device's sensor: a pixel right and down, turned 10 degrees, 30 % less gain, read noise.
# The host model, 98 % on clean digits, falls to about 27 % on it.
SHIFT = SensorShift(dx=1, dy=1, rotation_deg=10.0, gain=0.7, noise_std=1.5, clip=(0.0, 16.0))
STEPS, BATCH, LR = 300, 32, 0.01
FEATURES = "/features/features.6/Flatten_output_0"     # torch.onnx's name for the Flatten's output


class SmallCNN(nn.Module):
    """The user's model: two conv stages and a linear classifier, nothing of edgefa's."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


def images(X: np.ndarray, std: Standardizer) -> torch.Tensor:
    return torch.from_numpy(std.apply(X)).reshape(-1, 1, 8, 8)


def export_onnx(module: nn.Module, example: torch.Tensor, path, dynamic: bool = True, **kwargs) -> None:
    torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "n"}} if dynamic else None, **kwargs)


@pytest.fixture(scope="module")
def host_and_device():
    """The host's digits (BP training), and the device's: shifted, split into fine-tuning and
    held-out halves (stratified, seeded)."""
    digits = load_digits()
    host, device = stratified_split(digits, 0.25, seed=0)
    device_train, device_test = stratified_split(device, 1 / 3, seed=1)
    return host, SHIFT.apply(device_train, seed=1), SHIFT.apply(device_test, seed=2), device_test


@pytest.fixture(scope="module")
def trained_cnn(host_and_device):
    """SmallCNN trained by backprop (Adam, 15 epochs, one thread: under a second) on the host's data."""
    host = host_and_device[0]
    std = Standardizer.fit(host.X)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = SmallCNN()
            X, y = images(host.X, std), torch.from_numpy(host.y)
            optimizer = torch.optim.Adam(net.parameters(), 1e-2)
            for _ in range(15):
                for idx in torch.randperm(len(X)).split(64):
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(net(X[idx]), y[idx]).backward()
                    optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval(), std


def accuracy_of(net: nn.Module, data: Dataset, std: Standardizer) -> float:
    with torch.no_grad():
        return float((net(images(data.X, std)).argmax(1).numpy() == data.y).mean())


@pytest.fixture(scope="module")
def cnn_onnx(trained_cnn, tmp_path_factory):
    net, std = trained_cnn
    path = tmp_path_factory.mktemp("user") / "cnn.onnx"
    export_onnx(net, torch.zeros(2, 1, 8, 8), path)
    return path


@pytest.fixture(scope="module")
def own_bundle(cnn_onnx, trained_cnn, tmp_path_factory):
    """`edgefa bundle from-onnx` on the user's file: the trunk up to the Flatten, a new 64 -> 10
    head, the host's standardization. (The CLI's result and its output.)"""
    std = trained_cnn[1]
    out = tmp_path_factory.mktemp("bundles") / "own"
    proc = cli_in_process("bundle", "from-onnx", cnn_onnx, "--features", FEATURES, "--head", "64,10",
                          "--lr", LR, "--standardize", f"{std.mean!r},{std.std!r}", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


# --- a. the test: the user's CNN, a new head, fine-tuned over the link ----------------------

def test_users_onnx_cnn_fine_tunes_under_a_new_head_over_the_link(own_bundle, trained_cnn, host_and_device,
                                                                   tmp_path):
    bundle, _ = own_bundle
    net, std = trained_cnn
    _, shifted_train, shifted_test, clean_test = host_and_device
    host_clean, host_shifted = accuracy_of(net, clean_test, std), accuracy_of(net, shifted_test, std)
    assert host_clean > 0.95 and host_shifted < 0.6, (host_clean, host_shifted)   # the shift hurts
    save_npz(tmp_path / "train.npz", shifted_train)
    save_npz(tmp_path / "test.npz", shifted_test)

    report = tmp_path / "report.json"
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:           # torch cannot import there
        deploy = run_edgefa("deploy", bundle, "--device", srv.url, without_torch=True)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        tune = run_edgefa("finetune", "--device", srv.url, "--data", tmp_path / "train.npz", "--eval",
                          tmp_path / "test.npz", "--steps", STEPS, "--batch-size", BATCH, "--report", report,
                          without_torch=True)
        assert tune.returncode == 0, tune.stdout + tune.stderr
    r = json.loads(report.read_text())
    print(f"\nhost BP model: {host_clean:.1%} clean, {host_shifted:.1%} shifted; new head over the link: "
          f"{r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%} on {len(shifted_test)} held-out shifted digits")
    assert (r["final_step"], r["refused_steps"]) == (STEPS, [])
    assert r["accuracy_after"] > r["accuracy_before"] + 0.4
    assert r["accuracy_after"] > host_shifted + 0.3          # adapted on the device beats the unadapted model


def test_the_summary_names_the_cut_the_head_and_what_trains(own_bundle):
    _, out = own_bundle
    assert f"cut at '{FEATURES}', 64 features" in out, out
    # trained: (64*64 + 64) + (64*10 + 10); frozen: the trunk's (8*9 + 8) + (16*8*9 + 16)
    assert "head: 64 -> 64 -> 10 (relu); the device trains all: 4,810 of 6,058 parameters" in out, out
    assert "tensorrt 10.3: ready" in out and "trunk.onnx" in out, out


# --- b. the same from Python: a torch module as the trunk -----------------------------------------

def test_bundle_from_module_fine_tunes_locally_and_infers_as_the_host(trained_cnn, host_and_device, tmp_path):
    net, std = trained_cnn
    _, shifted_train, shifted_test, _ = host_and_device
    out = bundle_from_module(net.features, torch.zeros(3, 1, 8, 8), tmp_path / "b", head=[10], trainable="head",
                             standardize=(std.mean, std.std), lr=0.05)
    b = read_bundle(out)
    assert trunk_of(b.model)["source"] == "torch.onnx export of Sequential"
    # infer.onnx is the whole model: the module's features under the head in weights.npz
    x = std.apply(shifted_test.X[:50])
    with torch.no_grad():
        feats = net.features(torch.from_numpy(x).reshape(-1, 1, 8, 8)).numpy()
    with np.load(out / "weights.npz", allow_pickle=False) as w:
        expected = feats @ w["head.weight"].T + w["head.bias"]
    assert np.abs(OrtEngine(b, threads=1).predict_logits(x) - expected).max() < INFER_TOL

    r = Finetuner(b, shifted_train, FinetuneConfig(steps=150, batch_size=BATCH, threads=1), shifted_test).run()
    print(f"\nbundle_from_module, a new readout, 150 local steps: {r['accuracy_before']:.1%} -> "
          f"{r['accuracy_after']:.1%} on the held-out shifted digits")
    assert r["accuracy_after"] > r["accuracy_before"] + 0.4, r


# --- c. every model kind exports, runs `device evaluate`, and infers as the host does -------------

def _run(model: nn.Module) -> Run:
    return Run(model, make_optimizer(model, 0.01, 0.9), TrainConfig(method="dfa", lr=0.01, momentum=0.9),
               Standardizer(0.0, 1.0), {"final_test_accuracy": None})


def kind_model(kind: str) -> nn.Module:
    """A tiny model of each kind on digits (64 features, or 1x8x8 images), seeded."""
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP(MLPConfig(64, [16], 10, "relu", "dfa"))
    config = {"resmlp": NetConfig("resmlp", [64], 10, width=16, depth=2),
              "cnn": NetConfig("cnn", [1, 8, 8], 10, width=4, depth=2),
              "vit": NetConfig("vit", [1, 8, 8], 10, width=16, depth=1, heads=2, activation="gelu"),
              "transformer": NetConfig("transformer", [64], 10, width=16, depth=1, heads=2)}[kind]
    return {"resmlp": ResMLP, "cnn": CNN, "vit": ViTMini, "transformer": CausalTransformer}[kind](config)


KINDS = [("mlp", "all"), ("resmlp", "all"), ("cnn", "all"), ("cnn", "last:2"), ("cnn", "head"), ("vit", "head"),
         ("transformer", "head")]


@pytest.mark.parametrize("kind, trainable", KINDS, ids=[f"{k}-{t}" for k, t in KINDS])
def test_every_kind_exports_evaluates_and_infers_as_the_host(kind, trainable, digits_npz, tmp_path):
    model = kind_model(kind)
    out = export_bundle(_run(model), tmp_path / "b", trainable=trainable)
    b = read_bundle(out)
    x = load_digits().X[:40]
    with torch.no_grad():
        host = model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(OrtEngine(b, threads=1).predict_logits(x) - host).max() < INFER_TOL
    has_trunk = trunk_of(b.model) is not None
    assert has_trunk == (kind in ("vit", "transformer") or trainable != "all"), b.model
    proc = cli_in_process("device", "evaluate", out, "--data", digits_npz)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on 1797 samples (device state at step 0)" in proc.stdout, proc.stdout


def test_a_vit_trained_whole_is_one_line_naming_what_it_can_train(tmp_path):
    run_dir = tmp_path / "run"
    save_run(_run(kind_model("vit")), run_dir)
    proc = cli_in_process("export", run_dir, "--trainable", "all", "--out", tmp_path / "b")
    assert_one_error_line(proc, "--trainable all", "head only", "--trainable head")
    assert not (tmp_path / "b").exists()


# --- d. bad input: one line, exit 2, nothing written ---------------------------------------------

class TwoInputs(nn.Module):
    def forward(self, a, b):
        return a + b


class FixedBatch(nn.Module):
    """A trunk that bakes its batch into a Reshape when exported without a dynamic batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        h = self.conv(x)
        return h.reshape(x.shape[0], -1)


def _bad_models(folder):
    torch.manual_seed(0)
    (folder / "text.onnx").write_text("not a model\n")
    torch.onnx.export(TwoInputs(), (torch.zeros(2, 4), torch.zeros(2, 4)), str(folder / "two.onnx"), dynamo=False,
                      input_names=["a", "b"], output_names=["sum"], dynamic_axes={"a": {0: "n"}, "b": {0: "n"}})
    export_onnx(FixedBatch(), torch.zeros(1, 1, 8, 8), folder / "fixed.onnx", dynamic=False)


BAD = [  # (model file, extra arguments, fragments of the one line)
    ("cnn", ["--features", "/features/features.6/Flaten"], ["no tensor or node named", "close: /features/features.6/Flatten"]),
    ("text.onnx", ["--features", "x"], ["not an ONNX model"]),
    ("two.onnx", ["--features", "sum"], ["one float input", "a, b"]),
    ("cnn", ["--features", FEATURES, "--head", "0,10"], ["'--head'", "at least 1"]),
    ("fixed.onnx", ["--features", "logits"], ["batch", "dynamic batch"]),
    ("cnn", ["--features", FEATURES, "--trainable", "last:3"], ["--trainable 'last:3'", "between 1 and 2"]),
]


@pytest.mark.parametrize("model, args, fragments", BAD, ids=["unknown-cut", "not-onnx", "two-inputs", "head-0",
                                                              "fixed-batch", "trainable-too-deep"])
def test_bad_input_is_one_line_and_writes_nothing(model, args, fragments, cnn_onnx, tmp_path):
    _bad_models(tmp_path)
    path = cnn_onnx if model == "cnn" else tmp_path / model
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli_in_process("bundle", "from-onnx", path, *(["--head", "16,10"] if "--head" not in args else []),
                          *args, "--out", tmp_path / "out")
    assert_one_error_line(proc, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- e. the trunk is checked for TensorRT like every other graph ---------------------------------

def test_from_onnx_tensorrt_carries_the_refit_graph_the_device_would_derive(own_bundle, cnn_onnx, tmp_path):
    from edgefa.bundle import REFIT_GRAPH
    from edgefa.runtime.refit_graph import refit_graph_bytes

    default, _ = own_bundle
    assert not (default / REFIT_GRAPH).exists() and read_bundle(default).manifest["tensorrt"]["refit_graph"] is None
    out = tmp_path / "with_refit"
    proc = cli_in_process("bundle", "from-onnx", cnn_onnx, "--features", FEATURES, "--head", "64,10", "--out", out,
                          "--tensorrt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bundle = read_bundle(out)                     # a trunk bundle: trunk weights stay, head weights become constants
    assert bundle.manifest["tensorrt"]["refit_graph"] == REFIT_GRAPH
    assert refit_graph_bytes((out / "infer.onnx").read_bytes(), bundle.weights) == (out / REFIT_GRAPH).read_bytes()


def test_the_trunks_ops_are_in_the_tensorrt_readiness(own_bundle, trained_cnn):
    bundle, _ = own_bundle
    readiness = json.loads((bundle / "tensorrt" / "readiness.json").read_text())
    trunk_ops = sorted({n.op_type for n in onnx.load(str(bundle / TRUNK_GRAPH)).graph.node})
    assert readiness["graphs"][TRUNK_GRAPH]["ops"] == trunk_ops
    assert {"Conv", "MaxPool", "Relu"} <= set(trunk_ops)
    assert read_bundle(bundle).model["trunk"]["ops"] == trunk_ops
    # the whole model's graphs carry the trunk's ops too, and all are ready for TensorRT 10.3
    assert set(trunk_ops) <= set(readiness["graphs"]["infer.onnx"]["ops"])
    assert readiness["ready"] and readiness["target"] == "10.3"
    assert read_bundle(bundle).manifest["input"]["standardize"]["std"] == trained_cnn[1].std   # --standardize
