"""FMI: MPI-style message passing for serverless workers over direct TCP, Redis or object storage.

``Communicator`` is the entry point; ``UserOp`` declares a custom reduction;
``allreduce_run_figures`` is the one-call helper the executor uses to sum per-worker
figures. The rendezvous server of the direct channel is ``python -m
cai_helpers.fmi.rendezvous`` and the benchmark ``python -m cai_helpers.fmi.bench``.
"""

from cai_helpers.fmi.communicator import Communicator
from cai_helpers.fmi.config import FMIConfig, load_config
from cai_helpers.fmi.figures import allreduce_run_figures
from cai_helpers.fmi.ops import UserOp

__all__ = ["Communicator", "FMIConfig", "UserOp", "allreduce_run_figures", "load_config"]
