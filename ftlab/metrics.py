"""Classification metrics on the host (scikit-learn)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from ftlab.step import weighted_xent


def classification(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    pred = logits.argmax(-1)
    loss = float(weighted_xent(logits, labels, np.ones(len(labels), np.float32), 0.0))
    return {"accuracy": float(accuracy_score(labels, pred)),
            "macro_f1": float(f1_score(labels, pred, average="macro",
                                       labels=np.arange(num_classes), zero_division=0)),
            "loss": loss}
