"""The pipeline's stages: one module per DVC stage, the command `dvc.yaml` runs
(`python -m stages.<stage> ...`), each a thin shell over one function of the `ktpipe` library.

Every module exposes a click `command`; `stages/cli.py` gathers them, with the commands of
`ktpipe.commands`, into the `ktpipe` console script. The library never imports this folder.
"""
