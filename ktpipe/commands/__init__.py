"""The `ktpipe` commands that are not pipeline stages (experiments, preset, ship_base_models), one
module each exposing a click `command`; the stages are in the top-level `stages/` folder."""
