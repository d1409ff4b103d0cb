"""``distill report``: the models compared (``model``), read and evaluated (``collect``), and
shown in one HTML page (``html``) with its figures (``figures``, ``detections``).
"""
