"""Red team round 20, F4: the class of scheduler the task asks for, configured otherwise (Karras
sigmas and a third solver order: another sampler). Its process reports the class asked, and the
images moved by 0.0097 against L_gold's bound of 0.04, so it passed.

This module is appended to the gold code of a DPMSolverMultistepScheduler task.

expect with replay: key_attribute (the steps the replay shows are not the task's scheduler's, updates.StepCheck)
"""
_gold_load_pipeline = load_pipeline  # noqa: F821 - the gold code's, above


def load_pipeline(device, dtype):
    pipe = _gold_load_pipeline(device, dtype)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_karras_sigmas=True, solver_order=3)
    return pipe
