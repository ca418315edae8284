"""The operator: reconcile DiffusionTrainingJobs into gangs of torchrun pods."""
