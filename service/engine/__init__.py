"""The engine: everything between a decoded request and ONNX Runtime.

Data plane, validation, batching, sessions, the model repository, statistics and metrics.
"""
