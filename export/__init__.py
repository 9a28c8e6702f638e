"""PyTorch to ONNX: classifier and dense (fully convolutional) variants, with metadata."""
