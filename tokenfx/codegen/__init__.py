"""Codegen: the tokenfx::* custom ops (fake, CPU, CUDA/Triton, ONNX) and kernel emission."""
