"""Model zoo: every architecture x naming x source format loads strictly (published tensor
names, tiny shapes); metadata; hub ids offline; a run chained from another run's checkpoint.

The fixture writers below name and shape tensors as the published checkpoints do (HF
`ResNetForImageClassification` / `ViTModel` / `BertModel`, timm / torchvision ResNet), with
tiny sizes. Parity of the forward pass with `transformers` (torch) on such tiny random
models was checked outside the suite (transformers is not a dependency): ResNet basic and
bottleneck within 3e-6, ViT within 2e-8.
"""
import json
import os
import socket
import time
from collections import OrderedDict

import jax
import numpy as np
import pytest
from flax import nnx
from flax.serialization import msgpack_serialize
from safetensors.numpy import save_file

from conftest import compose_cfg
from ftlab import models, provenance
from ftlab.models import hub
from ftlab.models.loading import WEIGHTS, LoadError
from ftlab.schema import ConfigError, ModelConfig
from test_torch_io import Storage, Tensor, write_legacy, write_zip

RNG = np.random.default_rng(0)


def rand(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def bn(n: int) -> dict[str, np.ndarray]:
    return {"weight": rand(n), "bias": rand(n), "running_mean": rand(n),
            "running_var": np.abs(rand(n)) + 0.5, "num_batches_tracked": np.array(7, np.int64)}


# ---- fixture writers: published names, tiny shapes ----

RESNET = dict(depths=(1, 2), widths=(16, 32), bottleneck=True, stem=8)  # = variant "tiny"


def resnet_records(depths, widths, bottleneck, stem, classes=5):
    """(HF name, timm / torchvision name, array) for every tensor of a ResNet classifier."""
    recs = []

    def conv(hf, tv, shape):
        recs.append((hf + ".weight", tv + ".weight", rand(*shape)))

    def norm(hf, tv, n):
        recs.extend((f"{hf}.{k}", f"{tv}.{k}", v) for k, v in bn(n).items())

    conv("resnet.embedder.embedder.convolution", "conv1", (stem, 3, 7, 7))
    norm("resnet.embedder.embedder.normalization", "bn1", stem)
    cin = stem
    for s, (depth, w) in enumerate(zip(depths, widths)):
        for b in range(depth):
            hf, tv = f"resnet.encoder.stages.{s}.layers.{b}", f"layer{s + 1}.{b}"
            c = cin if b == 0 else w
            shapes = ([(w // 4, c, 1, 1), (w // 4, w // 4, 3, 3), (w, w // 4, 1, 1)]
                      if bottleneck else [(w, c, 3, 3), (w, w, 3, 3)])
            for k, shape in enumerate(shapes):
                conv(f"{hf}.layer.{k}.convolution", f"{tv}.conv{k + 1}", shape)
                norm(f"{hf}.layer.{k}.normalization", f"{tv}.bn{k + 1}", shape[0])
            if b == 0 and (s > 0 or c != w):
                conv(f"{hf}.shortcut.convolution", f"{tv}.downsample.0", (w, c, 1, 1))
                norm(f"{hf}.shortcut.normalization", f"{tv}.downsample.1", w)
        cin = w
    recs.append(("classifier.1.weight", "fc.weight", rand(classes, cin)))
    recs.append(("classifier.1.bias", "fc.bias", rand(classes)))
    return recs


def resnet_config(depths, widths, bottleneck, stem) -> dict:
    return {"model_type": "resnet", "architectures": ["ResNetForImageClassification"],
            "embedding_size": stem, "hidden_sizes": list(widths), "depths": list(depths),
            "layer_type": "bottleneck" if bottleneck else "basic", "hidden_act": "relu",
            "downsample_in_first_stage": False, "downsample_in_bottleneck": False}


VIT = dict(hidden=32, layers=2, heads=2, mlp=64, patch=8, grid=4)  # = variant "tiny"


def hf_layer(t: dict, layer: str, attention: str, norms, hidden: int, mlp: int) -> None:
    """One HF transformer layer's tensors (ViTModel and BertModel differ only in the
    attention module's name and the two norms')."""
    for name in (f"{attention}.query", f"{attention}.key", f"{attention}.value",
                 "attention.output.dense"):
        t[layer + name + ".weight"] = rand(hidden, hidden)
        t[layer + name + ".bias"] = rand(hidden)
    t[layer + "intermediate.dense.weight"] = rand(mlp, hidden)
    t[layer + "intermediate.dense.bias"] = rand(mlp)
    t[layer + "output.dense.weight"] = rand(hidden, mlp)
    t[layer + "output.dense.bias"] = rand(hidden)
    for norm in norms:
        t[f"{layer}{norm}.weight"], t[f"{layer}{norm}.bias"] = rand(hidden), rand(hidden)


def vit_tensors(hidden, layers, heads, mlp, patch, grid, pooler=True, classes=0):
    """HF ViTModel (with pooler) or ViTForImageClassification (`vit.` + `classifier`)."""
    p = "vit." if classes else ""
    t = {p + "embeddings.cls_token": rand(1, 1, hidden),
         p + "embeddings.position_embeddings": rand(1, 1 + grid * grid, hidden),
         p + "embeddings.patch_embeddings.projection.weight": rand(hidden, 3, patch, patch),
         p + "embeddings.patch_embeddings.projection.bias": rand(hidden)}
    for i in range(layers):
        hf_layer(t, f"{p}encoder.layer.{i}.", "attention.attention",
                 ("layernorm_before", "layernorm_after"), hidden, mlp)
    t[p + "layernorm.weight"], t[p + "layernorm.bias"] = rand(hidden), rand(hidden)
    if pooler and not classes:
        t["pooler.dense.weight"], t["pooler.dense.bias"] = rand(hidden, hidden), rand(hidden)
    if classes:
        t["classifier.weight"], t["classifier.bias"] = rand(classes, hidden), rand(classes)
    return t


def vit_config(hidden, layers, heads, mlp, patch, grid) -> dict:
    return {"model_type": "vit", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": mlp, "patch_size": patch,
            "image_size": patch * grid, "qkv_bias": True, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "num_channels": 3}


BERT = dict(vocab=50, hidden=24, layers=3, heads=2, mlp=48, positions=40)  # not a table variant


def bert_tensors(vocab, hidden, layers, heads, mlp, positions, prefix="", heads_too=False):
    """HF BertModel names (BertForPreTraining's `bert.` prefix and `cls.*` heads optional)."""
    e = prefix + "embeddings."
    t = {e + "word_embeddings.weight": rand(vocab, hidden),
         e + "position_embeddings.weight": rand(positions, hidden),
         e + "token_type_embeddings.weight": rand(2, hidden),
         e + "LayerNorm.weight": rand(hidden), e + "LayerNorm.bias": rand(hidden),
         e + "position_ids": np.arange(positions, dtype=np.int64)[None]}
    for i in range(layers):
        hf_layer(t, f"{prefix}encoder.layer.{i}.", "attention.self",
                 ("attention.output.LayerNorm", "output.LayerNorm"), hidden, mlp)
    t[prefix + "pooler.dense.weight"] = rand(hidden, hidden)
    t[prefix + "pooler.dense.bias"] = rand(hidden)
    if heads_too:
        t["cls.predictions.bias"] = rand(vocab)
        t["cls.seq_relationship.weight"] = rand(2, hidden)
    return t


def bert_config(vocab, hidden, layers, heads, mlp, positions) -> dict:
    return {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": vocab,
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": mlp, "max_position_embeddings": positions,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
            "position_embedding_type": "absolute"}


LITE_STAGES = ((3, 1, 1, 8, 1), (3, 2, 4, 16, 2), (5, 2, 4, 24, 1))  # = variant "tiny"


def lite_tensors(stages=LITE_STAGES, stem=8, top=32, classes=5):
    """lukemelas `efficientnet_pytorch` names (the shipped EfficientNet-Lite .pth files)."""
    t = {"_conv_stem.weight": rand(stem, 3, 3, 3)}

    def norm(name, n):
        t.update({f"{name}.{k}": v for k, v in bn(n).items()})

    norm("_bn0", stem)
    cin, i = stem, 0
    for k, _, expand, cout, repeats in stages:
        for _ in range(repeats):
            b, mid = f"_blocks.{i}.", cin * expand
            if expand != 1:
                t[b + "_expand_conv.weight"] = rand(mid, cin, 1, 1)
                norm(b + "_bn0", mid)
            t[b + "_depthwise_conv.weight"] = rand(mid, 1, k, k)
            norm(b + "_bn1", mid)
            t[b + "_project_conv.weight"] = rand(cout, mid, 1, 1)
            norm(b + "_bn2", cout)
            cin, i = cout, i + 1
    t["_conv_head.weight"] = rand(top, cin, 1, 1)
    norm("_bn1", top)
    t["_fc.weight"], t["_fc.bias"] = rand(classes, top), rand(classes)
    return t


def torch_tree(tensors: dict) -> OrderedDict:
    """A state dict as torch pickles it: one storage per tensor, C-contiguous views."""
    kinds = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
    out = OrderedDict()
    for i, (name, a) in enumerate(tensors.items()):
        a = np.ascontiguousarray(a)
        stride = tuple(s // a.itemsize for s in a.strides)
        out[name] = Tensor(Storage(kinds[a.dtype], str(i), a.reshape(-1)), 0, a.shape, stride)
    return out


def to_flax(tensors: dict):
    """HF Flax layout of the same model: nested dicts, `kernel` (in, out) / HWIO, `scale`,
    `embedding`, BatchNorm statistics in a `batch_stats` collection, no counters."""
    params, stats = {}, {}

    def put(tree, parts, value):
        for p in parts[:-1]:
            tree = tree.setdefault(p, {})
        tree[parts[-1]] = value

    for name, a in tensors.items():
        *head, leaf = name.split(".")
        if leaf == "num_batches_tracked":
            continue
        if leaf in ("running_mean", "running_var"):
            put(stats, [*head, leaf[len("running_"):]], a)
        elif leaf == "weight" and a.ndim == 4:
            put(params, [*head, "kernel"], a.transpose(2, 3, 1, 0))
        elif leaf == "weight" and head[-1].endswith("_embeddings"):
            put(params, [*head, "embedding"], a)
        elif leaf == "weight" and a.ndim == 2:
            put(params, [*head, "kernel"], a.T)
        elif leaf == "weight":
            put(params, [*head, "scale"], a)
        else:
            put(params, [*head, leaf], a)
    return {"params": params, "batch_stats": stats} if stats else params


def write(tmp_path, tensors: dict, fmt: str, config: dict | None = None, name: str = ""):
    """The checkpoint in `fmt` (safetensors | bin | pth | msgpack) in a fresh directory."""
    d = tmp_path / f"{fmt}{name}"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  str(d / "model.safetensors"))
    elif fmt == "bin":  # HF pytorch_model.bin: torch's zip format
        write_zip(d / "pytorch_model.bin", torch_tree(tensors), folder="pytorch_model")
    elif fmt == "pth":  # torchvision's download: legacy torch.save
        write_legacy(d / "resnet-tiny-0123abcd.pth", torch_tree(tensors))
    elif fmt == "msgpack":
        (d / "flax_model.msgpack").write_bytes(msgpack_serialize(
            jax.tree.map(np.asarray, to_flax(tensors))))
    return d


def weights(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def assert_all_loaded(model, cfg: ModelConfig, n: int, head_new: bool) -> None:
    """Every model weight came from the source: none still equals a fresh model's init."""
    r = models.resolve(cfg)
    fresh = weights(r.arch.build(cfg, r.size, r.meta, n, nnx.Rngs(params=0)))
    for path, value in weights(model).items():
        if head_new and path.startswith("head/"):
            continue
        assert not np.array_equal(value, fresh[path]), f"{path} kept its init"


# ---- every architecture x naming x format ----

def resnet_case(tmp_path, naming, fmt):
    recs = resnet_records(**RESNET)
    tensors = {(hf if naming == "hf" else tv): a for hf, tv, a in recs}
    cfg = resnet_config(**RESNET) if naming == "hf" else None
    return write(tmp_path, tensors, fmt, cfg), tensors, ModelConfig(
        arch="resnet", variant="tiny", keep_head=True)


CASES = [("resnet", "hf", "safetensors"), ("resnet", "hf", "bin"), ("resnet", "hf", "msgpack"),
         ("resnet", "timm", "safetensors"), ("resnet", "torchvision", "pth"),
         ("vit", "hf", "safetensors"), ("vit", "hf", "bin"), ("vit", "hf", "msgpack"),
         ("bert", "hf", "safetensors"), ("bert", "hf", "bin"), ("bert", "hf", "msgpack"),
         ("efficientnet_lite", "lukemelas", "pth")]


def make_case(tmp_path, arch, naming, fmt):
    """(source dir, its tensors under published names, model config, classes)."""
    if arch == "resnet":
        d, t, cfg = resnet_case(tmp_path, naming, fmt)
        return d, t, cfg, 5
    if arch == "efficientnet_lite":
        t = lite_tensors()
        cfg = ModelConfig(arch="efficientnet_lite", variant="tiny", keep_head=True)
        return write(tmp_path, t, fmt), t, cfg, 5
    if arch == "vit":
        t = vit_tensors(**VIT, classes=5)
        cfg = ModelConfig(arch="vit", variant="tiny", keep_head=True, dropout=0.0)
        return write(tmp_path, t, fmt, vit_config(**VIT)), t, cfg, 5
    t = bert_tensors(**BERT, prefix="bert.", heads_too=True)
    cfg = ModelConfig(arch="bert", variant="auto", keep_head=False)
    return write(tmp_path, t, fmt, bert_config(**BERT)), t, cfg, 3


@pytest.mark.parametrize("arch,naming,fmt", CASES)
def test_every_arch_naming_and_format_loads_every_tensor(tmp_path, arch, naming, fmt):
    d, t, cfg, n = make_case(tmp_path, arch, naming, fmt)
    cfg.source = str(d)
    model = models.build(cfg, n, seed=0)  # strict: every source tensor used or skipped
    assert_all_loaded(model, cfg, n, head_new=not cfg.keep_head)
    w = weights(model)
    if arch == "resnet":
        hf = naming == "hf"
        pre = "resnet." if hf else ""
        stem = t[pre + ("embedder.embedder.convolution.weight" if hf else "conv1.weight")]
        np.testing.assert_array_equal(w["stem/conv/kernel"], stem.transpose(2, 3, 1, 0))
        one = t[pre + ("encoder.stages.1.layers.0.layer.0.convolution.weight" if hf
                       else "layer2.0.conv1.weight")]
        np.testing.assert_array_equal(w["stages/1/0/conv1/kernel"], one[:, :, 0, 0].T)
        var = t[pre + ("encoder.stages.1.layers.1.layer.1.normalization.running_var" if hf
                       else "layer2.1.bn2.running_var")]
        np.testing.assert_array_equal(w["stages/1/1/bn2/var"], var)
        fc = t["classifier.1.weight" if hf else "fc.weight"]
        np.testing.assert_array_equal(w["head/layers/0/kernel"], fc.T)
        out = model({"image": np.zeros((2, 32, 32, 3), np.uint8)})
    elif arch == "vit":
        proj = t["vit.embeddings.patch_embeddings.projection.weight"]
        np.testing.assert_array_equal(w["embeddings/patch/kernel"],
                                      proj.transpose(2, 3, 1, 0).reshape(-1, proj.shape[0]))
        np.testing.assert_array_equal(w["embeddings/position"],
                                      t["vit.embeddings.position_embeddings"])
        np.testing.assert_array_equal(w["layers/1/attention/value/kernel"],
                                      t["vit.encoder.layer.1.attention.attention.value.weight"].T)
        np.testing.assert_array_equal(w["head/layers/0/kernel"], t["classifier.weight"].T)
        out = model({"image": np.zeros((2, 32, 32, 3), np.uint8)})
    elif arch == "efficientnet_lite":
        dw = t["_blocks.3._depthwise_conv.weight"]
        np.testing.assert_array_equal(w["blocks/3/depthwise/kernel"], dw[:, 0].transpose(1, 2, 0))
        np.testing.assert_array_equal(w["top/bn/mean"], t["_bn1.running_mean"])
        out = model({"image": np.zeros((2, 32, 32, 3), np.uint8)})
    else:
        # sizes from config.json
        assert w["embeddings/word/embedding"].shape == (BERT["vocab"], BERT["hidden"])
        assert len(model.layers) == BERT["layers"]
        np.testing.assert_array_equal(w["layers/2/fc1/kernel"],
                                      t["bert.encoder.layer.2.intermediate.dense.weight"].T)
        ids = np.ones((2, 8), np.int32)
        out = model({"input_ids": ids, "attention_mask": ids})
    assert out.shape == (2, n) and np.isfinite(np.asarray(out)).all()


def test_hf_and_timm_namings_of_the_same_weights_build_the_same_model(tmp_path):
    recs = resnet_records(**RESNET)
    hf = write(tmp_path, {a: x for a, _, x in recs}, "safetensors", resnet_config(**RESNET))
    tv = write(tmp_path, {b: x for _, b, x in recs}, "pth")
    cfg = dict(arch="resnet", variant="tiny", keep_head=True)
    a = weights(models.build(ModelConfig(**cfg, source=str(hf)), 5, 0))
    b = weights(models.build(ModelConfig(**cfg, source=str(tv)), 5, 1))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_basic_block_resnet_loads_from_torchvision_names(tmp_path):
    size = dict(depths=(1, 2), widths=(8, 16), bottleneck=False, stem=8)  # = "tiny-basic"
    d = write(tmp_path, {tv: x for _, tv, x in resnet_records(**size)}, "pth")
    cfg = ModelConfig(arch="resnet", variant="tiny-basic", source=str(d), keep_head=False)
    model = models.build(cfg, 3, 0)
    assert_all_loaded(model, cfg, 3, head_new=True)


BROKEN = {  # (arch, naming): (source tensor deleted -> the model weight then missing,
    #                      source tensor given a wrong shape)
    ("resnet", "hf"): ("resnet.encoder.stages.1.layers.0.layer.1.convolution.weight",
                       "stages/1/0/conv2/kernel",
                       "resnet.encoder.stages.0.layers.0.shortcut.normalization.running_mean"),
    ("resnet", "timm"): ("layer2.0.conv2.weight", "stages/1/0/conv2/kernel",
                         "layer1.0.downsample.1.running_mean"),
    ("vit", "hf"): ("vit.encoder.layer.1.attention.attention.key.weight",
                    "layers/1/attention/key/kernel", "vit.embeddings.cls_token"),
    ("bert", "hf"): ("bert.encoder.layer.2.output.dense.weight", "layers/2/fc2/kernel",
                     "bert.embeddings.LayerNorm.weight"),
    ("efficientnet_lite", "lukemelas"): ("_blocks.2._project_conv.weight",
                                         "blocks/2/project/kernel", "_blocks.0._bn1.weight"),
}


@pytest.mark.parametrize("arch,naming", list(BROKEN))
def test_wrong_shaped_and_missing_tensors_are_named(tmp_path, arch, naming):
    fmt = "pth" if arch == "efficientnet_lite" else "safetensors"
    _, t, cfg, n = make_case(tmp_path, arch, naming, fmt)
    missing, path, wrong = BROKEN[arch, naming]
    del t[missing]
    t[wrong] = rand(3, 3)
    config = json.loads((tmp_path / fmt / "config.json").read_text()) \
        if (tmp_path / fmt / "config.json").exists() else None
    cfg.source = str(write(tmp_path, t, fmt, config, name="-broken"))
    with pytest.raises(LoadError) as e:
        models.build(cfg, n, 0)
    msg = str(e.value)
    assert "2 mismatch" in msg and f"'{path}' has no source tensor" in msg
    assert f"'{wrong}'" in msg and "(3, 3)" in msg and "\n" not in msg


def test_bert_sizes_come_from_config_json(tmp_path):
    d = write(tmp_path, bert_tensors(**BERT), "safetensors", bert_config(**BERT))
    shapes = models.loading.param_paths(models.abstract(
        ModelConfig(arch="bert", variant="auto", source=str(d)), 3))
    assert shapes["layers/2/fc1/kernel"] == (24, 48)
    with pytest.raises(ConfigError) as e:  # a table variant that disagrees is an error
        models.abstract(ModelConfig(arch="bert", variant="tiny", source=str(d)), 3)
    assert e.value.key == "model.variant" and "auto" in str(e.value)
    with pytest.raises(ConfigError) as e:  # auto without a config.json
        models.abstract(ModelConfig(arch="bert", variant="auto"), 3)
    assert e.value.key == "model.variant"


def test_bert_tokenizer_from_vocab_txt(tmp_path):
    from ftlab.data.tokenize import encode, load_tokenizer
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "solar", "cell", "crack", "##s"]
    d = write(tmp_path, bert_tensors(**BERT), "safetensors", bert_config(**BERT))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = ModelConfig(arch="bert", variant="auto", source=str(d))
    assert models.tokenizer_of(cfg) == str(d / "vocab.txt")
    out = encode(load_tokenizer(models.tokenizer_of(cfg), 8), ["Solar cell cracks"])
    assert out["input_ids"][0].tolist() == [2, 5, 6, 7, 8, 3, 0, 0]


# ---- ViT position grid ----

def test_vit_position_grid_is_resampled_to_the_fine_tuning_resolution(tmp_path):
    t = vit_tensors(**VIT)  # 32 px / patch 8: 4x4 grid
    d = write(tmp_path, t, "safetensors", vit_config(**VIT))
    cfg = ModelConfig(arch="vit", variant="tiny", source=str(d), image_size=48, dropout=0.0)
    model = models.build(cfg, 3, 0)
    pos, src = np.asarray(model.embeddings.position[...]), t["embeddings.position_embeddings"]
    assert pos.shape == (1, 1 + 36, 32)
    np.testing.assert_array_equal(pos[0, 0], src[0, 0])  # [CLS] kept
    grid = jax.image.resize(src[0, 1:].reshape(4, 4, 32), (6, 6, 32), "bicubic")
    np.testing.assert_allclose(pos[0, 1:], np.asarray(grid).reshape(36, 32), atol=1e-6)
    assert model({"image": np.zeros((1, 48, 48, 3), np.uint8)}).shape == (1, 3)
    t["embeddings.position_embeddings"] = rand(1, 17, 16)  # other width: not resampled
    cfg.source = str(write(tmp_path, t, "safetensors", vit_config(**VIT), name="-bad"))
    with pytest.raises(LoadError, match=r"embeddings\.position_embeddings"):
        models.build(cfg, 3, 0)
    with pytest.raises(ConfigError) as e:
        models.abstract(ModelConfig(arch="vit", variant="tiny", image_size=50), 3)
    assert e.value.key == "model.image_size"


# ---- metadata ----

def test_metadata_from_published_files_and_config_overrides(tmp_path):
    d = write(tmp_path, vit_tensors(**VIT), "safetensors", vit_config(**VIT))
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
         "size": {"height": 32, "width": 32}, "resample": 3}))
    (d / "README.md").write_text("---\nlicense: cc-by-4.0\ntags: [vision]\n---\n# tiny\n")
    cfg = ModelConfig(arch="vit", variant="auto", source=str(d), keep_head=False)
    meta = models.pretrained_meta(cfg)
    assert meta.mean == pytest.approx((123.675, 116.28, 103.53))
    assert meta.input_size == 32 and meta.interpolation == "bicubic"
    assert meta.licence == "cc-by-4.0" and meta.classifier == {"hf": r"classifier\..*"}
    assert models.build(cfg, 3, 0).mean == meta.mean  # the model normalises with it
    cfg.mean, cfg.std = [100.0], [50.0]  # the config overrides the metadata
    model = models.build(cfg, 3, 0)
    assert (model.mean, model.std) == (100.0, 50.0)
    lite = models.build(ModelConfig(arch="efficientnet_lite", variant="tiny", mean=[1, 2, 3],
                                    std=[4, 5, 6]), 3, 0)  # per channel
    assert lite.mean == (1.0, 2.0, 3.0) and lite({"image": np.zeros((1, 32, 32, 3))}).shape == (1, 3)
    import dataclasses
    provenance.write(tmp_path, "name: x\n", dataclasses.asdict(models.pretrained_meta(cfg)))
    rec = json.loads((tmp_path / "model.json").read_text())
    assert rec["mean"] == 100.0 and rec["licence"] == "cc-by-4.0" and rec["input_size"] == 32
    assert {"tokenizer", "classifier", "head", "preprocessing", "sizes"} <= set(rec)


