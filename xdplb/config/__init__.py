"""pool.yaml: schema, loading and error messages that name file, line and field."""

from xdplb.config.errors import ConfigError, ConfigProblem
from xdplb.config.loader import check_backends_not_local, load_config, parse_config
from xdplb.config.schema import Backend, Config, Flows, HealthCheck, Maglev, Vip

__all__ = ["Backend", "Config", "ConfigError", "ConfigProblem", "Flows", "HealthCheck", "Maglev",
           "Vip", "check_backends_not_local", "load_config", "parse_config"]
