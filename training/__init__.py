"""Accelerate training scripts for UniMedI (pretraining; linear probe and fine-tuning to follow)."""
