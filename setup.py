"""The packages of the distribution, the one thing pyproject.toml cannot say here.

``configs/`` (the recipes ``distill demo`` and users run) and ``results/bench_kd.json`` (the
benchmark the demo quotes) stay at the top of the repository, where ``distill run
configs/shapes/distill.yaml`` and their relative ``_base_`` paths want them, and are shipped
inside the package as ``distill/configs`` and ``distill/results``: ``package_dir`` maps those
two package names onto the top-level folders. pyproject.toml's ``packages.find`` cannot add a
mapped package to the ones it finds, and listing every package there by hand would silently
leave out the next one; so they are found here and the two mapped ones added.
``distill.shipped.shipped_path`` reads them in the package (wheel, ``pip install .``) or beside
it (a clone, ``pip install -e .``).
"""

from setuptools import find_namespace_packages, setup

SHIPPED = {"distill.configs": "configs", "distill.results": "results"}

setup(
    packages=[
        *find_namespace_packages(include=["distill*", "teachers*", "students*"]),
        *SHIPPED,
    ],
    package_dir=SHIPPED,
    package_data={"distill.configs": ["**/*.yaml"], "distill.results": ["bench_kd.json"]},
)
