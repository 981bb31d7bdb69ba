"""Fast CPU paths behind the quantized modules, chosen by one explicit table.

``use_kernels(model)`` gives every quantized module the first kernel of ``KERNELS`` that can run it (and
says why the others cannot); modules no kernel fits keep the reference path (``reference.py``: dequantize,
then the float op), which is also the oracle every kernel is tested against. ``release_kernels(model)``
undoes it. Kernels are a per-instance attribute, like ``lowbit.nn.cached_weights``: nothing changes for
the class, for other models, or in what ``lowbit.save`` writes.

For CNNs, ``int8_conv_graph(model)`` (after ``use_kernels``) returns a traced copy whose int8 convolutions
run as chains: BatchNorm folded, activations fused, uint8 codes passed from one convolution to the next, and
residual adds summed by the convolution before them (on codes where the residual stream allows).
"""

from lowbit.kernels.dispatch import KERNELS, Kernel, KernelReport, kernel_name, release_kernels, use_kernels
from lowbit.kernels.conv_graph import ConvGraphReport, int8_conv_graph

__all__ = ["KERNELS", "Kernel", "KernelReport", "use_kernels", "release_kernels", "kernel_name", "int8_conv_graph",
           "ConvGraphReport"]
