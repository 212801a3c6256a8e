"""Build the Lambda zip package of the CAI handlers without torch.

``python -m cai_helpers.aws.bundle [--out build/lambda/executor.zip]`` writes one zip
that the template's three functions share: the ``cai_helpers`` package and the binary
wheels the ONNX path needs, for CPython 3.11 on manylinux2014 x86_64, unpacked and
stripped of tests, headers and unused libraries. It prints the unzipped size and
fails when it exceeds Lambda's 250 MB limit for zip packages.

Wheels are fetched once per machine with ``pip download`` into ``build/wheels``.
boto3, botocore and s3transfer are left out because the Lambda Python 3.11 runtime
ships them. AWS picks their version, which is fine because the bundle uses only S3 calls
and the standard retry modes.

The Lambda python3.11 runtime runs on Amazon Linux 2 (glibc 2.26), so wheels must be
manylinux2014 (glibc 2.17). onnxruntime 1.16.3 is the last release with such a wheel
for CPython 3.11, and it is built against the numpy 1.x ABI, hence ``numpy<2``. It
reads ONNX files of IR version <= 9 and opset <= 19 (ONNX 1.14).
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Callable

from cai_helpers.errors import DeploymentError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = REPO_ROOT / "cai_helpers"
DEFAULT_OUT = REPO_ROOT / "build" / "lambda" / "executor.zip"
DEFAULT_WHEEL_CACHE = REPO_ROOT / "build" / "wheels"

# Pinned so that every build of the bundle contains the same binaries.
REQUIREMENTS = (
    ("numpy", "1.26.4"),
    ("onnxruntime", "1.16.3"),
    ("pyarrow", "20.0.0"),
    ("safetensors", "0.8.0"),
)
PIP_PLATFORM = "manylinux2014_x86_64"
PIP_PYTHON_VERSION = "3.11"
PIP_TIMEOUT_S = 600
IN_LAMBDA_RUNTIME = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3")

LAMBDA_UNZIPPED_LIMIT_BYTES = 250 * 2**20  # deployment package, all layers included
MODEL_FILES = ("astromae.onnx", "astromae.int8.onnx", "config.json")
BUNDLED_MODEL_DIR = "cai_model"  # the model's folder inside the zip (option --model-dir)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps make the zip reproducible

DROP_DIR_NAMES = {"tests", "__pycache__", "include"}
DROP_SUFFIXES = (".pyc", ".pyo", ".pyx", ".pxd", ".pxi", ".h", ".hpp", ".cc", ".cpp")
# pyarrow.flight (RPC) is never imported by the handlers.
DROP_PATTERNS = (re.compile(r"^pyarrow/(lib)?(arrow_flight|arrow_python_flight|_flight)[^/]*\.so[.\d]*$"),)
_SONAME = re.compile(r"^(?P<base>.+\.so)(?P<version>(\.\d+)*)$")


@dataclass
class BundleReport:
    """Contents of a built zip: file count, sizes in bytes and the wheels used."""

    path: Path
    unzipped_bytes: int = 0
    zipped_bytes: int = 0
    files: int = 0
    dropped_bytes: int = 0
    wheels: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.path}: {self.files} files, {self.unzipped_bytes / 2**20:.1f} MB unzipped "
                f"(limit {LAMBDA_UNZIPPED_LIMIT_BYTES / 2**20:.0f} MB), {self.zipped_bytes / 2**20:.1f} MB "
                f"zipped; stripped {self.dropped_bytes / 2**20:.1f} MB; wheels: {', '.join(self.wheels)}")


def download_wheels(cache_dir: Path = DEFAULT_WHEEL_CACHE) -> list[Path]:
    """Fetch the pinned wheels into ``cache_dir`` unless they are there; return their paths."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [f"{name}=={version}" for name, version in REQUIREMENTS if not _cached_wheel(cache_dir, name, version)]
    if missing:
        command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
                   "--platform", PIP_PLATFORM, "--python-version", PIP_PYTHON_VERSION,
                   "--implementation", "cp", "--dest", str(cache_dir), *missing]
        log.info("downloading %s into %s", ", ".join(missing), cache_dir)
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if result.returncode != 0:
            raise DeploymentError(
                f"pip download of {missing} failed (exit {result.returncode}); check access to "
                f"PyPI or put the wheels into {cache_dir}. pip output: {result.stderr[-1500:]}"
            )
    wheels = []
    for name, version in REQUIREMENTS:
        wheel = _cached_wheel(cache_dir, name, version)
        if wheel is None:
            raise DeploymentError(f"no {PIP_PLATFORM} wheel of {name}=={version} in {cache_dir}")
        wheels.append(wheel)
    return wheels


def _cached_wheel(cache_dir: Path, name: str, version: str) -> Path | None:
    matches = sorted(cache_dir.glob(f"{name}-{version}-*.whl"))
    return matches[0] if matches else None


