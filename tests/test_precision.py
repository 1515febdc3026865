"""bf16 compute (model.compute_dtype) the cheaper dropout and GELU: same model, same math within
bf16 tolerance, params kept in f32, and the bf16 matmuls really in the compiled program."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import compose_cfg
from ftlab.models import bert, efficientnet
from ftlab.models.dropout import Dropout, keep_mask
from ftlab.models.gelu import gelu
from ftlab.models.precision import set_compute_dtype
from ftlab.schema import ConfigError
from ftlab.train import build_model

RNG = np.random.default_rng(0)
CASES = {
    "bert": (lambda: bert.BertClassifier(bert.VARIANTS["tiny"], 3, rngs=nnx.Rngs(0)),
             {"input_ids": jnp.asarray(RNG.integers(1, 60, (4, 16))),
              "attention_mask": jnp.ones((4, 16), jnp.int32)}),
    "efficientnet": (lambda: efficientnet.EfficientNetLite(
        efficientnet.VARIANTS["tiny"], 3, mean=127.0, std=128.0, rngs=nnx.Rngs(0)),
        {"image": jnp.asarray(RNG.integers(0, 255, (4, 32, 32, 3)), jnp.uint8)}),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_bf16_compute_matches_fp32_and_keeps_f32_params(arch):
    build, batch = CASES[arch]
    ref, low = build(), build()
    set_compute_dtype(low, "bfloat16")
    loss = lambda m: (m.forward(batch) ** 2).mean()
    grad = nnx.jit(nnx.value_and_grad(loss))
    (la, ga), (lb, gb) = grad(ref), grad(low)
    assert abs(float(la - lb)) <= 0.02 * abs(float(la)) + 1e-4
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert y.dtype == jnp.float32
        if float(jnp.linalg.norm(x)) > 1e-6:  # same direction, bf16 rounding aside
            cos = float(jnp.vdot(x, y) / (jnp.linalg.norm(x) * jnp.linalg.norm(y)))
            assert cos > 0.98, cos
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(low, nnx.Param)))
    def hlo(m):
        return jax.jit(lambda s: nnx.merge(nnx.graphdef(m), s).forward(batch)).lower(
            nnx.state(m)).as_text()
    # bf16 operands in the program (tensor<4x16x32xbf16>), none in fp32's.
    assert "xbf16>" in hlo(low) and "xbf16>" not in hlo(ref)


def _dot_operand_dtypes(compiled_text: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in an optimized HLO module."""
    dtype = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", compiled_text))
    return [(dtype[a], dtype[b]) for a, b in
            re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", compiled_text)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_matmul_of_a_bert_layer_step_is_a_dot_in_the_compute_dtype(dtype):
    # XLA:CPU runs a bf16 dot whose operand layout its kernels do not take in f32 (both
    # operands converted): the weight and attention gradients did, at half bf16's speed.
    size = bert.VARIANTS["tiny"]
    layer = bert.Layer(size, 0.0, 0.0, nnx.Rngs(0))
    set_compute_dtype(layer, dtype)
    x = jnp.asarray(RNG.standard_normal((4, 16, size.hidden)), jnp.float32)
    bias = jnp.zeros((4, 1, 1, 16), jnp.float32)
    graphdef, params = nnx.split(layer)
    loss = lambda p, x: (nnx.merge(graphdef, p)(x, bias) ** 2).sum()
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    dots = _dot_operand_dtypes(text)
    # 8 matmuls (6 dense, 2 in attention), each a forward product and two backward ones.
    want = "bf16" if dtype == "bfloat16" else "f32"
    assert len(dots) == 24 and all(d == (want, want) for d in dots), dots


def test_compute_dtype_from_config_and_bad_value_named():
    cfg = compose_cfg("experiment=digits_tiny", "model.compute_dtype=bfloat16")
    model = build_model(cfg, 10, abstract=True)
    assert any(getattr(m, "dot_general", None) is not None and
               m.dot_general.__name__ == "_linear_dot" for _, m in nnx.iter_modules(model))
    with pytest.raises(ConfigError) as e:
        build_model(compose_cfg("experiment=digits_tiny", "model.compute_dtype=fp8"), 10)
    assert e.value.key == "model.compute_dtype"


def test_dropout_rate_scale_determinism_and_gradient():
    d = Dropout(0.1, deterministic=False, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((64, 128, 384))
    y = d(x, rngs=jax.random.key(3))
    assert abs(float((y > 0).mean()) - 0.9) < 0.002
    assert float(y.max()) == pytest.approx(1 / 0.9)
    assert bool((d(x, rngs=jax.random.key(3)) == y).all())
    assert not bool((d(x, rngs=jax.random.key(4)) == y).all())
    g = jax.grad(lambda v: d(v, rngs=jax.random.key(3)).sum())(x)
    assert bool(((g > 0) == (y > 0)).all())
    assert bool((Dropout(0.1, deterministic=True)(x) == x).all())


def test_dropout_masks_are_independent_across_keys_elements_and_rows():
    # The mask is a keyed hash of the element index: what threefry would give must hold.
    shape, rate = (32, 12, 128, 128), 0.1
    masks = [keep_mask(jax.random.key(s), shape, rate).astype(jnp.float32) for s in (0, 1)]
    a, b = (m.ravel() - 0.9 for m in masks)
    corr = lambda u, v: float((u * v).mean() / 0.09)  # 0.09: a keep indicator's variance
    n = a.size  # ~6.3M draws: an independent pair's correlation is ~N(0, 1/n), 4e-4
    assert abs(float(masks[0].mean()) - 0.9) < 5 / (n ** 0.5 * 3.3)
    assert abs(corr(a, b)) < 2e-3  # two keys
    assert abs(corr(a[1:], a[:-1])) < 2e-3  # neighbours (the two halves of one hash)
    assert abs(corr(a[128:], a[:-128])) < 2e-3  # the next row
    rows = masks[0].reshape(-1, 128).mean(1)  # per-row rates spread as binomial ones do
    assert abs(float(rows.std()) - (0.09 / 128) ** 0.5) < 0.002
    # Nearby keys (a stream's successive draws) give unrelated masks too.
    keys = jax.random.split(jax.random.key(7), 4)
    ms = [keep_mask(k, (4096, 384), rate).astype(jnp.float32).ravel() - 0.9 for k in keys]
    assert max(abs(corr(ms[i], ms[j])) for i in range(4) for j in range(i)) < 5e-3


def test_gelu_matches_exact_gelu_and_its_gradient_keeps_only_the_input():
    x = jnp.asarray(np.concatenate([np.linspace(-12, 12, 4001), RNG.standard_normal(4000) * 3]),
                    jnp.float32)
    ref = lambda v: jax.nn.gelu(v, approximate=False)
    np.testing.assert_allclose(gelu(x), ref(x), atol=2e-6, rtol=2e-6)
    g = jnp.asarray(RNG.standard_normal(x.shape), jnp.float32)
    grad = lambda f: jax.grad(lambda v: (f(v) * g).sum())(x)
    np.testing.assert_allclose(grad(gelu), grad(ref), atol=4e-6, rtol=4e-6)
    # The hand-written backward: what autodiff saves for it is the input alone.
    _, residuals = jax.vjp(gelu, x)
    saved = [a for a in jax.tree.leaves(residuals) if getattr(a, "shape", ()) == x.shape]
    assert len(saved) == 1 and bool((saved[0] == x).all())
    assert bert.ACTS["gelu"] is gelu
