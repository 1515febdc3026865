"""The in-memory form of a dataset: ids, labels, raw inputs and extra columns."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Examples:
    ids: np.ndarray  # str, unique per sample
    labels: np.ndarray  # int
    class_names: list[str]
    texts: list[str] | None = None  # to tokenize with the model's tokenizer
    arrays: dict[str, np.ndarray] | None = None  # ready model inputs (input_ids, image, ...)
    columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # other labels
    column_classes: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # int columns' names

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray) -> "Examples":
        pick = lambda d: None if d is None else {k: v[idx] for k, v in d.items()}
        return Examples(self.ids[idx], self.labels[idx], self.class_names,
                        texts=None if self.texts is None else [self.texts[i] for i in idx],
                        arrays=pick(self.arrays), columns=pick(self.columns),
                        column_classes=self.column_classes)


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W) greyscale -> (N, size, size, 3) RGB, antialiased bilinear (Pillow)."""
    from PIL import Image
    out = np.empty((len(images), size, size), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
    return np.repeat(out[..., None], 3, axis=-1)
