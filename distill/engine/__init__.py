"""Training: the step (``step``, the file to read first), the loop around it (``loop``), the
run it loops over (``setup``), what that is built from (``build``, ``accelerator``), resumable
state (``checkpoint``) and stopping on a signal (``signals``).
"""
