"""Classification metrics on the host (scikit-learn)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, recall_score

from ftlab.step import weighted_xent


def classification(logits: np.ndarray, labels: np.ndarray,
                   class_names: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1, loss and each class's recall (`recall/<class>`)."""
    pred = logits.argmax(-1)
    ids = np.arange(len(class_names))
    loss = float(weighted_xent(logits, labels, np.ones(len(labels), np.float32)))
    recall = recall_score(labels, pred, labels=ids, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(labels, pred)),
            "macro_f1": float(f1_score(labels, pred, average="macro", labels=ids,
                                       zero_division=0)),
            "loss": loss,
            **{f"recall/{name}": float(r) for name, r in zip(class_names, recall)}}
