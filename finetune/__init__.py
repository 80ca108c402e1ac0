"""VG-LAW grounding fine-tuning with Mask Grounding; evaluation and prediction on the RefCOCO family."""
