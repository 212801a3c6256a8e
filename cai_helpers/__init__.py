"""CAI helpers: data, AstroMAE, partitioning, inference, fan-out and FMI for the notebooks.

The notebooks under ``notebooks/`` stay thin and call into this package, which Lambda
handlers import too. Submodules are imported on demand, so that a torch-free worker can
import ``cai_helpers`` without pulling in torch.
"""

__version__ = "0.1.0"
