"""A trained model outside training: rebuilt from its card (``rebuild``), run on a user's images
(``predict``), exported to ONNX (``export``) and run with ONNX Runtime (``onnx_runtime``).
"""