# ---- hub ids ----

def _no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("spec,repo", [("hf://bogus-org/bogus-model", "bogus-org/bogus-model"),
                                       ("timm://bogus_resnet.x_in1k", "timm/bogus_resnet.x_in1k")])
def test_offline_hub_id_fails_at_once_with_the_fix(tmp_path, monkeypatch, spec, repo):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _no_network(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        models.abstract(ModelConfig(arch="resnet", variant="tiny", source=spec), 3)
    assert time.perf_counter() - start < 5
    msg = str(e.value)
    assert e.value.key == "model.source" and "\n" not in msg
    assert f"hf download {repo}" in msg and "not in the Hugging Face cache" in msg


def test_unresponsive_hub_gives_up_after_a_short_probe(tmp_path, monkeypatch):
    """Online as far as the environment says (no HF_HUB_OFFLINE), but the endpoint never
    answers (a listening socket whose accept queue is full drops further connects): the
    probe's timeout, not a download's, bounds the wait, and the message says what to do."""
    from huggingface_hub import constants
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    queued = [socket.socket() for _ in range(3)]
    for c in queued:
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as e:
            hub.fetch("hf://bogus-org/bogus-model", "model.source", ("model.safetensors",))
    finally:
        for c in [*queued, srv]:
            c.close()
    assert time.perf_counter() - start < hub.PROBE_S + 5
    assert "hub is unreachable" in str(e.value)
    assert "hf download bogus-org/bogus-model" in str(e.value)


def test_cached_hub_id_loads_offline(tmp_path, monkeypatch):
    snap = tmp_path / "models--tiny-org--tiny-vit" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("ab" * 20)
    t = vit_tensors(**VIT)
    save_file(t, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps(vit_config(**VIT)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _no_network(monkeypatch)
    cfg = ModelConfig(arch="vit", variant="auto", source="hf://tiny-org/tiny-vit",
                      keep_head=False, dropout=0.0)
    model = models.build(cfg, 3, 0)
    np.testing.assert_array_equal(np.asarray(model.embeddings.cls_token[...]),
                                  t["embeddings.cls_token"])
    assert models.pretrained_meta(cfg).weights == str(snap / "model.safetensors")
    assert hub.repo_id("timm://resnet50.a1_in1k") == ("timm/resnet50.a1_in1k", None)
    assert hub.repo_id("hf://org/name@v2") == ("org/name", "v2")


# ---- chaining: a finished run as model.source ----

SMOKE = ("experiment=digits_tiny", "debug=smoke", "eval.baselines=false")


@pytest.fixture(scope="module")
def plant_a(tmp_path_factory):
    from ftlab.train import run
    run_dir = tmp_path_factory.mktemp("plant_a")
    run(compose_cfg(*SMOKE), run_dir)
    return run_dir


def test_chained_run_starts_from_the_earlier_runs_best_weights(plant_a):
    from ftlab import runs
    old = runs.load_config(plant_a)
    best, _ = runs.load_model(old, plant_a, 10)
    best = weights(best)
    for keep in (False, True):
        cfg = compose_cfg(*SMOKE, f"model.source={plant_a}", f"model.keep_head={keep}").model
        got = weights(models.build(cfg, 10, seed=123))
        assert got.keys() == best.keys()
        for k in got:
            same = np.array_equal(got[k], best[k])
            assert same or (not keep and k.startswith("head/")), k
        assert keep or not np.array_equal(got["head/layers/0/kernel"],
                                          best["head/layers/0/kernel"])
    meta = models.pretrained_meta(cfg)
    assert meta.chained_from == str(plant_a)
    assert meta.sizes == models.pretrained_meta(old.model).sizes


def test_chaining_checks_architecture_and_classes(plant_a):
    with pytest.raises(ConfigError) as e:
        models.abstract(compose_cfg("experiment=elpv_tiny", f"model.source={plant_a}").model, 2)
    assert e.value.key == "model.source" and "model.arch=bert" in str(e.value)
    cfg = compose_cfg(*SMOKE, f"model.source={plant_a}", "model.keep_head=true").model
    with pytest.raises(ConfigError) as e:
        models.abstract(cfg, 3)
    assert e.value.key == "model.keep_head" and "10 classes" in str(e.value)


def test_plant_b_trains_from_plant_a(plant_a, tmp_path):
    """A second run (frozen backbone, new head) on the first run's checkpoint: its backbone
    ends exactly as run A's best, and the run dir records where it came from."""
    from ftlab import runs
    from ftlab.train import run
    # Another seed: with A's, where A's best checkpoint ends its head-only phase (its backbone
    # still the init), B's run would replay A's exactly and its head end equal too.
    cfg = compose_cfg(*SMOKE, f"model.source={plant_a}", "schedule.groups.top.train_from=null",
                      "schedule.groups.rest.train_from=null", "trainer.seed=1")
    run(cfg, tmp_path)
    a, _ = runs.load_model(runs.load_config(plant_a), plant_a, 10)
    b, _ = runs.load_model(runs.load_config(tmp_path), tmp_path, 10)
    a, b = weights(a), weights(b)
    for k in a:
        assert np.array_equal(a[k], b[k]) != k.startswith("head/"), k
    assert json.loads((tmp_path / "model.json").read_text())["chained_from"] == str(plant_a)
