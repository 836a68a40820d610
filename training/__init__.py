"""The training library, above data.py: flags (config), process groups, checkpoints, tracking, models and
LoRA, scoring, metrics and the model card; train.py, evaluate.py and export.py lean on it."""
