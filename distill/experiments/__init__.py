"""Runs of many models: grids trained in lockstep (``sweep``), the end-to-end demo (``demo``),
the goals a measured run is held to (``goals``) and the machine it ran on (``machine``).
"""
