"""Running quantized models fast: lowbit's decode engine (:mod:`lowbit.runtime.native_lm`) and streaming
generation (:mod:`lowbit.runtime.generate`)."""
