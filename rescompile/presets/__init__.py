"""Shipped spec presets (TOML), found by rescompile.spec.preset(); examples/ holds copies."""
