"""The embedded demo: a toy world of rendered shapes (world.py, world.yaml), the pretraining of its
three base models (pretrain.py: a tiny CLIP; pretrain_cross.py: a ViLT-like cross-encoder;
pretrain_caption.py: a CoCa-like captioner), their backends (models.py, vilt.py, found through the
registry of ktpipe.models) and the base models shipped pretrained (shipped.py, base_models/).

Nothing of the method (ktpipe.transfer) or the evaluation (ktpipe.eval) imports this package; it
is what lets `dvc repro` run offline on a CPU in minutes.
"""
