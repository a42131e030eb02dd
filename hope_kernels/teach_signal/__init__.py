"""``teach_signal``: cross-entropy of ``hidden @ weight^T`` and its gradient w.r.t. ``hidden``."""
from hope_kernels.teach_signal.interface import OP, TeachSignalCall, teach_signal
from hope_kernels.teach_signal.naive import teach_signal_naive

__all__ = ["teach_signal", "teach_signal_naive", "TeachSignalCall", "OP"]
