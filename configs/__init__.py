"""Run configs: `base.get_config()` holds every field; each variant changes only
what differs. Installed with the package, so `--config=configs/flickr.py`
loads from any directory."""
