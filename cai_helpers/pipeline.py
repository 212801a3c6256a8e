"""The main job: execute the notebooks headless through papermill, in order.

``make run`` calls ``python -m cai_helpers``, which runs :data:`NOTEBOOK_STEPS`: prepare
the real-galaxy data set (01), load the shipped AstroMAE model and export ONNX (02), then
partition, fan out over all local cores and summarize (04). Executed copies go to
``runs/notebooks/``; each step may write a JSON of key results beside its copy. The
table below is the one place that lists the notebooks and their parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cai_helpers.errors import InvalidParameterError, NotebookFailedError
from cai_helpers.logs import setup_logging

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
DEFAULT_OUT_DIR = Path("runs") / "notebooks"
KERNEL_NAME = "python3"
STORE = "data/store"
DATASET_PREFIX = "datasets/sdss-rendered"  # written by notebook 01
MODEL_DIR = "data/models/astromae"
FANOUT_STEP = "04"  # the step whose parameters are a fan-out run's settings


@dataclass(frozen=True)
class NotebookStep:
    """One notebook of the main job, its papermill parameters and its results file.

    ``results_parameter`` names the notebook parameter that receives the path of the
    results JSON beside the executed copy (None when the notebook writes none).
    """

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    results_parameter: str | None = "results_path"

    @property
    def key(self) -> str:
        """Short id used on the command line: the leading number ("04")."""
        return self.name.split("_", 1)[0]


NOTEBOOK_STEPS: tuple[NotebookStep, ...] = (
    NotebookStep("01_prepare_data.ipynb", {"store_location": STORE, "dataset_prefix": DATASET_PREFIX}),
    NotebookStep("02_astromae.ipynb", {"mode": "load", "model_dir": MODEL_DIR, "onnx_dir": MODEL_DIR, "n_eval": 0}),
    NotebookStep("04_lambda_fanout.ipynb", {
        "backend": "local", "store": STORE, "dataset_prefix": DATASET_PREFIX, "partition_mb": 25,
        "data_size_mb": None, "batch_size": 256, "runtime": "onnx", "max_concurrency": None,
        "model_dir": MODEL_DIR,
    }),
)


def results_path(out_dir: Path, step: NotebookStep) -> Path:
    """Return where ``step`` writes its key results: ``<out_dir>/<name>.results.json``."""
    return out_dir / (Path(step.name).stem + ".results.json")


def execute_step(step: NotebookStep, out_dir: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Execute one notebook with papermill into ``out_dir``; return the executed copy."""
    import papermill

    source = NOTEBOOK_DIR / step.name
    if not source.is_file():
        raise InvalidParameterError(
            f"notebook {source} not found; add it or drop step {step.key!r} (--notebooks)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = {**step.parameters, **(overrides or {})}
    if step.results_parameter:
        parameters[step.results_parameter] = str(results_path(out_dir, step))

    started = time.perf_counter()
    log.info("executing %s with %s", step.name, parameters)
    try:
        papermill.execute_notebook(str(source), str(out_dir / step.name), parameters=parameters,
                                   kernel_name=KERNEL_NAME, cwd=str(ROOT))
    except papermill.PapermillExecutionError as exc:
        raise NotebookFailedError(
            f"{step.name} failed in cell {exc.exec_count} with {exc.ename}: {exc.evalue}; "
            f"the executed copy {out_dir / step.name} shows the traceback"
        ) from exc
    log.info("executed %s in %.1f s", step.name, time.perf_counter() - started)
    return out_dir / step.name


def notebook_parameters(step: NotebookStep) -> set[str]:
    """Return the names the notebook's ``parameters`` cell declares."""
    import papermill

    return set(papermill.inspect_notebook(str(NOTEBOOK_DIR / step.name)))


def check_parameters(steps: Sequence[NotebookStep], overrides: dict[str, dict[str, Any]]) -> None:
    """Reject, before anything runs, parameters a notebook does not declare and invalid run settings.

    papermill only warns about an unknown parameter and runs on with the default, so a
    misspelt ``-p 04.batchsize=8`` would silently run at batch 512.
    """
    known_steps = {s.key: s for s in NOTEBOOK_STEPS}
    for key, values in overrides.items():
        if key not in known_steps:
            raise InvalidParameterError(f"unknown notebook step {key!r} in -p {key}.NAME=VALUE; known steps: {sorted(known_steps)}")
        declared = notebook_parameters(known_steps[key])
        unknown = sorted(set(values) - declared)
        if unknown:
            raise InvalidParameterError(
                f"notebook {known_steps[key].name} has no parameter {', '.join(unknown)}; "
                f"its parameters are: {', '.join(sorted(declared))}"
            )
    for step in steps:
        if step.key == FANOUT_STEP:
            _check_run_parameters({**step.parameters, **overrides.get(step.key, {})})


def _check_run_parameters(parameters: dict[str, Any]) -> None:
    """Validate the fan-out step's run settings the way notebook 04 will build them."""
    from dataclasses import fields

    from cai_helpers.runconfig import RunParams

    names = {f.name for f in fields(RunParams)} - {"extra"}
    RunParams(**{k: v for k, v in parameters.items() if k in names}).validate()


def run_pipeline(
    steps: Sequence[NotebookStep] = NOTEBOOK_STEPS,
    *,
    out_dir: str | Path = DEFAULT_OUT_DIR,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Execute ``steps`` in order; return the executed paths and the results they recorded.

    ``overrides`` maps a step key ("04") to parameters that replace the table's.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_absolute():
        out_dir = ROOT / out_dir
    executed: dict[str, str] = {}
    results: dict[str, Any] = {}
    for step in steps:
        executed[step.key] = str(execute_step(step, out_dir, (overrides or {}).get(step.key)))
        path = results_path(out_dir, step)
        if step.results_parameter and path.is_file():
            results[step.key] = json.loads(path.read_text())
    return {"out_dir": str(out_dir), "executed": executed, "results": results}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Parse ``STEP.NAME=VALUE`` pairs (VALUE as JSON, else a string) into overrides."""
    overrides: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        step, dot, parameter = name.partition(".")
        if not sep or not dot or not parameter:
            raise InvalidParameterError(f"invalid parameter {pair!r}: use STEP.NAME=VALUE, e.g. 04.partition_mb=100")
        overrides.setdefault(step, {})[parameter] = _parse_value(value)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``make run``: run the main job and print where its outputs are."""
    parser = argparse.ArgumentParser(prog="python -m cai_helpers", description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", default=",".join(s.key for s in NOTEBOOK_STEPS),
                        help="comma-separated step keys to run, in table order (default: all)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help="folder for executed notebooks")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="STEP.NAME=VALUE",
                        help="override a notebook parameter, VALUE as JSON (e.g. -p 04.partition_mb=100)")
    args = parser.parse_args(argv)
    setup_logging()

    requested = [key.strip() for key in args.notebooks.split(",") if key.strip()]
    unknown = sorted(set(requested) - {s.key for s in NOTEBOOK_STEPS})
    if unknown:
        parser.error(f"unknown notebook step(s) {unknown}; known: {[s.key for s in NOTEBOOK_STEPS]}")
    steps = [s for s in NOTEBOOK_STEPS if s.key in requested]
    try:
        overrides = parse_overrides(args.parameter)
        check_parameters(steps, overrides)
        outcome = run_pipeline(steps, out_dir=args.out_dir, overrides=overrides)
    except InvalidParameterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NotebookFailedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print("executed notebooks:")
    for key, path in outcome["executed"].items():
        print(f"  {key}  {path}")
    fanout = outcome["results"].get("04", {})
    for label in ("catalog", "summary"):
        if fanout.get(label):
            print(f"{label}: {fanout[label]}")
    return 0
