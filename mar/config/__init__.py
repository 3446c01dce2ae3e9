"""Typed, strict configuration: ``loader`` reads YAML into dataclasses, ``schema`` holds the sections."""
from mar.config.loader import (ConfigError, config_from_dict, config_to_dict, load_config, parse_override,
                               read_yaml, save_config)
from mar.config.schema import (PRECISIONS, DataConfig, ModelConfig, OptimConfig, RunConfig, SampleConfig,
                               SamplingOptions, TokenizerConfig, TrainConfig, effective_lr, precision_of)

__all__ = ["PRECISIONS", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "SampleConfig",
           "SamplingOptions", "TokenizerConfig", "TrainConfig", "config_from_dict", "config_to_dict", "effective_lr",
           "load_config", "parse_override", "precision_of", "read_yaml", "save_config"]
