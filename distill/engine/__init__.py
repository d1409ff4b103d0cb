"""Training: the step (``step``, the file to read first), the loop around it (``loop``), what
they are built from (``build``, ``accelerator``), resumable state (``checkpoint``) and stopping on a
signal (``signals``).
"""
