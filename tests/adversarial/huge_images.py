"""Bombs the parent: returns 3000x3000 images for a 16x16 job. They compress to a few KB each as
PNG but would take 27 MB each decoded (a few hundred MB in float64 metrics). The parent reads the
size from each PNG's IHDR chunk on the stream and rejects the result before decoding anything.

expect: status bad_result: more than the 1024 this job allows
"""
from PIL import Image


def generate(pipe, batch):
    return [Image.new("RGB", (3000, 3000), (i * 40 % 256, 80, 160)) for i in range(len(batch["seeds"]))]
