"""The run configuration: YAML files -> frozen dataclasses.

- ``schema``: one dataclass per section, and the names and ranges its keys accept
- ``load``: reading a file (and the files it inherits from), ``--set`` overrides, writing
- ``resume``: what a resumed run may change

    cfg = load_config("configs/shapes/distill.yaml", ["distill.logit.temperature=2"])
    cfg.distill.logit.temperature  # 2.0
"""

from distill.config.load import (
    check_values,
    dump_config,
    flatten,
    from_dict,
    load_config,
    override,
    parse_value,
    read_config,
    read_yaml_mapping,
    replace,
    to_dict,
    value_text,
)
from distill.config.resume import RESUME_MAY_CHANGE, check_resume_config
from distill.config.schema import (
    ANCHOR_PRESETS,
    KD_WEIGHT_KEYS,
    LEVEL_NAMES,
    NON_NEGATIVE,
    POSITIVE,
    TORCHVISION_ANCHORS,
    WEIGHTS_SETTINGS,
    AnchorConfig,
    BoxKDConfig,
    Config,
    ConfigError,
    CrossKDConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    FeatureKDConfig,
    LogitKDConfig,
    OutputConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    choices,
    register_choices,
    resize_bounds,
)

__all__ = [
    "ANCHOR_PRESETS",
    "KD_WEIGHT_KEYS",
    "LEVEL_NAMES",
    "NON_NEGATIVE",
    "POSITIVE",
    "RESUME_MAY_CHANGE",
    "TORCHVISION_ANCHORS",
    "WEIGHTS_SETTINGS",
    "AnchorConfig",
    "BoxKDConfig",
    "Config",
    "ConfigError",
    "CrossKDConfig",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "FeatureKDConfig",
    "LogitKDConfig",
    "OutputConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "check_resume_config",
    "check_values",
    "choices",
    "dump_config",
    "flatten",
    "from_dict",
    "load_config",
    "override",
    "parse_value",
    "read_config",
    "read_yaml_mapping",
    "register_choices",
    "replace",
    "resize_bounds",
    "to_dict",
    "value_text",
]
