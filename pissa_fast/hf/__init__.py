"""transformers-side knowledge: a checkpoint on disk (checkpoint.py), the model class it was saved from
built on the meta device (skeleton.py) and the weights that target_modules selects (targets.py).
transformers and peft are imported inside the functions that need them, never at import time."""
