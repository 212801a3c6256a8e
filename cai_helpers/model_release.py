"""Package a finished training run as the shipped model folder ``data/models/astromae``.

Writes ``model.safetensors`` (float16) + ``config.json``, ``mae/`` (the MAE decoder in
float16, for reconstructions), ``training.json`` (train config, epoch histories and the
commands that reproduce the run) and ``metrics.json``: test-split photo-z metrics of the
shipped weights and of the kNN baseline on the same galaxies, plus the ONNX float32 and
int8 parity (|dz| p50/p99/max against torch) on the test cutouts.

Run ``python -m cai_helpers.model_release RUN_DIR [MODEL_DIR]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cai_helpers.baseline import knn_baseline
from cai_helpers.checkpoint import load_model, save_model
from cai_helpers.export import export_all, onnx_parity, onnx_session, predict_onnx
from cai_helpers.mae import load_mae, save_mae
from cai_helpers.metrics import photoz_metrics
from cai_helpers.train import predict
from cai_helpers.train_data import TrainArrays

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "models" / "astromae"
# test-split figures of the authors' model on the real SDSS cutouts (arXiv:2409.01825)
PUBLISHED_TEST = {"mse": 0.00053, "mae": 0.01520}


def _unique_training_galaxies(arrays: TrainArrays, realisations: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    n = arrays.train_mags.shape[0] // realisations  # rows repeat once per realisation
    return arrays.train_mags[:n], arrays.train_z[:n]


def train_command(cfg: dict[str, Any]) -> str:
    """Return the ``python -m cai_helpers.train all`` command line for a config dict."""
    flags = []
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value != "":
            flags.append(f"{flag} {value}")
    return "python -m cai_helpers.train all " + " ".join(flags)


def release(run_dir: str | Path, model_dir: str | Path = DEFAULT_MODEL_DIR,
            command: str = "") -> dict[str, Any]:
    """Ship the run in ``run_dir`` to ``model_dir``; returns the metrics dictionary."""
    run_dir, model_dir = Path(run_dir), Path(model_dir)
    result = json.loads((run_dir / "result.json").read_text())
    cfg = result["config"]

    # weights: float16 copy, evaluated as shipped
    trained = load_model(run_dir / "model")
    save_model(trained, model_dir, dtype=torch.float16, extra={"train_config": cfg})
    shipped = load_model(model_dir)
    save_mae(load_mae(run_dir / "mae"), model_dir / "mae", dtype=torch.float16,
             decoder_only=True)

    # photo-z metrics on the test split, and the baseline on the same galaxies
    arrays = TrainArrays.load(run_dir / "arrays.safetensors")
    z_true = arrays.test_z.numpy()
    z_pred = predict(shipped, arrays.test_images, arrays.test_mags)
    train_mags, train_z = _unique_training_galaxies(arrays, cfg["realisations"])
    metrics: dict[str, Any] = {
        "test_split": {"n": int(len(z_true)), "split_seed": cfg["split_seed"],
                       "render_seed": cfg["render_seed"], "realisation": 0,
                       "note": "rendered cutouts of real SDSS galaxies (cai_helpers.render)"},
        "astromae": photoz_metrics(z_pred, z_true),
        "knn_baseline": knn_baseline(train_mags, train_z, arrays.test_mags, z_true),
        "published_astromae_real_sdss": PUBLISHED_TEST,
    }

    # ONNX parity on the same cutouts
    onnx_paths = export_all(shipped, run_dir / "onnx")
    for kind, path in onnx_paths.items():
        metrics[f"onnx_{kind}_parity_dz"] = onnx_parity(shipped, path, arrays.test_images,
                                                        arrays.test_mags)
    z_int8 = predict_onnx(onnx_session(onnx_paths["int8"]), arrays.test_images.numpy(),
                          arrays.test_mags.numpy())
    metrics["onnx_int8"] = photoz_metrics(z_int8, z_true)

    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    training = {"train_config": cfg, "pretrain": result.get("pretrain"),
                "finetune": result.get("finetune"),
                "commands": [command or train_command(cfg),
                             f"python -m cai_helpers.model_release {run_dir} {model_dir}"]}
    (model_dir / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    logger.info("released %s: sigma_nmad %.4f (kNN %.4f)", model_dir,
                metrics["astromae"]["sigma_nmad"], metrics["knn_baseline"]["sigma_nmad"])
    np.save(run_dir / "test_predictions.npy", np.stack([z_true, z_pred]))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cai_helpers.model_release",
                                     description="Ship a training run as the model folder.")
    parser.add_argument("run_dir", help="out_dir of python -m cai_helpers.train")
    parser.add_argument("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--command", default="", help="training command to record")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    release(args.run_dir, args.model_dir, args.command)


if __name__ == "__main__":
    main()
