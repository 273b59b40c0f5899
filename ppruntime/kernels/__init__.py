"""Triton kernels of the GPU path (each tested against its torch reference).

Importing a kernel module imports triton; set TRITON_INTERPRET=1 before that import to
run the kernels interpreted on CPU tensors (the tests do). The layer kernels (rms_norm,
rotary, activation) compute in float32 and store in their input's dtype; their reference
is ppruntime.model.layer_ops.TorchLayerOps.
"""
