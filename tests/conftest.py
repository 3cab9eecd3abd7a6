"""Test-session settings: the tests use tiny models, for which one intra-op thread is fastest
and immune to oversubscription when other processes share the two cores."""
import torch

torch.set_num_threads(1)
