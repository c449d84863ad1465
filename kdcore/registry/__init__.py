"""The plugin layer: hook specifications, component records, the plugin manager."""
