"""Runs out of GPU memory (simulated on a CPU: the error torch raises). A failure of this candidate
only: its process ends, and the next candidate starts in a fresh one (see
test_a_failing_candidate_does_not_poison_the_next_one).

expect: error OutOfMemoryError in generate: CUDA out of memory
"""


def generate(pipe, batch):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
