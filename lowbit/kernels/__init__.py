"""Fast CPU paths behind the quantized modules, chosen by one explicit table.

``use_kernels(model)`` gives every quantized module the first kernel of ``KERNELS`` that can run it (and
says why the others cannot); modules no kernel fits keep the reference path (``reference.py``: dequantize,
then the float op), which is also the oracle every kernel is tested against. ``release_kernels(model)``
undoes it. Kernels are a per-instance attribute, like ``lowbit.nn.cached_weights``: nothing changes for
the class, for other models, or in what ``lowbit.save`` writes.
"""

from lowbit.kernels.dispatch import KERNELS, Kernel, KernelReport, kernel_name, release_kernels, use_kernels

__all__ = ["KERNELS", "Kernel", "KernelReport", "use_kernels", "release_kernels", "kernel_name"]
