"""Evaluate an AstroMAE model on rendered test-split galaxies beside the kNN baseline.

Used by ``notebooks/02_astromae.ipynb``: it renders the first ``n_eval`` test galaxies
(realisation 0), predicts their redshift with the model and with a kNN fitted on the
catalog's training split, and returns predictions and metrics of both.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cai_helpers.baseline import fit_knn, predict_knn
from cai_helpers.checkpoint import load_model
from cai_helpers.errors import InvalidParameterError
from cai_helpers.mae import MAE_FILE, MAEPretrainer, load_mae
from cai_helpers.metrics import normalized_residuals, photoz_metrics
from cai_helpers.model import AstroMAE
from cai_helpers.train import TrainConfig, predict, train
from cai_helpers.train_data import SPLIT_TEST, SPLIT_TRAIN, render_split, split_codes

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Predictions and metrics on one set of test galaxies."""

    object_id: np.ndarray
    z_true: np.ndarray
    z_pred: np.ndarray
    z_knn: np.ndarray
    images: torch.Tensor  # [N, C, 32, 32] nanomaggies per pixel
    magnitudes: torch.Tensor  # [N, 5] AB mag
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def residuals(self) -> dict[str, np.ndarray]:
        """Return dz per model, for :func:`cai_helpers.plots_model.plot_residuals`."""
        return {"AstroMAE": normalized_residuals(self.z_pred, self.z_true),
                "kNN (r + colours)": normalized_residuals(self.z_knn, self.z_true)}

    def summary(self) -> dict[str, Any]:
        return {"n": int(len(self.z_true)), **self.metrics}


def knn_on_catalog_split(magnitudes: np.ndarray, split_seed: int = 42) -> np.ndarray:
    """Predict with the kNN baseline fitted on the catalog's training split."""
    from cai_helpers.catalog import MAG_COLUMNS, load_catalog

    catalog = load_catalog()
    train = split_codes(catalog["object_id"].to_numpy(), split_seed) == SPLIT_TRAIN
    model = fit_knn(catalog.loc[train, list(MAG_COLUMNS)].to_numpy(),
                    catalog.loc[train, "z"].to_numpy())
    return predict_knn(model, magnitudes)


def evaluate_on_test_split(model: AstroMAE, n_eval: int = 0, *, render_seed: int = 42,
                           split_seed: int = 42, workers: int = 1) -> Evaluation:
    """Render ``n_eval`` test galaxies (0 = all) and evaluate the model and the kNN."""
    data = render_split(SPLIT_TEST, n_eval, render_seed=render_seed, split_seed=split_seed,
                        crop=model.config.img_size, workers=workers)
    z_true = data["redshift"].numpy()
    evaluation = Evaluation(
        object_id=data["object_id"].numpy(), z_true=z_true,
        z_pred=predict(model, data["images"], data["magnitudes"]),
        z_knn=knn_on_catalog_split(data["magnitudes"].numpy(), split_seed),
        images=data["images"], magnitudes=data["magnitudes"])
    evaluation.metrics = {"astromae": photoz_metrics(evaluation.z_pred, z_true),
                          "knn_baseline": photoz_metrics(evaluation.z_knn, z_true)}
    logger.info("evaluated %d test galaxies: sigma_nmad %.4f (kNN %.4f)", len(z_true),
                evaluation.metrics["astromae"]["sigma_nmad"],
                evaluation.metrics["knn_baseline"]["sigma_nmad"])
    return evaluation


MODES = ("load", "finetune", "pretrain_finetune")


def prepare_model(mode: str, model_dir: str | Path, train_config: TrainConfig
                  ) -> tuple[AstroMAE, dict[str, list[dict[str, Any]] | None],
                             MAEPretrainer | None]:
    """Load the shipped model or train one, as the notebook's ``mode`` requests.

    - "load": the model in ``model_dir`` and the epoch histories of its training.json;
    - "finetune": new heads on the encoder of ``model_dir``;
    - "pretrain_finetune": MAE pretraining, then fine-tuning, from scratch.

    Returns the model, the histories per phase and an MAE (encoder + decoder) for
    reconstructions, or None where no decoder weights exist.
    """
    if mode not in MODES:
        raise InvalidParameterError(f"mode {mode!r} must be one of {MODES}")
    model_dir = Path(model_dir)
    if mode == "load":
        model = load_model(model_dir)
        record = json.loads((model_dir / "training.json").read_text())
    else:
        stages = "all" if mode == "pretrain_finetune" else "finetune"
        if mode == "finetune":
            train_config.init_model = str(model_dir)
        record = train(train_config, stages)
        model = load_model(Path(train_config.out_dir) / "model")
    histories = {phase: (record.get(phase) or {}).get("history")
                 for phase in ("pretrain", "finetune")}

    mae_dir = Path(train_config.out_dir) / "mae" if mode == "pretrain_finetune" \
        else model_dir / "mae"
    mae = None
    if (mae_dir / MAE_FILE).is_file():
        mae = load_mae(mae_dir, encoder_state=model.encoder.state_dict())
    else:
        logger.warning("no MAE decoder in %s; reconstructions are skipped", mae_dir)
    return model, histories, mae
