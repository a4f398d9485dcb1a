"""The one typed configuration: YAML files -> `--set key=value` overrides -> driver -> workers -> checkpoints.

    from pipeline.config import load_config
    config = load_config([Path("jobs/configs/default.yaml")], ["optim.lr=0.2"])

By idea: `schema` (the sections, their defaults and checks), `loading` (YAML merging, overrides, configs saved by
older versions), `environment` (what a run needs from where it runs: shards on disk, paths outside a Ray job's
copy). Model facts live in the model table, `pipeline.architectures`. Everything public is importable from here.
"""

from pipeline.config.environment import (
    RAY_JOB_COPY_HINT,
    RAY_WORKING_DIR_MARK,
    WORKER_GROUP_START_TIMEOUT_S,
    refuse_job_copy,
    require_shards,
)
from pipeline.config.loading import (
    DEFAULT_CONFIG,
    PROJECT_ROOT,
    load_config,
    set_key,
    validate_config,
    validate_saved_config,
    with_overrides,
    with_text_overrides,
)
from pipeline.config.schema import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PIL_MAX_IMAGE_PIXELS,
    RUN_NAME,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RetrievalConfig,
    ScalingConfig,
    SearchConfig,
    SearchSpaceParam,
    TrackingConfig,
)
from pipeline.errors import ConfigError  # raised by everything here: callers catch it from the same import

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "PIL_MAX_IMAGE_PIXELS",
    "PROJECT_ROOT",
    "RAY_JOB_COPY_HINT",
    "RAY_WORKING_DIR_MARK",
    "RUN_NAME",
    "WORKER_GROUP_START_TIMEOUT_S",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RetrievalConfig",
    "ScalingConfig",
    "SearchConfig",
    "SearchSpaceParam",
    "TrackingConfig",
    "load_config",
    "refuse_job_copy",
    "require_shards",
    "set_key",
    "validate_config",
    "validate_saved_config",
    "with_overrides",
    "with_text_overrides",
]