def _keep(path: str, names: set[str]) -> bool:
    """Return whether a wheel member is needed at run time."""
    parts = PurePosixPath(path).parts
    if DROP_DIR_NAMES.intersection(parts[:-1]) or path.endswith(DROP_SUFFIXES):
        return False
    if any(pattern.match(path) for pattern in DROP_PATTERNS):
        return False
    # Shared libraries ship as libX.so, libX.so.N and libX.so.N.M.K copies (zip has no
    # symlinks); the loader only opens the SONAME libX.so.N, so drop the other two.
    match = _SONAME.match(path)
    if match and path.startswith("pyarrow/"):
        base, version = match["base"], match["version"]
        if version == "":
            return not any(n.startswith(base + ".") and n[len(base) + 1:].isdigit() for n in names)
        if version.count(".") > 1:
            return (base + "." + version.split(".")[1]) not in names
    return True


def _member_path(name: str) -> str | None:
    """Map a wheel member to its path in the bundle; None for scripts, headers and data."""
    head, _, rest = name.partition("/")
    if head.endswith(".data"):
        kind, _, inner = rest.partition("/")
        return inner if kind in ("purelib", "platlib") else None
    return name


@dataclass(frozen=True)
class _Member:
    """One file of the bundle: its path in the zip, size, mode and a reader of its bytes."""

    arcname: str
    size: int
    mode: int
    read: Callable[[], bytes]


def _wheel_members(source: zipfile.ZipFile, report: BundleReport) -> list[_Member]:
    names = {_member_path(i.filename) or "" for i in source.infolist()}
    members = []
    for info in sorted(source.infolist(), key=lambda i: i.filename):
        target = _member_path(info.filename)
        if info.is_dir() or target is None:
            continue
        if not _keep(target, names):
            report.dropped_bytes += info.file_size
            continue
        mode = ((info.external_attr >> 16) & 0o777 or 0o644) | 0o444
        members.append(_Member(target, info.file_size, mode, partial(source.read, info)))
    return members


def _tree_members(folder: Path, arc_root: str, only: tuple[str, ...] | None = None) -> list[_Member]:
    members = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or not _keep(relative, set()):
            continue
        if only is not None and path.name not in only:
            continue
        members.append(_Member(f"{arc_root}/{relative}", path.stat().st_size, 0o644, path.read_bytes))
    return members


def _write_zip(path: Path, members: list[_Member]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for member in members:
            info = zipfile.ZipInfo(member.arcname, date_time=ZIP_DATE)
            info.external_attr = (0o100000 | member.mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            out.writestr(info, member.read())


def build_bundle(
    out: Path = DEFAULT_OUT,
    *,
    wheel_cache: Path = DEFAULT_WHEEL_CACHE,
    model_dir: Path | None = None,
    limit_bytes: int = LAMBDA_UNZIPPED_LIMIT_BYTES,
) -> BundleReport:
    """Write the Lambda zip to ``out`` and return its report.

    ``model_dir`` adds the model's ONNX files and config.json under ``cai_model/<name>/``
    (at /var/task/cai_model/<name> in Lambda) instead of reading them from S3.
    Raises DeploymentError, before writing anything, when the unzipped size would
    exceed ``limit_bytes``.
    """
    wheels = download_wheels(wheel_cache)
    report = BundleReport(path=out, wheels=[w.name for w in wheels])
    with ExitStack() as stack:
        members = _tree_members(PACKAGE_DIR, "cai_helpers")
        for wheel in wheels:
            members += _wheel_members(stack.enter_context(zipfile.ZipFile(wheel)), report)
        if model_dir is not None:
            model_dir = Path(model_dir)
            if not any((model_dir / name).is_file() for name in MODEL_FILES[:2]):
                raise DeploymentError(
                    f"no astromae.onnx or astromae.int8.onnx in {model_dir}; export the model "
                    "with cai_helpers.export.export_onnx first"
                )
            members += _tree_members(model_dir, f"{BUNDLED_MODEL_DIR}/{model_dir.name}", only=MODEL_FILES)

        report.files = len(members)
        report.unzipped_bytes = sum(m.size for m in members)
        if report.unzipped_bytes > limit_bytes:
            raise DeploymentError(
                f"the Lambda bundle would be {report.unzipped_bytes / 2**20:.1f} MB unzipped, over the "
                f"{limit_bytes / 2**20:.0f} MB limit of zip packages; leave the model out (it is read "
                "from S3) or use the container image route (deploy/Dockerfile)"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        partial_path = out.with_suffix(".zip.partial")
        _write_zip(partial_path, members)
        partial_path.replace(out)
    report.zipped_bytes = out.stat().st_size
    log.debug("%s", report.describe())
    return report


def main(argv: list[str] | None = None) -> int:
    """Build the bundle from the command line and print its size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="zip file to write")
    parser.add_argument("--wheel-cache", type=Path, default=DEFAULT_WHEEL_CACHE,
                        help="folder that caches the downloaded wheels")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="also pack this model folder's ONNX files into the zip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = build_bundle(args.out, wheel_cache=args.wheel_cache, model_dir=args.model_dir)
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.describe())
    print(f"not bundled (in the Lambda runtime): {', '.join(IN_LAMBDA_RUNTIME)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
