"""The models: the split forward over torchvision's RetinaNet parts and its detection loss
(``retinanet``), the one trainable module (``trainable``), weights files and names (``weights``),
the card beside every weights file (``card``) and what weights were trained with (``provenance``).
"""
