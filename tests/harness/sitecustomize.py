"""Test harness, imported by every Python process a test starts with this folder on PYTHONPATH.

Switches (environment variables), each only what the test names:
- LORAFORGE_TEST_CPU_FSDP=1: drive accelerate's real FSDP2 path on CPU processes over gloo. accelerate turns
  FSDP on only for GPU-type distributed types (state.py, AcceleratorState.__init__: the branch that sets
  DistributedType.FSDP is inside `elif self.distributed_type in [MULTI_GPU, MULTI_NPU, ...]`, which skips
  MULTI_CPU), so on a CPU the same launch silently runs DDP. Here, after the state is built, a MULTI_CPU state
  that was given an FSDP plugin becomes DistributedType.FSDP with that plugin — from there everything
  (Trainer's FSDP branches, `fsdp2_prepare_model`, `fully_shard` on a CPU mesh, saving, resume) is the
  library code a GPU run executes. What differs from a GPU: the device (cpu) and the backend (gloo).
- LORAFORGE_TEST_NAN_AT_STEP=N: the loss of optimizer step N (1-based) is multiplied by NaN on every rank, in
  the trainer's `compute_loss` (training only), so the gradients of that step are NaN (what a diverging run
  produces): nan_trainer.py, the one NaN trainer the in-process tests use too.
"""

import os

if os.environ.get("LORAFORGE_TEST_CPU_FSDP") == "1":
    import accelerate.state as _state

    _orig_init = _state.AcceleratorState.__init__

    def _init(self, *args, fsdp_plugin=None, **kwargs):
        _orig_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == _state.DistributedType.MULTI_CPU:
            self.distributed_type = _state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    _state.AcceleratorState.__init__ = _init

if os.environ.get("LORAFORGE_TEST_NAN_AT_STEP"):
    from loraforge.run import session as _session

    _libraries = _session.training_libraries

    def _nan_libraries():  # the trainer (heavy: trl) loads where loraforge loads it, not in every process
        libs = _libraries()
        from nan_trainer import nan_at  # this folder

        libs.trainer.LoraTrainer = nan_at(int(os.environ["LORAFORGE_TEST_NAN_AT_STEP"]))
        return libs

    _session.training_libraries = _nan_libraries
