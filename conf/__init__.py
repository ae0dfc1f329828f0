"""The run configs, installed as the package ``mbs.conf`` (pyproject.toml) so that Hydra finds them with the search path
``pkg://mbs.conf`` in a wheel install too; Hydra only reads a config package that has this file."""
