"""Configs of the hybrid families (one module per family: `wmjax.configs.cheems`, ...). Doge's config is
`wmjax.config.DogeConfig`. Every config is a frozen, validated dataclass with the family contract's methods
(replace, from_dict, to_dict, preset, from_upstream_dict, to_upstream_dict); errors are `wmjax.config.ConfigError`.
"""
