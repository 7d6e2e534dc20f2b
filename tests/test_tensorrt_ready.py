"""TensorRT readiness where TensorRT is absent: the bundle's real graphs checked against the
ONNX-TensorRT support matrix of the targeted release, bad graphs built with onnx.helper, the
trtexec script read back against the graphs, the tensorrt/ files hashed in the bundle, and the
`edgefa export` options (--trt-target, --batch-profile, --require-tensorrt).

The not-ready export path needs no contrivance: TensorRT 8.5's parser has no LayerNormalization
(it arrived in 8.6), and a resmlp's infer.onnx uses it, so a resmlp exported for 8.5 is a real
graph that is not ready.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from conftest import assert_one_error_line, cli_in_process, run_edgefa
from edgefa.bundle import pack_archive, read_bundle, unpack_archive, write_bundle
from edgefa.errors import BundleError, EdgefaError
from edgefa.exporters.onnx_graphs import OPSET, infer_graph, serialize_checked, train_step_graph
from edgefa.exporters.tensorrt_ready import (DATA_FILE, check_graph, check_profile, load_target,
                                             parse_batch_profile, readiness, target_names, trtexec_lines)

TARGETS = ("8.5", "10.3")
PROFILE = {"min": 1, "opt": 32, "max": 256}
TRT_FILES = ("tensorrt/trtexec.sh", "tensorrt/readiness.json")   # infer_refit.onnx only with --tensorrt


# --- helpers --------------------------------------------------------------------------------

def mlp_topology(activation="relu", trainable="all", classes=10):
    return {"kind": "mlp", "in_features": 64, "n_classes": classes, "activation": activation, "trainable": trainable,
            "layers": [{"name": "fc0", "in": 64, "out": 32}, {"name": "fc1", "in": 32, "out": 16},
                       {"name": "head", "in": 16, "out": classes}]}


def resmlp_topology(activation="gelu", trainable="all", depth=2):
    return {"kind": "resmlp", "in_features": 12, "n_classes": 4, "width": 16, "depth": depth, "expansion": 2,
            "activation": activation, "ln_eps": 1e-5, "trainable": trainable}


def graphs_of(topo, momentum=0.9, loss="cross_entropy (mean over the batch)"):
    return {"infer.onnx": serialize_checked(infer_graph(topo)),
            "train_step.onnx": serialize_checked(train_step_graph(topo, momentum, loss))}


def tiny_model(nodes, inputs, outputs, opset=OPSET, initializers=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 8
    return model


def fvalue(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def relu_model(**kw):
    """x [batch, 4] -> Relu -> y: ready everywhere, the base the bad graphs below change."""
    return tiny_model([helper.make_node("Relu", ["x"], ["y"], name="r0")],
                      [fvalue("x", ["batch", 4])], [fvalue("y", ["batch", 4])], **kw)


def graph_batch_inputs(data: bytes) -> dict[str, list]:
    """Read from the graph itself: inputs whose dim 0 is symbolic -> their dims."""
    model = onnx.load_from_string(data)
    out = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_param"):
            out[value.name] = [d.dim_param or d.dim_value for d in dims]
    return out


def script_lines(script: str) -> dict[str, list[str]]:
    """The trtexec invocations of a trtexec.sh: --onnx value -> its arguments."""
    calls = {}
    for line in script.splitlines():
        if line.startswith('"$trtexec" '):
            args = line.split()[1:]
            onnx_arg = next(a for a in args if a.startswith("--onnx="))
            calls[onnx_arg.split("=", 1)[1]] = args
    return calls


def flag(args: list[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)


# --- the data file ----------------------------------------------------------------------------

def test_the_data_file_names_its_sources_and_both_targets():
    assert target_names() == ["8.5", "10.3"]
    text = DATA_FILE.read_text()
    assert "onnx/onnx-tensorrt" in text and "docs/operators.md" in text
    for name in TARGETS:
        t = load_target(name)
        assert t.version == name and t.jetpack.startswith("JetPack")
        assert "onnx/onnx-tensorrt docs/operators.md @ " in t.source
        assert t.opset_min <= OPSET <= t.opset_max
        assert {"Gemm", "MatMul", "Relu", "OneHot", "LogSoftmax", "ReduceSumSquare"} <= t.ops
        assert "Bernoulli" not in t.ops
    assert "LayerNormalization" in load_target("10.3").ops and "LayerNormalization" not in load_target("8.5").ops
    with pytest.raises(EdgefaError, match="this edgefa knows TensorRT 8.5, 10.3"):
        load_target("9.9")


# --- the real graphs --------------------------------------------------------------------------

REAL = {
    "mlp relu momentum": lambda: graphs_of(mlp_topology()),
    "mlp tanh no momentum last:1": lambda: graphs_of(mlp_topology("tanh", "last:1"), momentum=0.0),
    "mlp bradley-terry scorer": lambda: graphs_of(mlp_topology(classes=1), loss="bradley-terry"),
    "resmlp gelu": lambda: graphs_of(resmlp_topology()),
    "resmlp relu last:2 no momentum": lambda: graphs_of(resmlp_topology("relu", "last:2"), momentum=0.0),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", REAL)
def test_real_graphs_are_ready_except_layernorm_before_tensorrt_8_6(kind, target):
    graphs = REAL[kind]()
    summary = readiness(graphs, target, PROFILE)
    if kind.startswith("resmlp") and target == "8.5":
        # infer.onnx fuses each LayerNorm into LayerNormalization (opset 17), which TensorRT 8.5
        # does not parse; the step writes LayerNorm out and is ready.
        infer = onnx.load_from_string(graphs["infer.onnx"])
        lns = [n for n in infer.graph.node if n.op_type == "LayerNormalization"]
        assert len(lns) == resmlp_topology()["depth"] + 1
        assert summary["problems"] == [f"infer.onnx: node '{n.name}' (op LayerNormalization) is not in "
                                       f"TensorRT 8.5's supported ONNX operators" for n in lns]
        assert summary["graphs"]["train_step.onnx"]["ready"] and not summary["ready"]
        return
    assert summary["ready"] is True and summary["problems"] == []
    for name, data in graphs.items():
        assert check_graph(onnx.load_from_string(data), name, target, PROFILE) == []
        entry = summary["graphs"][name]
        assert entry["ready"] and entry["problems"] == [] and entry["opset"] == OPSET
        assert entry["batch_inputs"] == graph_batch_inputs(data)
        assert entry["fp16"] is (name == "infer.onnx")
    assert summary["target"] == target and summary["profile"] == PROFILE


def test_the_session_run_is_ready_for_both_targets(tiny_bundle_master):
    graphs = {n: (tiny_bundle_master / n).read_bytes() for n in ("infer.onnx", "train_step.onnx")}
    for target in TARGETS:
        summary = readiness(graphs, target, (1, 32, 256))
        assert summary["ready"] and summary["problems"] == [], summary["problems"]


# --- what is not ready ------------------------------------------------------------------------

def test_an_unsupported_op_is_named_with_its_node():
    model = tiny_model([helper.make_node("Relu", ["x"], ["h"], name="r0"),
                        helper.make_node("Bernoulli", ["h"], ["y"], name="n12")],
                       [fvalue("x", ["batch", 4])], [fvalue("y", ["batch", 4])])
    onnx.checker.check_model(model, full_check=True)          # a valid ONNX graph, just not TensorRT's
    for target in TARGETS:
        assert check_graph(model, "train_step.onnx", target, PROFILE) == [
            f"train_step.onnx: node 'n12' (op Bernoulli) is not in TensorRT {target}'s supported ONNX operators"]


def test_a_custom_domain_node_and_an_unnamed_node_are_reported():
    model = tiny_model([helper.make_node("Relu", ["x"], ["h"], name="r0"),
                        helper.make_node("FancyGelu", ["h"], ["g"], name="custom7", domain="com.example"),
                        helper.make_node("Hardmax", ["g"], ["y"])],
                       [fvalue("x", ["batch", 4])], [fvalue("y", ["batch", 4])],
                       extra_opsets=[helper.make_opsetid("com.example", 1)])
    problems = check_graph(model, "infer.onnx", "8.5", PROFILE)
    assert len(problems) == 2
    assert problems[0].startswith("infer.onnx: node 'custom7' (op FancyGelu) is in domain 'com.example'")
    assert "plugin" in problems[0]
    assert problems[1] == ("infer.onnx: node #2 (op Hardmax, no name, output 'y') is not in TensorRT 8.5's "
                           "supported ONNX operators")
    assert len(check_graph(model, "infer.onnx", "10.3", PROFILE)) == 1   # 10.x parses Hardmax


def test_an_op_inside_a_control_flow_body_is_checked():
    then = helper.make_graph([helper.make_node("Bernoulli", ["x"], ["t"], name="inner")], "then", [],
                             [fvalue("t", ["batch", 4])])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="inner_relu")], "else", [],
                              [fvalue("e", ["batch", 4])])
    model = tiny_model([helper.make_node("If", ["c"], ["y"], name="if0", then_branch=then, else_branch=other)],
                       [fvalue("c", [], TensorProto.BOOL), fvalue("x", ["batch", 4])], [fvalue("y", ["batch", 4])])
    assert check_graph(model, "infer.onnx", "10.3", PROFILE) == [
        "infer.onnx: node 'inner' (op Bernoulli) is not in TensorRT 10.3's supported ONNX operators"]


@pytest.mark.parametrize("target,opset", [("10.3", 21), ("10.3", 8), ("8.5", 18)])
def test_an_opset_outside_the_range_is_reported(target, opset):
    t = load_target(target)
    problems = check_graph(relu_model(opset=opset), "infer.onnx", target, PROFILE)
    assert problems == [f"infer.onnx: opset {opset} is outside TensorRT {target}'s supported range "
                        f"(opset {t.opset_min} to {t.opset_max})"]


def test_the_opset_must_be_the_default_domain_s():
    model = relu_model()
    model.opset_import[0].domain = "ai.onnx"             # the default domain's other spelling is fine
    assert check_graph(model, "infer.onnx", "10.3", PROFILE) == []
    del model.opset_import[:]
    assert check_graph(model, "infer.onnx", "10.3", PROFILE) == ["infer.onnx: imports no default-domain ONNX opset"]


def test_a_non_batch_symbolic_dim_and_an_unknown_rank_are_named():
    model = tiny_model([helper.make_node("Relu", ["x"], ["y"], name="r0")],
                       [fvalue("x", ["batch", "features"])], [fvalue("y", None)])
    problems = check_graph(model, "infer.onnx", "10.3", PROFILE)
    assert problems == [
        "infer.onnx: input 'x' dim 1 is symbolic ('features'): only dim 0 (the batch) may vary, "
        "every other dim must be a fixed integer",
        "infer.onnx: output 'y' has no known rank (TensorRT needs static ranks)"]


def test_static_inputs_need_no_profile_and_a_symbolic_batch_is_fine():
    # a scalar lr and a weight [out, in] beside a batched x: only x gets the profile
    model = tiny_model([helper.make_node("Gemm", ["x", "w", "b"], ["a"], name="g0", transB=1),
                        helper.make_node("Mul", ["a", "lr"], ["y"], name="m0")],
                       [fvalue("x", ["batch", 4]), fvalue("w", [3, 4]), fvalue("b", [3]), fvalue("lr", [])],
                       [fvalue("y", ["batch", 3])])
    assert check_graph(model, "train_step.onnx", "10.3", PROFILE) == []
    script = trtexec_lines({"train_step.onnx": model.SerializeToString()}, PROFILE, True)
    args = script_lines(script)["train_step.onnx"]
    assert flag(args, "minShapes") == "x:1x4" and flag(args, "maxShapes") == "x:256x4"


def test_a_bad_profile_is_rejected():
    model = relu_model()
    assert check_graph(model, "infer.onnx", "10.3", (64, 32, 256)) == [
        "infer.onnx: batch profile min 64, opt 32, max 256: needs min <= opt <= max (it applies to input 'x')"]
    for bad, why in (((64, 32, 256), "needs min <= opt <= max"), ((0, 32, 256), "min must be at least 1"),
                     ((1, 300, 256), "needs min <= opt <= max"), ((1, 2.5, 4), "must be integers"),
                     ((True, 2, 4), "must be integers")):
        with pytest.raises(EdgefaError, match=why):
            check_profile(bad)
    with pytest.raises(EdgefaError):
        trtexec_lines({"infer.onnx": model.SerializeToString()}, (8, 4, 16), True)
    assert parse_batch_profile(" 2, 8,64") == {"min": 2, "opt": 8, "max": 64}
    for spec in ("1,32", "1,x,3", "", "1,2,3,4", "64,32,256", "0,1,2"):
        with pytest.raises(EdgefaError, match="--batch-profile"):
            parse_batch_profile(spec)


def test_an_unreadable_graph_is_one_problem():
    summary = readiness({"infer.onnx": b"\x00not onnx at all"}, "10.3", PROFILE)
    assert not summary["ready"] and len(summary["problems"]) == 1
    assert summary["problems"][0].startswith("infer.onnx: not a readable ONNX model")


# --- trtexec.sh -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp relu momentum", "mlp bradley-terry scorer", "resmlp gelu"])
def test_trtexec_lines_follow_the_graphs_and_the_profile(kind):
    graphs = REAL[kind]()
    profile = {"min": 2, "opt": 16, "max": 128}
    for fp16 in (True, False):
        calls = script_lines(trtexec_lines(graphs, profile, fp16))
        assert sorted(calls) == sorted(graphs)
        for name, args in calls.items():
            stem = name[:-len(".onnx")]
            assert flag(args, "saveEngine") == f"{stem}.engine"
            assert flag(args, "timingCacheFile") == "timing.cache"
            assert ("--fp16" in args) is (fp16 and name == "infer.onnx")   # the DFA step stays FP32
            batched = graph_batch_inputs(graphs[name])
            assert batched, name
            for key in ("min", "opt", "max"):
                expected = ",".join(f"{n}:" + "x".join(str(d) for d in [profile[key], *dims[1:]])
                                    for n, dims in batched.items())
                assert flag(args, f"{key}Shapes") == expected


def test_trtexec_sh_runs_from_anywhere_against_the_bundle(tiny_bundle, tmp_path):
    """The script, run by sh with a stand-in trtexec on TRTEXEC, cds into the bundle and finds
    both graphs there; the stand-in records each argv."""
    log = tmp_path / "argv.log"
    fake = tmp_path / "fake-trtexec"
    fake.write_text('#!/bin/sh\n[ -f "${1#--onnx=}" ] || { echo "no ${1#--onnx=} in $PWD" >&2; exit 3; }\n'
                    f'echo "$PWD $*" >> {log}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    done = subprocess.run(["sh", str(tiny_bundle / "tensorrt" / "trtexec.sh")], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(os.environ, TRTEXEC=str(fake)), timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    for line, name in zip(calls, ("infer.onnx", "train_step.onnx")):
        cwd, *args = line.split(" ")
        assert Path(cwd).resolve() == tiny_bundle.resolve()
        assert args[0] == f"--onnx={name}" and ("--fp16" in args) is (name == "infer.onnx")


# --- the bundle -------------------------------------------------------------------------------

def test_the_bundle_lists_hashes_and_verifies_the_tensorrt_files(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for name in TRT_FILES:
        data = (tiny_bundle / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["tensorrt"] == {"target": "10.3", "ready": True, "problems": [], "profile": PROFILE,
                                    "fp16_infer": True, "fp16_train_step": False,
                                    "trtexec": "tensorrt/trtexec.sh", "readiness": "tensorrt/readiness.json",
                                    "refit_graph": None}      # not carried: the device derives it
    record = json.loads((tiny_bundle / "tensorrt/readiness.json").read_text())
    assert record["ready"] and record["target"] == "10.3" and record["fp16_train_step"] is False
    assert set(record["graphs"]) == {"infer.onnx", "train_step.onnx"}
    assert "onnx/onnx-tensorrt" in record["source"]
    bundle = read_bundle(tiny_bundle)
    assert set(TRT_FILES) <= set(bundle.manifest["files"]) and "tensorrt/infer_refit.onnx" not in bundle.manifest["files"]


@pytest.mark.parametrize("name", TRT_FILES)
def test_tampering_with_a_tensorrt_file_fails_the_hash(tiny_bundle, name):
    path = tiny_bundle / name
    path.write_bytes(path.read_bytes().replace(b"--timingCacheFile", b"--timingCacheFilX")
                     if name.endswith(".sh") else path.read_bytes() + b" ")
    with pytest.raises(BundleError, match=r"tensorrt/.*: sha256 mismatch"):
        read_bundle(tiny_bundle)
    path.unlink()
    with pytest.raises(BundleError, match=r"tensorrt/.*: missing"):
        read_bundle(tiny_bundle)


def test_the_tensorrt_folder_travels_in_the_archive(tiny_bundle, tmp_path):
    archive = tmp_path / "b.tar"
    archive.write_bytes(pack_archive(tiny_bundle))
    got = unpack_archive(archive, tmp_path / "unpacked", max_bytes=archive.stat().st_size)
    for name in TRT_FILES:
        assert (got / name).read_bytes() == (tiny_bundle / name).read_bytes()


def test_write_bundle_extra_files_need_safe_names(tiny_bundle, tmp_path):
    b = read_bundle(tiny_bundle)
    graphs = {n: (tiny_bundle / n).read_bytes() for n in ("infer.onnx", "train_step.onnx")}
    manifest = {k: v for k, v in b.manifest.items() if k != "files"}
    for bad in ("../evil", "/etc/x", ".hidden", "notes/.x", "state/x", "infer.onnx", "manifest.json",
                "a\\b", "a//b", "./a", ""):
        with pytest.raises(BundleError, match="extra bundle file"):
            write_bundle(tmp_path / "nope", manifest, graphs, b.weights, b.feedback, extra_files={bad: b"x"})
        assert not (tmp_path / "nope").exists()
    out = write_bundle(tmp_path / "ok", manifest, graphs, b.weights, b.feedback,
                       extra_files={"notes/deep/readme.txt": b"hello"})
    assert read_bundle(out).manifest["files"]["notes/deep/readme.txt"]["bytes"] == 5
    assert (out / "notes" / "deep" / "readme.txt").read_bytes() == b"hello"


# --- export and the CLI -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def resmlp_run(tmp_path_factory):
    """A tiny resmlp trained for one epoch on digits (TensorRT 8.5 cannot parse its infer.onnx)."""
    from edgefa.training.trainer import TrainConfig, save_run, train

    run = train(TrainConfig(model="resmlp", width=16, depth=1, epochs=1, alignment=False, device="cpu"))
    out = tmp_path_factory.mktemp("resmlp_run")
    save_run(run, out)
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_options_reach_the_bundle(tiny_run, tmp_path):
    from edgefa.exporters.export import export_bundle
    from edgefa.training.trainer import load_run

    out = export_bundle(load_run(tiny_run), tmp_path / "b", trt_target="8.5", batch_profile=(4, 8, 16),
                        fp16_infer=False, require_tensorrt=True)
    m = read_bundle(out).manifest["tensorrt"]
    assert m["target"] == "8.5" and m["ready"] and m["profile"] == {"min": 4, "opt": 8, "max": 16}
    assert m["fp16_infer"] is False
    calls = script_lines((out / m["trtexec"]).read_text())
    assert not any("--fp16" in args for args in calls.values())
    assert flag(calls["infer.onnx"], "optShapes") == "x:8x64"
    with pytest.raises(EdgefaError, match=r"^export: batch profile min 8, opt 4, max 16: needs min <= opt <= max$"):
        export_bundle(load_run(tiny_run), tmp_path / "c", batch_profile=(8, 4, 16))
    with pytest.raises(EdgefaError, match=r"^export: tensorrt target '7\.1'"):
        export_bundle(load_run(tiny_run), tmp_path / "c", trt_target="7.1")
    assert not (tmp_path / "c").exists()


def test_require_tensorrt_refuses_a_graph_that_is_not_ready_and_leaves_the_old_bundle(resmlp_run, tmp_path):
    from edgefa.exporters.export import export_bundle
    from edgefa.training.trainer import load_run

    run = load_run(resmlp_run)
    out = export_bundle(run, tmp_path / "b", trt_target="10.3", require_tensorrt=True)
    before = tree_bytes(out)
    with pytest.raises(EdgefaError) as err:
        export_bundle(run, out, trt_target="8.5", require_tensorrt=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("export: tensorrt 8.5: not ready: infer.onnx: node 'LayerNormalization_")
    assert "(op LayerNormalization) is not in TensorRT 8.5's supported ONNX operators (+1 more)" in message
    assert tree_bytes(out) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # without require_tensorrt the bundle is written and says why it is not ready
    out = export_bundle(run, tmp_path / "warned", trt_target="8.5")
    m = read_bundle(out).manifest["tensorrt"]
    assert m["ready"] is False and len(m["problems"]) == 2
    assert all("(op LayerNormalization)" in p for p in m["problems"])


def test_cli_require_tensorrt_on_a_ready_run_succeeds(tiny_run, tmp_path):
    out = tmp_path / "b"
    proc = cli_in_process("export", tiny_run, "--out", out, "--require-tensorrt", "--trt-target", "8.5",
                          "--batch-profile", "1,16,64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == ""
    ready = [line for line in proc.stdout.splitlines() if line.startswith("tensorrt ")]
    assert ready == [f"tensorrt 8.5: ready (infer.onnx, train_step.onnx); build on the device: "
                     f"sh {out.resolve() / 'tensorrt' / 'trtexec.sh'}"]
    assert read_bundle(out).manifest["tensorrt"]["profile"] == {"min": 1, "opt": 16, "max": 64}


def test_cli_not_ready_is_one_warning_and_with_require_one_error(resmlp_run, tmp_path):
    warned = cli_in_process("export", resmlp_run, "--out", tmp_path / "w", "--trt-target", "8.5")
    assert warned.returncode == 0, warned.stdout + warned.stderr
    lines = [line for line in warned.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: tensorrt 8.5: not ready: infer.onnx: node '")
    assert "(op LayerNormalization)" in lines[0] and "see tensorrt/readiness.json" in lines[0]
    assert not any(line.startswith("tensorrt ") for line in warned.stdout.splitlines())

    existing = tmp_path / "w"
    before = tree_bytes(existing)
    refused = cli_in_process("export", resmlp_run, "--out", existing, "--trt-target", "8.5", "--require-tensorrt")
    assert_one_error_line(refused, "export: tensorrt 8.5: not ready", "(op LayerNormalization)", "no bundle written")
    assert tree_bytes(existing) == before


@pytest.mark.parametrize("args,fragment", [
    (("--batch-profile", "1,32"), "--batch-profile '1,32': expected MIN,OPT,MAX"),
    (("--batch-profile", "64,32,256"), "--batch-profile '64,32,256': needs min <= opt <= max"),
    (("--trt-target", "7.1"), "tensorrt target '7.1': this edgefa knows TensorRT 8.5, 10.3"),
])
def test_cli_bad_tensorrt_options_are_one_line_in_process(tiny_run, tmp_path, args, fragment):
    proc = cli_in_process("export", tiny_run, "--out", tmp_path / "b", *args)
    assert_one_error_line(proc, "export: " + fragment)
    assert not (tmp_path / "b").exists()


def test_cli_malformed_batch_profile_is_one_line_before_torch(tmp_path):
    """A real process where `import torch` fails: the spec is refused before torch is needed."""
    proc = run_edgefa("export", tmp_path / "no-run", "--out", tmp_path / "b", "--batch-profile", "1,x,3",
                      without_torch=True)
    assert_one_error_line(proc, "export: --batch-profile '1,x,3': expected MIN,OPT,MAX")
    assert not (tmp_path / "b").exists()
